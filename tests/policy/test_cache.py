"""Expert cache bookkeeping: invariants under every policy and layout, MRS's update, Belady's bound."""

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataclasses import dataclass

from hybrimoe.policy.belady import belady_misses
from hybrimoe.policy.cache import ExpertCache
from hybrimoe.policy.cache_policies import BeladyPolicy, MRSPolicy

N_LAYERS, N_EXPERTS, TOP_K = 4, 16, 2


def routing(seed: int, n_steps: int, skew: float | None, top_k: int = TOP_K, n_layers: int = N_LAYERS):
    """(layer, topk_ids [1, k], router_probs [1, E]) per layer call; Zipf-skewed when `skew` is given."""
    rng = np.random.default_rng(seed)
    weights = np.ones(N_EXPERTS) if skew is None else 1.0 / np.arange(1, N_EXPERTS + 1) ** skew
    calls = []
    for _ in range(n_steps):
        for layer in range(n_layers):
            perm = rng.permutation(N_EXPERTS)  # a different popularity order per layer
            logits = np.log(weights[perm]) + rng.gumbel(size=N_EXPERTS)
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            topk = np.argsort(-probs)[:top_k]
            calls.append((layer, topk[None, :], probs[None, :]))
    return calls


@dataclass
class Replayed:
    cache: ExpertCache
    hits: int = 0
    misses: int = 0
    loads: int = 0


def replay(cache: ExpertCache, calls, predicted: int = 0, check=None) -> Replayed:
    """The planner's pattern: observe, access, admit every miss with this layer's experts protected."""
    result = Replayed(cache)
    for i, (layer, topk, probs) in enumerate(calls):
        cache.observe(layer, topk, probs)
        experts = topk[0].tolist()
        hits = cache.access(layer, experts)
        result.hits += hits
        result.misses += len(experts) - hits
        needed = {layer: set(experts)}
        for later, later_topk, _ in calls[i + 1 : i + 1 + predicted]:
            needed.setdefault(later, set()).update(later_topk[0].tolist())
        cache.protect(needed)
        protected = {(needed_layer, e) for needed_layer, es in needed.items() for e in es}
        for e in experts:
            before = {eid for eid in protected if cache.is_resident(eid)}
            result.loads += cache.admit((layer, e)) is not None
            assert all(cache.is_resident(eid) for eid in before), "a protected expert was evicted"
            if check is not None:
                check(cache)
    return result


def check_consistent(cache: ExpertCache) -> None:
    assert cache.occupancy() <= cache.capacity
    slots = [cache.slot_of((layer, e)) for layer in range(cache.n_layers) for e in cache.resident(layer)]
    assert len(slots) == cache.occupancy() == len(set(slots))
    for layer in range(cache.n_layers):
        pool = cache.pool_slots(layer)
        for e in cache.resident(layer):
            assert cache.slot_of((layer, e)) in pool
        if cache.layout == "per-layer":
            assert len(cache.resident(layer)) <= len(pool)


def future_of(calls):
    return [(layer, topk[0].tolist()) for layer, topk, _ in calls]


def make(policy, capacity, layout="shared", calls=None, **kwargs):
    if policy == "belady":
        policy = BeladyPolicy(future_of(calls))
    return ExpertCache(N_LAYERS, N_EXPERTS, capacity, layout=layout, policy=policy, **kwargs)


@pytest.mark.parametrize("layout", ["shared", "per-layer"])
@pytest.mark.parametrize("policy", ["mrs", "lru", "lfu", "least-stale", "belady"])
def test_invariants_under_replay(policy, layout):
    calls = routing(seed=1, n_steps=40, skew=1.0)
    for capacity in (0, 3, 13, 32, 64):
        result = replay(make(policy, capacity, layout, calls), calls, predicted=2, check=check_consistent)
        assert result.hits + result.misses == len(calls) * TOP_K
        assert result.loads - result.cache.evictions == result.cache.occupancy()


def test_protected_experts_block_eviction():
    cache = ExpertCache(1, 8, 2, policy="lru")
    cache.fill([(0, 0), (0, 1)])
    cache.protect({0: {0, 1}})
    assert cache.admit((0, 2)) is None
    assert cache.resident(0) == {0, 1}
    cache.protect({0: {0}})
    load = cache.admit((0, 2))
    assert load is not None and load.expert == (0, 2) and load.slot == cache.slot_of((0, 2))
    assert cache.resident(0) == {0, 2} and cache.evictions == 1


@pytest.mark.parametrize("skew", [None, 0.8, 1.2])
@pytest.mark.parametrize("layout", ["shared", "per-layer"])
def test_belady_bound_and_policy_beat_every_other_policy(skew, layout):
    calls = routing(seed=3, n_steps=60, skew=skew)
    accesses = future_of(calls)
    for capacity in (4, 16, 32):
        bound = belady_misses(accesses, capacity, layout, N_LAYERS, N_EXPERTS)
        clairvoyant = replay(make("belady", capacity, layout, calls), calls).misses
        assert bound <= clairvoyant
        for policy in ("mrs", "lru", "lfu"):
            misses = replay(make(policy, capacity, layout), calls).misses
            assert bound <= misses, (policy, capacity)
            assert clairvoyant <= misses, (policy, capacity)
        warm = [(layer, e) for layer in range(N_LAYERS) for e in range(N_EXPERTS)][:capacity]
        static = make("static", capacity, layout)
        static.fill(warm)
        assert bound <= replay(static, calls).misses


def test_belady_misses_hand_example():
    # One layer, capacity 2, accesses a b c a b d a: MIN keeps a and b (bypassing c and d): 4 misses.
    a, b, c, d = 0, 1, 2, 3
    accesses = [(0, [x]) for x in (a, b, c, a, b, d, a)]
    assert belady_misses(accesses, 2, "shared", 1, 4) == 4
    assert belady_misses(accesses, 0, "shared", 1, 4) == 7
    assert belady_misses(accesses, 4, "shared", 1, 4) == 4


def test_lru_hits_grow_with_capacity():
    # One expert per access, every miss admitted: LRU is a stack algorithm, so hits never drop.
    rng = random.Random(5)
    calls = []
    for _ in range(400):
        layer = rng.randrange(N_LAYERS)
        expert = min(int(rng.paretovariate(1.0)) - 1, N_EXPERTS - 1)
        calls.append((layer, np.array([[expert]]), None))
    previous = -1
    for capacity in range(0, N_LAYERS * N_EXPERTS + 1, 3):
        hits = replay(ExpertCache(N_LAYERS, N_EXPERTS, capacity, policy="lru"), calls).hits
        assert hits >= previous, capacity
        previous = hits


def test_mrs_update_equals_sequential_per_token_updates():
    rng = np.random.default_rng(0)
    n_tokens, n_experts, k, alpha = 7, 16, 2, 0.3
    probs = rng.dirichlet(np.ones(n_experts), size=n_tokens)  # [T, E]
    topk = np.argsort(-probs, axis=1)[:, :k]
    batched = ExpertCache(1, n_experts, 4, policy=MRSPolicy(alpha=alpha))
    batched.policy.scores[0] = rng.random(n_experts)
    start = batched.policy.scores[0].copy()
    batched.observe(0, topk, probs)
    # The paper's formula, token by token, with p = 2k.
    expected = start.copy()
    for t in range(n_tokens):
        top = np.argsort(-probs[t])[: 2 * k]
        masked = np.zeros(n_experts)
        masked[top] = probs[t, top]
        expected = alpha * masked + (1 - alpha) * expected
    np.testing.assert_allclose(batched.policy.scores[0], expected, rtol=1e-12)
    sequential = ExpertCache(1, n_experts, 4, policy=MRSPolicy(alpha=alpha))
    sequential.policy.scores[0] = start
    for t in range(n_tokens):
        sequential.observe(0, topk[t : t + 1], probs[t : t + 1])
    np.testing.assert_allclose(sequential.policy.scores[0], expected, rtol=1e-12)
    assert batched.priority((0, int(np.argmax(expected)))) == pytest.approx(expected.max())


def test_mrs_fallbacks_without_router_probs():
    cache = ExpertCache(1, 8, 2, policy="mrs", mrs_alpha=0.5)
    cache.observe(0, np.array([[1, 2]]), None, np.array([[0.75, 0.25]]))
    np.testing.assert_allclose(cache.policy.scores[0], [0, 0.375, 0.125, 0, 0, 0, 0, 0])
    cache.observe(0, np.array([[1, 3]]))
    np.testing.assert_allclose(cache.policy.scores[0], [0, 0.4375, 0.0625, 0.25, 0, 0, 0, 0])


def test_mrs_evicts_lowest_score():
    cache = ExpertCache(1, 8, 2, policy="mrs")
    cache.fill([(0, 0), (0, 1)])
    probs = np.array([[0.05, 0.5, 0.3, 0.15, 0, 0, 0, 0]])
    cache.observe(0, np.array([[1, 2]]), probs)
    assert cache.top_experts(0, 3) == [1, 2, 3]
    load = cache.admit((0, 2))
    assert load.slot == 0 and cache.resident(0) == {1, 2}
    # only_if_better: expert 3 (0.075) does not displace expert 2 (0.15).
    assert cache.admit((0, 3), only_if_better=True) is None


def test_per_layer_layout_splits_capacity():
    cache = ExpertCache(3, 8, 7, layout="per-layer", policy="lru")
    assert [len(cache.pool_slots(layer)) for layer in range(3)] == [3, 2, 2]
    assert [cache.pool_slots(layer).start for layer in range(3)] == [0, 3, 5]
    for e in range(8):
        cache.access(1, [e])
        cache.protect({1: {e}})
        cache.admit((1, e))
        assert len(cache.resident(1)) <= 2
        assert all(cache.slot_of((1, x)) in (3, 4) for x in cache.resident(1))
    assert cache.resident(1) == {6, 7} and cache.occupancy() == 2


def test_static_never_changes():
    calls = routing(seed=2, n_steps=20, skew=1.0)
    freq = np.arange(N_LAYERS * N_EXPERTS, dtype=float).reshape(N_LAYERS, N_EXPERTS)
    cache = ExpertCache(N_LAYERS, N_EXPERTS, 10, policy="static", frequencies=freq)
    loads = cache.fill([(0, 1), (2, 3), (3, 15)])
    assert [load.slot for load in loads] == [0, 1, 2]
    before = {layer: set(cache.resident(layer)) for layer in range(N_LAYERS)}
    assert replay(cache, calls).loads == 0
    assert {layer: set(cache.resident(layer)) for layer in range(N_LAYERS)} == before
    assert cache.evictions == 0
    assert cache.top_experts(1, 2) == [15, 14]


def test_lfu_prefers_frequent_then_recent():
    cache = ExpertCache(1, 8, 2, policy="lfu")
    for e in (0, 0, 1, 2):
        cache.access(0, [e])
        cache.protect({0: {e}})
        cache.admit((0, e))
    # 0 used twice stays; 1 and 2 once each: 1 (older) was evicted for 2.
    assert cache.resident(0) == {0, 2}


def test_belady_clock_must_follow_the_future():
    cache = ExpertCache(2, 4, 2, policy="belady", accesses=[(0, [1]), (1, [2])])
    cache.access(0, [1])
    with pytest.raises(ValueError):
        cache.access(0, [1])
    with pytest.raises(ValueError):
        ExpertCache(2, 4, 2, policy="belady")


def test_belady_evicts_farthest_next_use():
    # Capacity 2; the future is 0 1 2 0 1: at the miss on 2, expert 1 is needed after 0, so goes.
    future = [(0, [x]) for x in (0, 1, 2, 0, 1)]
    cache = ExpertCache(1, 4, 2, policy=BeladyPolicy(future))
    cache.fill([(0, 0), (0, 1)])
    for x in (0, 1, 2):
        cache.access(0, [x])
    assert cache.priority((0, 1)) == -4 and cache.priority((0, 0)) == -3
    cache.protect({0: {2}})
    load = cache.admit((0, 2))
    assert load.slot == 1 and cache.resident(0) == {0, 2}


def test_fill_skips_full_pools_and_residents():
    cache = ExpertCache(2, 4, 2, layout="per-layer", policy="lru")
    loads = cache.fill([(0, 0), (0, 0), (0, 1), (1, 3)])
    assert [(load.expert, load.slot) for load in loads] == [((0, 0), 0), ((1, 3), 1)]
    assert cache.admit((0, 0)) is None  # already resident


@settings(max_examples=60, deadline=None)
@given(
    policy=st.sampled_from(["mrs", "lru", "lfu", "least-stale"]),
    layout=st.sampled_from(["shared", "per-layer"]),
    capacity=st.integers(0, N_LAYERS * N_EXPERTS),
    ops=st.lists(
        st.tuples(st.integers(0, N_LAYERS - 1), st.lists(st.integers(0, N_EXPERTS - 1), min_size=1, max_size=4)),
        max_size=60,
    ),
)
def test_random_operations_keep_invariants(policy, layout, capacity, ops):
    cache = ExpertCache(N_LAYERS, N_EXPERTS, capacity, layout=layout, policy=policy)
    n_accesses = n_hits = 0
    for layer, experts in ops:
        experts = sorted(set(experts))
        probs = np.full((1, N_EXPERTS), 1.0 / N_EXPERTS)
        cache.observe(layer, np.array([experts[:2]]), probs)
        n_hits += cache.access(layer, experts)
        n_accesses += len(experts)
        cache.protect({layer: experts})
        resident_protected = {(layer, e) for e in experts if cache.is_resident((layer, e))}
        for e in experts:
            cache.admit((layer, e), only_if_better=e % 2 == 0)
        assert all(cache.is_resident(eid) for eid in resident_protected)
        check_consistent(cache)
    assert 0 <= n_hits <= n_accesses


@settings(max_examples=60, deadline=None)
@given(
    policy=st.sampled_from(["mrs", "lru", "lfu", "least-stale"]),
    layout=st.sampled_from(["shared", "per-layer"]),
    capacity=st.integers(1, N_LAYERS * N_EXPERTS // 2),
    ops=st.lists(
        st.tuples(
            st.integers(0, N_LAYERS - 1),
            st.lists(st.integers(0, N_EXPERTS - 1), min_size=1, max_size=4, unique=True),
            st.integers(0, N_LAYERS - 1),
            st.lists(st.integers(0, N_EXPERTS - 1), max_size=4, unique=True),
            st.integers(1, 2),
        ),
        max_size=40,
    ),
)
def test_every_eviction_is_the_lowest_priority_unprotected_resident(policy, layout, capacity, ops):
    """The incrementally kept slot priorities and lazy pins agree with a search from scratch."""
    cache = ExpertCache(N_LAYERS, N_EXPERTS, capacity, layout=layout, policy=policy)
    rng = np.random.default_rng(capacity)
    for layer, experts, later, later_experts, n_tokens in ops:
        probs = rng.dirichlet(np.ones(N_EXPERTS), size=n_tokens)  # [T, E]
        cache.observe(layer, np.array([experts[:TOP_K]] * n_tokens), probs)
        cache.access(layer, experts)
        needed = {layer: set(experts)}
        needed.setdefault(later, set()).update(later_experts)
        cache.protect(needed)
        for e in experts:
            if cache.is_resident((layer, e)):
                continue
            pool = cache.pool_slots(layer)
            in_pool = [(o, x) for o in range(N_LAYERS) for x in cache.resident(o) if cache.slot_of((o, x)) in pool]
            candidates = [
                (cache.priority(eid), cache.slot_of(eid), eid) for eid in in_pool if eid[1] not in needed.get(eid[0], ())
            ]
            full = len(in_pool) == len(pool)
            before = {(o, x) for o in range(N_LAYERS) for x in cache.resident(o)}
            load = cache.admit((layer, e))
            after = {(o, x) for o in range(N_LAYERS) for x in cache.resident(o)}
            evicted = before - after
            if evicted:
                assert full and evicted == {min(candidates)[2]}
            if load is None:
                assert not candidates and full
