"""Small profiles and synthetic traces for policy tests."""

from __future__ import annotations

import numpy as np
import pytest

from hybrimoe.config import ExpertShape, HardwareProfile, LatencyCurve, LinearFit, Transfer
from hybrimoe.trace import RoutingTrace, TraceMeta, TraceStep

SHAPE = ExpertShape(hidden_size=64, intermediate_size=32, dtype="bfloat16")


def make_profile(cpu_ms=0.2, cpu_per_token_ms=0.02, gpu_ms=0.02, load_ms=0.4, dense_ms=0.1) -> HardwareProfile:
    return HardwareProfile(
        name="test",
        expert_shape=SHAPE,
        cpu_expert=LatencyCurve(fit=LinearFit(cpu_ms, cpu_per_token_ms)),
        gpu_expert=LatencyCurve(fit=LinearFit(gpu_ms, 0.0005)),
        transfer=Transfer(expert_load_ms=load_ms, h2d_pinned_gbps=25.0),
        dense_layer=LatencyCurve(fit=LinearFit(dense_ms, 0.001)),
    )


def make_trace(n_layers=4, n_experts=16, top_k=2, n_tokens=64, seed=0, zipf=1.2, steps=1) -> RoutingTrace:
    """Skewed routing: each layer prefers its own experts with Zipf-like popularity."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, n_experts + 1, dtype=float)
    popularity = ranks**-zipf / np.sum(ranks**-zipf)
    meta = TraceMeta(
        model="synthetic",
        n_layers=n_layers,
        n_experts=n_experts,
        top_k=top_k,
        n_shared_experts=0,
        hidden_size=SHAPE.hidden_size,
        intermediate_size=SHAPE.intermediate_size,
        dtype=SHAPE.dtype,
        provenance="tests",
    )
    trace_steps = []
    for _ in range(steps):
        ids = np.empty((n_layers, n_tokens, top_k), dtype=np.int16)
        for layer in range(n_layers):
            perm = rng.permutation(n_experts)
            for t in range(n_tokens):
                ids[layer, t] = perm[rng.choice(n_experts, size=top_k, replace=False, p=popularity)]
        trace_steps.append(TraceStep(topk_ids=ids))
    return RoutingTrace(meta, tuple(trace_steps))


@pytest.fixture
def profile() -> HardwareProfile:
    return make_profile()


@pytest.fixture
def trace() -> RoutingTrace:
    return make_trace()
