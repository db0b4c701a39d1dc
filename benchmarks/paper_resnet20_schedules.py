"""The paper's ResNet-20 ablation at 2 and at 10 epochs, side by side (RESULTS.md section 6).

Reads the final top-1 of every 2-epoch run (``paper_resnet20_2ep_top1.csv``, from the
2026-12-02 ablation's ``results.csv``) and the ``*_score.json`` records of the 10-epoch runs
(``paper_resnet20_10ep/``), and draws one figure of two panels: left, top-1 after each epoch of
the 10-epoch runs (mean over seeds, band from lowest to highest seed); right, each variant's
mean paired difference to a baseline (``avg``, or ``--baseline``) at 2 and at 10 epochs, with
its 95% interval where two or more seeds are paired. It prints the comparison of each schedule
as ``ablate``'s summary writes it, and each 10-epoch run's top-1 after epochs 1, 2, 4, ... as a
Markdown table.

    python benchmarks/paper_resnet20_schedules.py [--baseline avg+sac]
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from flexsurgeon.commands.ablate import holm_note, markdown_table, summarize
from flexsurgeon.plotting.figures import new_figure, save_png
from flexsurgeon.plotting.plot import draw_top1_by_epoch

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=Path, default=HERE / "paper_resnet20_2ep_top1.csv")
    parser.add_argument("--long", type=Path, default=HERE / "paper_resnet20_10ep")
    parser.add_argument("--baseline", default="avg")
    parser.add_argument("--out", type=Path, default=HERE / "paper_resnet20_10ep" / "schedules.png")
    args = parser.parse_args()

    with args.short.open() as f:
        short = [{"variant": r["variant"], "seed": int(r["seed"]), "top1": float(r["top1"])} for r in csv.DictReader(f)]
    variants = json.loads((args.long / "ablation.json").read_text())["variants"]
    long = sorted((json.loads(p.read_text()) for p in args.long.glob("*_score.json")),
                  key=lambda r: (variants.index(r["variant"]), r["seed"]))
    epochs = max(r["epochs"] for r in long)
    sums = {}
    for name, rows, n in (("2 epochs", short, 2), (f"{epochs} epochs", long, epochs)):
        sums[n] = summarize([r for r in rows if r["variant"] in variants], variants, args.baseline)
        print(f"## {name}\n\n{markdown_table(sums[n], args.baseline)}\n\n{holm_note(sums[n], args.baseline)}\n")
    print(f"## top-1 after each epoch\n\n{by_epoch_table(long, epochs)}\n")

    fig = new_figure(figsize=(11, 4.4))
    curves, gaps = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1]})
    draw_top1_by_epoch(curves, long)
    curves.set(ylabel="top-1 on t10k (%)", title=f"{epochs}-epoch runs: top-1 after each epoch")

    others = [v for v in variants if v != args.baseline]
    for n, marker in ((2, "s"), (epochs, "o")):  # the legend's entries, in gray
        gaps.plot([], [], marker, color="0.3", mfc="white" if n == 2 else None, label=f"after {n} epochs")
    for j, (n, marker) in enumerate(((2, "s"), (epochs, "o"))):
        for i, v in enumerate(others):
            e = next(e for e in sums[n] if e["variant"] == v)
            if e["diff"] is None:
                continue
            x = i + (j - 0.5) * 0.3
            err = None if e["ci_low"] is None else [[e["diff"] - e["ci_low"]], [e["ci_high"] - e["diff"]]]
            gaps.errorbar([x], [e["diff"]], yerr=err, fmt=marker, color=f"C{variants.index(v)}", capsize=4,
                          mfc="white" if n == 2 else None)
            gaps.annotate(f"n={e['paired_runs']}", (x, e["diff"]), xytext=(4, -10), textcoords="offset points",
                          fontsize=7)
    gaps.axhline(0, color="0.4", lw=0.8, ls="--")
    gaps.set_xticks(range(len(others)), others, rotation=15, fontsize=8)
    gaps.set(ylabel=f"top-1 minus {args.baseline}, same seed (points)",
             title=f"gap to {args.baseline}: mean paired difference, 95% interval")
    gaps.grid(alpha=0.3, axis="y")
    gaps.legend(fontsize=8)
    print(f"wrote {save_png(fig, args.out)}")


def by_epoch_table(runs: list[dict], epochs: int) -> str:
    """One row per run: its top-1 after epoch 1, then every second epoch, the last in bold."""
    shown = sorted({1, *range(2, epochs + 1, 2), epochs})
    rows = [f"| variant, seed | top-1 after epoch {' / '.join(map(str, shown))} |", "|---|---|"]
    for r in runs:
        top1 = [f"{r['top1_by_epoch'][e - 1]:.2f}" for e in shown]
        rows.append(f"| {r['variant']}, seed {r['seed']} | {' / '.join(top1[:-1] + [f'**{top1[-1]}**'])} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
