#!/usr/bin/env python3
"""Report of scripts/study.sh: reads <out>/floor.json and <out>/runs/<variant>-s<seed>/
(eval-<step>-cfg<g>.json from promoe-evaluate, routing.json from train_dit) and writes
<out>/results.json, <out>/results.md, <out>/fd_steps.png (FD against steps, guidance 1.5) and,
from each variant's first seed, <out>/samples.png (its train_dit sample grid: a row per class)
and <out>/routing.png (its routing map)."""
import json
import math
import re
import statistics
import sys
import textwrap
from pathlib import Path

ORDER = ["dense", "top-k", "expert-choice", "expert-race", "promoe", "promoe-no-rcl", "promoe-no-cond"]


def load_runs(out):
    runs = []
    for d in sorted((out / "runs").iterdir()):
        m = re.fullmatch(r"(.+)-s(\d+)", d.name)
        if not m or not d.is_dir():
            continue
        evals = []
        for f in d.glob("eval-*-cfg*.json"):
            e = re.fullmatch(r"eval-(\d+)-cfg([\d.]+)\.json", f.name)
            if not e:
                continue
            j = json.loads(f.read_text())
            evals.append({"step": int(e[1]), "cfg": float(e[2]), "n": j["n"], "fd": j["fd"], "accuracy": j["accuracy"],
                          "precision": j["precision"], "recall": j["recall"]})
        evals.sort(key=lambda e: (e["cfg"], e["step"]))
        routing = None
        if (d / "routing.json").exists():
            blocks = json.loads((d / "routing.json").read_text())["blocks"]
            routing = {k: statistics.fmean(b[k] for b in blocks) for k in ("class_share", "position_share")}
            routing["blocks"] = blocks
        runs.append({"variant": m[1], "seed": int(m[2]), "evals": evals, "routing": routing})
    runs.sort(key=lambda r: (ORDER.index(r["variant"]) if r["variant"] in ORDER else len(ORDER), r["variant"], r["seed"]))
    return runs


def final(run, cfg, steps):
    """The run's evaluation at the study's last step and guidance cfg, or None (run unfinished)."""
    return next((e for e in run["evals"] if e["cfg"] == cfg and e["step"] == steps), None)


def mean_sd(values):
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def fmt(ms, digits=1):
    if ms is None:
        return "–"
    m, s, n = ms
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def summarise(runs, steps):
    """Per variant, over its finished runs (evaluated at the study's last step)."""
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    rows = []
    for v in variants:
        rs = [r for r in runs if r["variant"] == v and final(r, 1.5, steps)]
        if not rs:
            continue
        row = {"variant": v, "seeds": [r["seed"] for r in rs]}
        for cfg in (1.0, 1.5):
            fs = [final(r, cfg, steps) for r in rs]
            fs = [f for f in fs if f]
            for key in ("fd", "accuracy", "precision", "recall"):
                row[f"{key}_cfg{cfg}"] = mean_sd([f[key] for f in fs])
        for key in ("class_share", "position_share"):
            row[key] = mean_sd([r["routing"][key] for r in rs if r["routing"]])
        rows.append(row)
    return rows


def study_steps(runs):
    return max((e["step"] for r in runs for e in r["evals"]), default=0)


def write_markdown(out, floor, runs, rows):
    steps = study_steps(runs)
    lines = [f"# Routing study: {steps} steps", "",
             "Finished runs only, at the last step (EMA weights); mean ± standard deviation over seeds. FD: Fréchet distance in the "
             "feature classifier's penultimate features against the Fashion-MNIST test set (lower is better); "
             "accuracy: samples classified as their requested label; P / R: precision / recall (k = 3). "
             "Class / position share: the part of the first-choice expert's entropy explained by the class / the "
             "token position (mutual information over entropy, mean over MoE blocks; t = 500).", "",
             "| variant | seeds | FD (cfg 1.0) | FD (cfg 1.5) | accuracy (cfg 1.5) | P (cfg 1.5) | R (cfg 1.5) "
             "| class share | position share |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {len(r['seeds'])} | {fmt(r['fd_cfg1.0'])} | {fmt(r['fd_cfg1.5'])} "
                     f"| {fmt(r['accuracy_cfg1.5'], 3)} | {fmt(r['precision_cfg1.5'], 3)} | {fmt(r['recall_cfg1.5'], 3)} "
                     f"| {fmt(r['class_share'], 3)} | {fmt(r['position_share'], 3)} |")
    if floor:
        f = floor["floor"]
        lines.append(f"| *real test set (floor)* | – | {f['fd']:.2f} | | {f['accuracy']:.3f} | {f['precision']:.3f} "
                     f"| {f['recall']:.3f} | | |")
    lines += ["", "## Every run: FD at guidance 1.5 along training, and at the end with guidance 1.0", ""]
    all_steps = sorted({e["step"] for r in runs for e in r["evals"]})
    lines.append("| run | " + " | ".join(f"step {s}" for s in all_steps) + " | step " + str(steps) + " cfg 1.0 |")
    lines.append("|---|" + "---|" * (len(all_steps) + 1))
    for r in runs:
        by = {(e["step"], e["cfg"]): e["fd"] for e in r["evals"]}
        cells = [f"{by[(s, 1.5)]:.1f}" if (s, 1.5) in by else "–" for s in all_steps]
        cells.append(f"{by[(steps, 1.0)]:.1f}" if (steps, 1.0) in by else "–")
        lines.append(f"| {r['variant']} s{r['seed']} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plot(out, runs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("study_report: matplotlib is missing (Debian: python3-matplotlib); no fd_steps.png", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    for i, v in enumerate(variants):
        for j, r in enumerate(x for x in runs if x["variant"] == v):
            es = [e for e in r["evals"] if e["cfg"] == 1.5]
            ax.plot([e["step"] for e in es], [e["fd"] for e in es], marker="o", color=colours[i % len(colours)],
                    linestyle="-" if j == 0 else "--", label=v if j == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("FD (guidance 1.5; log scale)")
    ax.set_title("FD along training (solid: first seed, dashed: others)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fd_steps.png")
    plt.close(fig)
    montage(out, runs, "samples.png", "samples at the last step (EMA weights, guidance 2; a row per class)")
    montage(out, runs, "routing.png", "first MoE block: each class's most frequent expert per token position "
                                      "(a colour per expert; grey: unconditional)")


def montage(out, runs, picture, title):
    """One panel per variant (its first seed's <run>/<picture>), side by side, into <out>/<picture>."""
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt
    firsts = {}
    for r in runs:
        firsts.setdefault(r["variant"], r)
    panels = [(v, out / "runs" / f"{v}-s{r['seed']}" / picture) for v, r in firsts.items()]
    panels = [(v, p) for v, p in panels if p.exists()]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(max(2.2 * len(panels), 6.0), 2.8), dpi=150, squeeze=False)
    for ax, (v, p) in zip(axes[0], panels):
        ax.imshow(mpimg.imread(p), cmap="gray", interpolation="nearest")
        ax.set_title(v, fontsize=8)
        ax.axis("off")
    fig.suptitle(textwrap.fill(title, 90), fontsize=8)
    fig.tight_layout()
    fig.savefig(out / picture)
    plt.close(fig)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: study_report.py <study folder>")
    out = Path(sys.argv[1])
    floor = json.loads((out / "floor.json").read_text()) if (out / "floor.json").exists() else None
    runs = load_runs(out)
    if not runs:
        sys.exit(f"study_report: no runs under {out / 'runs'}")
    rows = summarise(runs, study_steps(runs))
    to_json = lambda ms: None if ms is None else {"mean": ms[0], "sd": ms[1], "n": ms[2]}
    (out / "results.json").write_text(json.dumps(
        {"floor": floor["floor"] if floor else None, "runs": runs,
         "summary": [{k: (to_json(v) if isinstance(v, tuple) or v is None else v) for k, v in r.items()} for r in rows]},
        indent=1) + "\n")
    write_markdown(out, floor, runs, rows)
    plot(out, runs)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
