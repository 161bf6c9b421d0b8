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
  experts, no prediction; kept as a baseline. Both are bounded by the copy engine's idle time
  (`max_loads`, from the planner); impact also by its gains (a copy must shorten a predicted layer
  or outrank the weakest resident). Top-score has no such filter and fills its budget, so its
  budget is only the idle copy time before the next layer (copies beyond it would make that layer
  wait, and a layer that waits leaves more "idle" time to fill: the copy storm).
- Nothing the current layer or a predicted layer needs is ever evicted: the caller names those
  experts with `ExpertCache.protect` first.
- Shapes: T = tokens in the step, k = top-k.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet

import numpy as np

from hybrimoe.policy.cache import ExpertCache
from hybrimoe.policy.costs import CostModel
from hybrimoe.policy.names import MEMO_MAX, is_decode
from hybrimoe.policy.plan import SlotLoad
from hybrimoe.policy.scheduler import ScheduleFn

_EPSILON_MS = 1e-12  # a gain must beat the best so far by more than rounding

# (n_tokens_of, resident) -> simulated finish time of a layer's experts; `resident` holds only
# experts of n_tokens_of.
LayerTimeFn = Callable[[Mapping[int, int], AbstractSet[int]], float]
# (n_resident, n_other) -> the same for a decode layer: every count 1, n_resident of its experts
# resident and n_other not.
DecodeTimeFn = Callable[[int, int], float]


class LayerTimes:
    """A layer's simulated expert time with an idle copy engine, for the impact prefetcher's gains:
    `schedule` with `costs`, memoized on the layer's load pattern (`layer_time`, a `LayerTimeFn`),
    and on the resident count alone in decode (`decode_time`, a `DecodeTimeFn`)."""

    def __init__(self, schedule: ScheduleFn, costs: CostModel):
        self.schedule, self.costs = schedule, costs
        self._memo: dict[tuple, float] = {}

    def layer_time(self, counts: Mapping[int, int], resident: AbstractSet[int]) -> float:
        if is_decode(counts):
            return self.decode_time(len(resident), len(counts) - len(resident))
        resident_loads, other_loads = [], []
        for expert, n_tokens in counts.items():
            (resident_loads if expert in resident else other_loads).append(n_tokens)
        key = (tuple(sorted(resident_loads)), tuple(sorted(other_loads)))
        finish_ms = self._memo.get(key)
        if finish_ms is None:
            finish_ms = self._remember(key, self.schedule(counts, resident, self.costs).finish_ms)
        return finish_ms

    def decode_time(self, n_resident: int, n_other: int) -> float:
        key = (n_resident, n_other)
        finish_ms = self._memo.get(key)
        if finish_ms is None:
            counts = dict.fromkeys(range(n_resident + n_other), 1)
            finish_ms = self._remember(key, self.schedule(counts, set(range(n_resident)), self.costs).finish_ms)
        return finish_ms

    def _remember(self, key: tuple, finish_ms: float) -> float:
        if len(self._memo) >= MEMO_MAX:
            self._memo.clear()
        self._memo[key] = finish_ms
        return finish_ms


def token_counts(topk_ids: np.ndarray) -> dict[int, int]:
    """[T, k] routed ids -> {expert: tokens routed to it}."""
    if topk_ids.shape[0] == 1:
        return dict.fromkeys(topk_ids.tolist()[0], 1)
    experts, counts = np.unique(topk_ids, return_counts=True)
    return dict(zip(experts.tolist(), counts.tolist()))


class _Candidates:
    """One predicted layer's predicted, non-resident experts (the order to try them in), its
    simulated time, and its best candidate with that candidate's gain (None: none shortens it)."""

    __slots__ = ("layer", "candidates", "current_ms", "best_gain_ms", "best")

    def __init__(self, layer: int, candidates: list[int], current_ms: float):
        self.layer, self.candidates, self.current_ms = layer, candidates, current_ms
        self.best_gain_ms, self.best = 0.0, None

    def take_best(self) -> None:
        """The best candidate became resident: the layer's time drops by its gain; rescore."""
        self._made_resident(self.best)
        self.candidates.remove(self.best)
        self.current_ms -= self.best_gain_ms
        if self.candidates:
            self.rescore()

    def rescore(self) -> None: ...

    def _made_resident(self, expert: int) -> None: ...


class _DecodeCandidates(_Candidates):
    """A decode layer (every predicted count 1): its time depends only on how many of its experts
    are resident, so every candidate gains the same and the lowest id goes first."""

    __slots__ = ("n_resident", "decode_time")

    def __init__(self, layer: int, candidates: list[int], n_resident: int, decode_time: DecodeTimeFn):
        super().__init__(layer, candidates, decode_time(n_resident, len(candidates)))
        self.n_resident, self.decode_time = n_resident, decode_time

    def rescore(self) -> None:
        gain = self.current_ms - self.decode_time(self.n_resident + 1, len(self.candidates) - 1)
        self.best_gain_ms, self.best = (gain, self.candidates[0]) if gain > _EPSILON_MS else (0.0, None)

    def _made_resident(self, expert: int) -> None:
        self.n_resident += 1


class _CountedCandidates(_Candidates):
    """A layer with predicted token counts: each candidate's gain is the layer's simulated time
    without it minus with it resident; candidates go by predicted tokens, most first."""

    __slots__ = ("counts", "resident", "layer_time")

    def __init__(self, layer: int, candidates: list[int], counts: Mapping[int, int], resident: set[int],
                 layer_time: LayerTimeFn):
        super().__init__(layer, candidates, layer_time(counts, resident))
        self.counts, self.resident, self.layer_time = counts, resident, layer_time

    def rescore(self) -> None:
        self.best_gain_ms, self.best = 0.0, None
        tried_n_tokens = 0
        for expert in self.candidates:
            # Candidates are sorted by count and equal counts gain the same: try the first of each.
            n_tokens = self.counts[expert]
            if n_tokens == tried_n_tokens:
                continue
            tried_n_tokens = n_tokens
            self.resident.add(expert)
            gain = self.current_ms - self.layer_time(self.counts, self.resident)
            self.resident.discard(expert)
            if gain > self.best_gain_ms + _EPSILON_MS:
                self.best_gain_ms, self.best = gain, expert

    def _made_resident(self, expert: int) -> None:
        self.resident.add(expert)


def _candidates_of(
    cache: ExpertCache, layer: int, counts: Mapping[int, int], layer_time: LayerTimeFn,
    decode_time: DecodeTimeFn | None,
) -> _Candidates | None:
    cached = cache.resident(layer)
    candidates = [e for e in counts if e not in cached]
    if not candidates:
        return None
    if is_decode(counts):
        candidates.sort()  # equal gains: lowest id first
        if decode_time is not None:
            return _DecodeCandidates(layer, candidates, len(counts) - len(candidates), decode_time)
    else:
        candidates.sort(key=lambda e: (-counts[e], e))
    return _CountedCandidates(layer, candidates, counts, cached.intersection(counts), layer_time)


class _Deadlines:
    """Room on the copy queue for copies bound for several later layers, queued in their order:
    `caps[i]` copies at most may be queued up to and including `layers[i]`'s, so that each lands
    before its layer starts."""

    def __init__(self, layers: Sequence[int], caps: Sequence[int]):
        self.position = {layer: i for i, layer in enumerate(layers)}
        self.room = list(caps)

    def allows(self, layer: int) -> bool:
        return min(self.room[self.position[layer]:]) > 0

    def take(self, layer: int) -> None:
        room = self.room
        for i in range(self.position[layer], len(room)):
            room[i] -= 1


def impact_prefetch(
    cache: ExpertCache,
    predicted_counts: Mapping[int, Mapping[int, int]],  # later layer -> {expert: predicted tokens}
    load_caps: Mapping[int, int],  # later layer, in queue order -> copies queued up to its own
    layer_time: LayerTimeFn,
    warm_layers: tuple[int, ...] = (),
    decode_time: DecodeTimeFn | None = None,
) -> list[SlotLoad]:
    """Greedy by simulated gain over predicted experts, then warm fill by cache score. The copies
    come back in `load_caps`' layer order, the warm fill's last.

    `load_caps` covers every predicted layer: the most copies that may be queued up to and
    including that layer's, so that each lands before its layer starts; the warm fill, queued
    last, has the last layer's room.
    With `decode_time`, a layer whose predicted counts are all 1 is timed by how many of its
    experts are resident, without building sets.
    """
    loads: list[SlotLoad] = []
    if not load_caps or cache.capacity == 0:
        return loads
    deadlines = _Deadlines(tuple(load_caps), tuple(load_caps.values()))
    if deadlines.room[-1] <= 0:
        return loads
    layers = []
    for layer, counts in predicted_counts.items():
        candidates = _candidates_of(cache, layer, counts, layer_time, decode_time)
        if candidates is not None:
            candidates.rescore()
            layers.append(candidates)
    while layers:
        layers = [candidates for candidates in layers if deadlines.allows(candidates.layer)]
        best = _best_layer(layers)
        if best is None:
            break
        load = cache.admit((best.layer, best.best))
        if load is None:
            break
        loads.append(load)
        deadlines.take(best.layer)
        best.take_best()
        if not best.candidates:
            layers.remove(best)
    loads.sort(key=lambda load: deadlines.position[load.expert[0]])
    if deadlines.room[-1] > 0 and warm_layers:
        loads.extend(warm_fill(cache, warm_layers, deadlines.room[-1]))
    return loads


def _best_layer(layers: list[_Candidates]) -> _Candidates | None:
    """The layer whose best candidate gains most (the first on ties), or None when none gains."""
    best_gain_ms, best = 0.0, None
    for candidates in layers:
        if candidates.best_gain_ms > best_gain_ms + _EPSILON_MS:
            best_gain_ms, best = candidates.best_gain_ms, candidates
    return best


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
