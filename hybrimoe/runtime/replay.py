"""Routing replay: a recorded trace's routing fed to the runtime step by step, in place of the router's.

Shapes: L = MoE layers, T = tokens in one forward step, N = tokens in the trace, k = top-k,
E = routed experts per layer.

Design choices:
- The trace is read as one token stream (`RoutingTrace.tokens` semantics): only the token count
  of each step of the run is consumed, so the run's steps need not have the trace's step shapes
  (a 19-token prompt then 1-token decode steps can replay any trace).
- The trace's arrays are concatenated over steps once; a step is then a few slices.
- `for_model` checks shape facts only (the runner calls it before any weight is read): the trace
  must route top-k of the model's E experts in at least the model's L MoE layers; a trace of more
  layers is replayed by its first L (the documented behaviour: e.g. a 48-layer trace on a 3-layer
  model).
- Plain numpy, no torch: the executor moves each step to the device and fills in what the trace
  did not record (routing weights, router probabilities) from the model's own router.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from hybrimoe.errors import UserError
from hybrimoe.trace import RoutingTrace, TraceMeta


class ReplayStep(NamedTuple):
    """The routing of one forward step of T tokens, as the trace recorded it."""

    topk_ids: np.ndarray  # [L, T, k] int64
    topk_weights: np.ndarray | None  # [L, T, k] float32, when the trace recorded routing weights
    router_probs: np.ndarray | None  # [L, T, E] float32, when the trace recorded router probabilities

    @property
    def n_tokens(self) -> int:
        return self.topk_ids.shape[1]


class RoutingReplay:
    """Hands out a trace's routing in order, `n_tokens` at a time; `source` names it in errors."""

    def __init__(self, trace: RoutingTrace, source: str = "the replayed trace"):
        self.meta, self.source = trace.meta, source
        self.n_tokens = trace.n_tokens
        self.position = 0  # tokens consumed so far
        steps = trace.steps
        self._ids = trace.topk_ids().astype(np.int64)  # [L, N, k]
        self._weights = (
            np.concatenate([s.topk_weights for s in steps], axis=1) if trace.has_weights else None
        )  # [L, N, k] float32
        self._probs = (
            np.concatenate([s.router_probs for s in steps], axis=1).astype(np.float32, copy=False)
            if trace.has_router_probs
            else None
        )  # [L, N, E] float32

    @classmethod
    def for_model(
        cls, trace: RoutingTrace, n_layers: int, n_experts: int, top_k: int, source: str = "the replayed trace"
    ) -> RoutingReplay:
        """The replay of `trace` on a model of these shapes: its first `n_layers` MoE layers when it
        has more; one UserError line when it has fewer, or other experts or top-k."""
        check_fits(trace.meta, n_layers, n_experts, top_k, source)
        if trace.meta.n_layers > n_layers:
            trace = trace.select_layers(range(n_layers))
        return cls(trace, source)

    @property
    def remaining(self) -> int:
        return self.n_tokens - self.position

    def next_step(self, n_tokens: int) -> ReplayStep:
        """The next `n_tokens` tokens' routing; a UserError when the trace has run out."""
        start, stop = self.position, self.position + n_tokens
        if stop > self.n_tokens:
            raise UserError(
                f"{self.source}: the trace has {self.n_tokens} tokens of routing; the run needs more "
                f"(a step of {n_tokens} tokens after {start})"
            )
        self.position = stop
        cut = slice(start, stop)
        return ReplayStep(
            topk_ids=self._ids[:, cut],
            topk_weights=None if self._weights is None else self._weights[:, cut],
            router_probs=None if self._probs is None else self._probs[:, cut],
        )


def check_fits(meta: TraceMeta, n_layers: int, n_experts: int, top_k: int, source: str) -> None:
    """Refuses a trace (its metadata) that cannot route this model, as one UserError line."""
    if (meta.n_experts, meta.top_k) != (n_experts, top_k):
        raise UserError(
            f"{source}: the trace routes top-{meta.top_k} of {meta.n_experts} experts, "
            f"the model top-{top_k} of {n_experts}"
        )
    if meta.n_layers < n_layers:
        raise UserError(
            f"{source}: the trace has {meta.n_layers} MoE layers, the model {n_layers}; "
            "a trace must cover every MoE layer (one with more layers replays its first ones)"
        )
