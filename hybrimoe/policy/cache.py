"""The GPU expert cache's bookkeeping: which expert sits in which slot, and which one to evict. No tensors.

Design choices:
- Capacity counts experts. Layout "shared" is one pool of `capacity` slots for all layers;
  "per-layer" splits it evenly (the first `capacity % n_layers` layers get one slot more) or as
  given (`pool_sizes`), each layer owning a contiguous slot range. Slots are numbered
  0..capacity-1 overall either way, and a free slot is always the lowest-numbered free one of its
  pool.
- Residency is `_slot_eid` (slot -> expert, None when free). Two indexes are derived from it for
  the hot paths, and only `_place` and `_evict` change any of the three: `_resident` (per layer,
  the set of resident experts: membership tests) and `_slots` ([L, E] slot per expert, NOT_RESIDENT
  (-1) elsewhere: vectorized refreshes and lookups). -1 is the only "not resident" value.
- Priorities come from the cache policy (`cache_policies.py`): the victim is the unprotected
  resident of the pool with the lowest priority, lowest slot on ties, an argmin over `_slot_prio`
  (each slot's priority; +inf when free or pinned; one scratch entry at the end, which the -1 of a
  non-resident expert indexes, so a layer's refresh is one scatter). A policy's observe hook may
  change a whole layer's priorities; the slots are refreshed only at the next victim search
  (`_refresh_stale`), so a plan that evicts nothing never pays it.
- `protect` names the experts no admit may evict (those the current layer and the predicted next
  layers need), by layer, until it is called again; `admit` returns None when every candidate is
  protected. Protection is applied lazily: when the argmin is protected its slot is pinned to +inf
  and the argmin taken again; the next `protect` unpins what it no longer covers. The mapping is
  kept, not copied: do not mutate it while it protects.
- `resident(layer)` returns the live set (no copy): do not mutate it, and copy it if you need a
  snapshot across `admit` calls.
- Shapes: E = experts per layer, L = layers.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet

import numpy as np

from hybrimoe.errors import PolicyError
from hybrimoe.policy.cache_policies import CachePolicy, make_policy
from hybrimoe.policy.names import LAYOUTS, check_name, even_pool_sizes
from hybrimoe.policy.plan import ExpertId, SlotLoad

NOT_RESIDENT = -1
_INF = float("inf")


class ExpertCache:
    """Which (layer, expert) sits in which accelerator slot, and which one an admit evicts."""

    def __init__(
        self,
        n_layers: int,
        n_experts: int,
        capacity: int,
        layout: str = "shared",
        policy: str | CachePolicy = "mrs",
        mrs_alpha: float = 0.5,
        mrs_top_p: int | None = None,
        frequencies: np.ndarray | None = None,  # [L, E], for the static policy's priorities
        accesses: Sequence[tuple[int, Iterable[int]]] | None = None,  # the future, for "belady"
        pool_sizes: Sequence[int] | None = None,  # [L] slots per layer, for "per-layer" (default: even)
    ):
        check_name("cache layout", layout, LAYOUTS)
        if not 0 <= capacity <= n_layers * n_experts:
            raise PolicyError(f"capacity must be in [0, {n_layers * n_experts}], got {capacity}")
        self.n_layers, self.n_experts, self.capacity, self.layout = n_layers, n_experts, capacity, layout
        if isinstance(policy, str):
            kwargs = {"accesses": accesses} if accesses is not None else {}
            policy = make_policy(policy, alpha=mrs_alpha, top_p=mrs_top_p, frequencies=frequencies, **kwargs)
        self.policy = policy
        policy.bind(n_layers, n_experts)
        self._prio = policy.prio  # [L*E + 1]
        self._prio_rows = policy.prio[:-1].reshape(n_layers, n_experts)  # [L, E] view
        self._pools, self._pool_of_layer = _pools(n_layers, capacity, layout, pool_sizes)
        self._free = [list(range(hi - 1, lo - 1, -1)) for lo, hi in self._pools]  # popped from the end
        self._slot_eid: list[ExpertId | None] = [None] * capacity
        self._resident: list[set[int]] = [set() for _ in range(n_layers)]
        self._slots = np.full((n_layers, n_experts), NOT_RESIDENT, dtype=np.intp)  # [L, E]
        self._slot_prio = np.full(capacity + 1, np.inf)  # [capacity + 1], the last entry scratch
        self._pool_prio = [self._slot_prio[lo:hi] for lo, hi in self._pools]  # views of _slot_prio
        self._pinned: set[int] = set()  # slots held at +inf because the current protection covers them
        self._stale: set[int] = set()  # layers whose priorities changed since the last victim search
        self._protected: Mapping[int, Collection[int]] = {}
        self.evictions = 0

    # -- queries ---------------------------------------------------------------------------------

    def resident(self, layer: int) -> AbstractSet[int]:
        """The live set of layer's resident experts (not a copy: do not mutate)."""
        return self._resident[layer]

    def is_resident(self, eid: ExpertId) -> bool:
        return eid[1] in self._resident[eid[0]]

    def slot_of(self, eid: ExpertId) -> int | None:
        slot = int(self._slots[eid])
        return None if slot == NOT_RESIDENT else slot

    def slots_of(self, layer: int, experts: Iterable[int]) -> dict[int, int]:
        """expert -> slot, for resident experts of `layer`."""
        row = self._slots[layer]
        return {expert: int(row[expert]) for expert in experts}

    def priority(self, eid: ExpertId) -> float:
        return float(self._prio[eid[0] * self.n_experts + eid[1]])

    def occupancy(self) -> int:
        """Resident experts (at most `capacity`)."""
        return self.capacity - sum(map(len, self._free))

    def pool_slots(self, layer: int) -> range:
        """The slots layer's experts may occupy."""
        return range(*self._pools[self._pool_of_layer[layer]])

    def weakest_priority(self, layer: int) -> float:
        """The priority an expert of `layer` must beat to displace a resident (-inf: a free slot;
        +inf: nothing in its pool may be evicted)."""
        pool = self._pool_of_layer[layer]
        if self._free[pool]:
            return -_INF
        slot = self._victim(pool)
        return _INF if slot is None else float(self._slot_prio[slot])

    def weakest_priorities(self, layers: list[int]) -> list[float]:
        """`weakest_priority` of each layer, searched once per pool."""
        floor_of_pool: dict[int, float] = {}
        for layer in layers:
            pool = self._pool_of_layer[layer]
            if pool not in floor_of_pool:
                floor_of_pool[pool] = self.weakest_priority(layer)
        return [floor_of_pool[self._pool_of_layer[layer]] for layer in layers]

    def outside_priorities(self, layers: list[int]) -> np.ndarray:
        """[len(layers), E] the priorities of those layers' experts, -inf for resident ones (a copy).

        `layers` ascending; consecutive layers are sliced rather than gathered.
        """
        first, last = layers[0], layers[-1]
        if last - first == len(layers) - 1:
            prio, slots = self._prio_rows[first : last + 1], self._slots[first : last + 1]
        else:
            prio, slots = self._prio_rows.take(layers, axis=0), self._slots.take(layers, axis=0)
        return np.where(slots == NOT_RESIDENT, prio, -_INF)

    def top_experts(self, layer: int, n: int) -> list[int]:
        """Layer's n highest-priority experts, highest first (ties: lower id first)."""
        n = max(0, min(n, self.n_experts))
        if n == 0:
            return []
        row = self._prio_rows[layer]
        ids = np.argpartition(-row, n - 1)[:n] if n < self.n_experts else np.arange(self.n_experts)
        return ids[np.lexsort((ids, -row[ids]))].tolist()

    def top_experts_overall(self, n: int) -> list[ExpertId]:
        """The n highest-priority experts of all layers, highest first (ties: lower layer, then expert)."""
        prio = self._prio[:-1]  # [L*E]
        keys = np.lexsort((np.arange(prio.shape[0]), -prio))[: max(0, n)]
        return [(int(key) // self.n_experts, int(key) % self.n_experts) for key in keys]

    # -- bookkeeping -----------------------------------------------------------------------------

    def observe(
        self,
        layer: int,
        topk_ids: np.ndarray,  # [T, k]
        router_probs: np.ndarray | None = None,  # [T, E]
        topk_weights: np.ndarray | None = None,  # [T, k]
    ) -> None:
        """Score bookkeeping for one layer call (MRS); a no-op for the other policies."""
        if self.policy.uses_observe:
            self.policy.on_observe(layer, topk_ids, router_probs, topk_weights)
            if self._resident[layer]:
                self._stale.add(layer)

    def access(self, layer: int, experts: Collection[int]) -> int:
        """Tells the policy which (distinct) experts layer uses now; returns how many were resident."""
        hits = len(self._resident[layer].intersection(experts))
        if self.policy.uses_access:
            self.policy.on_access(layer, experts)
            if hits:  # access-driven policies change only the accessed experts' priorities
                row, slot_prio, prio = self._slots[layer], self._slot_prio, self._prio
                base = layer * self.n_experts
                for expert in experts:
                    slot = row[expert]
                    if slot != NOT_RESIDENT:
                        slot_prio[slot] = prio[base + expert]
        return hits

    def protect(self, experts_by_layer: Mapping[int, Collection[int]]) -> None:
        """From now until the next call, no admit evicts these experts (layer -> experts)."""
        self._protected = experts_by_layer
        for slot in [slot for slot in self._pinned if not self._is_protected(slot)]:
            self._pinned.discard(slot)
            self._slot_prio[slot] = self.priority(self._slot_eid[slot])

    def admit(self, eid: ExpertId, only_if_better: bool = False) -> SlotLoad | None:
        """Gives eid a slot: a free one, else the lowest-priority unprotected resident's.

        With `only_if_better`, evicts only a resident of strictly lower priority than eid. Returns
        None (and changes nothing) when eid is already resident, the policy never admits, or no
        resident may be evicted.
        """
        layer, expert = eid
        if expert in self._resident[layer] or not self.policy.admits:
            return None
        pool = self._pool_of_layer[layer]
        free = self._free[pool]
        key = layer * self.n_experts + expert
        if free:
            slot = free.pop()
        else:
            slot = self._victim(pool)
            if slot is None or (only_if_better and not self._slot_prio[slot] < self._prio[key]):
                return None
            self._evict(slot)
        if self.policy.uses_admit:
            self.policy.on_admit(key)
        self._place(eid, slot)
        return SlotLoad(eid, slot)

    def fill(self, eids: Iterable[ExpertId]) -> list[SlotLoad]:
        """Warm start: puts each eid in a free slot of its pool (no eviction; skipped when full)."""
        loads = []
        for layer, expert in eids:
            eid = (int(layer), int(expert))
            free = self._free[self._pool_of_layer[eid[0]]]
            if eid[1] in self._resident[eid[0]] or not free:
                continue
            slot = free.pop()
            self._place(eid, slot)
            loads.append(SlotLoad(eid, slot))
        return loads

    # -- the victim search and the two places residency changes ---------------------------------

    def _victim(self, pool: int) -> int | None:
        """The pool's lowest-priority unprotected resident slot, or None."""
        lo, hi = self._pools[pool]
        if lo == hi:
            return None
        self._refresh_stale()
        slot_prio, pool_prio = self._slot_prio, self._pool_prio[pool]
        while True:
            slot = lo + int(pool_prio.argmin())
            if slot_prio[slot] == _INF:
                return None
            if not self._is_protected(slot):
                return slot
            self._pin(slot)

    def _refresh_stale(self) -> None:
        """Copies the changed priorities of observed layers to their resident experts' slots (one
        scatter per layer: the non-resident experts land in the scratch entry)."""
        for layer in self._stale:
            self._slot_prio[self._slots[layer]] = self._prio_rows[layer]
        self._stale.clear()

    def _is_protected(self, slot: int) -> bool:
        layer, expert = self._slot_eid[slot]
        experts = self._protected.get(layer)
        return experts is not None and expert in experts

    def _pin(self, slot: int) -> None:
        self._slot_prio[slot] = _INF
        self._pinned.add(slot)

    def _place(self, eid: ExpertId, slot: int) -> None:
        layer, expert = eid
        self._slot_eid[slot] = eid
        self._resident[layer].add(expert)
        self._slots[layer, expert] = slot
        if self._is_protected(slot):
            self._pin(slot)
        else:
            self._slot_prio[slot] = self._prio[layer * self.n_experts + expert]

    def _evict(self, slot: int) -> None:
        layer, expert = self._slot_eid[slot]
        self._slot_eid[slot] = None
        self._resident[layer].discard(expert)
        self._slots[layer, expert] = NOT_RESIDENT
        self._pinned.discard(slot)
        self.evictions += 1


def _pools(
    n_layers: int, capacity: int, layout: str, pool_sizes: Sequence[int] | None
) -> tuple[list[tuple[int, int]], list[int]]:
    """([(first slot, end slot)] per pool, [pool of each layer])."""
    if layout == "shared":
        return [(0, capacity)], [0] * n_layers
    sizes = pool_sizes if pool_sizes is not None else even_pool_sizes(capacity, n_layers)
    if len(sizes) != n_layers or sum(sizes) != capacity or min(sizes, default=0) < 0:
        raise PolicyError(f"pool sizes must be {n_layers} counts summing to {capacity}, got {list(sizes)}")
    ends = np.cumsum(sizes).tolist()
    return [(end - size, end) for size, end in zip(sizes, ends)], list(range(n_layers))
