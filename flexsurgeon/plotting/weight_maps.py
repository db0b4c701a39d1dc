"""FlexPool weight maps as PNGs: the normalised weights ``A`` (C, H, W) a FlexPool pools with,
their channel mean and the channels that moved furthest from average pooling."""
from __future__ import annotations

import math
import re
from pathlib import Path

from ..errors import PlotError
from .figures import new_figure, require_matplotlib, save_png


def pool_weights(pool):
    """The normalised weights ``A`` (C, H, W), float32 on the CPU, as FlexPool computes them.

    pool softmax: the softmax of each channel's logits; pool linear: the raw weights.
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
    SimPool baselines) have no weight map and are skipped. A token FlexPool is drawn on its
    patch grid (one without a grid has no image to draw).
    """
    from ..layers.pools import FlexPool  # torch: imported when drawing, so the command line starts light
    from ..layers.token_pool import TokenFlexPool

    plan = getattr(model, "flexsurgeon_plan", None)
    modules = {t.node: t.module for t in getattr(plan, "sac", ())}
    found = []
    for path, module in model.named_modules():
        if not isinstance(module, FlexPool) and not (isinstance(module, TokenFlexPool) and module.grid is not None):
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


DEFAULT_TOP = 8  # channels per weight map


def plot_weight_maps(model, out_dir, top: int = DEFAULT_TOP, source: str | None = None) -> list[Path]:
    """One PNG per FlexPool in ``model``: its channel-mean weight map and the ``top`` channels
    with the largest spread (max - min of A), on one colour scale centred on ``1/(H*W)``
    (average pooling, white). Returns the paths written; none when the model has no FlexPool.
    ``source`` (e.g. the folder the model came from) goes into the titles.
    """
    check_top(top)
    require_matplotlib()
    out_dir = Path(out_dir)
    written = []
    for stem, label, pool in flex_pools_of(model):
        title = f"{source}: {label}" if source else label
        written.append(save_png(_weight_map_figure(pool, title, top), out_dir / f"{stem}.png"))
    return written


def check_top(top) -> None:
    """A PlotError unless ``top`` (channels per weight map) is a positive integer."""
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise PlotError(f"top must be a positive number of channels, got {top!r}")


def _what_to_draw(pool):
    """``(A as (C, H, W), the source's weight per position, its name, the pool's shape, notes)``:
    a FlexPool's map against average pooling; a token FlexPool's patch weights against the
    weight its start gives a patch (the mean's 1/n, or 0 beside a class token)."""
    import torch

    from ..layers.token_pool import TokenFlexPool

    if not isinstance(pool, TokenFlexPool):
        a = pool_weights(pool)
        h, w = pool.size
        return a, 1.0 / (h * w), "1/(H·W)", "average pooling", f"{a.shape[0]}x{h}x{w}", []
    with torch.no_grad():
        a = pool.patch_weights().cpu()
        whole = pool.pooling_weights().cpu()
    kind, *where = pool.start
    ref = 1.0 / (where[1] - where[0]) if kind == "mean" else 0.0
    name = "1/n" if kind == "mean" else "its start"
    source = f"the mean over {where[1] - where[0]} tokens" if kind == "mean" else f"token {where[0]}"
    notes = [f"prefix token {i}: weight {whole[:, i].mean().item():.3g} (channel mean)" for i in range(pool.num_prefix)]
    return a, ref, name, source, f"{a.shape[0]} x {pool.num_tokens} tokens, patches {a.shape[1]}x{a.shape[2]}", notes


def _weight_map_figure(pool, title: str, top: int):
    from matplotlib.colors import TwoSlopeNorm

    a, uniform, ref_name, source, shape_text, notes = _what_to_draw(pool)
    channels = a.shape[0]
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
    fig = new_figure(figsize=(max(2.3 * cols + 1.4, 7.5), 2.3 * rows + 1.1))
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
    bar.set_ticks(ticks, labels=[f"{t:.3g}" + (f" = {ref_name}" if t == uniform else "") for t in ticks])
    bar.set_label(f"A[c, h, w]; black line: {ref_name} = {uniform:.4g} ({source})", fontsize=8)
    lines = [f"{title}: FlexPool[{pool.pool}] {shape_text}",
             f"channel mean and the top {len(chosen)} channels by spread (max - min of A); white = {ref_name}",
             f"distance from {source}, ½Σ|A - {ref_name}| per channel: mean {distance.mean().item():.3g}, "
             f"max {distance.max().item():.3g}", *notes]
    if still_uniform:
        lines.append(f"(every channel is still exactly {source})")
    fig.suptitle("\n".join(lines), fontsize=9)
    return fig


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "pool"
