"""What a forward step costs besides the routed experts, measured on a model's own modules.

Shapes: L = MoE layers, E = experts per layer, T = new tokens in a step, C = cached tokens.

Design choices:
- The model is built from its `config.json` with random weights (no checkpoint is read) and at most
  `MAX_MOE_LAYERS` MoE layers (fewer when a layer's experts would not fit in RAM): per-layer costs
  are means over its layers, and the work outside the layers does not depend on their number.
- Every figure comes from real forward steps through transformers and `generate`, the loop `run`
  uses, timed by hooks on the model (each step's start) and on each MoE decoder layer (its wall
  time; the accelerator is synchronised at each hook, so on CUDA the times are the device's too):
  * null experts (an experts implementation returning zeros): the dense part of a layer at T new
    tokens, and its growth with the KV cache in decode;
  * the runtime's executor with every expert resident: its own host work per layer, that is the
    layer's time less its dense part, its experts (the profile's accelerator curve at their token
    counts) and the planner's measured wall time; and the step's work outside the MoE layers
    (embedding, rotary, mask, dense-MLP layers, final norm, LM head, sampling, the loop and the
    runtime's per-step bookkeeping), measured here rather than with null experts because the
    runtime's memory traffic leaves it slower (measured: 0.73-0.88 ms against 0.44 on the demo);
  * the executor with every expert on the CPU worker: the worker's per-layer start-up cost (thread
    hand-off and wait), the same way with the CPU curve;
  * the executor copying every expert into a slot before running it (decode): what a copy costs
    from the model's own host weights (the stand-in's expert load; measured: 2.3x a copy between
    two warm buffers on a random Qwen3-shaped model, whose copies touch pages and TLB entries the
    micro-benchmark's do not);
  * the executor with each strategy's own planner (the default policy, a quarter of the experts
    cached): that planner's wall time per layer, the two calls apart.
- Per-step and per-layer figures are means, not medians: a run's time is their sum, slow
  steps included. Differences of measured times can come out slightly negative through noise;
  they are floored at zero, and curves at a small positive value the schema accepts.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hybrimoe.config import CurvePoint, HardwareProfile, LatencyCurve, ModelCosts, PlannerCost, PolicyConfig
from hybrimoe.errors import UserError
from hybrimoe.host import available_ram_bytes
from hybrimoe.policy.plan import LayerPlan, SlotLoad
from hybrimoe.profile.fit import fit_curve
from hybrimoe.profile.measure import fill_weights, token_counts
from hybrimoe.profile.timing import Budget
from hybrimoe.runtime.accelerator import Accelerator
from hybrimoe.runtime.generate import generate
from hybrimoe.runtime.loading import (
    LoadedModel, Quantization, build_on_meta, config_dtype, find_moe_layers, from_model, load_config,
)
from hybrimoe.runtime.stats import RunCounters

MAX_MOE_LAYERS = 4  # enough for the executor's lookahead over later layers' routers to be typical
MAX_PREFILL_TOKENS = 512
NULL_EXPERTS = "hybrimoe-null"
_MIN_MS = 1e-4  # a floor for measured differences (the schema wants positive curve points)


class SideOnlyPlanner:
    """Every activated expert on one side: `accelerator` (each expert resident in its own slot, so
    `capacity` is L * E), `cpu`, or `load` (copied into a slot at every use, then run on the
    accelerator; `capacity` is E). Implements the Planner protocol; plans cost a few microseconds."""

    lookahead_layers = 0

    def __init__(self, side: str, n_layers: int, n_experts: int):
        if side not in ("accelerator", "cpu", "load"):
            raise ValueError(f"side must be accelerator, cpu or load, got {side!r}")
        self.side, self.n_experts = side, n_experts
        self._loads = ()
        if side == "accelerator":
            self._loads = tuple(
                SlotLoad((layer, e), layer * n_experts + e) for layer in range(n_layers) for e in range(n_experts)
            )

    @property
    def capacity(self) -> int:
        return self.n_experts if self.side == "load" else len(self._loads)

    def initial_loads(self) -> tuple[SlotLoad, ...]:
        return self._loads

    def begin_step(self, n_tokens: int, context_tokens: int) -> None:
        pass

    def plan_layer(self, layer, topk_ids, router_probs, predicted_topk) -> LayerPlan:
        experts = tuple(np.unique(topk_ids).tolist())
        if self.side == "cpu":
            return LayerPlan(layer, (), (), experts, {}, (), 0.0)
        if self.side == "load":
            loads = tuple(SlotLoad((layer, e), slot) for slot, e in enumerate(experts))
            return LayerPlan(layer, (), experts, (), {e: slot for slot, e in enumerate(experts)}, loads, 0.0)
        base = layer * self.n_experts
        return LayerPlan(layer, experts, (), (), {e: base + e for e in experts}, (), 0.0)

    def plan_prefetch(self, plan) -> tuple[SlotLoad, ...]:
        return ()


# ---------------------------------------------------------------------------------------------
# building the model


def build_random_model(
    config_path: Path, device: torch.device, trust_remote_code: bool = False, quantization: Quantization | None = None
) -> LoadedModel:
    """The model of `config_path` with random weights and at most MAX_MOE_LAYERS MoE layers (its
    experts quantized as the runtime quantizes them, when asked)."""
    config = _load_config_file(config_path, trust_remote_code)
    meta = build_on_meta(config, trust_remote_code)
    layers, shape, n_experts, _ = find_moe_layers(meta, config.model_type)
    free = available_ram_bytes()
    fits = MAX_MOE_LAYERS if free is None else int(free // 4 // max(1, n_experts * shape.expert_bytes))
    if fits < 1:
        raise UserError(
            f"one MoE layer's experts ({n_experts * shape.expert_bytes / 1e9:.1f} GB) do not fit in a quarter of "
            f"the free RAM: profile with --preset or explicit sizes instead of --model"
        )
    wanted = min(MAX_MOE_LAYERS, fits, len(layers))
    n_decoder_layers = layers[wanted - 1].decoder_layer + 1
    config.num_hidden_layers = n_decoder_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:n_decoder_layers]
    model = _build_uninitialised(config, trust_remote_code)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("e_score_correction_bias"):
                param.fill_(1.0 if "norm" in name else 0.0)
            else:
                fill_weights(param.data)
    return from_model(model, device, quantization=quantization)


def _load_config_file(config_path: Path, trust_remote_code: bool):
    """`load_config` reads a checkpoint directory's config.json: a config file of another name
    (`--model tiny-mixtral.json`) is read from a directory of its own, as config.json."""
    if config_path.name == "config.json":
        return load_config(config_path.parent, trust_remote_code)
    with tempfile.TemporaryDirectory() as directory:
        shutil.copyfile(config_path, Path(directory) / "config.json")
        return load_config(Path(directory), trust_remote_code)


def _build_uninitialised(config, trust_remote_code: bool) -> torch.nn.Module:
    """On the host, parameters left unset (filled by the caller); buffers such as rotary
    frequencies are computed as usual."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=config_dtype(config))


# ---------------------------------------------------------------------------------------------
# timing forward steps


class _StepClock:
    """Each forward step's start (a pre-hook on the model) and each MoE layer's wall time and
    planning time within it (hooks on the decoder layers that hold experts)."""

    def __init__(self, loaded: LoadedModel, sync: Callable[[], None], counters: RunCounters | None):
        self._sync, self._counters = sync, counters
        self.starts: list[float] = []  # perf_counter at each step's start
        # per step, per MoE layer: (layer ms, plan_layer ms, plan_prefetch ms)
        self.layers: list[list[tuple[float, float, float]]] = []
        decoder = loaded.model.model.layers
        self._handles = [loaded.model.register_forward_pre_hook(self._step)]
        for layer in loaded.layers:
            module = decoder[layer.decoder_layer]
            self._handles.append(module.register_forward_pre_hook(self._layer_start))
            self._handles.append(module.register_forward_hook(self._layer_end))
        self._t0 = self._plan0 = 0.0

    def _step(self, module, args) -> None:
        self._sync()  # sync point: the previous step's work is done
        self.starts.append(time.perf_counter())
        self.layers.append([])

    def _layer_start(self, module, args) -> None:
        self._sync()  # sync point: the layer starts on an idle accelerator
        self._plan0 = self._planning_ns()
        self._t0 = time.perf_counter()

    def _planning_ns(self) -> tuple[int, int]:
        counters = self._counters
        return (counters.planning_ns, counters.prefetch_planning_ns) if counters is not None else (0, 0)

    def _layer_end(self, module, args, output) -> None:
        self._sync()  # sync point: the layer's work is done
        elapsed_ms = (time.perf_counter() - self._t0) * 1e3
        layer_ns, prefetch_ns = self._planning_ns()
        self.layers[-1].append((elapsed_ms, (layer_ns - self._plan0[0]) / 1e6, (prefetch_ns - self._plan0[1]) / 1e6))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass(frozen=True)
class _Step:
    n_tokens: int
    context_tokens: int
    step_ms: float  # from this step's start to the next one's
    layer_ms: tuple[float, ...]  # [L] each MoE layer's wall time
    plan_layer_ms: tuple[float, ...]  # [L] the planner's plan_layer wall time in each layer
    plan_prefetch_ms: tuple[float, ...]  # [L] its plan_prefetch wall time
    expert_tokens: tuple[tuple[int, ...], ...]  # [L] token counts of the layer's activated experts


class _Runner:
    """Runs `generate` on random prompts and returns its timed steps (the last step, which has no
    successor to end it, is dropped)."""

    def __init__(self, loaded: LoadedModel, accelerator: Accelerator, seed: int = 0):
        self.loaded, self.accelerator = loaded, accelerator
        self._generator = torch.Generator().manual_seed(seed)
        self.vocab = loaded.model.config.vocab_size

    def steps(self, prompt_tokens: int, n_new: int, runtime=None) -> list[_Step]:
        ids = torch.randint(0, self.vocab, (1, prompt_tokens), generator=self._generator).to(self.accelerator.device)
        routed: list[tuple[tuple[int, ...], ...]] = []

        def on_step() -> None:
            if runtime is not None:
                records = runtime.end_step()
                routed.append(tuple(tuple(np.bincount(r.topk_ids.ravel())[np.unique(r.topk_ids)].tolist())
                                    for r in records))

        clock = _StepClock(self.loaded, self.accelerator.synchronize, runtime.counters if runtime else None)
        try:
            generate(self.loaded.model, ids, torch.ones_like(ids), n_new + 1, on_step=on_step,
                     sync=self.accelerator.synchronize)
        finally:
            clock.close()
        steps = []
        for i in range(len(clock.starts) - 1):
            layers = clock.layers[i]
            steps.append(_Step(
                n_tokens=prompt_tokens if i == 0 else 1,
                context_tokens=0 if i == 0 else prompt_tokens + i - 1,
                step_ms=(clock.starts[i + 1] - clock.starts[i]) * 1e3,
                layer_ms=tuple(ms for ms, _, _ in layers),
                plan_layer_ms=tuple(plan for _, plan, _ in layers),
                plan_prefetch_ms=tuple(plan for _, _, plan in layers),
                expert_tokens=routed[i] if routed else (),
            ))
        return steps


@contextlib.contextmanager
def _null_experts(loaded: LoadedModel) -> Iterator[None]:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NULL_EXPERTS, _null_forward)
    previous = loaded.model.config._experts_implementation
    loaded.model.set_experts_implementation(NULL_EXPERTS)
    try:
        yield
    finally:
        loaded.model.set_experts_implementation(previous)


def _null_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    return torch.zeros_like(hidden_states)  # [T, D]: no routed expert contributes


# ---------------------------------------------------------------------------------------------
# the measurement


@dataclass(frozen=True)
class _Plan:
    prefill_tokens: tuple[int, ...]  # T of the timed prefills
    decode_prompts: tuple[int, ...]  # prompt lengths the decode steps follow
    decode_steps: int  # timed decode steps after each
    rounds: int  # each kind of run is repeated this many times, the kinds interleaved


def _plan(loaded: LoadedModel, budget: Budget) -> _Plan:
    max_positions = getattr(loaded.model.config, "max_position_embeddings", None) or 4096
    quick = budget.max_repeats < 20
    decode_steps = 8 if quick else 16
    longest = min(MAX_PREFILL_TOKENS, budget.max_tokens, max_positions // 2)
    return _Plan(
        prefill_tokens=tuple(token_counts(longest)),
        decode_prompts=(8, max(9, min(longest, max_positions - decode_steps - 2))),
        decode_steps=decode_steps,
        rounds=2 if quick else 4,
    )


class ModelTimer:
    """Times forward steps of one model with `generate`, as planned by `_plan`."""

    def __init__(self, loaded: LoadedModel, accelerator: Accelerator, budget: Budget,
                 progress: Callable[[str], None] = lambda what: None):
        self.loaded, self.accelerator, self.progress = loaded, accelerator, progress
        self.plan = _plan(loaded, budget)
        self._runner = _Runner(loaded, accelerator)

    def runs(self, what: str, runtime=None, prefill_tokens: tuple[int, ...] | None = None) -> list[_Step]:
        """A timed prefill of every planned length (or of `prefill_tokens`), then decode steps
        after each planned prompt."""
        steps = []
        for n_tokens in self.plan.prefill_tokens if prefill_tokens is None else prefill_tokens:
            self.progress(f"{what}: prefill of {n_tokens} token(s)")
            steps.append(self._runner.steps(n_tokens, 1, runtime)[0])
        for prompt in self.plan.decode_prompts:
            self.progress(f"{what}: decode after {prompt} tokens")
            steps += self._runner.steps(prompt, self.plan.decode_steps, runtime)[1:]
        return steps

    def decode(self, runtime) -> None:
        """Decode steps after the shortest planned prompt, untimed (the runtime counts what it needs)."""
        self._runner.steps(self.plan.decode_prompts[0], self.plan.decode_steps, runtime)


@dataclass(frozen=True)
class ModelMeasurement:
    dense_layer: LatencyCurve  # one MoE layer's dense part, T new tokens over an empty cache
    dense_ms_per_context_token: float  # its growth in decode, per new and cached token pair
    outside_step: LatencyCurve  # the step's work outside the MoE layers, with the runtime
    host_layer: LatencyCurve  # the executor's host work per MoE layer, planning excluded
    cpu_worker_ms: float  # the CPU worker's start-up cost per layer it runs experts in
    expert_load_ms: float  # one expert copied into a slot, from the model's own host weights

    def model_costs(self, model: str, planners: tuple[PlannerCost, ...] = ()) -> ModelCosts:
        return ModelCosts(model, self.outside_step, self.host_layer, self.dense_ms_per_context_token, planners)


def measure_model(timer: ModelTimer, cpu_expert: LatencyCurve, accelerator_expert: LatencyCurve) -> ModelMeasurement:
    """Null experts, every expert resident, every expert on the CPU worker: each kind of run
    repeated in interleaved rounds, so a machine whose speed drifts slows them alike. The expert
    curves are this machine's, taken out of the layers' times."""
    from hybrimoe.runtime.hybrid import HybridRuntime
    from hybrimoe.runtime.planning import TRACE_LOOKAHEAD_DEPTH

    loaded, accelerator = timer.loaded, timer.accelerator
    resident = SideOnlyPlanner("accelerator", loaded.n_layers, loaded.n_experts)
    cpu_side = SideOnlyPlanner("cpu", loaded.n_layers, loaded.n_experts)
    copying = SideOnlyPlanner("load", loaded.n_layers, loaded.n_experts)
    null_steps, resident_steps, cpu_steps, load_steps = [], [], [], []
    with _null_experts(loaded):
        timer.runs("warm-up")  # first calls of every kernel size
    for round_ in range(1, timer.plan.rounds + 1):
        with _null_experts(loaded):
            null_steps += timer.runs(f"round {round_}, null experts")
        with HybridRuntime(loaded, resident, accelerator, resident.capacity, TRACE_LOOKAHEAD_DEPTH) as runtime:
            resident_steps += timer.runs(f"round {round_}, experts on the accelerator", runtime)
        with HybridRuntime(loaded, cpu_side, accelerator, 0, TRACE_LOOKAHEAD_DEPTH) as runtime:
            cpu_steps += timer.runs(f"round {round_}, experts on the CPU worker", runtime)
        with HybridRuntime(loaded, copying, accelerator, copying.capacity, TRACE_LOOKAHEAD_DEPTH) as runtime:
            load_steps += timer.runs(f"round {round_}, every expert copied in", runtime, prefill_tokens=())

    prefill = [s for s in null_steps if s.context_tokens == 0]
    dense = _curve(_mean_by_tokens([(s.n_tokens, ms) for s in prefill for ms in s.layer_ms], _MIN_MS))
    pairs = np.array([(s.context_tokens, ms - dense.ms(1)) for s in null_steps if s.context_tokens
                      for ms in s.layer_ms])
    slope = 0.0
    if len(pairs) and np.ptp(pairs[:, 0]) > 0:
        slope = max(0.0, float(np.polyfit(pairs[:, 0], pairs[:, 1], 1)[0]))

    def dense_ms(step: _Step) -> float:
        return dense.ms(step.n_tokens) + slope * step.context_tokens * step.n_tokens

    def expected_ms(curve: LatencyCurve) -> Callable[[_Step, int], float]:
        """A layer's dense part and its experts' time on `curve`."""
        return lambda step, layer: dense_ms(step) + sum(curve.ms(n) for n in step.expert_tokens[layer])

    host = _curve(_mean_by_tokens(
        [(step.n_tokens, ms) for step, _, ms in _residuals(resident_steps, expected_ms(accelerator_expert))], _MIN_MS))
    # Outside the layers with the runtime's memory in use and its per-step bookkeeping, as in a run.
    outside = _curve(_mean_by_tokens([(s.n_tokens, s.step_ms - sum(s.layer_ms)) for s in resident_steps], _MIN_MS))

    def with_host(curve: LatencyCurve) -> Callable[[_Step, int], float]:
        return lambda step, layer: expected_ms(curve)(step, layer) + host.ms(step.n_tokens)

    decode_cpu_steps = [step for step in cpu_steps if step.context_tokens]
    cpu_worker_ms = statistics.fmean(ms for _, _, ms in _residuals(decode_cpu_steps, with_host(cpu_expert)))
    # What the copies add to a decode layer, per copy: the copies of the model's own weights.
    load_ms = statistics.fmean(ms / len(step.expert_tokens[layer])
                               for step, layer, ms in _residuals(load_steps, with_host(accelerator_expert)))
    return ModelMeasurement(dense, slope, outside, host, max(0.0, cpu_worker_ms), max(_MIN_MS, load_ms))


def measure_planners(
    timer: ModelTimer, profile: HardwareProfile, strategies: tuple[str, ...]
) -> tuple[PlannerCost, ...]:
    """Each strategy's planner wall time per layer, planning with `profile`."""
    return tuple(_planner_cost(timer, profile, strategy) for strategy in strategies)


def _mean_by_tokens(values: list[tuple[int, float]], floor_ms: float) -> list[CurvePoint]:
    """One point per token count: the mean (a run's total is a sum of such times, slow ones
    included), with the spread of the samples."""
    by_tokens: dict[int, list[float]] = {}
    for n_tokens, ms in values:
        by_tokens.setdefault(n_tokens, []).append(ms)
    points = []
    for n_tokens in sorted(by_tokens):
        samples = by_tokens[n_tokens]
        points.append(CurvePoint(n_tokens, max(floor_ms, statistics.fmean(samples)), max(samples) - min(samples)))
    return points


def _curve(points: list[CurvePoint]) -> LatencyCurve:
    return fit_curve(points) if len(points) >= 2 else LatencyCurve(points=tuple(points))


def _residuals(
    steps: list[_Step], expected_ms: Callable[[_Step, int], float]
) -> list[tuple[_Step, int, float]]:
    """(step, layer, what the layer's time has beyond `expected_ms` and the planner's) for every
    MoE layer of every step."""
    return [
        (step, layer, ms - step.plan_layer_ms[layer] - step.plan_prefetch_ms[layer] - expected_ms(step, layer))
        for step in steps
        for layer, ms in enumerate(step.layer_ms)
    ]


def _planner_cost(timer: ModelTimer, profile: HardwareProfile, strategy: str) -> PlannerCost:
    """One strategy's planner wall time per layer as tokens grow, a quarter of the experts cached."""
    from hybrimoe.policy.strategies import ModelDims, cache_capacity
    from hybrimoe.runtime.hybrid import HybridRuntime
    from hybrimoe.runtime.planning import TRACE_LOOKAHEAD_DEPTH, build_planner

    loaded = timer.loaded
    dims = ModelDims(loaded.n_layers, loaded.n_experts, loaded.top_k)
    capacity = cache_capacity(dims, PolicyConfig().cache_ratio) if profile.has_accelerator else 0
    uniform = np.ones((loaded.n_layers, loaded.n_experts))  # frequency baselines: no workload to count
    planner = build_planner(strategy, loaded, profile, PolicyConfig(), capacity, uniform)
    prefill_tokens = timer.plan.prefill_tokens[::-2][::-1]  # every other length, the longest kept
    with HybridRuntime(loaded, planner, timer.accelerator, capacity, TRACE_LOOKAHEAD_DEPTH) as runtime:
        steps = timer.runs(f"planner {strategy}", runtime, prefill_tokens)
    layer = _mean_by_tokens([(s.n_tokens, ms) for s in steps for ms in s.plan_layer_ms], _MIN_MS)
    prefetch = _mean_by_tokens([(s.n_tokens, ms) for s in steps for ms in s.plan_prefetch_ms], _MIN_MS)
    return PlannerCost(strategy, _curve(layer), _curve(prefetch))
