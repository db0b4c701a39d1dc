"""The text reports of the command line: what inspect found and what convert did."""
from __future__ import annotations

from ..layers.kinds import FLEXPOOL_KINDS
from ..surgery.costs import CostReport


def converted_line(plan) -> str:
    """One line on what convert changed: where each pool was replaced and how, and the SAC taps."""
    pools = ", ".join(pool_site(p, plan.pools) for p in plan.pools)
    heads = ", ".join(t.module or t.node for t in plan.sac) or "none"
    return f"converted {plan.source.label}: {pool_label(plan.pool)} at {pools}; SAC heads: {heads}"


def inspection_report(model: str, found) -> str:
    """What ``flexsurgeon inspect`` prints: pools, stages and what convert would do."""
    a = found.analysis
    lines = [f"{model} at {a.in_chans}x{a.img_size[0]}x{a.img_size[1]}", "", "global pools:"]
    rows = [("node", "module", "kind", "role", "input CxHxW or tokens")]
    rows += [(p.node, pool_module(p), p.kind, p.role, shape_text(p)) for p in a.pools]
    lines += table(rows) if a.pools else ["  none"]
    lines += ["", "stages:"]
    rows = [("#", "node", "module", "channels", "HxW or tokens", "reduction")]
    rows += [(str(i), s.node, s.hook.path if s.hook else s.module, str(s.channels),
              f"{s.size[1]} tokens" if s.layout == "tokens" else f"{s.size[0]}x{s.size[1]}", str(s.reduction))
             for i, s in enumerate(a.stages)]
    lines += table(rows) if a.stages else ["  none"]
    lines += ["", "convert would:"]
    if found.plan is None:
        lines.append(f"  refuse: {found.problem}")
    else:
        plan = found.plan
        for p in plan.pools:
            dropout = f", dropout {plan.dropout}" if plan.dropout else ""
            lines.append(f"  replace the pool at {pool_site(p, plan.pools)} with {pool_label(plan.pool)} "
                         f"{shape_text(p)}{dropout}" + (f": {token_reads(p)}" if p.layout == "tokens" else ""))
        for t, w in zip(plan.sac, plan.sac_weights):
            lines.append(f"  attach a SAC head at {t.node} ({t.read} of {t.module}), {shape_text(t)}, loss weight {w}")
        lines.append(f"  main classifier loss weight {plan.sac_weights[-1]}")
    if found.costs is not None:
        lines += ["", "cost (one image, torch's FLOP counter; multiply-adds = FLOPs / 2):", *cost_lines(found.costs)]
    return "\n".join(lines)


def pool_module(site) -> str:
    """The module a found pool is, or the method whose code holds it (``forward_head``); else
    the path torch.fx gives its node."""
    if site.pool_module is not None:
        return site.pool_module.path
    if site.rewrite is not None:
        return ".".join(filter(None, (site.rewrite.holder, site.rewrite.forward)))
    return site.module


def pool_site(edit, edits=()) -> str:
    """Where a pool is replaced and how: ``global_pool (in place)``, ``head.forward (graph
    rewrite)``. The node, named in that method's own graph, only where the method holds
    another replaced pool: it is not the node name of the whole model's graph."""
    if edit.replacement == "in_place":
        return f"{edit.module} (in place)"
    where = (edit.module, edit.forward)
    node = f", node {edit.node}" if sum((e.module, e.forward) == where for e in edits) > 1 else ""
    return f"{'.'.join(filter(None, where))}{node} (graph rewrite)"


def shape_text(site) -> str:
    """``768x7x7`` for a map (C x H x W), ``192 x 197 tokens`` for a token sequence."""
    if site.layout == "tokens":
        return f"{site.channels} x {site.size[1]} tokens"
    return f"{site.channels}x{site.size[0]}x{site.size[1]}"


def token_reads(site) -> str:
    """What a token pool reads, as the source model did: ``class token 0 of 197``, ``mean over 196
    patch tokens (14x14 grid), 1 prefix token skipped``."""
    n, start = site.size[1], site.start
    if start[0] == "token":
        return f"{'class ' if start[1] < site.prefix else ''}token {start[1]} of {n}"
    first, last = start[1], start[2]
    grid = f" ({site.grid[0]}x{site.grid[1]} grid)" if site.grid else ""
    if first == site.prefix and last == n and site.prefix:
        return f"mean over {last - first} patch tokens{grid}, {first} prefix token{'s' * (first > 1)} skipped"
    if first == 0 and last == n:
        return f"mean over all {n} tokens{grid}"
    return f"mean over tokens {first} to {last - 1} of {n}"


def table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def cost_lines(report: CostReport) -> list[str]:
    """The report as a small table: parameters and multiply-adds, then each added module."""
    def row(label, cost, base=None):
        change = "" if base is None else f"{cost.params - base.params:+,} / {cost.macs - base.macs:+,}"
        return (label, f"{cost.params:,}", f"{cost.macs:,}", change)

    rows = [("model", "parameters", "multiply-adds", "change vs source"), row("source", report.source),
            row("converted, inference", report.inference, report.source),
            row("converted, training (with SAC heads)", report.training, report.source)]
    rows += [(f"  + {name}", f"{cost.params:,}", f"{cost.macs:,}", "") for name, cost in report.added]
    return table(rows)


def pool_label(pool: str) -> str:
    """How reports name a pool kind: ``FlexPool[softmax]``, ``avg pool``, ..."""
    return f"FlexPool[{pool}]" if pool in FLEXPOOL_KINDS else f"{pool} pool"
