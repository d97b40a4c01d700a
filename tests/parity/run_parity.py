#!/usr/bin/env python3
"""End-to-end parity: PyTorch references vs the C++ tool `promoe-parity`.

    python3 run_parity.py [--model moe|dit] --parity PATH/promoe-parity --work DIR [--quick] [--only SUBSTR]

1. writes the cases into DIR (make_cases.py for moe, make_dit_cases.py for dit, run with this
   same Python interpreter);
2. for each case runs
     PATH --model MODEL --config C/config.json --weights C/weights.safetensors
          --inputs C/inputs.safetensors --out C/actual.safetensors
3. compares C/actual.safetensors with C/expected.safetensors (compare.compare, in process).
Prints PASS/FAIL per case; exits 1 if any case fails.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True  # keep the source tree free of __pycache__
sys.path.insert(0, HERE)
import compare  # noqa: E402
import safetensors_io as st  # noqa: E402


def tail(text, n=15):
    lines = text.strip().splitlines()
    return "\n".join("    " + l for l in lines[-n:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["moe", "dit"], default="moe", help="which parity cases to run")
    ap.add_argument("--parity", required=True, help="path to the promoe-parity executable")
    ap.add_argument("--work", required=True, help="directory for the cases and outputs")
    ap.add_argument("--quick", action="store_true", help="only the quick subset of cases")
    ap.add_argument("--only", default=None, help="run only cases whose name contains this")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per tool run")
    args = ap.parse_args()

    maker = "make_cases.py" if args.model == "moe" else "make_dit_cases.py"
    gen = [sys.executable, os.path.join(HERE, maker), "--out", args.work]
    if args.quick:
        gen.append("--quick")
    r = subprocess.run(gen, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    if r.returncode != 0:
        print("%s failed (exit %d):\n%s" % (maker, r.returncode, tail(r.stdout, 40)))
        return 1
    with open(os.path.join(args.work, "cases.txt")) as f:
        cases = [l.strip() for l in f if l.strip()]
    if args.only:
        cases = [c for c in cases if args.only in c]
    if not cases:
        print("no cases selected")
        return 1

    t0 = time.time()
    failed = []
    for name in cases:
        c = os.path.join(args.work, name)
        actual = os.path.join(c, "actual.safetensors")
        if os.path.exists(actual):
            os.remove(actual)
        with open(os.path.join(c, "config.json")) as f:
            dtype = json.load(f)["dtype"]
        cmd = [args.parity, "--model", args.model,
               "--config", os.path.join(c, "config.json"),
               "--weights", os.path.join(c, "weights.safetensors"),
               "--inputs", os.path.join(c, "inputs.safetensors"),
               "--out", actual]
        try:
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               universal_newlines=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print("FAIL %s: tool timed out after %.0f s" % (name, args.timeout))
            failed.append(name)
            continue
        except OSError as e:
            print("FAIL %s: cannot run %s: %s" % (name, args.parity, e))
            failed.append(name)
            continue
        if r.returncode != 0 or not os.path.exists(actual):
            print("FAIL %s: tool exit %d%s\n%s" % (name, r.returncode,
                  "" if os.path.exists(actual) else ", no output file", tail(r.stdout)))
            failed.append(name)
            continue
        try:
            fails, n, worst, worst_name = compare.compare(
                st.load(os.path.join(c, "expected.safetensors")), st.load(actual), dtype)
        except Exception as e:  # unreadable or malformed actual file
            fails, n, worst, worst_name = ["cannot read/compare: %s" % e], 0, 0.0, ""
        if not fails:
            print("PASS %-52s %d tensors, worst rel err %.2e (%s)" % (name, n, worst, worst_name or "-"))
        else:
            print("FAIL %s\n%s" % (name, "\n".join("    " + l for l in fails)))
            failed.append(name)

    print("%d/%d cases passed in %.1f s" % (len(cases) - len(failed), len(cases), time.time() - t0))
    if failed:
        print("failed: " + " ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
