"""The text reports of the command line: what inspect found and what convert did."""
from __future__ import annotations

from ..layers.kinds import FLEXPOOL_KINDS
from ..surgery.costs import CostReport


def converted_line(plan) -> str:
    """One line on what convert changed: where each pool was replaced and how, and the SAC taps."""
    pools = ", ".join(pool_site(p) for p in plan.pools)
    heads = ", ".join(t.module or t.node for t in plan.sac) or "none"
    return f"converted {plan.source.label}: {pool_label(plan.pool)} at {pools}; SAC heads: {heads}"


def inspection_report(model: str, found) -> str:
    """What ``flexsurgeon inspect`` prints: pools, stages and what convert would do."""
    a = found.analysis
    lines = [f"{model} at {a.in_chans}x{a.img_size[0]}x{a.img_size[1]}", "", "global pools:"]
    rows = [("node", "module", "kind", "role", "input CxHxW")]
    rows += [(p.node, p.module, p.kind, p.role, f"{p.channels}x{p.size[0]}x{p.size[1]}") for p in a.pools]
    lines += table(rows) if a.pools else ["  none"]
    lines += ["", "stages:"]
    rows = [("#", "node", "module", "channels", "HxW", "reduction")]
    rows += [(str(i), s.node, s.module, str(s.channels), f"{s.size[0]}x{s.size[1]}", str(s.reduction))
             for i, s in enumerate(a.stages)]
    lines += table(rows) if a.stages else ["  none"]
    lines += ["", "convert would:"]
    if found.plan is None:
        lines.append(f"  refuse: {found.problem}")
    else:
        plan = found.plan
        for p in plan.pools:
            dropout = f", dropout {plan.dropout}" if plan.dropout else ""
            lines.append(f"  replace the pool at {pool_site(p)} with {pool_label(plan.pool)} "
                         f"{p.channels}x{p.size[0]}x{p.size[1]}{dropout}")
        for t, w in zip(plan.sac, plan.sac_weights):
            lines.append(f"  attach a SAC head at {t.node} ({t.read} of {t.module}), "
                         f"{t.channels}x{t.size[0]}x{t.size[1]}, loss weight {w}")
        lines.append(f"  main classifier loss weight {plan.sac_weights[-1]}")
    if found.costs is not None:
        from .report import cost_lines

        lines += ["", "cost (one image, torch's FLOP counter; multiply-adds = FLOPs / 2):", *cost_lines(found.costs)]
    return "\n".join(lines)


def pool_site(edit) -> str:
    """Where a pool is replaced and how: ``global_pool (in place)``, ``forward of head (graph rewrite)``."""
    if edit.replacement == "in_place":
        return f"{edit.module} (in place)"
    return f"{'.'.join(filter(None, (edit.module, edit.forward)))}, node {edit.node} (graph rewrite)"


def table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def cost_lines(report: CostReport) -> list[str]:
    """The report as a small table: parameters and multiply-adds, then each added module."""
    from .report import table

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
