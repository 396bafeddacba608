r"""Intervals across seeds for `trl-cpo demo`.

Every number the demo reports is a mean over seeds with a 95% Student-t interval,

    mean +- t(0.975, n - 1) * s / sqrt(n),      s = the sample standard deviation over the n seeds,

(`t_interval`); with one seed there is no interval. Seeds vary everything (data, reference, training), so the
interval is about the whole experiment, not only the optimiser's noise; with 3 seeds ``t(0.975, 2) = 4.30``, so it is
wide unless the seeds agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

CONFIDENCE = 0.95
INTERVAL_NAME = "95% Student-t interval over seeds: mean ± t(0.975, n-1) * sd / sqrt(n) (no interval for n = 1)"


def _t_central_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with `df` (integer) degrees of freedom (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    sin, cos = math.sin(theta), math.cos(theta)
    if df % 2:
        series, term = (cos, cos) if df > 1 else (0.0, 0.0)
        for k in range(1, (df - 3) // 2 + 1):
            term *= cos * cos * (2 * k) / (2 * k + 1)
            series += term
        return 2 / math.pi * (theta + sin * series)
    series, term = 1.0, 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= cos * cos * (2 * k - 1) / (2 * k)
        series += term
    return sin * series


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student-t critical value: ``P(|T| < t) = confidence`` (e.g. 4.303 for df=2 at 95%)."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df={df!r} must be an integer >= 1.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} must be in (0, 1).")
    low, high = 0.0, 1.0
    while _t_central_mass(high, df) < confidence:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if _t_central_mass(middle, df) < confidence else (low, middle)
    return (low + high) / 2


def t_interval(values: Sequence[float | None], confidence: float = CONFIDENCE) -> dict[str, Any] | None:
    """``{"mean", "low", "high", "n"}`` of the non-None `values` (see the module docstring); None if there are none.

    ``low`` and ``high`` are None for a single value.
    """
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    if n == 0:
        return None
    mean = sum(xs) / n
    if n == 1:
        return {"mean": round(mean, 6), "low": None, "high": None, "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n - 1, confidence) * sd / math.sqrt(n)
    return {"mean": round(mean, 6), "low": round(mean - half, 6), "high": round(mean + half, 6), "n": n}
