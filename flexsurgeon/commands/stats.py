"""Statistics for ablation summaries: Student's t quantiles for paired confidence intervals.
"""
from __future__ import annotations

import math


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (for confidence intervals), by bisection on the integrated density."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError("t_quantile needs 0.5 <= p < 1 and df >= 1")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float) -> float:  # Simpson's rule on [0, t]
        steps = 2000
        h = t / steps
        total = 0.0
        for i in range(steps + 1):
            x = i * h
            f = math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))
            total += f * (1 if i in (0, steps) else 4 if i % 2 else 2)
        return 0.5 + total * h / 3

    low, high = 0.0, 1.0
    while cdf(high) < p:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2
