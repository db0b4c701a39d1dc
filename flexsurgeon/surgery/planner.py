"""Decide what to change: from an analysis to a surgery plan (which pools, which SAC taps, the loss weights).
"""
from __future__ import annotations

import re

from ..errors import AnalysisError
from .analysis import REPLACEABLE, Analysis, StageSite, find_tap
from .plan import PoolEdit, SacTap, SourceSpec, SurgeryPlan, default_sac_weights


def _resolve_taps(analysis: Analysis, sac_stages) -> list[StageSite]:
    stages = analysis.stages
    if sac_stages is None and analysis.default_taps:  # an isotropic token model: blocks at 1/3 and 2/3 of the depth
        return [stages[i] for i in analysis.default_taps if stages[i].hook is not None]
    if sac_stages is None:  # the paper's layout: heads on the two stages before the last (that a hook can read)
        return [s for s in stages[:-1] if s.hook is not None][-2:]
    taps = []
    for item in sac_stages:
        if isinstance(item, int) or (isinstance(item, str) and re.fullmatch(r"-?\d+", item)):
            index = int(item)
            if not -len(stages) <= index < len(stages) - 1 and not (index < 0 and -len(stages) <= index < -1):
                raise AnalysisError(
                    f"--sac-stages index {index} is out of range: the model has stages 0..{len(stages) - 1} "
                    f"and the last ({len(stages) - 1}) feeds the main classifier")
            taps.append(stages[index])
        else:
            taps.append(find_tap(analysis, str(item)))
    for tap in taps:
        if tap.hook is None:
            raise AnalysisError(f"no module returns or takes the tensor at '{tap.module or tap.node}', so a SAC head "
                                "cannot read it with a hook; choose a block's output (see `flexsurgeon inspect`)")
    order = {n.name: i for i, n in enumerate(analysis.traced.graph.nodes)}
    return sorted({t.node: t for t in taps}.values(), key=lambda t: order[t.node])


def _pool_edit(site) -> PoolEdit:
    common = {"channels": site.channels, "size": tuple(site.size), "layout": site.layout, "start": tuple(site.start),
              "prefix": site.prefix, "grid": tuple(site.grid)}
    if site.pool_module is not None:
        return PoolEdit(node=site.node, input=site.input, keepdim=site.pool_module.keepdim,
                        module=site.pool_module.path, replacement="in_place", **common)
    if site.rewrite is not None:
        return PoolEdit(node=site.rewrite.node, input=site.rewrite.input, keepdim=site.rewrite.keepdim,
                        module=site.rewrite.holder, replacement="graph_rewrite", forward=site.rewrite.forward,
                        **common)
    raise AnalysisError(f"the pool at '{site.module or site.node}' is neither a module of its own nor in a module "
                        "that traces on its own, so it cannot be replaced")


def make_plan(analysis: Analysis, source: SourceSpec | None, num_classes: int, *, pool: str = "softmax",
              dropout: float = 0.0, sac_stages=None, sac_weights=None, replace_gating: bool = False) -> SurgeryPlan:
    """Decide what to change: the head average pools (and gating pools if asked) and the SAC taps.

    ``sac_stages``: None for the default (the two stages before the last), an empty list
    for no heads, or stage indices / node names / module paths.
    """
    pools = [p for p in analysis.pools if p.kind in REPLACEABLE and (p.role == "head" or replace_gating)]
    if not pools:
        others = [p for p in analysis.pools if p.role == "head"]
        if others and others[-1].kind == "attention":
            raise AnalysisError(
                f"the head at '{others[-1].module or others[-1].node}' reads one token kept apart from the others: "
                "the output of an attention pool (a learned query over the tokens, timm's global_pool='map') or a "
                "class token carried on its own (PiT); FlexPool has no tokens to weigh there, so it cannot replace it")
        if others:
            raise AnalysisError(
                f"the head pool at '{others[0].module or others[0].node}' is not an average over the whole map or "
                "over a run of tokens (it is a max, a sum, or a masked or weighted reduction), so FlexPool cannot "
                "replace it without changing the model")
        h, w = analysis.img_size
        raise AnalysisError(
            f"no global average pool over a map and no class token or mean over tokens found at input size "
            f"{h}x{w}: the model pools with attention (timm's global_pool='map'), flattens its features into "
            "linear layers, or its last feature map is already 1x1 (then try a larger --img-size)")
    taps = _resolve_taps(analysis, sac_stages)
    weights = tuple(sac_weights) if sac_weights is not None else default_sac_weights(len(taps))
    return SurgeryPlan(
        source=source, num_classes=num_classes, in_chans=analysis.in_chans, img_size=tuple(analysis.img_size),
        pools=tuple(_pool_edit(p) for p in pools),
        sac=tuple(SacTap(node=t.node, channels=t.channels, size=tuple(t.size), module=t.hook.path, read=t.hook.read,
                         layout=t.layout, prefix=t.prefix, grid=tuple(t.grid)) for t in taps),
        sac_weights=weights, pool=pool, dropout=float(dropout),
    )
