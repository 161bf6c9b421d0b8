"""The peers' newer mechanisms as baselines, on hand-worked routing: kTransformers' front-loading
and dynamic update, llama.cpp's expert LRU, SpecMD's Least-Stale eviction, placement learned on
another trace, and the best-baseline comparison."""

import numpy as np
import pytest

from hybrimoe.config import PolicyConfig
from hybrimoe.errors import UserError
from hybrimoe.policy.cache import ExpertCache
from hybrimoe.policy.costs import CostModel
from hybrimoe.policy.comparison import compare_strategies, make_workload
from hybrimoe.policy.baselines import BaselineParams
from hybrimoe.policy.names import BASELINES
from hybrimoe.policy.planner import ModelDims
from hybrimoe.policy.strategies import make_planner
from hybrimoe.trace import RoutingTrace, TraceStep

from .conftest import make_profile, make_trace


def _step(planner, ids_by_layer: list[list[int]]) -> list[tuple]:
    """One decode step of one token; per layer (plan, the copies plan_prefetch queued)."""
    planner.begin_step(1, 0)
    out = []
    for layer, ids in enumerate(ids_by_layer):
        plan = planner.plan_layer(layer, np.array([ids]), None, {})
        out.append((plan, planner.plan_prefetch(plan)))
    return out


def _resident(cache: ExpertCache) -> set[tuple[int, int]]:
    return {(layer, e) for layer in range(cache.n_layers) for e in cache.resident(layer)}


# -- Least-Stale ---------------------------------------------------------------------------------


def test_least_stale_evicts_a_stale_expert_before_a_current_one():
    cache = ExpertCache(2, 4, 2, policy="least-stale")
    cache.access(0, [0])  # pass 1
    cache.admit((0, 0))
    cache.access(1, [1])
    cache.admit((1, 1))
    cache.access(0, [0])  # pass 2: (0, 0) is current again, (1, 1) is stale
    cache.protect({})
    cache.admit((1, 2))
    assert _resident(cache) == {(0, 0), (1, 2)}


def test_least_stale_keeps_first_in_first_out_order_where_lru_moves_a_used_expert():
    """An expert admitted early in a pass and used later in it keeps its place in the queue; LRU
    moves it to the back, so the two evict different experts."""
    evicted = {}
    for policy in ("least-stale", "lru"):
        cache = ExpertCache(3, 4, 2, policy=policy)
        cache.access(0, [0])  # pass 1, tick 1
        cache.admit((2, 3))  # a prefetch for layer 2
        cache.access(1, [1])  # tick 2
        cache.admit((1, 1))
        cache.access(2, [3])  # tick 3: the prefetched expert is used
        cache.access(0, [2])  # pass 2
        cache.protect({0: {2}})
        before = _resident(cache)
        cache.admit((0, 2))
        evicted[policy] = before - _resident(cache)
    assert evicted == {"least-stale": {(2, 3)}, "lru": {(1, 1)}}


# -- kTransformers -------------------------------------------------------------------------------


def test_front_loading_fills_from_the_first_layer_and_never_copies():
    dims = ModelDims(4, 4, 2)
    planner = make_planner("ktransformers-front", dims, CostModel(make_profile()), PolicyConfig(), 6)
    assert [load.expert for load in planner.initial_loads()] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    for plan, copies in _step(planner, [[0, 1], [1, 2], [0, 3], [2, 3]]):
        assert not plan.loads and not copies
    assert planner.stats.cpu_runs == 5 and planner.stats.accelerator_runs == 3


def test_dynamic_update_moves_the_placement_to_the_online_count_every_n_steps():
    dims = ModelDims(2, 4, 1)
    profiled = np.array([[9.0, 8.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # [L, E]: (0, 0) and (0, 1) were hot
    baseline = BaselineParams(refresh_steps=2, refresh_decay=0.5)
    planner = make_planner("ktransformers-dynamic", dims, CostModel(make_profile()), PolicyConfig(), 2, profiled,
                           baseline)
    assert {load.expert for load in planner.initial_loads()} == {(0, 0), (0, 1)}
    first = _step(planner, [[3], [2]])
    assert [copies for _, copies in first] == [(), ()]  # no refresh after one step
    assert first[0][0].cpu == (3,) and first[1][0].cpu == (2,)  # misses run on the CPU, nothing is loaded
    second = _step(planner, [[3], [2]])
    assert second[0][1] == ()  # the refresh comes after the step's last layer
    assert {load.expert for load in second[1][1]} == {(0, 3), (1, 2)}
    assert _resident(planner.cache) == {(0, 3), (1, 2)}
    third = _step(planner, [[3], [2]])
    assert [plan.gpu for plan, _ in third] == [(3,), (2,)]


def test_dynamic_update_starts_uniform_without_a_profile_and_refreshes_on_long_prefills():
    dims = ModelDims(2, 4, 1)
    baseline = BaselineParams(refresh_steps=100, refresh_prefill_tokens=3)
    planner = make_planner("ktransformers-dynamic", dims, CostModel(make_profile()), PolicyConfig(), 2, None, baseline)
    assert {load.expert for load in planner.initial_loads()} == {(0, 0), (1, 0)}  # one slot per layer
    planner.begin_step(3, 0)
    copies = []
    for layer in range(2):
        plan = planner.plan_layer(layer, np.array([[2], [2], [3]]), None, {})
        copies.append(planner.plan_prefetch(plan))
    assert copies[0] == () and {load.expert for load in copies[1]} == {(0, 2), (1, 2)}


# -- llama.cpp ---------------------------------------------------------------------------------


def test_llamacpp_lru_runs_misses_on_the_cpu_and_uploads_them_for_later_steps():
    dims = ModelDims(2, 4, 2)
    planner = make_planner("llamacpp-lru", dims, CostModel(make_profile()), PolicyConfig(), 4, None,
                           BaselineParams(lru_inserts=1))
    assert planner.initial_loads() == ()  # every layer on the CPU, two LRU slots each, cold
    first = _step(planner, [[0, 1], [2, 3]])
    assert [plan.cpu for plan, _ in first] == [(0, 1), (2, 3)] and not any(plan.loads for plan, _ in first)
    assert [[load.expert for load in copies] for _, copies in first] == [[(0, 0)], [(1, 2)]]  # one per layer
    second = _step(planner, [[0, 1], [2, 3]])
    assert [plan.gpu for plan, _ in second] == [(0,), (2,)]
    assert [[load.expert for load in copies] for _, copies in second] == [[(0, 1)], [(1, 3)]]
    third = _step(planner, [[1, 2], [3, 0]])  # (0, 0) and (1, 2) are the least recently used
    assert [[load.expert for load in copies] for _, copies in third] == [[(0, 2)], [(1, 0)]]
    assert _resident(planner.cache) == {(0, 1), (0, 2), (1, 3), (1, 0)}


def test_llamacpp_lru_keeps_later_layers_fully_resident():
    dims = ModelDims(3, 4, 2)
    planner = make_planner("llamacpp-lru", dims, CostModel(make_profile()), PolicyConfig(), 6, None,
                           BaselineParams(lru_cpu_layers=2))
    assert {load.expert for load in planner.initial_loads()} == {(2, e) for e in range(4)}
    assert [len(planner.cache.pool_slots(layer)) for layer in range(3)] == [1, 1, 4]
    with pytest.raises(ValueError, match="needs 8 slots"):
        make_planner("llamacpp-lru", dims, CostModel(make_profile()), PolicyConfig(), 6, None,
                     BaselineParams(lru_cpu_layers=1))
    with pytest.raises(ValueError, match=r"must be in \[0, 3\]"):
        make_planner("llamacpp-lru", dims, CostModel(make_profile()), PolicyConfig(), 6, None,
                     BaselineParams(lru_cpu_layers=4))


def test_least_stale_serves_the_caching_baselines():
    dims = ModelDims(4, 16, 2)
    for strategy in ("gpu-offload", "llamacpp-lru"):
        planner = make_planner(strategy, dims, CostModel(make_profile()), PolicyConfig(), 16, None,
                               BaselineParams(eviction="least-stale"))
        assert planner.cache.policy.name == "least-stale"
    with pytest.raises(ValueError, match="eviction"):
        BaselineParams(eviction="static")


# -- placement learned on another workload, and the stronger comparison ----------------------


def test_profiling_trace_gives_the_frequencies_and_the_whole_trace_is_replayed():
    trace, other = make_trace(n_tokens=40, seed=0), make_trace(n_tokens=30, seed=1)
    workload = make_workload(trace, "decode", 0.25, 512, None, other)
    assert workload.replay.n_tokens == 40 and workload.profiling_tokens == 30
    assert np.array_equal(workload.profiling_frequencies, other.expert_frequencies())
    with pytest.raises(UserError, match="does not route like"):
        make_workload(trace, "decode", 0.25, 512, None, make_trace(n_experts=8))


def test_best_baseline_is_the_fastest_deployable_one():
    trace = make_trace(n_tokens=48, steps=2)
    comparison = compare_strategies(trace, make_profile(), ratios=(0.25,), mode="decode", references=False)
    best = comparison.best_baseline(0.25)
    assert best in BASELINES
    deployable = [comparison.results[(s, 0.25)].step_ms for s in BASELINES]
    assert comparison.results[(best, 0.25)].step_ms == min(deployable)
    ratio = comparison.vs_best_baseline("hybrimoe", 0.25)
    assert ratio == pytest.approx(min(deployable) / comparison.results[("hybrimoe", 0.25)].step_ms)


def test_a_trace_of_two_steps_replays_through_every_new_baseline_deterministically():
    trace = make_trace(n_tokens=16, steps=2)
    replay = RoutingTrace(trace.meta, tuple(TraceStep(step.topk_ids) for step in trace.steps))
    results = [
        compare_strategies(replay, make_profile(), ratios=(0.25,), mode="prefill", references=False, prefill_tokens=8,
                           strategies=("ktransformers-dynamic", "llamacpp-lru", "ktransformers-front"))
        for _ in range(2)
    ]
    assert [r.step_ms for r in results[0].results.values()] == [r.step_ms for r in results[1].results.values()]


def test_progress_counts_every_cell_of_a_comparison():
    """`simulate`'s bar shows counts and the time left: each cell is announced with the cells done
    and in all (strategies x ratios, the Belady oracle at each ratio, the lower bound once)."""
    calls = []
    compare_strategies(make_trace(n_tokens=16), make_profile(), ratios=(0.25, 0.5), strategies=("hybrimoe", "cpu-only"),
                       mode="decode", progress=lambda done, total, cell: calls.append((done, total, cell)))
    assert [(done, total) for done, total, _ in calls] == [(i, 7) for i in range(7)]
    assert calls[0][2] == "hybrimoe at 25% cache" and calls[-2][2] == "belady-oracle at 50% cache"
    assert calls[-1][2] == "lower-bound"
