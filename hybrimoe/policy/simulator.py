"""Trace-driven simulator: replays routing traces through planners on a cost model.

Design choices:
- The simulator drives the very planner the runtime drives; its times are the planner's own
  timeline model (dense part, expert phase from the schedule, copy-engine queue, stalls on late
  prefetches), so simulation and execution make the same decisions.
- Predictions for prefetching, in order of preference: recorded lookahead (the runtime's gate
  predictions) when the trace has them; otherwise the most recent routing seen at the target layer
  (`recent`, the stated predictor); `oracle` passes the true routing (an upper bound).
- Deterministic: no randomness anywhere; the same inputs give the same report.
- Shapes: T = tokens in a step, k = top-k, E = experts, L = MoE layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hybrimoe.policy.names import PREDICTORS, check_name
from hybrimoe.policy.planner import PolicyPlanner
from hybrimoe.trace import RoutingTrace, TraceStep



@dataclass(frozen=True)
class SimResult:
    strategy: str
    mode: str
    cache_ratio: float
    capacity: int
    n_steps: int
    n_tokens: int
    total_ms: float
    step_ms: float  # mean per step: TTFT for prefill steps, ms/token for decode steps
    layer_ms: tuple[float, ...]  # [L] mean expert-phase ms per layer and step
    hit_rate: float  # ready and waited hits
    bytes_loaded: int
    gpu_share: float
    prefetch_precision: float
    prefetch_recall: float
    stall_ms: float
    waited_hit_rate: float  # hits whose prefetch was still in flight when their layer started

    @property
    def ready_hit_rate(self) -> float:
        return self.hit_rate - self.waited_hit_rate

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * self.n_tokens / self.total_ms if self.total_ms else 0.0


def simulate(
    trace: RoutingTrace,
    planner: PolicyPlanner,
    predictor: str = "recent",
    strategy: str = "",
    cache_ratio: float = 0.0,
    mode: str = "decode",
    context_tokens: int = 0,
    batch_size: int = 1,
    checkpoints: int = 0,
    on_checkpoint: Callable[[int, float], None] | None = None,
) -> SimResult:
    """Replays every step of `trace` through `planner`; the planner's clock gives the times.

    In decode mode the steps continue `batch_size` sequences whose KV cache holds `context_tokens`
    tokens before the first step; in prefill mode every step is a new prompt (an empty cache).
    `on_checkpoint(steps_done, ms_so_far)` is called after each of `checkpoints` equal slices of
    the steps (the tuner's intermediate values; it may raise to stop the replay)."""
    check_name("predictor", predictor, PREDICTORS)
    n_layers = trace.meta.n_layers
    recent: list[np.ndarray | None] = [None] * n_layers  # [L] each layer's last routing
    layer_ms = np.zeros(n_layers)  # [L] expert-phase ms summed over steps
    start_ms = planner.clock_ms
    n_steps = trace.n_steps
    slice_ends = {math.ceil(n_steps * (i + 1) / checkpoints) for i in range(checkpoints)} if on_checkpoint else set()
    for done, step in enumerate(trace.steps, start=1):
        planner.begin_step(step.n_tokens, context_tokens if mode == "decode" else 0)
        context_tokens += step.n_tokens // batch_size
        _replay_step(planner, step, predictor, recent, layer_ms)
        if done in slice_ends:
            on_checkpoint(done, planner.clock_ms - start_ms)
    total_ms = planner.clock_ms - start_ms
    stats = planner.stats
    return SimResult(
        strategy=strategy,
        mode=mode,
        cache_ratio=cache_ratio,
        capacity=planner.cache.capacity,
        n_steps=n_steps,
        n_tokens=trace.n_tokens,
        total_ms=total_ms,
        step_ms=total_ms / n_steps if n_steps else 0.0,
        layer_ms=tuple((layer_ms / max(n_steps, 1)).tolist()),
        hit_rate=stats.hit_rate or 0.0,
        bytes_loaded=(stats.demand_loads + stats.prefetch_loads) * planner.costs.expert_bytes,
        gpu_share=stats.accelerator_share or 0.0,
        prefetch_precision=stats.prefetch_precision or 0.0,
        prefetch_recall=stats.prefetch_recall or 0.0,
        stall_ms=stats.stall_ms,
        waited_hit_rate=stats.waited_hit_rate or 0.0,
    )


def _replay_step(
    planner: PolicyPlanner, step: TraceStep, predictor: str, recent: list[np.ndarray | None], layer_ms: np.ndarray
) -> None:
    """Plans every layer of one step (both calls); adds each layer's modelled ms to `layer_ms`."""
    n_layers, depth = len(recent), planner.lookahead_layers
    probs_all, weights_all = step.router_probs, step.topk_weights
    # Traces store ids compactly (int16); numpy indexes with intp several times faster.
    ids_all = step.topk_ids.astype(np.intp, copy=False)  # [L, T, k]
    for layer in range(n_layers):
        ids = ids_all[layer]  # [T, k]
        predicted = _predictions(step, layer, depth, predictor, recent, n_layers) if depth else {}
        layer_start = planner.clock_ms
        plan = planner.plan_layer(
            layer,
            ids,
            None if probs_all is None else probs_all[layer],
            predicted,
            None if weights_all is None else weights_all[layer],
        )
        planner.plan_prefetch(plan)
        layer_ms[layer] += planner.clock_ms - layer_start
        recent[layer] = ids


def _predictions(step, layer, depth, predictor, recent, n_layers) -> dict[int, np.ndarray]:
    predicted = {}
    for d in range(1, depth + 1):
        target = layer + d
        if predictor == "recorded" and step.lookahead is not None:
            if target < n_layers and d <= step.lookahead.shape[1]:
                predicted[target] = step.lookahead[layer, d - 1]
        elif predictor == "oracle":
            if target < n_layers:
                predicted[target] = step.topk_ids[target]
        else:
            seen = recent[target % n_layers]
            if seen is not None and seen.shape[0] == step.topk_ids.shape[1]:
                predicted[target % n_layers] = seen
    return predicted
