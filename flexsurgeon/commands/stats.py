"""Statistics for ablation summaries: Student's t quantiles for paired confidence intervals, the
paired t-test's two-sided p-value, and Holm's step-down adjustment over several comparisons.
"""
from __future__ import annotations

import math

# t_{0.975, df}: the two-sided 95% critical values of Student's t for df = 1..30, as printed in
# statistics tables (4 decimals). ``ablate`` compares 2 to 31 paired seeds, so df = 1..30.
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
MAX_DF = len(T_975)


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile at ``p = 0.975`` (a two-sided 95% interval) for ``df`` = 1..30, from the table."""
    if p != 0.975:
        raise ValueError(f"t_quantile has the 0.975 quantile only (two-sided 95% intervals), not {p}")
    if not isinstance(df, int) or not 1 <= df <= MAX_DF:
        raise ValueError(f"t_quantile covers 1 to {MAX_DF} degrees of freedom (2 to {MAX_DF + 1} paired seeds), "
                         f"not {df}")
    return T_975[df - 1]


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom: ``I_x(df/2, 1/2)`` with
    ``x = df / (df + t^2)``, the regularized incomplete beta function."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, not {df}")
    if math.isinf(t):
        return 0.0
    return _incomplete_beta(df / (df + t * t), df / 2, 0.5)


def _incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side only
        return 1.0 - _incomplete_beta(1.0 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * fraction / a


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest of k is multiplied
    by k - i + 1, kept at least as large as the one before it, and capped at 1. An adjusted p
    below alpha rejects that hypothesis with a family-wise error rate of at most alpha."""
    k = len(pvalues)
    adjusted = [0.0] * k
    running = 0.0
    for rank, i in enumerate(sorted(range(k), key=lambda j: pvalues[j])):
        running = max(running, min(1.0, (k - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
