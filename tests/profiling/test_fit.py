import math

import numpy as np
import pytest

from hybrimoe.config import CurvePoint, LatencyCurve, LinearFit
from hybrimoe.errors import ProfileError
from hybrimoe.profile.fit import crossover_tokens, fit_curve, fit_linear, is_erratic, quality_problem, relative_errors

COUNTS = [1, 2, 4, 8, 16, 32, 64, 128]


def points(ms_of, counts=COUNTS):
    return [CurvePoint(n, ms_of(n), 0.01) for n in counts]


def test_exact_line_is_recovered():
    fit = fit_linear(points(lambda n: 0.5 + 0.02 * n))
    assert fit.intercept_ms == pytest.approx(0.5)
    assert fit.per_token_ms == pytest.approx(0.02)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.max_rel_error == pytest.approx(0.0, abs=1e-9)


def test_fit_reports_its_quality_on_noisy_points():
    rng = np.random.default_rng(0)
    noisy = points(lambda n: (0.3 + 0.01 * n) * (1 + 0.05 * rng.standard_normal()))
    fit = fit_linear(noisy)
    predicted = [fit.ms(p.n_tokens) for p in noisy]
    worst = max(abs(m - p.ms) / p.ms for m, p in zip(predicted, noisy))
    assert fit.max_rel_error == pytest.approx(worst)
    assert 0.9 < fit.r2 <= 1.0


def test_relative_weighting_keeps_small_counts_accurate():
    # A fixed cost that dominates small counts, and a big per-token cost: an absolute-error fit would
    # trade the 1-token point away for the 128-token one.
    curve = points(lambda n: 1.0 + 0.001 * n * n)
    fit = fit_linear(curve)
    assert abs(fit.ms(1) - curve[0].ms) / curve[0].ms < 0.2


def test_coefficients_are_never_negative():
    rising = fit_linear(points(lambda n: 0.5 * n - 0.4))  # would fit a negative intercept
    assert rising.intercept_ms == 0.0 and rising.per_token_ms > 0
    falling = fit_linear(points(lambda n: 2.0 - 0.001 * n))  # would fit a negative slope
    assert falling.per_token_ms == 0.0 and falling.intercept_ms > 0
    assert falling.r2 >= 0.0


def test_fit_needs_two_positive_points():
    with pytest.raises(ProfileError, match="at least 2"):
        fit_linear([CurvePoint(1, 1.0)])
    with pytest.raises(ProfileError, match="positive"):
        fit_linear([CurvePoint(1, 1.0), CurvePoint(2, 0.0)])
    with pytest.raises(ProfileError, match="positive"):
        fit_linear([CurvePoint(1, 1.0), CurvePoint(2, math.nan)])


def test_fit_curve_interpolates_the_points_and_extrapolates_with_the_fit():
    measured = points(lambda n: 0.2 + 0.01 * n + (0.05 if n == 8 else 0.0))
    curve = fit_curve(measured)
    assert curve.ms(8) == pytest.approx(measured[3].ms)
    assert curve.ms(256) == pytest.approx(measured[-1].ms + curve.fit.per_token_ms * 128)
    fresh = [CurvePoint(3, curve.ms(3) * 1.1), CurvePoint(12, curve.ms(12))]
    assert relative_errors(curve, fresh) == pytest.approx([1 - 1 / 1.1, 0.0])


def test_crossover_is_where_loading_starts_to_win():
    cpu = LatencyCurve(fit=LinearFit(0.0, 0.1))
    gpu = LatencyCurve(fit=LinearFit(0.01, 0.0))
    assert crossover_tokens(cpu, gpu, load_ms=1.0) == 11  # 1.1 > 1.01, and 1.0 is not
    assert crossover_tokens(cpu, gpu, load_ms=0.001) == 1
    assert crossover_tokens(cpu, gpu, load_ms=1e6) is None


def test_erratic_curves_are_flagged():
    def curve(*ms):
        return LatencyCurve(points=tuple(CurvePoint(2**i, m) for i, m in enumerate(ms)))

    assert is_erratic(curve(16.0, 0.04, 0.05))  # a stalled 1-token point
    assert is_erratic(curve(1.0, 3.0, 1.2))
    assert not is_erratic(curve(1.0, 1.1, 0.9, 2.0))  # noise, not a stall


def test_quality_problems_name_what_is_wrong():
    sound = fit_curve(points(lambda n: 0.5 + 0.02 * n))
    assert quality_problem(sound) is None
    flat_and_noisy = fit_curve([CurvePoint(n, 0.05 + (0.04 if n == 4 else 0.0), 0.01) for n in COUNTS])
    assert flat_and_noisy.fit.r2 < 0.9 and quality_problem(flat_and_noisy) is not None  # a point 80% off
    nearly_flat = fit_curve([CurvePoint(n, 0.050 + 0.001 * (n % 2), 0.001) for n in COUNTS])
    assert nearly_flat.fit.r2 < 0.9 and quality_problem(nearly_flat) is None  # low R², but within 2%
    spread = fit_curve([CurvePoint(n, 0.5 + 0.02 * n, 8.0 if n == 1 else 0.01) for n in COUNTS])
    assert "1 of its 8 points spread" in quality_problem(spread)
    stalled = fit_curve([CurvePoint(1, 16.0, 0.0), CurvePoint(2, 0.04, 0.0), CurvePoint(4, 0.05, 0.0)])
    assert "falls as tokens grow" in quality_problem(stalled)
