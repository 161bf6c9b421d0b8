"""The runtime's side of planning: the policy core's planner for a loaded model, the run's routing
as a trace, and the simulator's prediction for that routing.

Design choices:
- The planner comes from the policy core's factory (`make_planner`), the same one the simulator
  replays, so the run's own routing, recorded as a trace, gives the simulator's prediction for
  the run on the same profile (`predict_run`).
- A recorded trace carries the later layers' predicted routing (the runtime's router lookahead),
  `TRACE_LOOKAHEAD_DEPTH` layers deep when it is written to a file.
- Shapes: L = MoE layers, T = tokens in a step, k = top-k, E = experts, D = lookahead depth.
"""

from __future__ import annotations

import numpy as np

from hybrimoe.config import HardwareProfile, PolicyConfig
from hybrimoe.errors import UserError
from hybrimoe.policy.plan import Planner
from hybrimoe.runtime.executor import LayerRecord
from hybrimoe.runtime.loading import LoadedModel
from hybrimoe.shapes import ModelShape, shape_from_hf_config
from hybrimoe.trace import RoutingTrace, TraceStep

TRACE_LOOKAHEAD_DEPTH = 3  # later layers predicted in a recorded trace (the paper's choice)


def model_shape(loaded: LoadedModel, name: str) -> ModelShape:
    """The policy core's description of the model (dense parts included), from its config."""
    config = loaded.model.config.to_dict()
    shape = shape_from_hf_config(config, name=name, dtype=loaded.expert_shape.dtype)
    return shape.quantized(loaded.expert_shape.quantize, loaded.expert_shape.group_size)


def build_planner(
    strategy: str,
    loaded: LoadedModel,
    profile: HardwareProfile,
    policy: PolicyConfig,
    capacity: int,
    frequencies: np.ndarray | None = None,  # [L, E] expert activations of a profiling workload
) -> Planner:
    """The policy core's planner for this model; `capacity` expert slots on the accelerator."""
    from hybrimoe.policy.costs import CostModel
    from hybrimoe.policy.planner import ModelDims
    from hybrimoe.policy.strategies import make_planner

    dims = ModelDims(loaded.n_layers, loaded.n_experts, loaded.top_k)
    try:
        return make_planner(strategy, dims, CostModel(profile), policy, capacity, frequencies)
    except ValueError as exc:
        raise UserError(f"strategy {strategy!r}: {exc}") from None


def predict_run(
    trace: RoutingTrace, planner: Planner, strategy: str, cache_ratio: float, batch_size: int = 1
) -> tuple[float | None, float | None]:
    """The simulator's (TTFT s, decode tokens/s per sequence) for the recorded run, replayed
    through a fresh planner built like the run's (the first step is the prefill of the prompts)."""
    from hybrimoe.policy.simulator import simulate

    predictor = "recorded" if trace.lookahead_depth else "recent"
    prefill = simulate(RoutingTrace(trace.meta, trace.steps[:1]), planner, predictor, strategy, cache_ratio, "prefill")
    ttft_s = prefill.total_ms / 1000.0
    if trace.n_steps < 2:
        return ttft_s, None
    decode = simulate(
        RoutingTrace(trace.meta, trace.steps[1:]), planner, predictor, strategy, cache_ratio, "decode",
        context_tokens=trace.steps[0].n_tokens // batch_size, batch_size=batch_size,
    )
    return ttft_s, (1000.0 / decode.step_ms if decode.step_ms else None)


def trace_step(records: list[LayerRecord], depth: int) -> TraceStep:
    """Stacks one step's per-layer records: ids [L, T, k], probs [L, T, E], lookahead [L, D, T, k]."""
    ids = np.stack([r.topk_ids for r in records])
    lookahead = np.full((len(records), depth, *ids.shape[1:]), -1, dtype=np.int16)
    for layer, record in enumerate(records):
        for target, predicted in record.lookahead.items():
            lookahead[layer, target - layer - 1] = predicted
    return TraceStep(
        topk_ids=ids,
        topk_weights=np.stack([r.topk_weights for r in records]),
        router_probs=np.stack([r.router_probs for r in records]),
        lookahead=lookahead if depth else None,
    )
