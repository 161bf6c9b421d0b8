"""Fitting the cost model to measured points, and what the fitted model implies.

Design choices:
- The policy core's lookups interpolate the measured points (`LatencyCurve.ms`); the linear fit
  summarises a resource (intercept = fixed cost, slope = per-token cost) and extrapolates past the
  last point.
- The fit minimises relative, not absolute, error: points span three decades of token counts, and an
  absolute fit would give up the small counts decode lives on for the large ones.
- Coefficients are kept non-negative: a negative intercept or slope is noise, and the schema refuses
  it. R-squared is the ordinary one on the unweighted points, floored at 0 for the same reason;
  `max_rel_error` is the worst |fit - point| / point.
- Pure numpy, no torch: `simulate` and the policy core may call it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hybrimoe.config import CurvePoint, LatencyCurve, LinearFit
from hybrimoe.errors import ProfileError


def fit_linear(points: Sequence[CurvePoint]) -> LinearFit:
    """ms = intercept + per_token * n_tokens, least squares on relative error, coefficients >= 0."""
    if len(points) < 2:
        raise ProfileError(f"fitting a latency curve needs at least 2 measured points, got {len(points)}")
    n = np.array([p.n_tokens for p in points], dtype=float)
    y = np.array([p.ms for p in points], dtype=float)
    if np.any(y <= 0) or not np.all(np.isfinite(y)):
        raise ProfileError("fitting a latency curve needs positive, finite latencies")
    # Dividing each row by its latency turns absolute residuals into relative ones.
    rows = np.stack([np.ones_like(n), n], axis=1) / y[:, None]
    (intercept, per_token), *_ = np.linalg.lstsq(rows, np.ones_like(y), rcond=None)
    if per_token < 0:
        per_token = 0.0
        intercept = np.sum(1 / y) / np.sum(1 / y**2)
    if intercept < 0:
        intercept = 0.0
        per_token = np.sum(n / y) / np.sum((n / y) ** 2)
    predicted = intercept + per_token * n
    ss_res = float(np.sum((y - predicted) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float(ss_res == 0)
    return LinearFit(
        intercept_ms=float(intercept),
        per_token_ms=float(per_token),
        r2=max(0.0, r2),
        max_rel_error=float(np.max(np.abs(predicted - y) / y)),
    )


def fit_curve(points: Sequence[CurvePoint]) -> LatencyCurve:
    """The measured points with their linear fit: what a profile stores for one resource."""
    return LatencyCurve(points=tuple(points), fit=fit_linear(points))


def relative_errors(curve: LatencyCurve, fresh: Sequence[CurvePoint]) -> list[float]:
    """|model - measured| / measured for points measured after the curve was fitted."""
    return [abs(curve.ms(p.n_tokens) - p.ms) / p.ms for p in fresh]


MIN_R2 = 0.9  # below this (and with a large error) a curve's linear fit is called poor
POOR_FIT_ERROR = 0.25  # ... the largest relative error of the fit that makes a low R² matter
NOISY_SPREAD = 1.0  # a point whose repeats spread over more than its median is noisy


def is_noisy(point: CurvePoint) -> bool:
    return point.spread_ms > NOISY_SPREAD * point.ms


def quality_problem(curve: LatencyCurve) -> str | None:
    """Why a measured curve should not be trusted as it is, in words; None when it looks sound.
    A low R² alone is not a problem: a curve nearly flat over its token counts (tiny experts) has
    little variance to explain, so the fit's largest relative error must be large too."""
    if is_erratic(curve):
        return "its latency falls as tokens grow"
    fit = curve.fit
    if fit.r2 is not None and fit.max_rel_error is not None and fit.r2 < MIN_R2 and fit.max_rel_error > POOR_FIT_ERROR:
        return f"its linear fit is poor (R² {fit.r2:.2f}, a point {fit.max_rel_error:.0%} off)"
    noisy = [p for p in curve.points if is_noisy(p)]
    if noisy:
        return f"{len(noisy)} of its {len(curve.points)} points spread over more than their median"
    return None


def curve_problems(profile) -> list[tuple[str, str]]:
    """(which curve, what is wrong with it) for each measured curve of `profile` that looks unsound."""
    curves = {"CPU expert curve": profile.cpu_expert, "dense layer curve": profile.dense_layer}
    if not profile.stand_in:
        curves["accelerator expert curve"] = profile.gpu_expert
    return [(what, problem) for what, curve in curves.items() if (problem := quality_problem(curve)) is not None]


def is_erratic(curve: LatencyCurve, factor: float = 2.0) -> bool:
    """True when a point is over `factor` times slower than a point with more tokens.

    Work grows with tokens, so this means something else (usually other processes holding the cores
    that a multi-threaded kernel waits for) dominated some measurements.
    """
    fastest_later = float("inf")
    for point in reversed(curve.points):
        if point.ms > factor * fastest_later:
            return True
        fastest_later = min(fastest_later, point.ms)
    return False


def crossover_tokens(cpu: LatencyCurve, gpu: LatencyCurve, load_ms: float, max_tokens: int = 4096) -> int | None:
    """The fewest tokens at which loading an expert and running it on the accelerator beats the CPU.

    Below it the CPU should run a non-resident expert; None when the CPU wins up to `max_tokens`.
    """
    for n_tokens in range(1, max_tokens + 1):
        if cpu.ms(n_tokens) > load_ms + gpu.ms(n_tokens):
            return n_tokens
    return None
