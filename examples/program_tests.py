#!/usr/bin/env python3
"""Program-level tests of train_dit and sample_dit (Python standard library only).

  program_tests.py errors --train BIN --sample BIN --work DIR
      Bad input to the programs -- unknown preset or MLP kind, missing or malformed data
      (truncated gzip IDX, bad IDX magic, a corrupt PNG in an image folder, latents of the
      wrong shape), corrupt or truncated checkpoints, a checkpoint of another config, a new run
      over an existing checkpoint, bad sample labels -- must end with exit status 1 and a
      message naming the problem, and must leave every file in the run folder as it was.

  program_tests.py data --train BIN --sample BIN --work DIR
      train_dit on an image folder (one sub-folder of PNGs per class) and on latents from a
      safetensors file; sample_dit writes raw samples to a .safetensors file.

  program_tests.py devices --train BIN --sample BIN --work DIR --devices cpu,thrust
      The same ProMoE training run and the same samples on each device (the first is the
      reference): losses within 1e-4 relative, samples within 1e-3, for every step.

  program_tests.py kill --train BIN --sample BIN --work DIR
      SIGKILLs train_dit while it writes a checkpoint (caught by watching for the temporary
      file), checks that the previous checkpoint still loads (sample_dit), resumes the run and
      checks that its final checkpoint equals an uninterrupted run's byte for byte.
"""
import argparse
import glob
import gzip
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

FASHION = "/usr/share/datasets/fashion-mnist"
# A small, quick run of the mini-28 preset.
BASE = ["--batch", "4", "--sample-steps", "1", "--seed", "5"]


def run(cmd, expect_ok=True):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if expect_ok and p.returncode != 0:
        sys.exit(f"FAILED ({p.returncode}): {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return p


def snapshot(folder):
    """{relative path: sha256} of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def write_safetensors(path, tensors):
    """tensors: {name: (dtype, shape, bytes)} -> a safetensors file (header, then data)."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def png_bytes(width, height, gray):
    """A valid 8-bit grayscale PNG."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\0" + bytes([gray]) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def errors(a):
    work = a.work
    run_dir = os.path.join(work, "run")
    ckpt = os.path.join(run_dir, "checkpoint.safetensors")
    run([a.train, *BASE, "--steps", "2", "--checkpoint-every", "1", "--out", run_dir])
    with open(ckpt, "rb") as f:
        good = f.read()

    data = os.path.join(work, "data")
    os.makedirs(data, exist_ok=True)
    # a truncated gzip IDX file, and a plain one with a wrong magic number
    truncated_gz = os.path.join(data, "truncated_gz")
    os.makedirs(truncated_gz, exist_ok=True)
    with open(os.path.join(FASHION, "train-images-idx3-ubyte.gz"), "rb") as f:
        head = f.read(20000)
    with open(os.path.join(truncated_gz, "train-images-idx3-ubyte.gz"), "wb") as f:
        f.write(head)
    shutil.copy(os.path.join(FASHION, "train-labels-idx1-ubyte.gz"), truncated_gz)
    bad_magic = os.path.join(data, "bad_magic")
    os.makedirs(bad_magic, exist_ok=True)
    with open(os.path.join(bad_magic, "train-images-idx3-ubyte"), "wb") as f:
        f.write(struct.pack(">IIII", 0x00000A03, 1, 28, 28) + bytes(784))
    with open(os.path.join(bad_magic, "train-labels-idx1-ubyte"), "wb") as f:
        f.write(struct.pack(">II", 0x00000801, 1) + bytes(1))
    # an image folder with one corrupt PNG
    folder = os.path.join(data, "folder")
    for cls in ("a", "b"):
        os.makedirs(os.path.join(folder, cls), exist_ok=True)
        with open(os.path.join(folder, cls, "0.png"), "wb") as f:
            f.write(png_bytes(28, 28, 100))
    with open(os.path.join(folder, "b", "1.png"), "wb") as f:
        f.write(png_bytes(28, 28, 7)[:-20])
    # latents of the wrong shape for mini-28 (which takes 28x28x1)
    latents = os.path.join(data, "latents.safetensors")
    write_safetensors(latents, {"latents": ("F32", [2, 4, 8, 8], bytes(2 * 4 * 8 * 8 * 4)),
                                "labels": ("I64", [2], struct.pack("<qq", 0, 1))})
    # labels outside the preset's classes
    far_labels = os.path.join(data, "far_labels.safetensors")
    write_safetensors(far_labels, {"latents": ("F32", [2, 1, 28, 28], bytes(2 * 784 * 4)),
                                   "labels": ("I64", [2], struct.pack("<qq", 0, 10))})

    # broken copies of the good run's checkpoint
    def broken_run(name, content):
        folder = os.path.join(work, name)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        with open(os.path.join(folder, "checkpoint.safetensors"), "wb") as f:
            f.write(content)
        return folder

    flipped = bytearray(good)
    flipped[20] ^= 0x5A  # inside the JSON header
    truncated_run = broken_run("truncated", good[: len(good) // 2])
    flipped_run = broken_run("flipped", bytes(flipped))
    short_run = broken_run("short", good[:5])

    train = [a.train, *BASE, "--steps", "4"]
    cases = [
        ("unknown preset", run_dir, [*train, "--out", run_dir, "--resume", "--preset", "tiny"],
         ["unknown DiT preset 'tiny'"]),
        ("unknown MLP kind", run_dir, [*train, "--out", run_dir, "--resume", "--mlp", "soft"],
         ["unknown MLP kind 'soft'"]),
        ("unknown matmul precision", run_dir, [*train, "--out", run_dir, "--resume", "--matmul-precision", "fp8"],
         ["matmul precision 'fp8'", "highest, bf16"]),
        ("missing data", run_dir, [*train, "--out", run_dir, "--resume", "--data", os.path.join(work, "nothing")],
         ["nothing", "no such file or folder"]),
        ("truncated gzip IDX", run_dir, [*train, "--out", run_dir, "--resume", "--data", truncated_gz],
         ["train-images-idx3-ubyte.gz", "truncated"]),
        ("bad IDX magic", run_dir, [*train, "--out", run_dir, "--resume", "--data", bad_magic],
         ["train-images-idx3-ubyte", "magic"]),
        ("corrupt PNG in an image folder", run_dir, [*train, "--out", run_dir, "--resume", "--data", folder],
         [os.path.join("b", "1.png")]),
        ("latents of another shape", run_dir, [*train, "--out", run_dir, "--resume", "--data", latents],
         ["latents.safetensors", "8x8x4", "28x28x1"]),
        ("labels outside the classes", run_dir, [*train, "--out", run_dir, "--resume", "--data", far_labels],
         ["far_labels.safetensors", "label 10 of sample 1"]),
        ("new run over a checkpoint", run_dir, [*train, "--out", run_dir], ["exists", "--resume", "--overwrite"]),
        ("checkpoint of another config", run_dir, [*train, "--out", run_dir, "--resume", "--mlp", "dense"],
         ["checkpoint.safetensors", "config differs at 'mlp'"]),
        ("truncated checkpoint", truncated_run, [*train, "--out", truncated_run, "--resume"],
         ["checkpoint.safetensors", "past the end", "truncated"]),
        ("checkpoint header byte flipped", flipped_run, [*train, "--out", flipped_run, "--resume"],
         ["checkpoint.safetensors"]),
        ("5-byte checkpoint", short_run, [*train, "--out", short_run, "--resume"], ["checkpoint.safetensors"]),
        ("sample_dit: truncated checkpoint", truncated_run,
         [a.sample, "--checkpoint", os.path.join(truncated_run, "checkpoint.safetensors"), "--steps", "1",
          "--out", os.path.join(truncated_run, "s.npz")], ["checkpoint.safetensors", "past the end", "truncated"]),
        ("sample_dit: label outside the classes", run_dir,
         [a.sample, "--checkpoint", ckpt, "--steps", "1", "--labels", "3", "12",
          "--out", os.path.join(run_dir, "s.npz")], ["--labels: 12", "0..9"]),
    ]
    failed = 0
    for name, folder, cmd, needles in cases:
        before = snapshot(folder)
        p = run(cmd, expect_ok=False)
        message = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
        problems = []
        if p.returncode != 1:
            problems.append(f"exit status {p.returncode}, expected 1")
        problems += [f"message lacks '{n}'" for n in needles if n not in message]
        if snapshot(folder) != before:
            problems.append("files in the run folder changed")
        status = "ok  " if not problems else "FAIL"
        print(f"{status} {name}: {message}")
        for q in problems:
            print(f"     {q}")
        failed += bool(problems)
    # Gradients that turn NaN (a learning rate that overflows the weights after one step):
    # clipping counts them on the device, the run stops at the next log line and the
    # checkpoint on disk stays the last one written before them (step 1).
    blowup = os.path.join(work, "blowup")
    shutil.rmtree(blowup, ignore_errors=True)
    p = run([a.train, *BASE, "--steps", "6", "--log-every", "1", "--checkpoint-every", "1", "--lr", "1e30",
             "--warmup", "0", "--out", blowup], expect_ok=False)
    message = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    saved = os.path.join(blowup, "checkpoint.safetensors")
    step = read_safetensors_header(saved).get("__metadata__", {}).get("step") if os.path.exists(saved) else None
    # (builds that check their inputs stop one step earlier, at the NaN in a layer's input)
    if p.returncode != 1 or "NaN" not in message or step != "1":
        print(f"FAIL NaN gradients: exit {p.returncode}, checkpoint step {step}: {message}")
        failed += 1
    else:
        print(f"ok   NaN gradients: {message}")
    if failed:
        sys.exit(f"{failed} of {len(cases) + 1} cases failed")
    print(f"all {len(cases) + 1} bad inputs rejected with a clear message and nothing written over")


def read_safetensors_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def data(a):
    work = a.work
    folder = os.path.join(work, "folder")
    for k in range(10):
        os.makedirs(os.path.join(folder, f"class{k}"))
        for j in range(3):
            with open(os.path.join(folder, f"class{k}", f"{j}.png"), "wb") as f:
                f.write(png_bytes(28, 28, 20 * k + j))
    latents = os.path.join(work, "latents.safetensors")
    n = 12
    values = struct.pack(f"<{n * 784}f", *[((i * 37) % 101) / 50.0 - 1.0 for i in range(n * 784)])
    write_safetensors(latents, {"latents": ("F32", [n, 1, 28, 28], values),
                                "labels": ("I32", [n], struct.pack(f"<{n}i", *[i % 10 for i in range(n)]))})
    for name, source, pictures in (("folder", folder, ["samples.png", "routing.png"]),
                                   ("latents", latents, ["routing.png"])):
        out = os.path.join(work, "run_" + name)
        p = run([a.train, *BASE, "--steps", "2", "--data", source, "--out", out])
        if ("on 30 images" if name == "folder" else f"on {n} latents") not in p.stdout:
            sys.exit(f"train_dit on {name}: unexpected data size in: {p.stdout}")
        for f in ["checkpoint.safetensors", "log.csv", *pictures]:
            if not os.path.exists(os.path.join(out, f)):
                sys.exit(f"train_dit on {name} wrote no {f}")
        print(f"train_dit on {name}: {p.stdout.strip().splitlines()[0]}")
    raw = os.path.join(work, "raw.safetensors")
    run([a.sample, "--checkpoint", os.path.join(work, "run_latents", "checkpoint.safetensors"), "--num-samples", "3",
         "--steps", "1", "--labels", "4", "--out", raw])
    header = read_safetensors_header(raw)
    if header["samples"]["shape"] != [3, 1, 28, 28] or header["labels"]["shape"] != [3]:
        sys.exit(f"sample_dit wrote an unexpected {raw}: {header}")
    print("sample_dit wrote raw samples [3, 1, 28, 28] and labels to a .safetensors file")


def read_safetensors_f32(path, name):
    header = read_safetensors_header(path)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + n + header[name]["data_offsets"][0])
        count = 1
        for d in header[name]["shape"]:
            count *= d
        return struct.unpack(f"<{count}f", f.read(4 * count))


def devices(a):
    names = a.devices.split(",")
    if len(names) < 2:
        sys.exit("--devices needs at least two devices to compare")
    losses, samples = {}, {}
    for dev in names:
        out = os.path.join(a.work, "run_" + dev)
        run([a.train, *BASE, "--device", dev, "--mlp", "promoe", "--steps", "6", "--log-every", "1",
             "--sample-every", "6", "--out", out])
        with open(os.path.join(out, "log.csv")) as f:
            losses[dev] = [float(line.split(",")[1]) for line in f.read().splitlines()[1:]]
        raw = os.path.join(a.work, f"samples_{dev}.safetensors")
        run([a.sample, "--device", dev, "--checkpoint", os.path.join(out, "checkpoint.safetensors"),
             "--num-samples", "4", "--steps", "3", "--cfg-scale", "1.5", "--out", raw])
        samples[dev] = read_safetensors_f32(raw, "samples")
    ref = names[0]
    if len(losses[ref]) != 6:
        sys.exit(f"{ref}: expected 6 logged steps, got {losses[ref]}")
    for dev in names[1:]:
        if len(losses[dev]) != len(losses[ref]):
            sys.exit(f"{dev}: {len(losses[dev])} logged steps, {ref}: {len(losses[ref])}")
        worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(losses[ref], losses[dev]))
        far = max(abs(x - y) for x, y in zip(samples[ref], samples[dev]))
        print(f"{dev} vs {ref}: losses {losses[dev]}, largest relative difference {worst:.3g}; "
              f"samples differ by at most {far:.3g}")
        if worst > 1e-4 or far > 1e-3:
            sys.exit(f"{dev} does not reproduce {ref}: losses {losses[ref]} vs {losses[dev]}, samples {far:.3g}")

    # bf16 GEMMs: the devices agree with each other (to 1e-2, the GPU's limit: on the CPU and
    # the Thrust OpenMP system both round the same operands) and stay near the float32 run.
    # The first steps' loss hardly depends on the GEMMs (DiT starts with a zero output layer);
    # the routing contrastive loss (aux) does, which shows that the bf16 path ran.
    def log_column(out, column):
        with open(os.path.join(out, "log.csv")) as f:
            return [float(line.split(",")[column]) for line in f.read().splitlines()[1:]]

    bf16, aux, aux_bf16 = {}, {}, {}
    for dev in names:
        out = os.path.join(a.work, "run_bf16_" + dev)
        run([a.train, *BASE, "--device", dev, "--mlp", "promoe", "--steps", "6", "--log-every", "1",
             "--sample-every", "6", "--matmul-precision", "bf16", "--out", out])
        bf16[dev], aux_bf16[dev] = log_column(out, 1), log_column(out, 2)
        aux[dev] = log_column(os.path.join(a.work, "run_" + dev), 2)
    for dev in names:
        worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(bf16[ref], bf16[dev]))
        drift = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(losses[dev], bf16[dev]))
        aux_drift = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(aux[dev], aux_bf16[dev]))
        print(f"{dev} with bf16 GEMMs: losses {bf16[dev]}, vs {ref} with bf16 {worst:.3g}, vs float32 {drift:.3g} "
              f"(aux {aux_drift:.3g})")
        if len(bf16[dev]) != 6 or worst > 1e-2 or drift > 5e-2 or not 0 < aux_drift <= 5e-2:
            sys.exit(f"{dev}: bf16 losses {bf16[dev]} aux {aux_bf16[dev]} (float32 {losses[dev]} aux {aux[dev]}, "
                     f"{ref} bf16 {bf16[ref]})")


def kill(a):
    work = a.work
    # 64 routed experts per MoE block make the checkpoint about 110 MB, so its write lasts long
    # enough to be caught; checkpoints every step.
    args = [*BASE, "--experts", "64", "--steps", "4", "--checkpoint-every", "1", "--sample-every", "1000"]
    straight = os.path.join(work, "straight")
    run([a.train, *args, "--out", straight])
    killed = os.path.join(work, "killed")
    ckpt = os.path.join(killed, "checkpoint.safetensors")
    for attempt in range(1, 6):
        shutil.rmtree(killed, ignore_errors=True)
        proc = subprocess.Popen([a.train, *args, "--out", killed], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        caught = False
        while proc.poll() is None:
            # a second checkpoint write under way: the first checkpoint exists, a temp file too
            if os.path.exists(ckpt) and glob.glob(ckpt + ".tmp.*"):
                proc.send_signal(signal.SIGKILL)
                caught = True
                break
            time.sleep(0.0005)
        proc.wait()
        temps = glob.glob(ckpt + ".tmp.*")
        if caught and temps:
            print(f"attempt {attempt}: killed during a checkpoint write "
                  f"({os.path.getsize(temps[0])} bytes of the new file written)")
            break
        print(f"attempt {attempt}: the write finished before the kill landed; again")
    else:
        sys.exit("could not kill train_dit during a checkpoint write in 5 attempts")
    # the previous checkpoint loads
    p = run([a.sample, "--checkpoint", ckpt, "--num-samples", "2", "--steps", "1",
             "--out", os.path.join(work, "after_kill.npz")])
    print("previous checkpoint loads: " + p.stdout.strip())
    # resuming finishes the run exactly as the uninterrupted one
    run([a.train, *args, "--out", killed, "--resume"])
    if glob.glob(ckpt + ".tmp.*"):
        sys.exit("the resumed run left the killed write's temporary file behind")
    with open(ckpt, "rb") as f1, open(os.path.join(straight, "checkpoint.safetensors"), "rb") as f2:
        if f1.read() != f2.read():
            sys.exit("the resumed run's checkpoint differs from the uninterrupted run's")
    print("resumed run ends with the uninterrupted run's checkpoint, byte for byte")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("test", choices=["errors", "data", "devices", "kill"])
    ap.add_argument("--train", required=True)
    ap.add_argument("--sample", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--devices", default="cpu,thrust", help="devices test: the devices to compare, reference first")
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    {"errors": errors, "data": data, "devices": devices, "kill": kill}[a.test](a)


if __name__ == "__main__":
    main()
