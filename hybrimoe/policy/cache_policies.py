"""Cache policies: how each one ranks experts, as the priorities the expert cache reads.

Design choices:
- A policy is one class keeping a flat float array `prio` [L*E + 1] (index layer * E + expert; the
  last entry +inf for free slots); the cache evicts a pool's lowest-priority unprotected resident.
  It declares the hooks it needs (`uses_observe`: any expert of a layer may change; `uses_access`:
  only the accessed ones; `uses_admit`: only the admitted one), so the cache refreshes one layer.
- Priorities:
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
  * activation count (kTransformers' dynamic update, as modelled): a decayed count per token.
  * static: the resident set is fixed by the cache's `fill`; it never admits. Priorities are the
    given frequencies (for `top_experts`), zero without them.
  * Belady (clairvoyant: built with the future access sequence, simulation only): priority =
    -(position of next use), so the victim is the expert used farthest in the future.
- Shapes: T = tokens in the step, k = top-k, E = experts per layer, L = layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from hybrimoe.errors import PolicyError
from hybrimoe.policy.names import CACHE_POLICIES, check_name

_NEVER = 1e18  # Belady: distance of an expert never used again


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
            raise PolicyError(f"MRS alpha must be in (0, 1], got {alpha}")
        if top_p is not None and top_p < 1:
            raise PolicyError(f"MRS top-p must be at least 1, got {top_p}")
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
                raise PolicyError(f"frequencies must have shape ({n_layers}, {n_experts}), got {freq.shape}")
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
            raise PolicyError(f"Belady: access to layer {layer} does not match the future at position {self.position}")
        self.advance()


def make_policy(name: str, **kwargs) -> CachePolicy:
    """'mrs' (alpha, top_p), 'lru', 'lfu', 'least-stale', 'static' (frequencies) or 'belady' (accesses)."""
    check_name("cache policy", name, CACHE_POLICIES)
    if name == "mrs":
        return MRSPolicy(alpha=kwargs.get("alpha", 0.5), top_p=kwargs.get("top_p"))
    if name == "static":
        return StaticPolicy(kwargs.get("frequencies"))
    if name == "belady":
        if "accesses" not in kwargs:
            raise PolicyError("the belady policy needs the future access sequence (accesses=...)")
        return BeladyPolicy(kwargs["accesses"])
    return {"lru": LRUPolicy, "lfu": LFUPolicy, "least-stale": LeastStalePolicy}[name]()
