#!/usr/bin/env python3
"""Compare the C++ tool's output with the PyTorch reference.

    python3 compare.py --expected E.safetensors --actual A.safetensors --dtype float64|float32

For every tensor in the expected file: it must exist in the actual file with the same shape;
relative error max|a - e| / max(max|e|, tiny) <= 1e-10 (float64) or 1e-4 (float32); where the
expected tensor is all zero (e.g. the gradient of an expert that got no token) the actual one
must be <= 1e-12 (float64) or 1e-6 (float32) in absolute value. Non-finite values fail.
Extra tensors in the actual file are ignored (counted in the summary).
"""

import argparse
import os
import sys

import torch

sys.dont_write_bytecode = True  # keep the source tree free of __pycache__
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io as st  # noqa: E402

TOL = {"float64": (1e-10, 1e-12), "float32": (1e-4, 1e-6)}  # (relative, absolute-for-zero)
TINY = 1e-300


def compare(expected, actual, dtype):
    """Return (list of failure lines, number of tensors checked, worst relative error, name)."""
    rel_tol, zero_tol = TOL[dtype]
    fails = []
    worst, worst_name = 0.0, ""
    for name in sorted(expected):
        e = expected[name]
        if name not in actual:
            fails.append("%s: missing from actual" % name)
            continue
        a = actual[name]
        if tuple(a.shape) != tuple(e.shape):
            fails.append("%s: shape %s, expected %s" % (name, list(a.shape), list(e.shape)))
            continue
        e64 = e.to(torch.float64)
        a64 = a.to(torch.float64)
        if not bool(torch.isfinite(a64).all()):
            fails.append("%s: non-finite values in actual" % name)
            continue
        if e64.numel() == 0:
            continue
        emax = float(e64.abs().max())
        diff = float((a64 - e64).abs().max())
        if emax == 0.0:
            if diff > zero_tol:
                fails.append("%s: expected all zero, max|actual| = %.3e > %.0e" % (name, diff, zero_tol))
            continue
        rel = diff / max(emax, TINY)
        if rel > worst:
            worst, worst_name = rel, name
        if rel > rel_tol:
            idx = int((a64 - e64).abs().argmax())
            fails.append("%s: rel err %.3e > %.0e (max|a-e| = %.3e, max|e| = %.3e; worst at flat "
                         "index %d: actual %.17g, expected %.17g)"
                         % (name, rel, rel_tol, diff, emax, idx, float(a64.reshape(-1)[idx]),
                            float(e64.reshape(-1)[idx])))
    return fails, len(expected), worst, worst_name


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--expected", required=True)
    ap.add_argument("--actual", required=True)
    ap.add_argument("--dtype", required=True, choices=sorted(TOL))
    args = ap.parse_args()
    expected = st.load(args.expected)
    actual = st.load(args.actual)
    fails, n, worst, worst_name = compare(expected, actual, args.dtype)
    for line in fails:
        print("FAIL " + line)
    extra = len(set(actual) - set(expected))
    if fails:
        print("%d of %d tensors failed (%s)" % (len(fails), n, args.dtype))
        return 1
    print("ok: %d tensors within tolerance (%s); worst rel err %.3e (%s)%s"
          % (n, args.dtype, worst, worst_name or "-",
             "; %d extra tensors ignored" % extra if extra else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
