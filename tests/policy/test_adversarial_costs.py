"""No cost model can make the policy core hang: tiny, huge and equal costs finish (each run under a
time limit), and costs that are not finite numbers (which profile loading refuses) raise instead
of spinning."""

from __future__ import annotations

import itertools
import signal
from contextlib import contextmanager

import pytest

from hybrimoe.config import PolicyConfig
from hybrimoe.policy import scheduler as sched
from hybrimoe.policy.costs import CostModel
from hybrimoe.policy.comparison import compare_strategies

from .conftest import make_profile, make_trace

LIMIT_S = 60


@contextmanager
def time_limit(seconds: int):
    def expire(signum, frame):
        raise TimeoutError(f"did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


EXTREMES = {"tiny": 1e-9, "huge": 1e9, "one": 1.0}
PROFILES = [
    pytest.param(dict(cpu_ms=cpu, cpu_per_token_ms=cpu, gpu_ms=gpu, load_ms=load, dense_ms=1.0), id=f"cpu {a}, gpu {b}, load {c}")
    for (a, cpu), (b, gpu), (c, load) in itertools.product(EXTREMES.items(), repeat=3)
]


@pytest.mark.parametrize("costs", PROFILES)
def test_the_scheduler_finishes_on_extreme_costs(costs):
    model = CostModel(make_profile(**costs))
    layers = [({e: 1 for e in range(8)}, set(range(0, 8, 2))), ({e: 1 + 7 * e for e in range(6)}, {1, 4}), ({}, set())]
    with time_limit(LIMIT_S):
        for counts, resident in layers:
            for backlog_ms in (0.0, 1e-9, 1e9):
                for guarded in (True, False):
                    plan = sched.schedule_hybrid(counts, resident, model, backlog_ms, guarded)
                    assert sorted(plan.gpu + plan.load + plan.cpu) == sorted(counts)
            sched.schedule_exact(counts, resident, model)


@pytest.mark.parametrize("costs", PROFILES[::4])
def test_the_simulator_finishes_on_extreme_costs(costs):
    trace = make_trace(n_tokens=24, steps=2)
    with time_limit(LIMIT_S):
        for mode in ("decode", "prefill"):
            comparison = compare_strategies(trace, make_profile(**costs), ratios=(0.0, 0.5, 1.0), mode=mode,
                                            prefill_tokens=8, policy=PolicyConfig(prefetch_depth=3))
            assert all(result.total_ms >= 0 for result in comparison.results.values())


def test_a_cost_that_is_not_a_number_raises_instead_of_spinning():
    """The scheduler's loop is bounded: a NaN (which no validated profile holds) once made it spin."""
    model = CostModel(make_profile(load_ms=float("nan")))
    with time_limit(LIMIT_S), pytest.raises(RuntimeError, match="not a finite number"):
        sched.schedule_hybrid({e: 1 for e in range(6)}, {0, 1}, model)
