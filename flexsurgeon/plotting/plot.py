"""Plots as PNG files: FlexPool weight maps, training curves and ablation accuracy.

``plot_folder`` (``flexsurgeon plot DIR``) looks at what DIR holds and draws what fits:
a model folder (config.json) gives one weight-map PNG per FlexPool (``weight_maps.py``);
a finetune run (log.jsonl) gives the training curves and the weight maps of its best/
(else last/) model; an ablation folder (results.csv) gives the accuracy plot.

matplotlib is an optional extra (``pip install 'flexsurgeon[plot]'``); figures are drawn
and saved as ``figures.py`` says.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import PlotError
from ..runs.layout import (
    ABLATION_REQUEST,
    ABLATION_RESULTS,
    ACCURACY_BY_EPOCH_NAME,
    ACCURACY_NAME,
    BEST,
    CURVES_NAME,
    LAST,
    LOG_NAME,
    PLOTS_DIR,
    SUMMARY_JSON,
)
from ..runs.log import read_log, read_scores
from ..utils import CONFIG_NAME, HUB_PREFIX, is_hub_name
from .figures import new_figure, require_matplotlib, save_png
from .weight_maps import DEFAULT_TOP, check_top, flex_pools_of, plot_weight_maps

__all__ = ["plot_ablation", "plot_ablation_by_epoch", "plot_folder", "plot_training_curves", "plot_weight_maps",
           "read_results"]


# ---------------------------------------------------------------- training curves


def plot_training_curves(log_path, out_path) -> Path:
    """Loss and top-1 per head (SAC heads and ``main``), train dashed and val solid, against epoch."""
    require_matplotlib()
    log_path = Path(log_path)
    return _draw_training_curves(read_log(log_path), log_path, out_path)


def _draw_training_curves(records: list[dict], log_path: Path, out_path) -> Path:
    heads: list[str] = []
    for r in records:
        for split in ("train", "val"):
            heads += [h for h in r[split]["top1"] if h not in heads]
    heads = [h for h in heads if h != "main"] + (["main"] if "main" in heads else [])
    epochs = [r["epoch"] for r in records]

    fig = new_figure(figsize=(11, 4.2))
    loss_ax, acc_ax = fig.subplots(1, 2)
    colours = ["C7", "C1", "C2", "C4", "C5", "C6", "C8", "C9"]
    for i, head in enumerate(heads):
        colour = "C0" if head == "main" else colours[i % len(colours)]
        for split, style in (("train", "--"), ("val", "-")):
            for ax, metric in ((loss_ax, "loss"), (acc_ax, "top1")):
                ys = [r[split][metric].get(head, math.nan) for r in records]
                ax.plot(epochs, ys, style, color=colour, marker="o", markersize=3,
                        linewidth=2 if head == "main" else 1.2, label=f"{head} {split}")
    frozen = [r["epoch"] for r in records if r.get("frozen_backbone")]
    for ax in (loss_ax, acc_ax):
        for e in frozen:
            ax.axvspan(e - 0.5, e + 0.5, color="0.9", zorder=0)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(epochs) < 12:
            ax.set_xticks(epochs)
    loss_ax.set_ylabel("cross-entropy loss")
    acc_ax.set_ylabel("top-1 (%)")
    best = max(records, key=lambda r: r["val"]["top1"].get("main", -math.inf))
    if "main" in best["val"]["top1"]:
        acc_ax.axvline(best["epoch"], color="C0", linestyle=":", linewidth=1)
        acc_ax.set_title(f"best val top-1 (main) {best['val']['top1']['main']:.2f}% at epoch {best['epoch']}",
                         fontsize=9)
    loss_ax.set_title("dashed: train, solid: val" + ("; grey: backbone frozen" if frozen else ""), fontsize=9)
    loss_ax.legend(fontsize=7, ncols=2 if len(heads) > 2 else 1)
    fig.suptitle(f"training curves: {log_path.parent.name or log_path.parent.resolve().name}", fontsize=10)
    return save_png(fig, Path(out_path))


# ---------------------------------------------------------------- ablation

def read_results(csv_path) -> list[dict]:
    """The rows of an ablation ``results.csv`` (header ``variant,seed,top1,...``) as dicts of strings."""
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PlotError(f"cannot read {csv_path}: {getattr(exc, 'strerror', None) or exc}") from exc
    missing = [c for c in ("variant", "seed", "top1") if c not in columns]
    if missing:
        raise PlotError(f"{csv_path} has no column {', '.join(missing)} (its header: {','.join(columns) or 'none'})")
    return rows


def _ablation_points(rows: Iterable[Mapping]) -> tuple[dict[str, list[tuple[int, float]]], int]:
    """Top-1 per variant in first-seen order, and how many rows had no result (blank or NaN top1)."""
    points: dict[str, list[tuple[int, float]]] = {}
    skipped = 0
    for i, row in enumerate(rows, 1):
        missing = [k for k in ("variant", "seed", "top1") if k not in row]
        if missing:
            raise PlotError(f"ablation row {i} has no {', '.join(missing)}; each row needs variant, seed and top1")
        variant = str(row["variant"])
        try:
            seed = int(row["seed"])
            raw = row["top1"]
            top1 = math.nan if raw is None or str(raw).strip() == "" else float(raw)
        except (TypeError, ValueError):
            raise PlotError(f"ablation row {i} ({variant}): seed must be an integer and top1 a number, "
                            f"got seed={row['seed']!r} top1={row['top1']!r}") from None
        points.setdefault(variant, [])
        if math.isnan(top1):
            skipped += 1
        else:
            points[variant].append((seed, top1))
    if not any(points.values()):
        raise PlotError("no ablation results to plot: no row has a top1 value")
    return points, skipped


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def plot_ablation(rows: Iterable[Mapping], out_path, baseline: str = "avg") -> Path:
    """Top-1 per variant: one point per seed, mean ± sample std, the ``baseline``'s mean as a
    reference line. ``rows`` are mappings with ``variant``, ``seed`` and ``top1`` (%), e.g. the
    rows of ``results.csv``; variants are drawn in the order first seen."""
    require_matplotlib()
    points, skipped = _ablation_points(rows)
    variants = list(points)
    stats = {v: _mean_std([t for _, t in points[v]]) for v in variants if points[v]}
    reference = stats.get(baseline, (None, None))[0]

    fig = new_figure(figsize=(max(5.0, 1.3 * len(variants) + 2.0), 4.8))
    ax = fig.subplots()
    if reference is not None:
        ax.axhline(reference, color="0.4", linestyle="--", linewidth=1, zorder=1,
                   label=f"{baseline} mean {reference:.2f}")
    for x, variant in enumerate(variants):
        seeds = sorted(points[variant])
        if not seeds:
            continue
        n = len(seeds)
        offsets = [0.0] if n == 1 else [-0.15 + 0.3 * k / (n - 1) for k in range(n)]
        colour = "0.5" if variant == baseline else f"C{x % 10}"
        ax.scatter([x + o for o in offsets], [t for _, t in seeds], s=22, color=colour, alpha=0.7, zorder=2)
        mean, std = stats[variant]
        ax.errorbar([x + 0.28], [mean], yerr=[std] if n > 1 else None, fmt="D", color="black", markersize=5,
                    capsize=4, zorder=3)
        note = f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f} (one seed)"
        if reference is not None and variant != baseline:
            note += f"\nΔ {mean - reference:+.2f}"
        ax.annotate(note, (x + 0.28, mean + std), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=7)
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels([f"{v}\n(n={len(points[v])})" for v in variants], rotation=30 if len(variants) > 5 else 0,
                       fontsize=8)
    ax.set_xlim(-0.6, len(variants) - 0.4)
    ax.margins(y=0.18)  # room for the mean ± std notes above the bars
    ax.set_ylabel("top-1 (%)")
    ax.grid(axis="y", alpha=0.3)
    if reference is not None:
        ax.legend(fontsize=8, loc="best")
    notes = [] if reference is not None else [f"no '{baseline}' rows: no reference line"]
    if skipped:
        notes.append(f"{skipped} run(s) without a top1 left out")
    ax.set_title("top-1 per variant: dots are seeds, diamonds mean ± sample std"
                 + (f"\n({'; '.join(notes)})" if notes else ""), fontsize=9)
    return save_png(fig, Path(out_path))


def plot_ablation_by_epoch(rows: Iterable[Mapping], out_path) -> Path:
    """Val top-1 after each epoch per variant: the mean over seeds as a line, the range over
    seeds as a band. ``rows`` are score records with ``variant`` and ``top1_by_epoch`` (%)."""
    require_matplotlib()
    fig = new_figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    draw_top1_by_epoch(ax, rows)
    ax.set_title("top-1 after each epoch: mean over seeds, band from lowest to highest seed", fontsize=9)
    return save_png(fig, Path(out_path))


def draw_top1_by_epoch(ax, rows: Iterable[Mapping]) -> None:
    """Draw on ``ax`` each variant's mean top-1 per epoch over its seeds, with the seeds' range."""
    curves: dict[str, list[list[float]]] = {}
    for row in rows:
        if row.get("top1_by_epoch"):
            curves.setdefault(str(row["variant"]), []).append([float(t) for t in row["top1_by_epoch"]])
    for i, (variant, runs) in enumerate(curves.items()):
        epochs = min(len(r) for r in runs)  # seeds still running have fewer epochs
        xs = list(range(1, epochs + 1))
        columns = [[r[e] for r in runs] for e in range(epochs)]
        ax.plot(xs, [sum(c) / len(c) for c in columns], marker="o", markersize=3, color=f"C{i % 10}",
                label=f"{variant} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(xs, [min(c) for c in columns], [max(c) for c in columns], color=f"C{i % 10}", alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def plot_folder(path, out_dir=None, top: int | None = None, model_code: str | None = None) -> list[Path]:
    """Plot whatever ``path`` holds; PNGs go to ``out_dir`` (default ``path/plots``).

    A model folder (config.json): weight maps. A finetune run (log.jsonl): training curves and
    the weight maps of its best/ model (else last/). An ablation folder (results.csv): the
    accuracy plot. A log.jsonl or results.csv file itself also works, and so does a converted
    model on the Hub (``hf-hub:ORG/NAME``; ``out_dir`` is then required). ``top`` (channels per
    weight map, default 8) and ``model_code`` apply to weight maps: refused where there is no
    model to draw them from.
    """
    # every input is read (and refused) before the first PNG is written: a failing plot writes nothing
    hub = is_hub_name(path)  # a converted model on the Hub: its weight maps
    if hub and out_dir is None:
        raise PlotError(f"plot {path} needs -o FOLDER for the PNGs")
    if not hub:
        path = Path(path)
        if not path.exists():
            raise PlotError(f"nothing to plot: {path} does not exist")
        if (top is not None or model_code is not None) and not any(
                (p / CONFIG_NAME).is_file() for p in (path, path / BEST, path / LAST)):
            raise PlotError(f"{'--top' if top is not None else '--model-code'} applies to FlexPool weight maps, and "
                            f"{path} holds no model to draw them from")
    top = DEFAULT_TOP if top is None else top
    check_top(top)
    require_matplotlib()
    if hub:
        return _weight_maps(path, Path(out_dir), top, required=True, source=path.removeprefix(HUB_PREFIX),
                            model_code=model_code)()
    if path.is_file():
        out = Path(out_dir) if out_dir is not None else path.parent / PLOTS_DIR
        if path.suffix == ".jsonl":
            return [plot_training_curves(path, out / CURVES_NAME)]
        if path.suffix == ".csv":
            return [plot_ablation(read_results(path), out / ACCURACY_NAME, _ablation_baseline(path.parent))]
        raise PlotError(f"cannot plot {path}: give a folder, a log.jsonl or a results.csv")
    out = Path(out_dir) if out_dir is not None else path / PLOTS_DIR
    draws = []
    if (path / ABLATION_RESULTS).is_file():
        rows, baseline = read_results(path / ABLATION_RESULTS), _ablation_baseline(path)
        draws.append(lambda: [plot_ablation(rows, out / ACCURACY_NAME, baseline)])
        by_epoch = [r for r in _ablation_scores(path) if r.get("top1_by_epoch")]
        if by_epoch:  # the figure ablate draws beside accuracy.png
            draws.append(lambda: [plot_ablation_by_epoch(by_epoch, out / ACCURACY_BY_EPOCH_NAME)])
    if (path / LOG_NAME).is_file():
        records = read_log(path / LOG_NAME)
        draws.append(lambda: [_draw_training_curves(records, path / LOG_NAME, out / CURVES_NAME)])
        model_dir = next((path / d for d in (BEST, LAST) if (path / d / CONFIG_NAME).is_file()), None)
        if model_dir is not None:
            draws.append(_weight_maps(model_dir, out, top, required=False, source=f"{path.name}/{model_dir.name}",
                                      model_code=model_code))
    elif (path / CONFIG_NAME).is_file():
        draws.append(_weight_maps(path, out, top, required=True, model_code=model_code))
    if not draws and (path / ABLATION_REQUEST).is_file():
        raise PlotError(f"nothing to plot in {path} yet: no run of this ablation has finished ({ABLATION_RESULTS} "
                        "is written after each run)")
    if not draws:
        raise PlotError(f"nothing to plot in {path}: it has no {CONFIG_NAME} (a model folder), "
                        f"{LOG_NAME} (a finetune run) or {ABLATION_RESULTS} (an ablation)")
    return [written for draw in draws for written in draw()]


def _ablation_scores(folder: Path) -> list[dict]:
    """The finished runs' score records (their top-1 after each epoch), in the ablation's order."""
    try:
        request = json.loads((folder / ABLATION_REQUEST).read_text())
        variants, seeds = [str(v) for v in request["variants"]], int(request["seeds"])
    except (OSError, ValueError, LookupError, TypeError):
        return []  # results.csv alone (copied out of its folder): accuracy.png only
    return read_scores(folder, variants, seeds)


def _ablation_baseline(folder: Path) -> str:
    """The baseline ``ablate`` compared against, from the folder's summary.json (else ``avg``), so
    that ``plot`` draws the figure ``ablate`` drew."""
    try:
        entries = json.loads((folder / SUMMARY_JSON).read_text())
        return str(entries[0]["baseline"])
    except (OSError, ValueError, LookupError, TypeError):
        return "avg"


def _weight_maps(directory: Path | str, out: Path, top: int, required: bool, source: str | None = None,
                 model_code: str | None = None):
    """Load the model in ``directory`` now; return what draws its weight maps. ``required``: a
    model without FlexPool is an error (a model folder asked for), else it draws nothing."""
    from ..checkpoints.io import load_folder

    model = load_folder(directory, model_code)
    if required and not flex_pools_of(model):
        pool = getattr(getattr(model, "flexsurgeon_plan", None), "pool", "another kind")
        raise PlotError(f"nothing to plot in {directory}: its pools are {pool}, not FlexPool, so they have "
                        "no weight maps")
    return lambda: plot_weight_maps(model, out, top=top, source=source or Path(directory).resolve().name)
