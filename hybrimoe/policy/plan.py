"""The plan for one MoE layer of one forward step: what the runtime executes and the simulator times.

Expert ids inside a plan are indices within the layer; `ExpertId = (layer, expert)` names an expert
across layers (prefetches, cache slots). Cache slots are numbered 0..capacity-1 over the whole
cache, whether it is one shared pool or partitioned per layer. Plans are NamedTuples: immutable,
and cheap to build once per layer of every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

ExpertId = tuple[int, int]


class SlotLoad(NamedTuple):
    """Copy expert `expert` into cache slot `slot` (evicting whatever it held)."""

    expert: ExpertId
    slot: int


class LayerPlan(NamedTuple):
    layer: int
    gpu: tuple[int, ...]  # resident experts computed on the accelerator, in this order
    load: tuple[int, ...]  # experts copied in first (see `loads`), then computed on the accelerator
    cpu: tuple[int, ...]  # experts computed on the CPU, in this order
    slot_of: dict[int, int]  # expert -> cache slot, for every expert in gpu + load
    loads: tuple[SlotLoad, ...]  # this layer's on-demand copies, in issue order
    predicted_ms: float  # the scheduler's simulated time for this layer's experts
    context: Any = None  # the planner's own record of the layer, handed back to `plan_prefetch`


@dataclass(slots=True)
class LayerContext:
    """What `plan_layer` leaves to `plan_prefetch`: the layer's routing and its timing."""

    layer: int
    topk_ids: np.ndarray  # [T, k]
    router_probs: np.ndarray | None  # [T, E]
    topk_weights: np.ndarray | None  # [T, k]
    counts: dict[int, int]  # expert -> tokens
    predicted_topk: Mapping[int, np.ndarray]  # later layer -> [T, k]
    before_ms: float  # dense part, host work and plan_layer: before the experts start
    start_ms: float = 0.0  # when the layer's experts start
    cpu_ms: float = 0.0  # the CPU worker's experts, from start_ms
    host_ms: float = 0.0  # the rest of the expert phase (see Timeline.expert_phase_ms)
    cpu: tuple[int, ...] = ()  # the experts the plan ran on the CPU
    observed: bool = False  # the score update ran
    predicted_counts: dict[int, dict[int, int]] | None = None  # set once what is needed is protected


class Planner(Protocol):
    """What the runtime and the simulator both call: `begin_step` once per forward step, then once
    per MoE layer `plan_layer`, then `plan_prefetch`. The runtime asks for the prefetches once the
    layer's experts are launched, so choosing them overlaps the layer's work instead of delaying its start.

    Shapes: T = tokens in this step, k = top-k, E = routed experts per layer.
    """

    lookahead_layers: int  # how many later layers' routing `plan_layer` wants predicted

    def initial_loads(self) -> tuple[SlotLoad, ...]:
        """Copies to make before the first step (a warm cache)."""
        ...

    def begin_step(self, n_tokens: int, context_tokens: int) -> None:
        """A forward step of `n_tokens` new tokens (all sequences) over `context_tokens` cached
        tokens per sequence starts."""
        ...

    def plan_layer(
        self,
        layer: int,
        topk_ids: np.ndarray,  # [T, k] int: this layer's routed experts per token
        router_probs: np.ndarray | None,  # [T, E] float: full router probabilities, when known
        predicted_topk: Mapping[int, np.ndarray],  # later layer -> [T, k] predicted experts
    ) -> LayerPlan: ...

    def plan_prefetch(self, plan: LayerPlan) -> tuple[SlotLoad, ...]:
        """Copies for later layers, issued after `plan`'s loads; call once with each `plan_layer`'s
        plan, before the next `plan_layer`."""
        ...
