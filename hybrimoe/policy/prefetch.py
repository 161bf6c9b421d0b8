"""Prefetching: what to copy into the expert cache for later layers while the copy engine is idle.

Design choices:
- Impact-driven (the paper's): for each later layer with predicted routing, the gain of making a
  predicted, non-resident expert resident is how much the scheduler's simulated time for that layer
  drops. Experts are taken greedily by gain while the copy budget lasts; gains are re-evaluated
  after each pick because a layer's second resident expert helps less than its first.
- Warm fill: budget left after the predicted experts goes to the highest-score experts of the next
  layers that outrank the cache's weakest unprotected resident, so PCIe time the schedule leaves idle
  keeps the cache warm instead of only admitting experts loaded for immediate use.
- Top-score (what the released HybriMoE code does): the next layer's highest-score non-resident
  experts, no prediction; kept as a baseline.
- Nothing the current layer or a predicted layer needs is ever evicted: the caller names those
  experts with `ExpertCache.protect` first.
- Shapes: T = tokens in the step, k = top-k.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from hybrimoe.policy.cache import ExpertCache
from hybrimoe.policy.plan import SlotLoad

# (n_tokens_of, resident) -> simulated finish time of a layer's experts
LayerTimeFn = Callable[[Mapping[int, int], frozenset[int] | set[int]], float]


def token_counts(topk_ids: np.ndarray) -> dict[int, int]:
    """[T, k] routed ids -> {expert: tokens routed to it}."""
    if topk_ids.shape[0] == 1:
        return dict.fromkeys(topk_ids[0].tolist(), 1)
    experts, counts = np.unique(topk_ids, return_counts=True)
    return dict(zip(experts.tolist(), counts.tolist()))


def impact_prefetch(
    cache: ExpertCache,
    predicted_counts: Mapping[int, Mapping[int, int]],  # later layer -> {expert: predicted tokens}
    max_loads: int,
    layer_time: LayerTimeFn,
    warm_layers: tuple[int, ...] = (),
) -> list[SlotLoad]:
    """Greedy by simulated gain over predicted experts, then warm fill by cache score."""
    loads: list[SlotLoad] = []
    if max_loads <= 0 or cache.capacity == 0:
        return loads
    # Per predicted layer: its counts, a snapshot of its resident set, its non-resident candidates
    # by predicted tokens (most first), and its current simulated time.
    layers = []
    for layer, counts in predicted_counts.items():
        # Only membership of the predicted experts matters to the layer's time: keep just those.
        cached = cache.resident(layer)
        resident = {e for e in counts if e in cached}
        candidates = sorted((e for e in counts if e not in resident), key=lambda e: (-counts[e], e))
        if candidates:
            layers.append([layer, counts, resident, candidates, layer_time(counts, resident)])
    while len(loads) < max_loads and layers:
        best_gain, best = 0.0, None
        for entry in layers:
            layer, counts, resident, candidates, current_ms = entry
            tried_counts: set[int] = set()
            for expert in candidates:
                # Within a layer, experts with equal token counts have equal gains: try one of each.
                n_tokens = counts[expert]
                if n_tokens in tried_counts:
                    continue
                tried_counts.add(n_tokens)
                resident.add(expert)
                gain = current_ms - layer_time(counts, resident)
                resident.discard(expert)
                if gain > best_gain + 1e-12:
                    best_gain, best = gain, (entry, expert)
        if best is None:
            break
        entry, expert = best
        load = cache.admit((entry[0], expert))
        if load is None:
            break
        loads.append(load)
        entry[2].add(expert)
        entry[3].remove(expert)
        entry[4] -= best_gain
        if not entry[3]:
            layers.remove(entry)
    if len(loads) < max_loads and warm_layers:
        loads.extend(warm_fill(cache, warm_layers, max_loads - len(loads)))
    return loads


def warm_fill(cache: ExpertCache, layers: tuple[int, ...], max_loads: int) -> list[SlotLoad]:
    """Loads the best-scored non-resident experts of `layers` that outrank the weakest resident."""
    loads: list[SlotLoad] = []
    candidates = []
    for layer in layers:
        # Only experts above the current victim's priority could be admitted.
        floor = cache.weakest_priority(layer)
        row = cache.priorities(layer)  # [E]
        better = np.flatnonzero((row > floor) & ~cache.resident_mask(layer))  # ascending ids
        best = better[np.argsort(-row[better], kind="stable")[:max_loads]].tolist()  # ties: lower id first
        candidates.extend((float(row[e]), layer, e) for e in best)
    candidates.sort(key=lambda item: (-item[0], item[1], item[2]))
    for _, layer, expert in candidates[:max_loads]:
        load = cache.admit((layer, expert), only_if_better=True)
        if load is None:
            break
        loads.append(load)
    return loads


def top_score_prefetch(cache: ExpertCache, next_layer: int, max_loads: int) -> list[SlotLoad]:
    """The released prototype's rule: the next layer's highest-score experts, no prediction."""
    loads: list[SlotLoad] = []
    if max_loads <= 0 or cache.capacity == 0:
        return loads
    resident = cache.resident(next_layer)
    for expert in cache.top_experts(next_layer, max_loads + len(resident)):
        if len(loads) == max_loads:
            break
        if expert in resident:
            continue
        load = cache.admit((next_layer, expert))
        if load is None:
            break
        loads.append(load)
    return loads
