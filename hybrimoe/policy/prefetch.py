"""Prefetching: what to copy into the expert cache for later layers while the copy engine is idle.

Design choices:
- Impact-driven (the paper's): for each later layer with predicted routing, the gain of making a
  predicted, non-resident expert resident is how much the scheduler's simulated time for that layer
  drops. Experts are taken greedily by gain while the copy budget lasts; the picked layer's gain is
  re-evaluated after each pick because a layer's second resident expert helps less than its first
  (the other layers' gains do not change). In decode every predicted count is 1, so a layer's time
  depends only on how many of its experts are resident (`DecodeTimeFn`).
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
from collections.abc import Set as AbstractSet

import numpy as np

from hybrimoe.policy.cache import ExpertCache
from hybrimoe.policy.plan import SlotLoad

# (n_tokens_of, resident) -> simulated finish time of a layer's experts; `resident` holds only
# experts of n_tokens_of.
LayerTimeFn = Callable[[Mapping[int, int], AbstractSet[int]], float]
# (n_resident, n_other) -> the same for a decode layer: every count 1, n_resident of its experts
# resident and n_other not.
DecodeTimeFn = Callable[[int, int], float]


def token_counts(topk_ids: np.ndarray) -> dict[int, int]:
    """[T, k] routed ids -> {expert: tokens routed to it}."""
    if topk_ids.shape[0] == 1:
        return dict.fromkeys(topk_ids.tolist()[0], 1)
    experts, counts = np.unique(topk_ids, return_counts=True)
    return dict(zip(experts.tolist(), counts.tolist()))


def impact_prefetch(
    cache: ExpertCache,
    predicted_counts: Mapping[int, Mapping[int, int]],  # later layer -> {expert: predicted tokens}
    max_loads: int,
    layer_time: LayerTimeFn,
    warm_layers: tuple[int, ...] = (),
    decode_time: DecodeTimeFn | None = None,
) -> list[SlotLoad]:
    """Greedy by simulated gain over predicted experts, then warm fill by cache score.

    With `decode_time`, a layer whose predicted counts are all 1 is timed by how many of its
    experts are resident, without building sets.
    """
    loads: list[SlotLoad] = []
    if max_loads <= 0 or cache.capacity == 0:
        return loads
    # Per predicted layer: [layer, counts (None in decode), which of its predicted experts are
    # resident (in decode: how many), the others by predicted tokens (most first, then by id), its
    # current simulated time, its best candidate's gain, that candidate]. Only the chosen layer's
    # best candidate changes after a pick.
    entries = []
    for layer, counts in predicted_counts.items():
        cached = cache.resident(layer)
        candidates = [e for e in counts if e not in cached]
        if not candidates:
            continue
        all_ones = len(counts) == sum(counts.values())
        if all_ones:  # equal gains: lowest id first
            candidates.sort()
        else:
            candidates.sort(key=lambda e: (-counts[e], e))
        if all_ones and decode_time is not None:
            n_resident = len(counts) - len(candidates)
            entry = [layer, None, n_resident, candidates, decode_time(n_resident, len(candidates)), 0.0, None]
        else:
            resident = cached.intersection(counts)
            entry = [layer, counts, resident, candidates, layer_time(counts, resident), 0.0, None]
        _rescore(entry, layer_time, decode_time)
        entries.append(entry)
    while len(loads) < max_loads and entries:
        best_gain, best = 0.0, None
        for entry in entries:
            if entry[5] > best_gain + 1e-12:
                best_gain, best = entry[5], entry
        if best is None:
            break
        expert = best[6]
        load = cache.admit((best[0], expert))
        if load is None:
            break
        loads.append(load)
        if best[1] is None:
            best[2] += 1
        else:
            best[2].add(expert)
        best[3].remove(expert)
        best[4] -= best_gain
        if best[3]:
            _rescore(best, layer_time, decode_time)
        else:
            entries.remove(best)
    if len(loads) < max_loads and warm_layers:
        loads.extend(warm_fill(cache, warm_layers, max_loads - len(loads)))
    return loads


def _rescore(entry: list, layer_time: LayerTimeFn, decode_time: DecodeTimeFn | None) -> None:
    """Sets entry's best gain and candidate (0.0 and None when no candidate shortens the layer)."""
    _, counts, resident, candidates, current_ms, _, _ = entry
    best_gain, best = 0.0, None
    if counts is None:  # decode: every candidate gains the same; `resident` is a count
        gain = current_ms - decode_time(resident + 1, len(candidates) - 1)
        if gain > 1e-12:
            best_gain, best = gain, candidates[0]
        entry[5], entry[6] = best_gain, best
        return
    tried_n_tokens = 0
    for expert in candidates:
        # Experts with equal token counts have equal gains, and candidates are sorted by count:
        # try the first of each count.
        n_tokens = counts[expert]
        if n_tokens == tried_n_tokens:
            continue
        tried_n_tokens = n_tokens
        resident.add(expert)
        gain = current_ms - layer_time(counts, resident)
        resident.discard(expert)
        if gain > best_gain + 1e-12:
            best_gain, best = gain, expert
    entry[5], entry[6] = best_gain, best


def warm_fill(cache: ExpertCache, layers: tuple[int, ...], max_loads: int) -> list[SlotLoad]:
    """Loads the best-scored non-resident experts of `layers` that outrank the weakest resident
    (ties: lower layer, then lower id)."""
    layers = sorted(layers)
    outside = cache.outside_priorities(layers)  # [n, E], -inf where resident
    # Only experts above the current victim's priority could be admitted.
    floors = cache.weakest_priorities(layers)
    if floors.count(floors[0]) == len(floors):
        floor = floors[0]
    else:  # per-layer pools: mask each layer by its own floor
        floor = -np.inf
        outside = np.where(outside > np.array(floors)[:, None], outside, floor)
    if max_loads == 1:
        best = [int(outside.argmax())]  # the first maximum: lowest (layer, expert) on ties
    else:
        best = np.argsort(-outside, axis=None, kind="stable")[:max_loads].tolist()
    flat_outside = outside.ravel()
    loads: list[SlotLoad] = []
    n_experts = cache.n_experts
    for flat in best:
        if not flat_outside[flat] > floor:
            break
        load = cache.admit((layers[flat // n_experts], flat % n_experts), only_if_better=True)
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
