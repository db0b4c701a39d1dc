"""Plots as PNG files: FlexPool weight maps, training curves and ablation accuracy.

``plot_folder`` (``flexsurgeon plot DIR``) looks at what DIR holds and draws what fits:
a model folder (config.json) gives one weight-map PNG per FlexPool; a finetune run
(log.jsonl) gives the training curves and the weight maps of its best/ (else last/)
model; an ablation folder (results.csv) gives the accuracy plot.

matplotlib is an optional extra (``pip install 'flexsurgeon[plot]'``). It is imported
inside the functions, and figures are drawn on matplotlib's Agg canvas directly, without
pyplot, so plotting neither needs a display nor changes a caller's pyplot backend.
Every PNG is written to a temporary file and renamed into place.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import PlotError

__all__ = ["channel_spread", "flex_pools_of", "plot_ablation", "plot_folder", "plot_training_curves",
           "plot_weight_maps", "pool_weights", "read_log", "read_results", "top_channels"]

INSTALL_HINT = "pip install 'flexsurgeon[plot]'"
PLOTS_DIR = "plots"
MODEL_CONFIG, RUN_LOG, ABLATION_RESULTS = "config.json", "log.jsonl", "results.csv"
CURVES_NAME, ABLATION_NAME = "curves.png", "ablation.png"
_DPI = 120


# ---------------------------------------------------------------- matplotlib

def _require_matplotlib() -> None:
    """Fail with the install hint when matplotlib is missing (before any slow work)."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise PlotError(f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}") from None


def _figure(**kwargs):
    """A matplotlib Figure on an Agg canvas, outside pyplot's global state."""
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically: a temporary sibling, then os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format="png", dpi=_DPI)
        os.replace(tmp, path)
    except OSError as exc:
        raise PlotError(f"could not write {path}: {exc.strerror or exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "pool"


# ---------------------------------------------------------------- FlexPool weight maps

def pool_weights(pool):
    """The normalised weights ``A`` (C, H, W), float32 on the CPU, as FlexPool computes them.

    softmax mode: the softmax of each channel's logits; linear mode: the raw weights.
    """
    import torch

    with torch.no_grad():
        return pool.pooling_weights().cpu()


def channel_spread(a):
    """Per-channel spread of a weight map (C, H, W): ``max - min`` over positions (0 = uniform)."""
    flat = a.flatten(1)
    return flat.amax(1) - flat.amin(1)


def top_channels(a, top: int) -> list[int]:
    """The ``top`` channels of ``a`` (C, H, W) with the largest spread, largest first (ties: lower index)."""
    import torch

    spread = channel_spread(a)
    order = torch.sort(spread, descending=True, stable=True).indices
    return order[: max(0, min(top, a.shape[0]))].tolist()


def flex_pools_of(model) -> list[tuple[str, str, object]]:
    """``(file stem, label, FlexPool)`` for every FlexPool in ``model``, in module order.

    The converted model's pools are named after their module path, the SAC heads' pools
    (``sac_heads.NODE.pool``) after the module they read; other pool kinds (average, LSE,
    SimPool baselines) have no weight map and are skipped.
    """
    from .layers import FlexPool

    plan = getattr(model, "flexsurgeon_plan", None)
    modules = {t.node: t.module for t in getattr(plan, "sac", ())}
    found = []
    for path, module in model.named_modules():
        if not isinstance(module, FlexPool):
            continue
        parts = path.split(".")
        if len(parts) == 3 and parts[0] == "sac_heads" and parts[2] == "pool":
            where = modules.get(parts[1])
            stem = f"weights-sac-{parts[1]}"
            label = f"SAC head at {where} (node {parts[1]})" if where else f"SAC head at node {parts[1]}"
        else:
            stem, label = f"weights-{path}", f"pool at {path}" if path else "FlexPool"
        found.append((_file_name(stem), label, module))
    return found


def plot_weight_maps(model, out_dir, top: int = 8, source: str | None = None) -> list[Path]:
    """One PNG per FlexPool in ``model``: its channel-mean weight map and the ``top`` channels
    with the largest spread (max - min of A), on one colour scale centred on ``1/(H*W)``
    (average pooling, white). Returns the paths written; none when the model has no FlexPool.
    ``source`` (e.g. the folder the model came from) goes into the titles.
    """
    _check_top(top)
    _require_matplotlib()
    out_dir = Path(out_dir)
    written = []
    for stem, label, pool in flex_pools_of(model):
        title = f"{source}: {label}" if source else label
        written.append(_save(_weight_map_figure(pool, title, top), out_dir / f"{stem}.png"))
    return written


def _check_top(top) -> None:
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise PlotError(f"top must be a positive number of channels, got {top!r}")


def _weight_map_figure(pool, title: str, top: int):
    from matplotlib.colors import TwoSlopeNorm

    a = pool_weights(pool)
    channels, (h, w) = a.shape[0], pool.size
    uniform = 1.0 / (h * w)
    chosen = top_channels(a, top)
    spread = channel_spread(a)
    maps = [("mean of all channels" if channels > 1 else "channel 0", a.mean(0))]
    maps += [(f"ch {c}  spread {spread[c].item():.3g}", a[c]) for c in chosen]
    distance = 0.5 * (a - uniform).abs().flatten(1).sum(1)  # per channel; 0 = average pooling

    lo = min(min(m.min().item() for _, m in maps), uniform)
    hi = max(max(m.max().item() for _, m in maps), uniform)
    eps = max(abs(uniform) * 1e-3, 1e-12)  # a uniform (untrained) pool still gets a valid scale
    norm = TwoSlopeNorm(vcenter=uniform, vmin=min(lo, uniform - eps), vmax=max(hi, uniform + eps))

    cols = math.ceil(math.sqrt(len(maps)))
    rows = math.ceil(len(maps) / cols)
    fig = _figure(figsize=(max(2.3 * cols + 1.4, 7.5), 2.3 * rows + 1.1))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    image = None
    for ax, (name, m) in zip(axes, maps):
        image = ax.imshow(m.numpy(), cmap="RdBu_r", norm=norm, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(maps):]:
        ax.set_axis_off()
    bar = fig.colorbar(image, ax=list(axes), shrink=0.9)
    bar.ax.axhline(uniform, color="black", linewidth=2)
    still_uniform = hi - lo <= eps  # untrained: every weight is 1/(H*W) up to rounding
    ticks = [uniform] if still_uniform else [uniform, norm.vmin, norm.vmax]
    for t in [] if still_uniform else bar.get_ticks():  # matplotlib's, where they do not crowd those (bar units)
        if norm.vmin <= t <= norm.vmax and all(abs(float(norm(t)) - float(norm(k))) > 0.06 for k in ticks):
            ticks.append(t)
    ticks.sort()
    bar.set_ticks(ticks, labels=[f"{t:.3g}" + (" = 1/(H·W)" if t == uniform else "") for t in ticks])
    bar.set_label(f"A[c, h, w]; black line: 1/(H·W) = {uniform:.4g} (average pooling)", fontsize=8)
    lines = [f"{title}: FlexPool[{pool.mode}] {channels}x{h}x{w}",
             f"channel mean and the top {len(chosen)} channels by spread (max - min of A); white = 1/(H·W)",
             f"distance from average pooling, ½Σ|A - 1/(H·W)| per channel: mean {distance.mean().item():.3g}, "
             f"max {distance.max().item():.3g}"]
    if still_uniform:
        lines.append("(every channel is still exactly average pooling)")
    fig.suptitle("\n".join(lines), fontsize=9)
    return fig


# ---------------------------------------------------------------- training curves

def read_log(log_path) -> list[dict]:
    """The epoch records of a finetune ``log.jsonl``, one per epoch (a resumed epoch's last record).

    A malformed last line (an epoch being written) is ignored; any other bad line is an error.
    """
    log_path = Path(log_path)
    try:
        lines = log_path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PlotError(f"cannot read {log_path}: {getattr(exc, 'strerror', None) or exc}") from exc
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    by_epoch: dict[int, dict] = {}
    for k, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if k == len(numbered) - 1:
                break
            raise PlotError(f"{log_path} line {number} is not JSON; is it a flexsurgeon finetune log?") from None
        if not (isinstance(record, dict) and isinstance(record.get("epoch"), int)
                and all(isinstance(record.get(s), dict) and isinstance(record[s].get(m), dict)
                        for s in ("train", "val") for m in ("loss", "top1"))):
            raise PlotError(f"{log_path} line {number} has no epoch with train/val loss and top1; "
                            "is it a flexsurgeon finetune log?")
        by_epoch[record["epoch"]] = record
    if not by_epoch:
        raise PlotError(f"{log_path} has no finished epochs yet")
    return [by_epoch[e] for e in sorted(by_epoch)]


def plot_training_curves(log_path, out_path) -> Path:
    """Loss and top-1 per head (SAC heads and ``main``), train dashed and val solid, against epoch."""
    _require_matplotlib()
    log_path = Path(log_path)
    records = read_log(log_path)
    heads: list[str] = []
    for r in records:
        for split in ("train", "val"):
            heads += [h for h in r[split]["top1"] if h not in heads]
    heads = [h for h in heads if h != "main"] + (["main"] if "main" in heads else [])
    epochs = [r["epoch"] for r in records]

    fig = _figure(figsize=(11, 4.2))
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
    return _save(fig, Path(out_path))


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
    _require_matplotlib()
    points, skipped = _ablation_points(rows)
    variants = list(points)
    stats = {v: _mean_std([t for _, t in points[v]]) for v in variants if points[v]}
    reference = stats.get(baseline, (None, None))[0]

    fig = _figure(figsize=(max(5.0, 1.3 * len(variants) + 2.0), 4.8))
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
    return _save(fig, Path(out_path))


# ---------------------------------------------------------------- folders

def plot_folder(path, out_dir=None, top: int = 8, model_code: str | None = None) -> list[Path]:
    """Plot whatever ``path`` holds; PNGs go to ``out_dir`` (default ``path/plots``).

    A model folder (config.json): weight maps. A finetune run (log.jsonl): training curves and
    the weight maps of its best/ model (else last/). An ablation folder (results.csv): the
    accuracy plot. A log.jsonl or results.csv file itself also works.
    """
    _check_top(top)
    _require_matplotlib()
    path = Path(path)
    if not path.exists():
        raise PlotError(f"nothing to plot: {path} does not exist")
    if path.is_file():
        out = Path(out_dir) if out_dir is not None else path.parent / PLOTS_DIR
        if path.suffix == ".jsonl":
            return [plot_training_curves(path, out / CURVES_NAME)]
        if path.suffix == ".csv":
            return [plot_ablation(read_results(path), out / ABLATION_NAME)]
        raise PlotError(f"cannot plot {path}: give a folder, a log.jsonl or a results.csv")
    out = Path(out_dir) if out_dir is not None else path / PLOTS_DIR
    written: list[Path] = []
    if (path / ABLATION_RESULTS).is_file():
        written.append(plot_ablation(read_results(path / ABLATION_RESULTS), out / ABLATION_NAME))
    if (path / RUN_LOG).is_file():
        written.append(plot_training_curves(path / RUN_LOG, out / CURVES_NAME))
        model_dir = next((path / d for d in ("best", "last") if (path / d / MODEL_CONFIG).is_file()), None)
        if model_dir is not None:
            written += _plot_model_folder(model_dir, out, top, required=False, source=f"{path.name}/{model_dir.name}",
                                          model_code=model_code)
    elif (path / MODEL_CONFIG).is_file():
        written += _plot_model_folder(path, out, top, required=True, model_code=model_code)
    if not written and not (path / RUN_LOG).is_file() and not (path / ABLATION_RESULTS).is_file():
        raise PlotError(f"nothing to plot in {path}: it has no {MODEL_CONFIG} (a model folder), "
                        f"{RUN_LOG} (a finetune run) or {ABLATION_RESULTS} (an ablation)")
    return written


def _plot_model_folder(directory: Path, out: Path, top: int, required: bool, source: str | None = None,
                       model_code: str | None = None) -> list[Path]:
    from .io import load_folder

    model = load_folder(directory, model_code)
    written = plot_weight_maps(model, out, top=top, source=source or directory.resolve().name)
    if required and not written:
        kind = getattr(getattr(model, "flexsurgeon_plan", None), "pool_mode", "another kind")
        raise PlotError(f"nothing to plot in {directory}: its pools are {kind}, not FlexPool, so they have "
                        "no weight maps")
    return written
