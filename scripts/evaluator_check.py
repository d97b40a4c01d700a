#!/usr/bin/env python3
"""Checks that promoe-evaluate's FD behaves: one random half of the Fashion-MNIST test set
scored against the other half (FD near 0) and uniform noise scored against the test set (FD
large). Writes the two halves and the noise as .npz files into OUT and prints a table.

    scripts/evaluator_check.py --evaluate build/tools/promoe-evaluate --classifier C.safetensors
                               [--data /usr/share/datasets/fashion-mnist] [--out evaluator-check]
                               [--seed 0]
"""
import argparse
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def read_idx(path):
    """An IDX file (plain or .gz) as a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def find(data, stem):
    for name in (stem, stem + ".gz"):
        if (data / name).exists():
            return data / name
    sys.exit(f"evaluator_check: no {stem}[.gz] in {data}")


def save(path, images, labels):
    np.savez(path, arr_0=images[..., None].astype(np.uint8), labels=labels.astype(np.int64))


def score(args, samples, reference=None):
    out = Path(str(samples) + ".json")
    cmd = [args.evaluate, "--classifier", args.classifier, "--data", str(args.data), "--samples", str(samples),
           "--json", str(out)]
    if reference:
        cmd += ["--reference", str(reference)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--evaluate", required=True, help="the promoe-evaluate program")
    ap.add_argument("--classifier", required=True, help="its cached classifier (trained when missing)")
    ap.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--out", type=Path, default=Path("evaluator-check"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    images = read_idx(find(args.data, "t10k-images-idx3-ubyte"))
    labels = read_idx(find(args.data, "t10k-labels-idx1-ubyte"))
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(images))
    half = len(images) // 2
    a, b = args.out / "test-half-a.npz", args.out / "test-half-b.npz"
    save(a, images[order[:half]], labels[order[:half]])
    save(b, images[order[half:]], labels[order[half:]])
    noise = args.out / "noise.npz"
    save(noise, rng.integers(0, 256, size=(half, 28, 28)), rng.integers(0, 10, size=half))

    rows = [("one half of the test set vs the other", score(args, a, b)),
            ("uniform noise vs the test set", score(args, noise))]
    print("| samples | n | FD | accuracy | precision | recall |")
    print("|---|---|---|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s['n']} | {s['fd']:.2f} | {s['accuracy']:.3f} | {s['precision']:.3f} | {s['recall']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
