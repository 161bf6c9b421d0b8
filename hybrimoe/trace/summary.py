"""What `hybrimoe trace info` reports about a trace: its size, and how skewed and how repeated its routing is.

Shapes: L = MoE layers, N = tokens over all steps, k = top-k, E = routed experts per layer.

Design choices:
- Skew (the share of the most popular experts, the Gini coefficient) is computed over each layer's
  activation counts, then averaged over layers: expert e of one layer is not expert e of another.
- Reuse between consecutive tokens is reported beside its value under uniformly random routing
  (k / E), the baseline it is read against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hybrimoe.trace.format import RoutingTrace


@dataclass(frozen=True)
class TraceSummary:
    model: str
    n_steps: int
    n_tokens: int
    n_prefill_steps: int  # steps of more than one token
    n_prefill_tokens: int
    n_decode_steps: int  # 1-token steps
    n_layers: int
    n_experts: int
    top_k: int
    n_shared_experts: int
    expert_bytes: int
    has_weights: bool
    has_router_probs: bool
    lookahead_depth: int
    top10_share: float  # share of activations taken by the most popular 10% of a layer's experts, mean over layers
    top25_share: float
    gini: float  # Gini coefficient of a layer's activation counts, mean over layers (0 = uniform)
    reuse_overlap: float | None  # |top-k(t) & top-k(t-1)| / k over consecutive tokens, mean; None for 1 token
    reuse_overlap_random: float  # the same for uniformly random routing: k / E
    provenance: str


def trace_summary(trace: RoutingTrace) -> TraceSummary:
    meta = trace.meta
    E, k = meta.n_experts, meta.top_k
    counts = np.sort(trace.expert_frequencies(), axis=1)[:, ::-1].astype(np.float64)  # [L, E] descending
    totals = counts.sum(axis=1)

    def top_share(fraction: float) -> float:
        n_top = max(1, int(np.ceil(fraction * E)))
        return float((counts[:, :n_top].sum(axis=1) / totals).mean())

    ascending = counts[:, ::-1]
    rank = np.arange(1, E + 1)
    gini = (2 * (ascending * rank).sum(axis=1)) / (E * totals) - (E + 1) / E

    ids = trace.topk_ids()  # [L, N, k]
    if ids.shape[1] > 1:
        active = np.zeros((meta.n_layers, ids.shape[1], E), dtype=bool)  # [L, N, E]
        np.put_along_axis(active, ids.astype(np.int64), True, axis=2)
        reuse = float((active[:, 1:] & active[:, :-1]).sum(axis=2).mean() / k)
    else:
        reuse = None
    lengths = trace.step_lengths
    return TraceSummary(
        model=meta.model,
        n_steps=trace.n_steps,
        n_tokens=trace.n_tokens,
        n_prefill_steps=sum(1 for n in lengths if n > 1),
        n_prefill_tokens=sum(n for n in lengths if n > 1),
        n_decode_steps=sum(1 for n in lengths if n == 1),
        n_layers=meta.n_layers,
        n_experts=E,
        top_k=k,
        n_shared_experts=meta.n_shared_experts,
        expert_bytes=meta.expert_bytes,
        has_weights=trace.has_weights,
        has_router_probs=trace.has_router_probs,
        lookahead_depth=trace.lookahead_depth,
        top10_share=top_share(0.10),
        top25_share=top_share(0.25),
        gini=float(gini.mean()),
        reuse_overlap=reuse,
        reuse_overlap_random=k / E,
        provenance=meta.provenance,
    )
