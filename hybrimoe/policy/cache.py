"""The GPU expert cache's bookkeeping: which expert sits in which slot, and which one to evict. No tensors.

Design choices:
- Capacity counts experts. Layout "shared" is one pool of `capacity` slots for all layers;
  "per-layer" splits it evenly (the first `capacity % n_layers` layers get one slot more) or as
  given (`pool_sizes`), each layer owning a contiguous slot range. Slots are numbered
  0..capacity-1 overall either way, and a free slot is always the lowest-numbered free one of its
  pool.
- Every policy keeps one flat float array `prio` [L*E + 1] (index layer * E + expert; the last entry
  is +inf for free slots). The victim is the unprotected resident expert of the pool with the lowest
  priority, lowest slot on ties: an argmin over the pool's slots in `_slot_prio` (each slot's
  priority, +inf when free). Policies change the priorities of one layer at a time (`observe`,
  `access`), so only that layer's slots are refreshed, in one vectorized step; after `observe`
  the refresh waits for the next victim search, so a plan that evicts nothing never pays it (and
  the prefetch choice, off the runtime's critical path, pays it instead). Protection is
  checked lazily: when the argmin is protected, its slot is pinned to +inf (and unpinned at the next
  `protect`) and the argmin is taken again. Priorities:
  * MRS (the paper's Minus Recent Score): S <- a * TopP(s) + (1 - a) * S for every token of every
    step, s the token's router probabilities, TopP keeping its p highest (p defaults to 2 * top-k)
    and zeroing the rest. For T tokens the sequential updates sum to
    S_T = (1-a)^T S_0 + sum_t a (1-a)^(T-1-t) TopP(s_t), computed in one vectorized step. Without
    router probabilities the top-k weights stand in for s (zero elsewhere), else 1/k per chosen expert.
  * LRU: the tick (one per `access` call) of the last use; admission counts as a use, so a
    prefetched expert is not the next victim.
  * LFU: uses counted over the whole run, resident or not; ties go to the least recently used.
  * Least-Stale (SpecMD): experts not yet used in the ongoing forward pass go first, first in
    first out within each tier (see `LeastStalePolicy`).
  * static: the resident set is fixed by `fill`; `admit` always returns None. Priorities are the
    given frequencies (for `top_experts`), zero without them.
  * Belady (clairvoyant): built with the future access sequence; priority = -(position of next use),
    so the victim is the expert used farthest in the future. Each `access` advances its clock.
- `protect` names the experts no admit may evict (those the current layer and the predicted next
  layers need), by layer, until it is called again; `admit` returns None when every candidate is
  protected. The mapping is kept, not copied: do not mutate it while it protects.
- `resident(layer)` returns the live set (no copy): do not mutate it, and copy it if you need a
  snapshot across `admit` calls.
- `belady_misses` is a lower bound on the misses of any policy: Belady's MIN with bypass (a miss
  need not be admitted) on the flattened access sequence, which is optimal for each pool.
- Shapes: T = tokens in the step, k = top-k, E = experts per layer, L = layers.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet

import numpy as np

from hybrimoe.policy.plan import ExpertId, SlotLoad

POLICIES = ("mrs", "lru", "lfu", "least-stale", "static", "belady")
CONFIGURABLE_POLICIES = ("mrs", "lru", "lfu", "least-stale", "static")  # what a profile's policy may name
ADMITTING_POLICIES = tuple(p for p in CONFIGURABLE_POLICIES if p != "static")  # the ones that take loads
LAYOUTS = ("shared", "per-layer")
_NEVER = 1e18  # Belady: distance of an expert never used again
_INF = float("inf")


class CachePolicy:
    """Keeps `prio` [L*E + 1] up to date through its hooks; the cache reads it to choose victims.

    A policy object serves one cache (`bind` allocates its arrays). Hooks default to doing nothing.
    """

    name = ""
    admits = True  # False: the resident set only changes through `fill`
    uses_access = False  # whether `on_access` must be called
    uses_observe = False  # whether `on_observe` must be called
    uses_admit = False  # whether `on_admit` must be called

    def bind(self, n_layers: int, n_experts: int) -> None:
        self.n_layers, self.n_experts = n_layers, n_experts
        self.prio = np.zeros(n_layers * n_experts + 1)
        self.prio[-1] = np.inf

    def on_observe(
        self, layer: int, topk_ids: np.ndarray, router_probs: np.ndarray | None, topk_weights: np.ndarray | None
    ) -> None:
        """May change the priority of any expert of `layer`."""

    def on_access(self, layer: int, experts: Sequence[int]) -> None:
        """May change only the priorities of `experts` (of `layer`)."""

    def on_admit(self, key: int) -> None:
        """May change only `key`'s priority."""


class MRSPolicy(CachePolicy):
    """Minus Recent Score: an exponentially decayed sum of each expert's top-p router scores."""

    name = "mrs"
    uses_observe = True

    def __init__(self, alpha: float = 0.5, top_p: int | None = None):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"MRS alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.top_p = top_p

    def bind(self, n_layers: int, n_experts: int) -> None:
        super().bind(n_layers, n_experts)
        self.scores = self.prio[:-1].reshape(n_layers, n_experts)  # [L, E] view
        self._rows = list(self.scores)  # [L] of [E] views, so a decode update does not build one

    def on_observe(
        self,
        layer: int,
        topk_ids: np.ndarray,  # [T, k]
        router_probs: np.ndarray | None,  # [T, E]
        topk_weights: np.ndarray | None,  # [T, k]
    ) -> None:
        n_tokens, k = topk_ids.shape
        if n_tokens == 0:
            return
        a = self.alpha
        row = self._rows[layer]  # [E]
        if n_tokens == 1:
            row *= 1.0 - a
            if router_probs is None:
                row[topk_ids] += a * topk_weights if topk_weights is not None else a / k  # [1, k] each
                return
            probs = router_probs[0]  # [E]
            n_experts = probs.shape[0]
            p = min(self.top_p or 2 * k, n_experts)
            if p < n_experts:
                top = np.argpartition(probs, n_experts - p)[n_experts - p :]  # [p]
                boost = probs[top]  # [p]
                boost *= a
                row[top] += boost
            else:
                row += a * probs
            return
        if router_probs is None:
            ids, vals = topk_ids, (topk_weights if topk_weights is not None else np.full(topk_ids.shape, 1.0 / k))
        else:
            n_experts = router_probs.shape[1]
            p = min(self.top_p or 2 * k, n_experts)
            if p == n_experts:
                ids = np.broadcast_to(np.arange(n_experts), router_probs.shape)
            else:
                ids = np.argpartition(router_probs, n_experts - p, axis=1)[:, n_experts - p :]  # [T, p]
            vals = np.take_along_axis(router_probs, ids, axis=1)  # [T, p]
        # Token t's scores are weighted a (1-a)^(T-1-t): the last token counts most.
        weights = a * (1.0 - a) ** np.arange(n_tokens - 1, -1, -1, dtype=np.float64)  # [T]
        row *= (1.0 - a) ** n_tokens
        np.add.at(row, ids.ravel(), (np.asarray(vals, dtype=np.float64) * weights[:, None]).ravel())


class LRUPolicy(CachePolicy):
    name = "lru"
    uses_access = True
    uses_admit = True

    def bind(self, n_layers: int, n_experts: int) -> None:
        super().bind(n_layers, n_experts)
        self.tick = 0

    def on_access(self, layer: int, experts: Sequence[int]) -> None:
        self.tick += 1
        base, prio, tick = layer * self.n_experts, self.prio, float(self.tick)
        for e in experts:
            prio[base + e] = tick

    def on_admit(self, key: int) -> None:
        self.prio[key] = float(self.tick)


class LFUPolicy(CachePolicy):
    """Priority = uses * 2^32 + tick of the last use: most uses first, then the most recent."""

    name = "lfu"
    uses_access = True
    _USE = float(1 << 32)

    def bind(self, n_layers: int, n_experts: int) -> None:
        super().bind(n_layers, n_experts)
        self.tick = 0

    def on_access(self, layer: int, experts: Sequence[int]) -> None:
        self.tick += 1
        base, prio, use = layer * self.n_experts, self.prio, self._USE
        for e in experts:
            key = base + e
            prio[key] = (prio[key] // use + 1.0) * use + self.tick


class LeastStalePolicy(CachePolicy):
    """SpecMD's Least-Stale (Hoang et al., 2026), as its published descriptions state it: an expert
    is current once used or admitted in the ongoing forward pass and stale otherwise; the victim is a
    stale expert if there is one, first in first out within each tier. A forward pass starts when a
    layer is accessed that is not after the last one accessed.

    Priority = the tick at which the expert last entered the current tier: stale experts entered in
    earlier passes, so they rank below current ones, oldest first, and a hit on a current expert
    changes nothing.
    """

    name = "least-stale"
    uses_access = True
    uses_admit = True

    def bind(self, n_layers: int, n_experts: int) -> None:
        super().bind(n_layers, n_experts)
        self.tick = 0
        self.forward_pass = 0
        self._last_layer = n_layers  # the first access opens the first pass
        self._entered_pass = np.zeros(n_layers * n_experts, dtype=np.int64)  # [L*E] when last made current

    def on_access(self, layer: int, experts: Sequence[int]) -> None:
        if layer <= self._last_layer:
            self.forward_pass += 1
        self._last_layer = layer
        self.tick += 1
        base, entered, current = layer * self.n_experts, self._entered_pass, self.forward_pass
        for e in experts:
            key = base + e
            if entered[key] != current:
                entered[key] = current
                self.prio[key] = float(self.tick)

    def on_admit(self, key: int) -> None:
        self._entered_pass[key] = self.forward_pass
        self.prio[key] = float(self.tick)


class ActivationCountPolicy(MRSPolicy):
    """An exponentially decayed count of each expert's activations, per token (`decay` per token);
    the router's probabilities and weights are ignored. Starts from `rates` [L, E] (activations per
    token of a profiling workload) when given."""

    name = "activation-count"

    def __init__(self, decay: float, rates: np.ndarray | None = None):
        super().__init__(alpha=1.0 - decay)
        self.rates = rates

    def bind(self, n_layers: int, n_experts: int) -> None:
        super().bind(n_layers, n_experts)
        if self.rates is not None:
            self.scores[:] = self.rates

    def on_observe(self, layer: int, topk_ids: np.ndarray, router_probs: np.ndarray | None,
                   topk_weights: np.ndarray | None) -> None:
        super().on_observe(layer, topk_ids, None, np.ones(topk_ids.shape))


class StaticPolicy(CachePolicy):
    """The resident set is whatever `fill` put there; priorities are the given frequencies."""

    name = "static"
    admits = False

    def __init__(self, frequencies: np.ndarray | None = None):  # [L, E]
        self.frequencies = frequencies

    def bind(self, n_layers: int, n_experts: int) -> None:
        super().bind(n_layers, n_experts)
        if self.frequencies is not None:
            freq = np.asarray(self.frequencies, dtype=np.float64)
            if freq.shape != (n_layers, n_experts):
                raise ValueError(f"frequencies must have shape ({n_layers}, {n_experts}), got {freq.shape}")
            self.prio[:-1] = freq.ravel()


class BeladyPolicy(CachePolicy):
    """Clairvoyant: evicts the resident expert whose next use is farthest in the future.

    `accesses` is the whole future, one (layer, experts used) entry per layer call, in call order.
    Each `access` on the cache advances the clock by one entry; `advance()` skips one.
    """

    name = "belady"
    uses_access = True

    def __init__(self, accesses: Sequence[tuple[int, Iterable[int]]]):
        self.accesses = [(int(layer), tuple(int(e) for e in experts)) for layer, experts in accesses]
        self.position = 0

    def bind(self, n_layers: int, n_experts: int) -> None:
        super().bind(n_layers, n_experts)
        self.prio[:-1] = -_NEVER
        # next_use[i][j]: the position after i where accesses[i]'s j-th expert is used again.
        self.next_use: list[list[float]] = [[] for _ in self.accesses]
        upcoming: dict[int, float] = {}
        for i in range(len(self.accesses) - 1, -1, -1):
            layer, experts = self.accesses[i]
            keys = [layer * n_experts + e for e in experts]
            self.next_use[i] = [upcoming.get(key, _NEVER) for key in keys]
            for key in keys:
                upcoming[key] = float(i)
        for key, first in upcoming.items():
            self.prio[key] = -first

    def advance(self) -> None:
        """Moves the clock past the current entry: its experts' priorities become their next use."""
        layer, experts = self.accesses[self.position]
        base = layer * self.n_experts
        for e, nxt in zip(experts, self.next_use[self.position]):
            self.prio[base + e] = -nxt
        self.position += 1

    def on_access(self, layer: int, experts: Sequence[int]) -> None:
        if (
            self.position >= len(self.accesses)
            or self.accesses[self.position][0] != layer
            or set(self.accesses[self.position][1]) != set(experts)
        ):
            raise ValueError(f"Belady: access to layer {layer} does not match the future at position {self.position}")
        self.advance()


def make_policy(name: str, **kwargs) -> CachePolicy:
    """'mrs' (alpha, top_p), 'lru', 'lfu', 'least-stale', 'static' (frequencies) or 'belady' (accesses)."""
    if name == "mrs":
        return MRSPolicy(alpha=kwargs.get("alpha", 0.5), top_p=kwargs.get("top_p"))
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "least-stale":
        return LeastStalePolicy()
    if name == "static":
        return StaticPolicy(kwargs.get("frequencies"))
    if name == "belady":
        if "accesses" not in kwargs:
            raise ValueError("the belady policy needs the future access sequence (accesses=...)")
        return BeladyPolicy(kwargs["accesses"])
    raise ValueError(f"unknown cache policy {name!r}; expected one of {', '.join(POLICIES)}")


class ExpertCache:
    """Which (layer, expert) sits in which accelerator slot, with hit/miss/load/eviction counters."""

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
        if layout not in LAYOUTS:
            raise ValueError(f"unknown cache layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
        if not 0 <= capacity <= n_layers * n_experts:
            raise ValueError(f"capacity must be in [0, {n_layers * n_experts}], got {capacity}")
        self.n_layers, self.n_experts, self.capacity, self.layout = n_layers, n_experts, capacity, layout
        if isinstance(policy, str):
            kwargs = {"accesses": accesses} if accesses is not None else {}
            policy = make_policy(policy, alpha=mrs_alpha, top_p=mrs_top_p, frequencies=frequencies, **kwargs)
        self.policy = policy
        policy.bind(n_layers, n_experts)
        self._prio = policy.prio
        self._prio_rows = policy.prio[:-1].reshape(n_layers, n_experts)  # [L, E] view
        if layout == "shared":
            self._pools = [(0, capacity)]
            self._pool_of_layer = [0] * n_layers
        else:
            sizes = pool_sizes if pool_sizes is not None else even_pool_sizes(capacity, n_layers)
            if len(sizes) != n_layers or sum(sizes) != capacity or min(sizes, default=0) < 0:
                raise ValueError(f"pool sizes must be {n_layers} counts summing to {capacity}, got {list(sizes)}")
            self._pools, lo = [], 0
            for size in sizes:
                self._pools.append((lo, lo + size))
                lo += size
            self._pool_of_layer = list(range(n_layers))
        self._free = [list(range(hi - 1, lo - 1, -1)) for lo, hi in self._pools]  # popped from the end
        # [capacity + 1] each slot's expert's priority, +inf when free or pinned; the last entry is
        # scratch, where a refresh writes the priorities of non-resident experts.
        self._slot_prio = np.full(capacity + 1, np.inf)
        self._pool_prio = [self._slot_prio[lo:hi] for lo, hi in self._pools]  # views of _slot_prio
        self._pinned: set[int] = set()  # slots set to +inf because the current protection covers them
        self._stale: set[int] = set()  # layers whose slots' priorities `observe` changed since the last victim search
        self._slot_eid: list[ExpertId | None] = [None] * capacity
        self._slot_index = [[-1] * n_experts for _ in range(n_layers)]  # [L][E] slot, -1: not resident
        # [L, E] the same as an array, with `capacity` (the scratch entry) where not resident.
        self._slot_array = np.full((n_layers, n_experts), capacity, dtype=np.intp)
        self._resident: list[set[int]] = [set() for _ in range(n_layers)]
        self._protected: Mapping[int, Collection[int]] = {}
        self.hits = self.misses = self.loads = self.evictions = 0

    # -- queries ---------------------------------------------------------------------------------

    def resident(self, layer: int) -> AbstractSet[int]:
        """The live set of layer's resident experts (not a copy: do not mutate)."""
        return self._resident[layer]

    def is_resident(self, eid: ExpertId) -> bool:
        return eid[1] in self._resident[eid[0]]

    def slot_of(self, eid: ExpertId) -> int | None:
        slot = self._slot_index[eid[0]][eid[1]]
        return None if slot < 0 else slot

    def slot_row(self, layer: int) -> list[int]:
        """[E] layer's slot per expert, -1 where not resident (live: do not mutate)."""
        return self._slot_index[layer]

    def priority(self, eid: ExpertId) -> float:
        return float(self._prio[eid[0] * self.n_experts + eid[1]])

    def occupancy(self) -> int:
        """Resident experts (at most `capacity`)."""
        return self.capacity - sum(map(len, self._free))

    def pool_slots(self, layer: int) -> range:
        """The slots layer's experts may occupy."""
        return range(*self._pools[self._pool_of_layer[layer]])

    def weakest_priorities(self, layers: list[int]) -> list[float]:
        """`weakest_priority` of each layer, searched once per pool."""
        floor_of_pool: dict[int, float] = {}
        floors = []
        for layer in layers:
            pool = self._pool_of_layer[layer]
            floor = floor_of_pool.get(pool)
            if floor is None:
                floor = floor_of_pool[pool] = self.weakest_priority(layer)
            floors.append(floor)
        return floors

    def outside_priorities(self, layers: list[int]) -> np.ndarray:
        """[len(layers), E] the priorities of those layers' experts, -inf for resident ones (a copy).

        `layers` ascending; consecutive layers are sliced rather than gathered.
        """
        first, last = layers[0], layers[-1]
        if last - first == len(layers) - 1:
            prio, slots = self._prio_rows[first : last + 1], self._slot_array[first : last + 1]
        else:
            prio, slots = self._prio_rows.take(layers, axis=0), self._slot_array.take(layers, axis=0)
        return np.where(slots == self.capacity, prio, -_INF)

    def weakest_priority(self, layer: int) -> float:
        """The priority an expert of `layer` must beat to displace a resident (-inf: a free slot;
        +inf: nothing in its pool may be evicted)."""
        pool = self._pool_of_layer[layer]
        if self._free[pool]:
            return -_INF
        slot = self._victim(pool)
        return _INF if slot is None else float(self._slot_prio[slot])

    def top_experts(self, layer: int, n: int) -> list[int]:
        """Layer's n highest-priority experts, highest first (ties: lower id first)."""
        n_experts = self.n_experts
        n = max(0, min(n, n_experts))
        row = self._prio[layer * n_experts : (layer + 1) * n_experts]
        if n == 0:
            return []
        ids = np.argpartition(-row, n - 1)[:n] if n < n_experts else np.arange(n_experts)
        ids = ids[np.lexsort((ids, -row[ids]))]
        return ids.tolist()

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

    def access(self, layer: int, experts: Iterable[int]) -> int:
        """Counts hits and misses for the (distinct) experts layer uses now; returns the hits."""
        if not hasattr(experts, "__len__"):
            experts = list(experts)
        hits = len(self._resident[layer].intersection(experts))
        self.hits += hits
        self.misses += len(experts) - hits
        if self.policy.uses_access:
            self.policy.on_access(layer, experts)
            # Access-driven policies change only the accessed experts' priorities.
            if hits:
                slot_row, slot_prio, prio = self._slot_index[layer], self._slot_prio, self._prio
                base = layer * self.n_experts
                for expert in experts:
                    slot = slot_row[expert]
                    if slot >= 0:
                        slot_prio[slot] = prio[base + expert]
        return hits

    def protect(self, experts_by_layer: Mapping[int, Collection[int]]) -> None:
        """From now until the next call, no admit evicts these experts (layer -> experts)."""
        self._protected = experts_by_layer
        if self._pinned:
            # Unpin what the new protection does not cover; what it still covers stays pinned.
            slot_prio, prio, slot_eid, n_experts = self._slot_prio, self._prio, self._slot_eid, self.n_experts
            still_pinned = set()
            for slot in self._pinned:
                layer, expert = slot_eid[slot]
                experts = experts_by_layer.get(layer)
                if experts is not None and expert in experts:
                    still_pinned.add(slot)
                else:
                    slot_prio[slot] = prio[layer * n_experts + expert]
            self._pinned = still_pinned

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
            if slot is None:
                return None
            if only_if_better and not self._slot_prio[slot] < self._prio[key]:
                return None
            # The victim's bookkeeping is undone here rather than in a helper: this is the hot path.
            old_layer, old_expert = self._slot_eid[slot]
            self._slot_index[old_layer][old_expert] = -1
            self._slot_array[old_layer, old_expert] = self.capacity
            self._resident[old_layer].discard(old_expert)
            self.evictions += 1
        if self.policy.uses_admit:
            self.policy.on_admit(key)
        self._place(eid, slot)
        self.loads += 1
        return SlotLoad(eid, slot)

    def fill(self, eids: Iterable[ExpertId]) -> list[SlotLoad]:
        """Warm start: puts each eid in a free slot of its pool (no eviction; skipped when full)."""
        loads = []
        for eid in eids:
            eid = (int(eid[0]), int(eid[1]))
            free = self._free[self._pool_of_layer[eid[0]]]
            if eid[1] in self._resident[eid[0]] or not free:
                continue
            slot = free.pop()
            self._place(eid, slot)
            loads.append(SlotLoad(eid, slot))
        return loads

    def _victim(self, pool: int) -> int | None:
        lo, hi = self._pools[pool]
        if lo == hi:
            return None
        if self._stale:
            for layer in self._stale:
                self._refresh_layer(layer)
            self._stale.clear()
        slot_prio, prio = self._slot_prio, self._pool_prio[pool]  # prio: [pool slots], a view
        while True:
            slot = lo + int(prio.argmin())
            if slot_prio[slot] == _INF:
                return None
            layer, expert = self._slot_eid[slot]
            experts = self._protected.get(layer)
            if experts is None or expert not in experts:
                return slot
            slot_prio[slot] = _INF
            self._pinned.add(slot)

    def _refresh_layer(self, layer: int) -> None:
        """Copies layer's (changed) priorities to its resident experts' slots (one scatter: the
        non-resident ones land in the scratch entry)."""
        self._slot_prio[self._slot_array[layer]] = self._prio_rows[layer]

    def _place(self, eid: ExpertId, slot: int) -> None:
        layer, expert = eid
        self._slot_eid[slot] = eid
        experts = self._protected.get(layer)
        if experts is not None and expert in experts:
            self._slot_prio[slot] = _INF
            self._pinned.add(slot)
        else:
            self._slot_prio[slot] = self._prio[layer * self.n_experts + expert]
        self._slot_index[layer][expert] = slot
        self._slot_array[layer, expert] = slot
        self._resident[layer].add(expert)


def even_pool_sizes(capacity: int, n_layers: int) -> list[int]:
    """[L] a per-layer split of `capacity` slots: even, the first `capacity % n_layers` layers one more."""
    share, extra = divmod(capacity, n_layers)
    return [share + (1 if layer < extra else 0) for layer in range(n_layers)]


def belady_misses(
    accesses: Sequence[tuple[int, Iterable[int]]],  # (layer, experts used) per layer call, in order
    capacity: int,
    layout: str,
    n_layers: int,
    n_experts: int,
) -> int:
    """The fewest misses any cache of this capacity and layout can have (MIN with bypass)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown cache layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    keys = [layer * n_experts + int(e) for layer, experts in accesses for e in experts]
    next_use = [0] * len(keys)
    upcoming: dict[int, int] = {}
    never = len(keys)
    for i in range(len(keys) - 1, -1, -1):
        next_use[i] = upcoming.get(keys[i], never)
        upcoming[keys[i]] = i
    if layout == "shared":
        sizes = [capacity]
        pool_of = [0] * n_layers
    else:
        sizes = even_pool_sizes(capacity, n_layers)
        pool_of = list(range(n_layers))
    resident: list[dict[int, int]] = [{} for _ in sizes]  # key -> its next use
    heaps: list[list[tuple[int, int]]] = [[] for _ in sizes]  # (-next use, key), stale entries skipped
    misses = 0
    for i, key in enumerate(keys):
        pool = pool_of[key // n_experts]
        res, heap = resident[pool], heaps[pool]
        nxt = next_use[i]
        if key in res:
            res[key] = nxt
            heapq.heappush(heap, (-nxt, key))
            continue
        misses += 1
        if sizes[pool] == 0:
            continue
        if len(res) >= sizes[pool]:
            while res.get(heap[0][1]) != -heap[0][0]:
                heapq.heappop(heap)
            if -heap[0][0] <= nxt:
                continue  # the newcomer is needed last: bypass
            del res[heapq.heappop(heap)[1]]
        res[key] = nxt
        heapq.heappush(heap, (-nxt, key))
    return misses
