"""Trace-driven simulator: replays routing traces through planners on a cost model.

Design choices:
- The simulator drives the very planner the runtime drives; its times are the planner's own
  timeline model (dense part, expert phase from the schedule, copy-engine queue, stalls on late
  prefetches), so simulation and execution make the same decisions.
- Predictions for prefetching, in order of preference: recorded lookahead (the runtime's gate
  predictions) when the trace has them; otherwise the most recent routing seen at the target layer
  (`recent`, the stated predictor); `oracle` passes the true routing (an upper bound).
- Baselines that place by frequency count on a profiling workload: another trace (`profiling`, as
  a user who profiled last week's prompts would), or else the first `profile_fraction` of the
  trace's tokens (a separate part of the same batch), the rest being replayed. `static-oracle`
  counts on the replayed part itself.
- Deterministic: no randomness anywhere; the same inputs give the same report.
- Shapes: T = tokens in a step, k = top-k, E = experts, L = MoE layers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from hybrimoe.config import HardwareProfile, PolicyConfig
from hybrimoe.errors import UserError
from hybrimoe.policy import scheduler as sched
from hybrimoe.policy.cache import ExpertCache
from hybrimoe.policy.costs import CostModel
from hybrimoe.policy.prefetch import token_counts
from hybrimoe.policy.strategies import (
    BASELINES,
    STRATEGIES,
    BaselineParams,
    ModelDims,
    PolicyPlanner,
    cache_capacity,
    make_planner,
)
from hybrimoe.trace import RoutingTrace, TraceStep

PREDICTORS = ("recorded", "recent", "oracle")
MODES = ("decode", "prefill")


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
    hit_rate: float
    bytes_loaded: int
    gpu_share: float
    prefetch_precision: float
    prefetch_recall: float
    stall_ms: float

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
    if predictor not in PREDICTORS:
        raise UserError(f"unknown predictor {predictor!r}; expected one of {', '.join(PREDICTORS)}")
    n_layers = trace.meta.n_layers
    depth = planner.lookahead_layers
    recent: list[np.ndarray | None] = [None] * n_layers
    layer_ms = np.zeros(n_layers)
    start_ms = planner.clock_ms
    n_steps = trace.n_steps
    slice_ends = {math.ceil(n_steps * (i + 1) / checkpoints) for i in range(checkpoints)} if on_checkpoint else set()
    for done, step in enumerate(trace.steps, start=1):
        planner.begin_step(step.n_tokens, context_tokens if mode == "decode" else 0)
        context_tokens += step.n_tokens // batch_size
        probs_all = step.router_probs
        weights_all = step.topk_weights
        # Traces store ids compactly (int16); numpy indexes with intp several times faster.
        ids_all = step.topk_ids.astype(np.intp, copy=False)  # [L, T, k]
        for layer in range(n_layers):
            ids = ids_all[layer]  # [T, k]
            predicted = {}
            if depth:
                predicted = _predictions(step, layer, depth, predictor, recent, n_layers)
            layer_start = planner.clock_ms
            planner.plan_layer(
                layer,
                ids,
                None if probs_all is None else probs_all[layer],
                predicted,
                None if weights_all is None else weights_all[layer],
            )
            planner.plan_prefetch()
            layer_ms[layer] += planner.clock_ms - layer_start
            recent[layer] = ids
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
        hit_rate=stats.hit_rate,
        bytes_loaded=(stats.demand_loads + stats.prefetch_loads) * planner.costs.expert_bytes,
        gpu_share=stats.gpu_share,
        prefetch_precision=stats.prefetch_precision,
        prefetch_recall=stats.prefetch_recall,
        stall_ms=stats.stall_ms,
    )


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


@dataclass(frozen=True)
class Comparison:
    """Every strategy at every cache ratio, in one mode, with the workload split it used."""

    mode: str
    ratios: tuple[float, ...]
    results: dict[tuple[str, float], SimResult]
    baseline: str
    profile_name: str
    trace_model: str
    replay_tokens: int
    profiling_tokens: int
    seconds: float
    greedy_vs_exact: tuple[float, float] | None = None  # (mean, worst) greedy/exact time ratio
    profiling_trace: str | None = None  # the other trace frequencies were counted on; None: this one's first part

    def speedup(self, strategy: str, ratio: float) -> float | None:
        base = self.results.get((self.baseline, ratio))
        mine = self.results.get((strategy, ratio))
        if base is None or mine is None or mine.step_ms == 0:
            return None
        return base.step_ms / mine.step_ms

    def best_baseline(self, ratio: float) -> str | None:
        """The fastest deployable baseline in this comparison at `ratio` (see strategies.BASELINES)."""
        timed = [(self.results[(s, ratio)].step_ms, s) for s in BASELINES if (s, ratio) in self.results]
        return min(timed)[1] if timed else None

    def vs_best_baseline(self, strategy: str, ratio: float) -> float | None:
        """How many times faster `strategy` is than the best baseline at `ratio`."""
        best = self.best_baseline(ratio)
        mine = self.results.get((strategy, ratio))
        if best is None or mine is None or mine.step_ms == 0:
            return None
        return self.results[(best, ratio)].step_ms / mine.step_ms


@dataclass
class Workload:
    """The replayed trace, and the expert frequencies baselines place by."""

    replay: RoutingTrace
    profiling_frequencies: np.ndarray  # [L, E]
    replay_frequencies: np.ndarray  # [L, E]
    profiling_tokens: int


def make_workload(
    trace: RoutingTrace,
    mode: str,
    profile_fraction: float,
    prefill_tokens: int,
    max_tokens: int | None,
    profiling: RoutingTrace | None = None,
) -> Workload:
    """The profiling workload (`profiling`, or else the first `profile_fraction` of the trace's
    tokens) and the replayed tokens, shaped one token per step for decode and as prompts of
    `prefill_tokens` tokens for prefill."""
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; expected decode or prefill")
    n_tokens = trace.n_tokens
    if profiling is not None:
        check_same_routing(trace, profiling)
        n_profiling = 0
    else:
        if not 0.0 < profile_fraction < 1.0:
            raise UserError(f"--profile-split must be in (0, 1), got {profile_fraction}")
        n_profiling = round(profile_fraction * n_tokens)
        if n_profiling == 0:
            raise UserError(f"a trace of {n_tokens} tokens is too short to split at {profile_fraction}")
        profiling = trace.tokens(0, n_profiling)
    n_replay = n_tokens - n_profiling if max_tokens is None else min(max_tokens, n_tokens - n_profiling)
    if n_replay <= 0:
        raise UserError(f"a trace of {n_tokens} tokens is too short to split at {profile_fraction}")
    replay = trace.tokens(n_profiling, n_profiling + n_replay)
    replay = replay.as_decode() if mode == "decode" else as_prompts(replay, prefill_tokens)
    return Workload(
        replay=replay,
        profiling_frequencies=profiling.expert_frequencies(),
        replay_frequencies=replay.expert_frequencies(),
        profiling_tokens=profiling.n_tokens,
    )


def check_same_routing(trace: RoutingTrace, profiling: RoutingTrace) -> None:
    """A profiling trace must route like the replayed one: same layers, experts and top-k."""
    if profiling.meta.routing_shape != trace.meta.routing_shape:
        raise UserError(
            f"the profiling trace ({profiling.meta.model}: {profiling.meta.n_layers} layers x "
            f"{profiling.meta.n_experts} experts, top-{profiling.meta.top_k}) does not route like the replayed "
            f"one ({trace.meta.model}: {trace.meta.n_layers} x {trace.meta.n_experts}, top-{trace.meta.top_k})"
        )


def as_prompts(trace: RoutingTrace, n_tokens: int) -> RoutingTrace:
    """The token stream regrouped into steps of `n_tokens` tokens (the last may be shorter)."""
    steps = []
    for start in range(0, trace.n_tokens, n_tokens):
        parts = trace.tokens(start, min(start + n_tokens, trace.n_tokens)).steps
        steps.append(parts[0] if len(parts) == 1 else _concat_steps(parts))
    return RoutingTrace(trace.meta, tuple(steps))


def _concat_steps(parts) -> TraceStep:
    def cat(name: str, axis: int):
        arrays = [getattr(part, name) for part in parts]
        return None if arrays[0] is None else np.concatenate(arrays, axis=axis)

    return TraceStep(cat("topk_ids", 1), cat("topk_weights", 1), cat("router_probs", 1), cat("lookahead", 2))


def compare_strategies(
    trace: RoutingTrace,
    profile: HardwareProfile,
    ratios: Iterable[float] = (0.25, 0.5, 0.75),
    strategies: Iterable[str] = STRATEGIES,
    mode: str = "decode",
    policy: PolicyConfig | None = None,
    predictor: str = "recent",
    profile_fraction: float = 0.25,
    prefill_tokens: int = 512,
    max_tokens: int | None = None,
    bound: bool = True,
    progress: Callable[[str], None] | None = None,
    profiling: RoutingTrace | None = None,
    profiling_name: str | None = None,
    baseline: BaselineParams = BaselineParams(),
) -> Comparison:
    """Every strategy at every cache ratio on one workload: what `hybrimoe simulate` prints.
    `profiling`: the trace frequency placement is counted on (named `profiling_name`); None:
    the first `profile_fraction` of `trace`."""
    strategies = tuple(strategies)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise UserError(f"unknown strategy {unknown[0]!r}; expected some of {', '.join(STRATEGIES)}")
    ratios = tuple(ratios)
    if any(not 0.0 <= r <= 1.0 for r in ratios):
        raise UserError("cache ratios must be in [0, 1]")
    profile.check_expert_shape(trace.meta.expert_shape())
    policy = policy or profile.policy or PolicyConfig()
    costs = CostModel(profile)
    dims = ModelDims(trace.meta.n_layers, trace.meta.n_experts, trace.meta.top_k)
    workload = make_workload(trace, mode, profile_fraction, prefill_tokens, max_tokens, profiling)
    started = time.perf_counter()
    results = {}
    for ratio in ratios:
        capacity = cache_capacity(dims, ratio)
        for strategy in strategies:
            if progress is not None:
                progress(f"{strategy} at {ratio:.0%} cache")
            freqs = workload.replay_frequencies if strategy == "static-oracle" else workload.profiling_frequencies
            try:
                planner = make_planner(strategy, dims, costs, policy, capacity, freqs, baseline)
            except ValueError as exc:  # a baseline setting that does not fit this cache
                raise UserError(f"{strategy} at {ratio:.0%} cache: {exc}") from None
            results[(strategy, ratio)] = simulate(
                workload.replay, planner, predictor, strategy=strategy, cache_ratio=ratio, mode=mode
            )
    if bound:
        for ratio in ratios:
            if progress is not None:
                progress(f"the oracle bound at {ratio:.0%} cache")
            planner = oracle_planner(workload.replay, dims, costs, policy, cache_capacity(dims, ratio))
            results[("oracle", ratio)] = simulate(
                workload.replay, planner, "oracle", strategy="oracle", cache_ratio=ratio, mode=mode
            )
    return Comparison(
        mode=mode,
        ratios=ratios,
        results=results,
        baseline="ktransformers",
        profile_name=profile.name,
        trace_model=trace.meta.model,
        replay_tokens=workload.replay.n_tokens,
        profiling_tokens=workload.profiling_tokens,
        seconds=time.perf_counter() - started,
        greedy_vs_exact=_greedy_vs_exact(workload.replay, costs) if mode == "decode" else None,
        profiling_trace=None if profiling is None else (profiling_name or profiling.meta.model),
    )


def oracle_planner(
    trace: RoutingTrace, dims: ModelDims, costs: CostModel, policy: PolicyConfig, capacity: int
) -> PolicyPlanner:
    """The bound: Belady's clairvoyant cache, hybrid schedule, impact prefetch fed the true routing."""
    accesses = [
        (layer, np.unique(step.topk_ids[layer]).tolist()) for step in trace.steps for layer in range(dims.n_layers)
    ]
    cache = ExpertCache(dims.n_layers, dims.n_experts, capacity, layout=policy.cache_layout, policy="belady",
                        accesses=accesses)
    depth = max(policy.prefetch_depth, 1)
    first_use = list(dict.fromkeys((layer, e) for layer, experts in accesses for e in experts))
    return PolicyPlanner(
        dims, costs, cache, sched.schedule_hybrid, prefetch="impact", prefetch_depth=depth, warm=tuple(first_use)
    )


def _greedy_vs_exact(trace: RoutingTrace, costs: CostModel, samples: int = 200) -> tuple[float, float] | None:
    """Greedy/exact schedule time on sampled decode layers, with a deterministic resident set."""
    if not costs.has_accelerator or not trace.steps:
        return None
    rng = np.random.default_rng(0)
    ratios = []
    n_layers = trace.meta.n_layers
    for i in range(samples):
        step = trace.steps[(i * 7919) % len(trace.steps)]
        ids = step.topk_ids[i % n_layers]
        counts = token_counts(ids)
        if len(counts) > sched.EXACT_MAX_EXPERTS:
            continue
        resident = {e for e in counts if rng.random() < 0.5}
        exact = sched.schedule_exact(counts, resident, costs).finish_ms
        greedy = sched.schedule_hybrid(counts, resident, costs).finish_ms
        if exact > 0:
            ratios.append(greedy / exact)
    if not ratios:
        return None
    return float(np.mean(ratios)), float(np.max(ratios))


def simulate_files(
    trace_path,
    profile_path,
    modes: Iterable[str] = MODES,
    accelerator_from=None,
    profiling_trace=None,
    **options,
) -> list[Comparison]:
    """Loads a trace and a profile (optionally borrowing another's accelerator, optionally
    counting frequencies on another trace) and compares."""
    from hybrimoe.config import load_profile
    from hybrimoe.trace import load_trace

    profile = load_profile(profile_path)
    if accelerator_from is not None:
        profile = profile.with_accelerator_from(load_profile(accelerator_from))
    if not profile.has_accelerator:
        raise UserError(
            f"profile {profile.name!r} has no accelerator section: pass --accelerator-from with a profile that has one"
        )
    trace = load_trace(trace_path)
    if profiling_trace is not None:
        options.update(profiling=load_trace(profiling_trace), profiling_name=str(profiling_trace))
    return [compare_strategies(trace, profile, mode=mode, **options) for mode in modes]
