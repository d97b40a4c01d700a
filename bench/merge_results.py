#!/usr/bin/env python3
"""Joins promoe_bench's and torch_bench.py's JSON by case name into one results file and prints
the comparison as a markdown table (used by scripts/bench.sh).

    merge_results.py --promoe P.json [--torch T.json] --out RESULTS.json [--openblas-core NAME]

RESULTS.json: {"host", "date", "cpu", "openblas_core", "promoe": <promoe_bench JSON>,
"torch": <torch_bench JSON> | null, "rows": [{"name", "promoe_ms", "torch_ms",
"speedup_vs_torch", "gflops", "torch_gflops", "ratio_vs_dense", "images_per_s",
"torch_images_per_s"}]}: one row per case name, promoe's order first; a value is null where
a side lacks the case (speedup_vs_torch = torch_ms / promoe_ms).
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


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def merged_rows(promoe, torch):
    by_name = {c["name"]: c for c in (torch or {}).get("cases", [])}
    names = [c["name"] for c in promoe["cases"]]
    names += [n for n in by_name if n not in set(names)]
    ours = {c["name"]: c for c in promoe["cases"]}
    rows = []
    for name in names:
        p, t = ours.get(name, {}), by_name.get(name, {})
        pm, tm = p.get("median_ms"), t.get("median_ms")
        rows.append({"name": name, "promoe_ms": pm, "torch_ms": tm,
                     "speedup_vs_torch": tm / pm if pm and tm else None,
                     "gflops": p.get("gflops"), "torch_gflops": t.get("gflops"),
                     "ratio_vs_dense": p.get("ratio_vs_dense"),
                     "images_per_s": p.get("images_per_s"), "torch_images_per_s": t.get("images_per_s")})
    return rows


def fmt(value, spec):
    return spec % value if value is not None else "-"


def markdown(rows):
    lines = ["| case | promoe ms | GFLOP/s | vs dense | torch ms | promoe speedup vs torch |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append("| %s | %s | %s | %s | %s | %s |" % (
            r["name"], fmt(r["promoe_ms"], "%.2f"), fmt(r["gflops"], "%.1f"), fmt(r["ratio_vs_dense"], "%.2fx"),
            fmt(r["torch_ms"], "%.2f"), fmt(r["speedup_vs_torch"], "%.2fx")))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--promoe", required=True, help="promoe_bench --json output")
    ap.add_argument("--torch", default=None, help="torch_bench.py --out output (omit when PyTorch did not run)")
    ap.add_argument("--out", required=True, help="merged results file (written via OUT.tmp)")
    ap.add_argument("--openblas-core", default=None, help="the OpenBLAS kernel PyTorch used, for the record")
    args = ap.parse_args(argv)

    promoe = load(args.promoe)
    torch = load(args.torch) if args.torch else None
    rows = merged_rows(promoe, torch)
    result = {"host": socket.gethostname(), "date": datetime.date.today().isoformat(), "cpu": cpu_model(),
              "openblas_core": args.openblas_core, "promoe": promoe, "torch": torch, "rows": rows}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(tmp, args.out)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
