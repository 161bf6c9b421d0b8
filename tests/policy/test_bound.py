"""The lower bound: no schedule of a layer, and no strategy on the shipped traces and profiles, beats it."""

from pathlib import Path

import numpy as np
import pytest

from hybrimoe.config import load_profile
from hybrimoe.policy import scheduler as sched
from hybrimoe.policy.bound import expert_phase_bound_ms, lower_bound
from hybrimoe.policy.comparison import compare_strategies
from hybrimoe.policy.costs import CostModel
from hybrimoe.trace import load_trace

from .conftest import make_profile, make_trace

REPO = Path(__file__).resolve().parents[2]
PROFILES = sorted(p for p in (REPO / "profiles").glob("*.qwen3-30b-a3b*.yaml") if load_profile(p).has_accelerator)


def test_a_layer_bound_is_below_the_exact_optimum_of_every_resident_set():
    costs = CostModel(make_profile(cpu_ms=0.3, cpu_per_token_ms=0.05, gpu_ms=0.05, load_ms=0.2))
    rng = np.random.default_rng(0)
    for _ in range(200):
        n_experts = int(rng.integers(1, 9))
        counts = {e: int(rng.integers(1, 40)) for e in range(n_experts)}
        bound_ms = expert_phase_bound_ms(counts, costs)
        for resident in ({e for e in counts if rng.random() < 0.5}, set(counts), set()):
            assert bound_ms <= sched.schedule_exact(counts, resident, costs).finish_ms + 1e-9


def test_a_decode_layer_bound_is_tight_when_one_side_is_much_faster():
    costs = CostModel(make_profile(cpu_ms=10.0, gpu_ms=0.02))
    counts = dict.fromkeys(range(8), 1)
    assert expert_phase_bound_ms(counts, costs) == pytest.approx(8 * costs.gpu_ms(1))


def test_the_bound_charges_what_every_strategy_pays_outside_the_experts():
    trace = make_trace(n_tokens=20)
    costs = CostModel(make_profile())
    bound = lower_bound(trace.as_decode(), costs)
    assert bound.n_steps == 20 and bound.step_ms > 4 * (costs.dense_ms(1) + costs.host_ms(1))


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_no_strategy_beats_the_bound_on_the_shipped_traces(profile, mode):
    comparison = compare_strategies(
        load_trace(REPO / "traces" / "qwen3-30b-a3b.npz"), load_profile(profile), ratios=(0.25, 0.75), mode=mode,
        max_tokens=24, prefill_tokens=12,
    )
    for (strategy, ratio), result in comparison.results.items():
        assert comparison.results[("lower-bound", ratio)].total_ms <= result.total_ms + 1e-6, (strategy, ratio)


@pytest.mark.parametrize("stand_in", [False, True])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_no_strategy_beats_the_bound_on_synthetic_routing(stand_in, mode):
    """Also where copies are slow against the experts, and on the CPU stand-in (nothing overlaps)."""
    import dataclasses

    profile = dataclasses.replace(make_profile(load_ms=1.5), stand_in=stand_in)
    comparison = compare_strategies(make_trace(n_tokens=120, seed=5), profile, ratios=(0.25, 0.75), mode=mode,
                                    prefill_tokens=16)
    for (strategy, ratio), result in comparison.results.items():
        assert comparison.results[("lower-bound", ratio)].total_ms <= result.total_ms + 1e-9, (strategy, ratio)
