import numpy as np
import pytest

from hybrimoe.config import PolicyConfig
from hybrimoe.errors import UserError
from hybrimoe.policy.costs import CostModel
from hybrimoe.policy.comparison import compare_strategies, make_workload
from hybrimoe.policy.simulator import simulate
from hybrimoe.policy.names import STRATEGIES
from hybrimoe.policy.planner import ModelDims
from hybrimoe.policy.strategies import cache_capacity, make_planner

from .conftest import make_profile, make_trace

DIMS = ModelDims(4, 16, 2)


def _planner(strategy, trace, ratio=0.5, policy=PolicyConfig()):
    costs = CostModel(make_profile())
    return make_planner(strategy, DIMS, costs, policy, cache_capacity(DIMS, ratio), trace.expert_frequencies())


def test_simulation_is_deterministic(trace):
    decode = trace.as_decode()
    first = simulate(decode, _planner("hybrimoe", trace))
    second = simulate(decode, _planner("hybrimoe", trace))
    assert first == second


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_and_accounts_every_expert(strategy, trace):
    decode = trace.as_decode()
    planner = _planner(strategy, trace)
    result = simulate(decode, planner, strategy=strategy)
    stats = planner.stats
    activations = sum(len(set(step.topk_ids[layer, 0].tolist())) for step in decode.steps for layer in range(4))
    assert stats.cpu_runs + stats.accelerator_runs == activations == stats.activations
    assert 0 <= stats.hits <= activations
    assert result.total_ms > 0
    assert len(result.layer_ms) == 4


def test_plans_partition_the_activated_experts_and_never_exceed_the_cache(trace):
    planner = _planner("hybrimoe", trace, ratio=0.25, policy=PolicyConfig(prefetch_depth=2))
    capacity = planner.cache.capacity
    slots: dict[int, tuple[int, int]] = {load.slot: load.expert for load in planner.initial_loads()}
    for step in trace.as_decode().steps:
        for layer in range(4):
            ids = step.topk_ids[layer]
            predicted = {layer + 1: step.topk_ids[layer + 1]} if layer < 3 else {}
            plan = planner.plan_layer(layer, ids, None, predicted)
            assert sorted(plan.gpu + plan.load + plan.cpu) == sorted(set(ids.ravel().tolist()))
            for load in plan.loads:
                slots[load.slot] = load.expert
            for expert in plan.gpu + plan.load:
                assert slots[plan.slot_of[expert]] == (layer, expert)
            for load in planner.plan_prefetch(plan):
                assert load.expert[0] != layer
                slots[load.slot] = load.expert
            assert all(0 <= slot < capacity for slot in slots)


def test_cpu_only_has_no_hits_and_full_cache_static_has_all_hits(trace):
    decode = trace.as_decode()
    assert simulate(decode, _planner("cpu-only", trace)).hit_rate == 0.0
    assert simulate(decode, _planner("static-oracle", trace, ratio=1.0)).hit_rate == 1.0


def test_hybrid_is_never_slower_than_static_on_the_same_resident_set(trace):
    decode = trace.as_decode()
    costs = CostModel(make_profile())
    static = make_planner("static-oracle", DIMS, costs, PolicyConfig(), 32, trace.expert_frequencies())
    policy = PolicyConfig(cache_policy="static", prefetch="none")
    hybrid = make_planner("hybrimoe", DIMS, costs, policy, 32, trace.expert_frequencies())
    assert simulate(decode, hybrid).total_ms <= simulate(decode, static).total_ms + 1e-9


def test_compare_reports_every_cell_and_speedups():
    trace = make_trace(n_tokens=200)
    comparison = compare_strategies(trace, make_profile(), ratios=(0.25, 0.75), mode="decode")
    assert set(comparison.results) == {(s, r) for s in (*STRATEGIES, "belady-oracle", "lower-bound") for r in (0.25, 0.75)}
    assert comparison.speedup("ktransformers", 0.25) == pytest.approx(1.0)
    prefill = compare_strategies(trace, make_profile(), ratios=(0.5,), mode="prefill", prefill_tokens=50)
    assert prefill.results[("hybrimoe", 0.5)].n_steps == 3


def test_workload_split_keeps_profiling_and_replay_apart():
    trace = make_trace(n_tokens=100)
    workload = make_workload(trace, "decode", 0.25, 512, None)
    assert workload.profiling_tokens == 25
    assert workload.replay.n_tokens == 75
    assert workload.profiling_frequencies.sum() == 25 * 4 * 2
    with pytest.raises(UserError):
        make_workload(trace, "decode", 1.5, 512, None)


def test_mismatched_profile_is_refused():
    from hybrimoe.config import ExpertShape
    import dataclasses

    profile = dataclasses.replace(make_profile(), expert_shape=ExpertShape(128, 32))
    with pytest.raises(UserError, match="made for experts"):
        compare_strategies(make_trace(n_tokens=20), profile, ratios=(0.5,))


def test_per_layer_warm_start_fills_every_layers_share(trace):
    policy = PolicyConfig(cache_layout="per-layer")
    planner = _planner("hybrimoe", trace, ratio=0.25, policy=policy)
    assert [len(planner.cache.resident(layer)) for layer in range(4)] == [4, 4, 4, 4]
    assert len(planner.initial_loads()) == 16


def test_plan_prefetch_receives_the_layers_context(trace):
    """plan_layer hands what plan_prefetch needs over in the plan: no state waits between the calls."""
    planner = _planner("hybrimoe", trace, policy=PolicyConfig(prefetch_depth=2))
    ids = trace.steps[0].topk_ids[0, :1]  # [1, k]
    planner.begin_step(1, 0)
    plan = planner.plan_layer(0, ids, None, {1: ids})
    assert plan.context.layer == 0 and plan.context.counts == {e: 1 for e in ids[0].tolist()}
    assert not plan.context.observed  # the score update waits for an admit or plan_prefetch
    planner.plan_prefetch(plan)
    assert plan.context.observed


@pytest.mark.parametrize("layout", ["shared", "per-layer"])
def test_every_admit_sees_the_score_updates_of_every_planned_layer(layout):
    """The score update waits for the first admit (or plan_prefetch); no admit may see stale scores."""
    from hybrimoe.policy.cache_policies import MRSPolicy

    n_layers, n_experts, top_k = 4, 16, 2
    dims = ModelDims(n_layers, n_experts, top_k)
    rng = np.random.default_rng(3)
    planner = make_planner(
        "hybrimoe", dims, CostModel(make_profile(load_ms=0.05)), PolicyConfig(cache_layout=layout, prefetch_depth=2),
        cache_capacity(dims, 0.25), rng.random((n_layers, n_experts)),
    )
    shadow = MRSPolicy(alpha=0.5, top_p=2 * top_k)
    shadow.bind(n_layers, n_experts)
    cache, admit = planner.cache, planner.cache.admit
    n_admits = 0

    def checked_admit(*args, **kwargs):
        nonlocal n_admits
        n_admits += 1
        np.testing.assert_array_equal(cache.policy.scores, shadow.scores)
        return admit(*args, **kwargs)

    cache.admit = checked_admit
    for i in range(400):
        layer, n_tokens = i % n_layers, 1 if i % 7 else 3
        ids = np.stack([rng.choice(n_experts, top_k, replace=False) for _ in range(n_tokens)])  # [T, k]
        probs = rng.dirichlet(np.ones(n_experts), size=n_tokens)  # [T, E]
        predicted = {(layer + d) % n_layers: rng.choice(n_experts, (n_tokens, top_k)) for d in (1, 2)}
        shadow.on_observe(layer, ids, probs, None)
        plan = planner.plan_layer(layer, ids, probs, predicted)
        planner.plan_prefetch(plan)
        np.testing.assert_array_equal(cache.policy.scores, shadow.scores)
    assert n_admits > 100
    assert planner.stats.demand_loads > 0 and planner.stats.prefetch_loads > 0


def test_hits_that_waited_for_a_prefetch_in_flight_are_counted_apart():
    """Impact prefetch two layers ahead with slow copies: some prefetched experts are still in flight
    when their layer starts."""
    trace = make_trace(n_tokens=60)
    planner = make_planner("hybrimoe", DIMS, CostModel(make_profile(load_ms=0.4)), PolicyConfig(prefetch_depth=2),
                           cache_capacity(DIMS, 0.5), trace.expert_frequencies())
    result = simulate(trace.as_decode(), planner)
    stats = planner.stats
    assert 0 < stats.waited_hits <= min(stats.hits, stats.prefetch_used)
    assert result.stall_ms > 0  # every waited hit delays its layer
    assert result.ready_hit_rate == pytest.approx((stats.hits - stats.waited_hits) / stats.activations)
    assert result.waited_hit_rate + result.ready_hit_rate == pytest.approx(result.hit_rate)


def test_without_prefetch_no_hit_waits():
    trace = make_trace(n_tokens=30)
    planner = _planner("hybrimoe", trace, policy=PolicyConfig(prefetch="none"))
    result = simulate(trace.as_decode(), planner)
    assert planner.stats.waited_hits == 0 and result.stall_ms == 0 and result.ready_hit_rate == result.hit_rate
