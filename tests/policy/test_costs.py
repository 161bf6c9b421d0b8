"""The cost model's whole step: work outside the layers, the dense part at the cache's length, the
executor's host work, the planners' time, the stand-in's timing and interference (hand-worked)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hybrimoe.config import Interference, LatencyCurve, LinearFit, ModelCosts, PlannerCost, PolicyConfig
from hybrimoe.policy import scheduler as sched
from hybrimoe.policy.cache import ExpertCache
from hybrimoe.policy.costs import CostModel
from hybrimoe.policy.planner import ModelDims, PolicyPlanner
from hybrimoe.policy.strategies import make_planner

from .conftest import make_profile


def flat(ms: float) -> LatencyCurve:
    return LatencyCurve(fit=LinearFit(ms, 0.0))


def with_model_costs(profile, outside_ms=1.0, host_ms=0.3, context_ms=0.0, planners=()):
    return dataclasses.replace(
        profile,
        model_costs=ModelCosts("test", flat(outside_ms), flat(host_ms), context_ms, planners),
    )


def one_layer_time(profile, ids, resident=(), strategy=None, context_tokens=0, capacity=8):
    """Clock after one step of one layer, from a planner with `resident` experts cached."""
    costs = CostModel(profile)
    dims = ModelDims(1, 8, 2)
    if strategy is None:
        cache = ExpertCache(1, 8, capacity, policy="lru")
        planner = PolicyPlanner(dims, costs, cache, sched.schedule_hybrid, warm=tuple((0, e) for e in resident),
                                planning_ms=costs.planning_ms("hybrimoe"))
    else:
        planner = make_planner(strategy, dims, costs, PolicyConfig(), capacity, np.ones((1, 8)))
    planner.begin_step(len(ids), context_tokens)
    plan = planner.plan_layer(0, np.array(ids), None, {})
    planner.plan_prefetch(plan)
    return planner.clock_ms, plan


def test_estimated_profiles_charge_only_the_fixed_overhead():
    profile = dataclasses.replace(make_profile(dense_ms=0.1), layer_overhead_ms=0.05)
    clock, plan = one_layer_time(profile, [[0, 1]], resident=(0, 1))
    dense = profile.dense_layer.ms(1)
    assert clock == pytest.approx(dense + 0.05 + plan.predicted_ms)


def test_model_costs_add_the_step_the_host_work_and_the_cache_length():
    profile = with_model_costs(make_profile(dense_ms=0.1), outside_ms=1.0, host_ms=0.3, context_ms=0.001)
    clock, plan = one_layer_time(profile, [[0, 1]], resident=(0, 1), context_tokens=100)
    dense = profile.dense_layer.ms(1) + 0.001 * 100 * 1
    assert clock == pytest.approx(1.0 + dense + 0.3 + plan.predicted_ms)


def test_planner_time_is_charged_before_the_experts_and_the_prefetch_choice_when_not_hidden():
    planners = (PlannerCost("hybrimoe", flat(0.04), flat(5.0)),)
    profile = with_model_costs(make_profile(dense_ms=0.1, gpu_ms=0.02), outside_ms=0.0, host_ms=0.0,
                               planners=planners)
    clock, plan = one_layer_time(profile, [[0, 1]], resident=(0, 1))
    before = profile.dense_layer.ms(1) + 0.04
    # On a GPU the prefetch choice overlaps the experts; 5 ms outlasts them, so the layer ends with it.
    assert plan.predicted_ms < 5.0
    assert clock == pytest.approx(before + 5.0)


def test_the_stand_in_runs_copies_then_its_experts_beside_the_cpu_worker():
    stand_in = dataclasses.replace(
        make_profile(cpu_ms=1.0, cpu_per_token_ms=0.0, gpu_ms=0.5, load_ms=0.25, dense_ms=0.0), stand_in=True
    )
    clock, plan = one_layer_time(stand_in, [[0, 1], [2, 3]], resident=(0, 1))  # four experts, one token each
    gpu_ms = stand_in.gpu_expert.ms(1)
    host_ms = len(plan.load) * 0.25 + (len(plan.gpu) + len(plan.load)) * gpu_ms  # one after another
    cpu_ms = len(plan.cpu) * 1.0
    assert set(plan.gpu) == {0, 1} and plan.load  # the plan copies, so the serial host side matters
    assert clock == pytest.approx(stand_in.dense_layer.ms(2) + max(host_ms, cpu_ms))


def test_cpu_experts_beside_copies_are_slowed_by_the_measured_interference():
    base = make_profile(cpu_ms=1.0, cpu_per_token_ms=0.0, gpu_ms=0.01, load_ms=0.2, dense_ms=0.0)
    clash = dataclasses.replace(base, interference=Interference(cpu_slowdown=1.5, copy_slowdown=1.0))
    ids = [[0, 1], [2, 3], [4, 5]]
    clock_base, plan = one_layer_time(base, ids, capacity=2)
    clock_clash, _ = one_layer_time(clash, ids, capacity=2)
    assert plan.cpu and plan.load  # copies run while the CPU computes, and the CPU is the longer side
    dense = base.dense_layer.ms(3)
    assert clock_clash - dense == pytest.approx(1.5 * (clock_base - dense))


def test_a_failed_admit_moves_the_expert_to_a_cpu_that_starts_up():
    profile = dataclasses.replace(make_profile(cpu_ms=1.0, cpu_per_token_ms=0.0, gpu_ms=0.01, load_ms=0.01),
                                  cpu_first_expert_extra_ms=0.5)
    clock, plan = one_layer_time(profile, [[0, 1]], strategy="hybrimoe", capacity=0)
    assert plan.cpu and not plan.load
    assert clock == pytest.approx(profile.dense_layer.ms(1) + 0.5 + 2 * 1.0)
