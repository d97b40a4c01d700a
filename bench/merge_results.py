#!/usr/bin/env python3
"""Joins promoe_bench's and torch_bench.py's JSON by case name into one results file and prints
the comparison as a markdown table (used by scripts/bench.sh).

    merge_results.py --promoe P.json [--promoe P2.json ...] [--torch T.json [--torch T2.json ...]]
                     [--torch-as-installed T3.json] --out RESULTS.json
                     [--openblas-core NAME] [--openblas-core-as-installed NAME]

Given several runs of a side (scripts/bench.sh alternates promoe and PyTorch runs), each case
keeps the run where it was fastest: on a shared machine a slow minute (another tenant, a
lower clock) then costs neither side its result. "promoe_runs" and "torch_runs" say how many
runs each side had.

RESULTS.json: {"host", "date", "cpu", "openblas_core", "openblas_core_as_installed",
"promoe": <promoe_bench JSON>, "torch": <torch_bench JSON> | null, "torch_as_installed":
<torch_bench JSON> | null, "torch_sgemm_gflops": float | null, "rows": [{"name",
"promoe_ms", "torch_ms", "speedup_vs_torch", "torch_as_installed_ms",
"speedup_vs_torch_as_installed", "gflops", "torch_gflops", "ratio_vs_dense",
"images_per_s", "torch_images_per_s"}]}: one row per case name, promoe's order first; a
value is null where a side lacks the case (speedup = torch ms / promoe ms).

`--torch` is PyTorch with the BLAS kernel tuned for the CPU, `--torch-as-installed` the same
PyTorch with the kernel its OpenBLAS picks by itself. torch_sgemm_gflops is the best
``gemm.*`` rate of the tuned run: no PyTorch case can beat it, so a speed-up over a PyTorch
case at g GFLOP/s is only possible up to (the machine's GEMM rate) / g.
"""

import argparse
import datetime
import json
import os
import socket
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


def best_of(runs):
    """One benchmark JSON from several runs of the same tool: each case from the run with
    the smallest median_ms (the first run's other keys)."""
    if not runs:
        return None
    best = dict(runs[0])
    cases = {}
    order = []
    for run in runs:
        for case in run.get("cases", []):
            name = case["name"]
            if name not in cases:
                order.append(name)
                cases[name] = case
            elif (case.get("median_ms") or float("inf")) < (cases[name].get("median_ms") or float("inf")):
                cases[name] = case
    best["cases"] = [cases[n] for n in order]
    return best


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def ratio(a, b):
    return a / b if a and b else None


def merged_rows(promoe, torch, torch_installed=None):
    by_name = {c["name"]: c for c in (torch or {}).get("cases", [])}
    installed = {c["name"]: c for c in (torch_installed or {}).get("cases", [])}
    names = [c["name"] for c in promoe["cases"]]
    names += [n for n in by_name if n not in set(names)]
    ours = {c["name"]: c for c in promoe["cases"]}
    rows = []
    for name in names:
        p, t = ours.get(name, {}), by_name.get(name, {})
        pm, tm = p.get("median_ms"), t.get("median_ms")
        im = installed.get(name, {}).get("median_ms")
        rows.append({"name": name, "promoe_ms": pm, "torch_ms": tm,
                     "speedup_vs_torch": ratio(tm, pm),
                     "torch_as_installed_ms": im, "speedup_vs_torch_as_installed": ratio(im, pm),
                     "gflops": p.get("gflops"), "torch_gflops": t.get("gflops"),
                     "ratio_vs_dense": p.get("ratio_vs_dense"),
                     "images_per_s": p.get("images_per_s"), "torch_images_per_s": t.get("images_per_s")})
    return rows


def fmt(value, spec):
    return spec % value if value is not None else "-"


def torch_sgemm_gflops(torch):
    rates = [c["gflops"] for c in (torch or {}).get("cases", []) if c["name"].startswith("gemm.") and c.get("gflops")]
    return max(rates) if rates else None


def markdown(rows, sgemm):
    lines = ["| case | promoe ms | GFLOP/s | vs dense | torch ms | torch GFLOP/s | speed-up vs torch "
             "| torch as installed ms | speed-up vs it |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r["name"], fmt(r["promoe_ms"], "%.2f"), fmt(r["gflops"], "%.1f"), fmt(r["ratio_vs_dense"], "%.2fx"),
            fmt(r["torch_ms"], "%.2f"), fmt(r["torch_gflops"], "%.1f"), fmt(r["speedup_vs_torch"], "%.2fx"),
            fmt(r["torch_as_installed_ms"], "%.2f"), fmt(r["speedup_vs_torch_as_installed"], "%.2fx")))
    if sgemm:
        lines.append("")
        lines.append("PyTorch's own sgemm (tuned kernel): %.1f GFLOP/s. A speed-up s over a PyTorch case at g "
                     "GFLOP/s needs s * g GFLOP/s:" % sgemm)
        for r in rows:
            if r["name"].startswith("moe.") and r["torch_gflops"]:
                lines.append("- %s: torch %.1f GFLOP/s; 2.5x needs %.1f GFLOP/s = %.2fx PyTorch's sgemm rate"
                             % (r["name"], r["torch_gflops"], 2.5 * r["torch_gflops"], 2.5 * r["torch_gflops"] / sgemm))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--promoe", required=True, action="append", help="promoe_bench --json output (repeatable)")
    ap.add_argument("--torch", default=[], action="append",
                    help="torch_bench.py --out output (repeatable; omit when PyTorch did not run)")
    ap.add_argument("--out", required=True, help="merged results file (written via OUT.tmp)")
    ap.add_argument("--torch-as-installed", default=None,
                    help="torch_bench.py output with OpenBLAS choosing its kernel itself (optional)")
    ap.add_argument("--openblas-core", default=None, help="the OpenBLAS kernel PyTorch used, for the record")
    ap.add_argument("--openblas-core-as-installed", default=None, help="the kernel of --torch-as-installed")
    args = ap.parse_args(argv)

    promoe = best_of([load(p) for p in args.promoe])
    torch = best_of([load(p) for p in args.torch])
    torch_installed = load(args.torch_as_installed) if args.torch_as_installed else None
    rows = merged_rows(promoe, torch, torch_installed)
    sgemm = torch_sgemm_gflops(torch)
    result = {"host": socket.gethostname(), "date": datetime.date.today().isoformat(), "cpu": cpu_model(),
              "openblas_core": args.openblas_core, "openblas_core_as_installed": args.openblas_core_as_installed,
              "promoe": promoe, "torch": torch, "torch_as_installed": torch_installed,
              "promoe_runs": len(args.promoe), "torch_runs": len(args.torch),
              "torch_sgemm_gflops": sgemm, "rows": rows}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(tmp, args.out)
    print(markdown(rows, sgemm))
    return 0


if __name__ == "__main__":
    sys.exit(main())
