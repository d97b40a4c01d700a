#!/usr/bin/env python3
"""PyTorch side of the benchmark comparison: the reference MoE layers and DiTs timed (eager).

    /usr/bin/python3 bench/torch_bench.py [--device cpu|cuda] [--threads 2] [--reps 5]
                                          [--tokens 1024,4096,16384] [--cases moe,dit,sample,gemm]
                                          [--dit-presets mini-28,mini-32] [--out FILE.json]

Models are the parity references, imported unchanged: ``tests/parity/moe_reference.py``
(``ProMoEBlock``, ``LinearTopKBlock``: a Python loop over experts with gather + ``index_add``)
and ``tests/parity/dit_reference.py`` (``DiT``). float32, ``torch.manual_seed(0)``.

How a timing is taken: one untimed warm-up call, then ``--reps`` timed calls, each timed with
``time.perf_counter`` (on ``--device cuda`` after ``torch.cuda.synchronize()``, so the time
is the device's); the median is reported in ms. ``--threads`` sets
``torch.set_num_threads`` and, before torch is imported, ``OMP_NUM_THREADS``,
``OPENBLAS_NUM_THREADS`` and ``MKL_NUM_THREADS`` (OpenBLAS ignores ``set_num_threads``), and
``OMP_WAIT_POLICY=PASSIVE`` unless already set: Debian's torch runs its own kernels on
libgomp threads and its GEMMs on OpenBLAS's pthreads, and libgomp threads spinning after a
parallel region starve the OpenBLAS threads (2-8x slower cases on 2 shared cores).

Cases (the names are a contract with the C++ ``promoe_bench``):

* ``moe.promoe_s.t{N}.fwd`` / ``.fwdbwd``: the ProMoE-S layer, D 384, 12 routed GELU-tanh
  experts of width 768, 1 unconditional and 1 shared expert (width 768), top-1 cosine-to-
  prototype router (identity gate, as in the paper), routing contrastive loss (lambda 1).
  Input x [N, 384] ~ N(0, 1) viewed as N/256 samples of 256 tokens; labels uniform in 0..9,
  with max(1, round(0.1 * samples)) samples set to the null label 10 (unconditional expert).
* ``moe.top2_e8.t{N}.fwd`` / ``.fwdbwd``: linear softmax router, top-2, renormalised gates,
  8 experts of width 1536, no shared expert, load-balance loss (weight 0.01).

  ``fwd`` is the training forward (``training=True``, autograd graph recorded, aux loss
  computed); ``fwdbwd`` is that forward, then ``((out * dy).sum() + aux).backward()`` with
  dy ~ N(0, 1), giving the parameter and input gradients (accumulated across calls, as
  the C++ layer accumulates). ``flops`` counts only the GEMMs: 4 * rows * D * H per expert
  MLP application (rows routed to it; unconditional and shared experts included) plus
  2 * rows * D * E for the router GEMM, rows = the tokens that are actually routed (the
  conditional ones for ProMoE); fwdbwd counts 3x fwd. ``router_ms`` (fwd rows only) times
  the routing alone (null-label mask, scores, top-k) under ``torch.no_grad``.
* ``dit.<preset>.{dense,promoe}.train_step`` (``--dit-presets``, default mini-28 and mini-32):
  batch 64; mini-28 = 28x28x1, patch 4, D 96, mini-32 = 32x32x3, patch 4, D 128; both depth 6,
  4 heads, mlp_ratio 4, 10 classes, learn_sigma off; S = DiT-S/2 on 32x32x4 latents (depth 12,
  D 384, 6 heads, 1000 classes, learn_sigma on: the loss takes the first 4 output channels). ``promoe`` puts a ProMoE MLP in blocks 1, 3, 5 (4 routed experts of width
  2D, 1 unconditional, 1 shared, top-1 prototypical router, RCL). One step: x0 ~ N(0, 1),
  labels uniform in 0..9 with 10 % dropped to the null label, t ~ U(0, 1) per sample,
  x_t = (1 - t) x0 + t e, target e - x0, ``model(x_t, 1000 t, labels)``, mse + aux losses,
  backward, ``clip_grad_norm_(0.5)``, AdamW (lr 1e-3, weight decay 0) step,
  ``zero_grad(set_to_none=False)``. ``images_per_s`` = 64 / step time.
* ``gemm.sgemm.n2048`` / ``gemm.sgemm.moe_up``: ``torch.mm`` of 2048^3 and of the MoE
  layers' up-projection shape (4096 x 384 by 384 x 1536): the GEMM rate of the BLAS torch runs
  on, which bounds every PyTorch case above (no speed-up claim is larger than what that rate
  leaves).
* ``sample.mini-28.{dense,promoe}``: 64 images, 10 Euler steps of rectified flow from t = 1 to
  0 with classifier-free guidance 2 (conditional and null-label passes as one batch of 128,
  ``model.eval()``, ``torch.no_grad``); the time is the whole sampling loop.

JSON written to ``--out`` (FILE.tmp, then ``os.replace``)::

    {"tool": "torch_bench", "torch_version": str, "device": str, "threads": int, "blas": str, "reps": int,
     "cases": [{"name": str, "median_ms": float, "flops": float|null, "gflops": float|null,
                "images_per_s": float|null, "router_ms": float|null}]}
"""

import argparse
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
PARITY_DIR = os.path.join(HERE, os.pardir, "tests", "parity")
sys.dont_write_bytecode = True  # keep the source tree free of __pycache__

TOKENS_PER_SAMPLE = 256
NUM_CLASSES = 10  # null label = NUM_CLASSES
NULL_FRACTION = 0.1
DIT_BATCH = 64
SAMPLE_STEPS = 10
CFG_SCALE = 2.0

# MoE layer cases: moe_reference.default_config overrides.
MOE_LAYERS = {
    "promoe_s": dict(router="prototypical", hidden_size=384, num_routed_experts=12, moe_intermediate_size=768,
                     use_uncond_expert=True, use_shared_expert=True, shared_expert_intermediate_size=768,
                     top_k=1, router_weight_mode="identity", routing_contrastive_lam=1.0),
    "top2_e8": dict(router="linear", hidden_size=384, num_routed_experts=8, moe_intermediate_size=1536,
                    use_uncond_expert=False, use_shared_expert=False, shared_expert_intermediate_size=0,
                    top_k=2, router_weight_mode="softmax", norm_topk_prob=True, load_balance_loss_coef=0.01),
}
# DiT presets: dit_reference.dit_config overrides (the C++ dit::preset values).
DIT_PRESETS = {
    "mini-28": dict(input_size=28, patch_size=4, in_channels=1, hidden_size=96, depth=6, num_heads=4,
                    num_classes=NUM_CLASSES, learn_sigma=False),
    "mini-32": dict(input_size=32, patch_size=4, in_channels=3, hidden_size=128, depth=6, num_heads=4,
                    num_classes=NUM_CLASSES, learn_sigma=False),
    "S": dict(input_size=32, patch_size=2, in_channels=4, hidden_size=384, depth=12, num_heads=6,
              num_classes=1000, learn_sigma=True),
}
DEFAULT_DIT_PRESETS = ["mini-28", "mini-32"]
SAMPLE_PRESETS = ["mini-28"]
DIT_MLPS = ["dense", "promoe"]

torch = F = moe_ref = dit_ref = None  # bound by load_torch()
DEVICE = "cpu"  # set from --device


def load_torch(threads):
    """Fixes the thread counts and OpenMP wait policy (read when the libraries load), then
    imports torch and the parity references."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see the module docstring
    global torch, F, moe_ref, dit_ref
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, PARITY_DIR)
    import moe_reference as moe_ref
    import dit_reference as dit_ref
    torch.set_num_threads(threads)
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)


def sync():
    """Waits for the device's queued work (CUDA launches are asynchronous)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, reps):
    """One untimed warm-up call, then the median of `reps` timed calls, in ms."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def blas_info():
    """BLAS_INFO of torch's build config plus the BLAS library actually loaded (best effort)."""
    m = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    info = m.group(1) if m else "unknown"
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({os.path.basename(l.split()[-1]) for l in f
                           if re.search(r"openblas|mkl_|libblis|libblas", l.split()[-1])})
    except OSError:
        libs = []
    return "%s (%s)" % (info, ", ".join(libs)) if libs else info


@dataclass
class Case:
    name: str
    run: Callable[[], None]
    flops: Optional[float] = None
    images: Optional[int] = None
    router: Optional[Callable[[], None]] = None


# ---------------------------------------------------------------------------------------- MoE
def null_labelled(labels):
    """Sets max(1, round(NULL_FRACTION * B)) randomly chosen samples to the null label."""
    b = labels.shape[0]
    n_null = max(1, round(NULL_FRACTION * b))
    labels[torch.randperm(b, device=labels.device)[:n_null]] = NUM_CLASSES
    return labels


def moe_fwd_flops(block, h, labels):
    """GEMM FLOPs of one forward: expert MLPs on the rows they get, the router on the rows it scores."""
    cfg = block.cfg
    n, d = h.shape[0] * h.shape[1], cfg["hidden_size"]
    routed = n
    if isinstance(block, moe_ref.ProMoEBlock):
        routed = int(block.conditional_mask(labels, h.shape[1]).sum())
    f = 4.0 * d * cfg["moe_intermediate_size"] * (routed * cfg["top_k"] + (n - routed))  # routed + uncond
    f += 2.0 * routed * d * cfg["num_routed_experts"]
    si = cfg["shared_expert_intermediate_size"]
    if isinstance(block, moe_ref.ProMoEBlock) and block.shared_expert is not None:
        f += 4.0 * n * d * si  # GELU MLP
    elif isinstance(block, moe_ref.LinearTopKBlock) and block.shared_experts is not None:
        f += 6.0 * n * d * si  # SwiGLU: gate, up, down
    return f


def moe_layer_cases(layer, n):
    """The fwd and fwdbwd cases of one MoE layer at n tokens (one block, input and dy shared)."""
    overrides = MOE_LAYERS[layer]
    block = moe_ref.build_block(moe_ref.default_config(dtype="float32", **overrides)).float().to(DEVICE)
    d, b = overrides["hidden_size"], n // TOKENS_PER_SAMPLE
    x = torch.randn(b, TOKENS_PER_SAMPLE, d, device=DEVICE, requires_grad=True)
    dy = torch.randn(b, TOKENS_PER_SAMPLE, d, device=DEVICE)
    labels = null_labelled(torch.randint(0, NUM_CLASSES, (b,), device=DEVICE))

    def fwd():
        return block(x, labels, True)

    def fwdbwd():
        out, aux = fwd()
        ((out * dy).sum() + aux).backward()

    @torch.no_grad()
    def route():
        flat = x.reshape(n, d)
        if isinstance(block, moe_ref.ProMoEBlock):
            flat = flat[block.conditional_mask(labels, TOKENS_PER_SAMPLE)]
        block.route(flat)

    f = moe_fwd_flops(block, x, labels)
    base = "moe.%s.t%d." % (layer, n)
    return [Case(base + "fwd", fwd, flops=f, router=route), Case(base + "fwdbwd", fwdbwd, flops=3 * f)]


# --------------------------------------------------------------------------------------- GEMM
def gemm_cases(args):
    """torch.mm on the BLAS torch uses: the rate any PyTorch layer here is bounded by. A large
    square product, and the up-projection shape of the MoE layers (4096 rows, 384 -> 1536)."""
    for name, (m, k, n) in (("sgemm.n2048", (2048, 2048, 2048)), ("sgemm.moe_up", (4096, 384, 1536))):
        a = torch.randn(m, k, device=DEVICE)
        b = torch.randn(k, n, device=DEVICE)
        out = torch.empty(m, n, device=DEVICE)
        yield Case("gemm." + name, lambda a=a, b=b, out=out: torch.mm(a, b, out=out), flops=2.0 * m * n * k)


# ---------------------------------------------------------------------------------------- DiT
def build_dit(preset, mlp):
    moe = None
    if mlp == "promoe":
        d = DIT_PRESETS[preset]["hidden_size"]
        moe = moe_ref.default_config(
            router="prototypical", num_routed_experts=4, moe_intermediate_size=2 * d,
            use_uncond_expert=True, use_shared_expert=True, shared_expert_intermediate_size=2 * d,
            top_k=1, router_weight_mode="identity", routing_contrastive_lam=1.0, null_label=NUM_CLASSES,
            dtype="float32")
    cfg = dit_ref.dit_config(mlp_ratio=4.0, interleave=True, moe=moe, dtype="float32", **DIT_PRESETS[preset])
    return dit_ref.DiT(cfg).to(torch.float32).to(DEVICE)  # pos_embed comes as float64


def image_shape(preset):
    p = DIT_PRESETS[preset]
    return (p["in_channels"], p["input_size"], p["input_size"])


def dit_train_case(preset, mlp):
    model = build_dit(preset, mlp).train()
    params = [p for _, p in model.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    shape = (DIT_BATCH,) + image_shape(preset)
    null = DIT_PRESETS[preset]["num_classes"]

    def step():
        x0 = torch.randn(shape, device=DEVICE)
        y = torch.randint(0, NUM_CLASSES, (DIT_BATCH,), device=DEVICE)
        y = torch.where(torch.rand(DIT_BATCH, device=DEVICE) < NULL_FRACTION, torch.full_like(y, null), y)
        t = torch.rand(DIT_BATCH, device=DEVICE)
        e = torch.randn(shape, device=DEVICE)
        tb = t.view(-1, 1, 1, 1)
        out, aux = model((1 - tb) * x0 + tb * e, t * 1000, y, True)
        loss = F.mse_loss(out[:, :shape[1]], e - x0) + aux  # learn_sigma: the first C channels
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        opt.zero_grad(set_to_none=False)

    return Case("dit.%s.%s.train_step" % (preset, mlp), step, images=DIT_BATCH)


def sample_case(preset, mlp):
    model = build_dit(preset, mlp).eval()
    shape = (DIT_BATCH,) + image_shape(preset)

    null = DIT_PRESETS[preset]["num_classes"]

    @torch.no_grad()
    def sample():
        x = torch.randn(shape, device=DEVICE)
        y = torch.randint(0, NUM_CLASSES, (DIT_BATCH,), device=DEVICE)
        y2 = torch.cat([y, torch.full_like(y, null)])  # conditional, then null-label half
        sigmas = torch.linspace(1.0, 0.0, SAMPLE_STEPS + 1).tolist()
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            out, _ = model(torch.cat([x, x]), torch.full((2 * DIT_BATCH,), 1000.0 * s, device=DEVICE), y2, False)
            cond, uncond = out[:, :shape[1]].chunk(2)  # learn_sigma: the first C channels
            x = x + (s_next - s) * (uncond + CFG_SCALE * (cond - uncond))
        return x

    return Case("sample.%s.%s" % (preset, mlp), sample, images=DIT_BATCH)


# The case table: family -> generator of cases. Generators, so that each model is built just
# before it is timed and dropped after.
CASE_FAMILIES = {
    "moe": lambda args: (c for n in args.tokens for layer in MOE_LAYERS for c in moe_layer_cases(layer, n)),
    "dit": lambda args: (dit_train_case(p, mlp) for p in args.dit_presets for mlp in DIT_MLPS),
    "sample": lambda args: (sample_case(p, mlp) for p in SAMPLE_PRESETS for mlp in DIT_MLPS),
    "gemm": gemm_cases,
}


# ---------------------------------------------------------------------------------------- main
def token_count(s):
    n = int(s)
    if n < TOKENS_PER_SAMPLE or n % TOKENS_PER_SAMPLE:
        raise ValueError("token count %s is not a positive multiple of %d" % (s, TOKENS_PER_SAMPLE))
    return n


def dit_preset(s):
    if s not in DIT_PRESETS:
        raise ValueError("unknown DiT preset %r (choose from %s)" % (s, ",".join(DIT_PRESETS)))
    return s


def case_family(s):
    if s not in CASE_FAMILIES:
        raise ValueError("unknown case family %r (choose from %s)" % (s, ",".join(CASE_FAMILIES)))
    return s


def csv_list(item):
    """argparse type: a comma-separated list, each item parsed by `item`."""
    def parse(s):
        try:
            return [item(v.strip()) for v in s.split(",")]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e))
    return parse


def fmt(value, spec):
    return spec % value if value is not None else "-"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch / BLAS threads (default 2)")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per case after 1 warm-up (default 5)")
    ap.add_argument("--tokens", type=csv_list(token_count), default=[1024, 4096, 16384],
                    help="MoE layer token counts, multiples of 256 (default 1024,4096,16384)")
    ap.add_argument("--cases", type=csv_list(case_family), default=list(CASE_FAMILIES),
                    help="case families to run (default moe,dit,sample,gemm)")
    ap.add_argument("--dit-presets", type=csv_list(dit_preset), default=DEFAULT_DIT_PRESETS,
                    help="DiT presets of the training-step cases (default mini-28,mini-32; also S)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where torch runs (default cpu)")
    ap.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.reps < 1:
        ap.error("--threads and --reps must be positive")
    return args


def main(argv=None):
    global DEVICE
    args = parse_args(argv)
    load_torch(args.threads)
    DEVICE = args.device
    if DEVICE == "cuda":
        if not torch.cuda.is_available():
            sys.exit("torch_bench: --device cuda, but this torch sees no CUDA device")
        blas = "cuBLAS (%s)" % torch.cuda.get_device_name()
    else:
        blas = blas_info()
    report = {"tool": "torch_bench", "torch_version": torch.__version__, "device": DEVICE, "threads": args.threads,
              "blas": blas, "reps": args.reps, "cases": []}
    print("torch_bench: torch %s on %s, float32, %d thread(s), BLAS %s, median of %d after 1 warm-up"
          % (report["torch_version"], DEVICE, args.threads, report["blas"], args.reps))
    print("%-34s %11s %9s %9s %10s" % ("case", "ms", "GFLOP/s", "images/s", "router ms"))
    for family in args.cases:
        for case in CASE_FAMILIES[family](args):
            ms = median_ms(case.run, args.reps)
            row = {"name": case.name, "median_ms": ms, "flops": case.flops,
                   "gflops": case.flops / ms * 1e-6 if case.flops else None,
                   "images_per_s": case.images / ms * 1e3 if case.images else None,
                   "router_ms": median_ms(case.router, args.reps) if case.router else None}
            report["cases"].append(row)
            print("%-34s %11.2f %9s %9s %10s" % (case.name, ms, fmt(row["gflops"], "%.1f"),
                                                 fmt(row["images_per_s"], "%.1f"), fmt(row["router_ms"], "%.2f")),
                  flush=True)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
