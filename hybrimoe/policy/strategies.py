"""Complete strategies: one planner class, configured as hybrimoe or as each baseline.

Design choices:
- Every strategy is a `PolicyPlanner`: an expert cache, a schedule rule, a prefetch rule and
  whether on-demand loads are admitted into the cache. The runtime and the simulator call the same
  planner, so what is simulated is what runs.
- The planner keeps a model of the step's timeline (dense part, expert phase, the copy engine's
  queue) from the cost model, so it knows how much PCIe time each layer leaves idle for prefetches,
  across layer and step boundaries. A prefetched expert that is still in flight when its layer
  starts delays that layer's accelerator queue.
- A layer is planned in two calls: `plan_layer` (schedule, demand loads: what the layer's experts
  wait for) and `plan_prefetch` (the prefetch choice, which the runtime makes while the experts
  run). The cache's priorities are read only by admits, so the layer's score update waits for the
  first admit; results are the same as updating first.
- A forward step opens with `begin_step`, which charges the work outside the decoder layers and
  sets the KV-cache length the layers' attention reads. Each layer is charged its dense part, the
  executor's host work and `plan_layer`'s measured wall time before its experts, then the experts;
  `plan_prefetch`'s wall time counts where nothing hides it (the experts finish first, or the CPU
  stand-in, whose host thread also runs the experts and the copies; see costs.py).
- Baselines, as they place experts:
  * `ktransformers`: a static GPU-resident set of the most frequent experts, counted on a separate
    profiling workload; all other routed experts on the CPU; no loads. Prefill uses the same static
    split (kTransformers' CPU kernels compute non-resident experts for every batch size).
  * `static-oracle`: the same, with frequencies counted on the replayed trace itself (a bound).
  * `ktransformers-front`: kTransformers' front-loading placement: the cache filled from the first
    layer onwards (lowest expert ids first in the last, partly filled layer), the rest on the CPU.
  * `ktransformers-dynamic`: kTransformers' dynamic expert update. Its documentation says only that
    it updates the GPU experts during inference, triggered by prefills of at least
    `--kt-gpu-prefill-token-threshold` tokens; modelled as frequency placement (from the profiling
    workload, or kTransformers' default uniform placement without one) refreshed to the top
    experts of an online activation count (decayed per token) after every `refresh_steps`-th step
    and every step of at least `refresh_prefill_tokens` tokens. The refresh's copies queue on the
    copy engine like prefetches; between refreshes, misses run on the CPU.
  * `llamacpp`: `--n-cpu-moe N`: the experts of the first N layers on the CPU, all later layers'
    experts resident, N the smallest that fits the cache; prefill uses the same split.
  * `llamacpp-lru`: llama.cpp's open expert-cache change (pull request 27861): the experts of the
    first `lru_cpu_layers` layers (default: every layer) live on the CPU, each of those layers with
    an LRU pool of the cache's slots left after the fully resident later layers (split evenly);
    resident experts run on the GPU, the rest on the CPU, and after each layer up to `lru_inserts`
    of its CPU experts are copied into its pool for later steps (`--moe-expert-cache-inserts`).
  * `gpu-offload`: every expert computed on the accelerator; misses loaded on demand into an LRU
    cache that starts empty (accelerate-style offload).
  * The caches of `gpu-offload` and `llamacpp-lru` evict by `BaselineParams.eviction` (LRU by
    default; any admitting policy, e.g. least-stale).
  * `cpu-only`: every routed expert on the CPU.
  * `hybrimoe`: HybriMoE scheduling, MRS cache (or the configured policy), impact-driven prefetch,
    warm start from profiled frequencies.
- Shapes: T = tokens in the step, k = top-k, E = experts per layer, L = MoE layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from hybrimoe.config import PolicyConfig
from hybrimoe.policy import scheduler as sched
from hybrimoe.policy.cache import ADMITTING_POLICIES, ActivationCountPolicy, ExpertCache, even_pool_sizes
from hybrimoe.policy.costs import CostModel, no_time
from hybrimoe.policy.plan import ExpertId, LayerPlan, SlotLoad
from hybrimoe.policy.prefetch import impact_prefetch, token_counts, top_score_prefetch

_MEMO_MAX = 1 << 16
STRATEGIES = (
    "hybrimoe", "ktransformers", "ktransformers-dynamic", "ktransformers-front", "static-oracle", "llamacpp",
    "llamacpp-lru", "gpu-offload", "cpu-only",
)
# Strategies a user could deploy today: the comparison's "best baseline" is the fastest of these.
# (static-oracle places by the replayed tokens' own frequencies, which no deployment knows.)
BASELINES = ("ktransformers", "ktransformers-dynamic", "ktransformers-front", "llamacpp", "llamacpp-lru",
             "gpu-offload", "cpu-only")
# Strategies whose placement is counted on a profiling workload (ktransformers-dynamic starts from
# kTransformers' default uniform placement without one).
NEEDS_FREQUENCIES = ("ktransformers", "static-oracle")


PlanningMs = tuple[Callable[[int], float], Callable[[int], float]]  # n_tokens -> plan_layer ms, plan_prefetch ms


@dataclass(frozen=True)
class BaselineParams:
    """Settings of the peer mechanisms the dynamic baselines model (see the module docstring)."""

    refresh_steps: int = 32  # ktransformers-dynamic: forward steps between placement refreshes
    refresh_prefill_tokens: int = 512  # a step of at least this many tokens also refreshes (kTransformers' threshold)
    refresh_decay: float = 0.99  # per-token decay of the online activation count
    lru_inserts: int = 2  # llamacpp-lru: experts uploaded per layer per step (--moe-expert-cache-inserts)
    lru_cpu_layers: int | None = None  # llamacpp-lru: --n-cpu-moe, layers with an LRU; None: every layer
    eviction: str = "lru"  # the cache policy of gpu-offload and llamacpp-lru (e.g. least-stale)

    def __post_init__(self) -> None:
        if self.refresh_steps < 1 or self.refresh_prefill_tokens < 1 or self.lru_inserts < 0:
            raise ValueError("refresh_steps and refresh_prefill_tokens must be at least 1, lru_inserts at least 0")
        if not 0.0 <= self.refresh_decay < 1.0:
            raise ValueError(f"refresh_decay must be in [0, 1), got {self.refresh_decay}")
        if self.eviction not in ADMITTING_POLICIES:
            raise ValueError(f"eviction must be one of {', '.join(ADMITTING_POLICIES)}, got {self.eviction!r}")


@dataclass(frozen=True)
class ModelDims:
    n_layers: int
    n_experts: int
    top_k: int


@dataclass
class PlannerStats:
    """Counts over every planned layer; expert executions are (expert, layer) pairs per step."""

    stall_ms: float = 0.0
    cpu_experts: int = 0
    gpu_experts: int = 0
    hits: int = 0
    misses: int = 0
    demand_loads: int = 0
    prefetch_loads: int = 0
    prefetch_used: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def prefetch_precision(self) -> float:
        return self.prefetch_used / self.prefetch_loads if self.prefetch_loads else 0.0

    @property
    def prefetch_recall(self) -> float:
        needed = self.prefetch_used + self.misses
        return self.prefetch_used / needed if needed else 0.0

    @property
    def gpu_share(self) -> float:
        total = self.cpu_experts + self.gpu_experts
        return self.gpu_experts / total if total else 0.0


class _Deferred:
    """What `plan_layer` leaves to `plan_prefetch`: the layer's routing, its timing, and whether its
    score update and protection have run (they run before the plan's first admit, wherever that is)."""

    __slots__ = ("layer", "topk_ids", "router_probs", "topk_weights", "counts", "predicted_topk", "before_ms",
                 "observed", "predicted_counts", "start_ms", "cpu_ms", "host_ms", "cpu")

    def __init__(self, layer, topk_ids, router_probs, topk_weights, counts, predicted_topk, before_ms):
        self.layer = layer
        self.topk_ids = topk_ids  # [T, k]
        self.router_probs = router_probs  # [T, E] or None
        self.topk_weights = topk_weights  # [T, k] or None
        self.counts: dict[int, int] = counts  # expert -> tokens
        self.predicted_topk: Mapping[int, np.ndarray] = predicted_topk  # later layer -> [T, k]
        self.before_ms = before_ms  # dense part, host work and plan_layer: before the experts start
        self.observed = False
        self.predicted_counts: dict[int, dict[int, int]] | None = None  # set when protected
        self.start_ms = 0.0  # when the layer's experts start
        self.cpu_ms = 0.0  # the CPU worker's experts, from start_ms
        self.host_ms = 0.0  # the rest of the layer's expert phase (see PolicyPlanner._expert_phase)
        self.cpu: tuple[int, ...] = ()  # the experts the plan ran on the CPU


@dataclass
class _Timeline:
    """The planner's model of time since the run started, in ms."""

    clock_ms: float = 0.0
    pcie_free_ms: float = 0.0
    pcie_idle_ms: float = 0.0  # moving average of the copy-engine time a layer leaves unused


class Refill(Protocol):
    """A baseline's own background copies (not HybriMoE's prefetch): asked after each layer."""

    def begin_step(self, n_tokens: int) -> None: ...

    def after_layer(
        self, cache: ExpertCache, layer: int, counts: Mapping[int, int], cpu: tuple[int, ...]
    ) -> list[SlotLoad]:
        """Copies to queue now; `counts`: expert -> tokens of this layer; `cpu`: experts it ran on the CPU."""
        ...


class PeriodicRefresh:
    """kTransformers' dynamic expert update, as modelled here: after the last layer of every
    `every_steps`-th step, and of every step of at least `prefill_tokens` tokens, the resident set
    becomes the `capacity` experts the cache's priorities (an online activation count) rank first."""

    def __init__(self, n_layers: int, every_steps: int, prefill_tokens: int):
        self._last_layer = n_layers - 1
        self.every_steps, self.prefill_tokens = every_steps, prefill_tokens
        self._steps_since = 0
        self._n_tokens = 0

    def begin_step(self, n_tokens: int) -> None:
        self._steps_since += 1
        self._n_tokens = n_tokens

    def after_layer(
        self, cache: ExpertCache, layer: int, counts: Mapping[int, int], cpu: tuple[int, ...]
    ) -> list[SlotLoad]:
        due = self._steps_since >= self.every_steps or self._n_tokens >= self.prefill_tokens
        if layer != self._last_layer or not due:
            return []
        self._steps_since = 0
        cache.protect({layer: counts})  # in use until this layer's experts finish
        loads = [cache.admit(eid, only_if_better=True) for eid in cache.top_experts_overall(cache.capacity)]
        return [load for load in loads if load is not None]


class InsertMisses:
    """llama.cpp's expert LRU (its open pull request 27861), as modelled here: after a layer runs, up
    to `per_step` of the experts it ran on the CPU (most tokens first) are copied into the layer's
    LRU slots, for its later steps."""

    def __init__(self, per_step: int):
        self.per_step = per_step

    def begin_step(self, n_tokens: int) -> None:
        pass

    def after_layer(
        self, cache: ExpertCache, layer: int, counts: Mapping[int, int], cpu: tuple[int, ...]
    ) -> list[SlotLoad]:
        if not cpu or not self.per_step:
            return []
        cache.protect({layer: counts})  # in use until this layer's experts finish
        chosen = sorted(cpu, key=lambda expert: (-counts[expert], expert))[: self.per_step]
        loads = [cache.admit((layer, expert)) for expert in chosen]
        return [load for load in loads if load is not None]


class PolicyPlanner:
    """Plans every MoE layer: schedule this layer's experts and admit loads (`plan_layer`), then
    choose prefetches (`plan_prefetch`).

    Both run at every MoE layer of every step, in the runtime as in the simulator, so they are
    written for speed: plain loops over a layer's few experts, memoized layer times, and numpy only
    where a whole row or pool is touched. The layer's experts wait only for `plan_layer`, so what
    can wait does: the score update and the protection of needed experts run before the plan's
    first admit, which in decode is usually in `plan_prefetch`.
    """

    def __init__(
        self,
        dims: ModelDims,
        costs: CostModel,
        cache: ExpertCache,
        schedule: sched.ScheduleFn,
        prefetch: str = "none",
        prefetch_depth: int = 0,
        admit_loads: bool = True,
        warm: tuple[ExpertId, ...] = (),
        planning_ms: PlanningMs | None = None,
        refill: Refill | None = None,
    ):
        """`planning_ms`: n_tokens -> this planner's measured plan_layer and plan_prefetch wall ms
        per layer (`CostModel.planning_ms`); None: planning costs no modelled time. `refill`: a
        baseline's own background copies, queued after each layer's prefetches."""
        self.dims = dims
        self.costs = costs
        self.cache = cache
        self.schedule = schedule
        self.prefetch = prefetch
        self.prefetch_depth = prefetch_depth
        self.lookahead_layers = prefetch_depth if prefetch == "impact" else 0
        self.admit_loads = admit_loads
        self.refill = refill
        # A cache that never admits cannot take copies: schedule as if copies were impossible.
        self._schedule_costs = costs if admit_loads and cache.policy.admits else costs.without_loads()
        self.stats = PlannerStats()
        self._timeline = _Timeline()
        # [L] expert -> when its prefetch lands (ms), for prefetched experts not used yet.
        self._in_flight: list[dict[int, float]] = [{} for _ in range(dims.n_layers)]
        self._backlog_step_ms = costs.load_ms / 16 if math.isfinite(costs.load_ms) else 1.0
        self._layer_time_memo: dict[tuple, float] = {}
        self._prefetches = prefetch != "none" and prefetch_depth > 0
        self._plan_layer_ms, self._plan_prefetch_ms = planning_ms or (no_time, no_time)
        self._context_ms_per_token = 0.0  # attention over this step's KV cache, per new token
        self._deferred: _Deferred | None = None  # from the last plan_layer, until plan_prefetch
        # [L][depth] the layers after each layer, wrapping into the next step.
        self._later = [
            [tuple((layer + d) % dims.n_layers for d in range(1, depth + 1)) for depth in range(prefetch_depth + 1)]
            for layer in range(dims.n_layers)
        ]
        self._initial = tuple(cache.fill(warm)) if warm else ()

    def initial_loads(self) -> tuple[SlotLoad, ...]:
        return self._initial

    @property
    def clock_ms(self) -> float:
        """Modelled time since the planner's first step, in ms."""
        return self._timeline.clock_ms

    def begin_step(self, n_tokens: int, context_tokens: int) -> None:
        """Opens a forward step of `n_tokens` new tokens over `context_tokens` cached ones (per
        sequence): charges the work outside the decoder layers."""
        self._timeline.clock_ms += self.costs.outside_ms(n_tokens)
        self._context_ms_per_token = self.costs.dense_context_ms * context_tokens
        if self.refill is not None:
            self.refill.begin_step(n_tokens)

    def _layer_time(self, counts: Mapping[int, int], resident: AbstractSet[int]) -> float:
        """A layer's simulated expert time with an idle copy engine (`resident`: which of the
        counted experts are resident), memoized on its load pattern."""
        if len(counts) == sum(counts.values()):
            return self._decode_time(len(resident), len(counts) - len(resident))
        resident_loads, other_loads = [], []
        for expert, n_tokens in counts.items():
            (resident_loads if expert in resident else other_loads).append(n_tokens)
        key = (tuple(sorted(resident_loads)), tuple(sorted(other_loads)))
        finish_ms = self._layer_time_memo.get(key)
        if finish_ms is None:
            finish_ms = self._remember(key, self.schedule(counts, resident, self._schedule_costs).finish_ms)
        return finish_ms

    def _decode_time(self, n_resident: int, n_other: int) -> float:
        """`_layer_time` of a decode layer (every count 1): only how many experts are resident matters."""
        key = (n_resident, n_other)
        finish_ms = self._layer_time_memo.get(key)
        if finish_ms is None:
            counts = dict.fromkeys(range(n_resident + n_other), 1)
            finish_ms = self.schedule(counts, set(range(n_resident)), self._schedule_costs).finish_ms
            finish_ms = self._remember(key, finish_ms)
        return finish_ms

    def _remember(self, key: tuple, finish_ms: float) -> float:
        if len(self._layer_time_memo) >= _MEMO_MAX:
            self._layer_time_memo.clear()
        self._layer_time_memo[key] = finish_ms
        return finish_ms

    def plan_layer(
        self,
        layer: int,
        topk_ids: np.ndarray,  # [T, k]
        router_probs: np.ndarray | None,  # [T, E]
        predicted_topk: Mapping[int, np.ndarray],  # later layer -> [T, k]
        topk_weights: np.ndarray | None = None,  # [T, k]
    ) -> LayerPlan:
        if self._deferred is not None:
            raise RuntimeError(f"plan_prefetch was not called after layer {self._deferred.layer}")
        costs, cache, stats, timeline = self.costs, self.cache, self.stats, self._timeline
        n_tokens = topk_ids.shape[0]
        counts = token_counts(topk_ids)
        resident = cache.resident(layer)

        before_ms = (
            costs.dense_ms(n_tokens) + self._context_ms_per_token * n_tokens + costs.host_ms(n_tokens)
            + self._plan_layer_ms(n_tokens)
        )
        start_ms = timeline.clock_ms + before_ms
        # The copy engine's backlog, rounded up to a 1/16 of a load so decode plans stay memoized.
        backlog_ms = timeline.pcie_free_ms - start_ms
        backlog_ms = math.ceil(backlog_ms / self._backlog_step_ms) * self._backlog_step_ms if backlog_ms > 0 else 0.0
        plan = self.schedule(counts, resident, self._schedule_costs, backlog_ms)

        # Prefetched experts this layer uses: count them, and wait for those still in flight.
        stall_ms = 0.0
        in_flight = self._in_flight[layer]
        if in_flight:
            used = [expert for expert in counts if expert in in_flight and expert in resident]
            for expert in used:
                wait_ms = in_flight.pop(expert) - start_ms
                if wait_ms > stall_ms:
                    stall_ms = wait_ms
            stats.prefetch_used += len(used)
        hits = cache.access(layer, counts)

        deferred = _Deferred(layer, topk_ids, router_probs, topk_weights, counts, predicted_topk, before_ms)
        if plan.load and self.admit_loads:  # the score update and protection come before any admit
            self._observe(deferred)
            self._protect(deferred)
        loads: list[SlotLoad] = []
        cpu = plan.cpu
        extra_cpu_ms = 0.0
        for expert in plan.load:
            load = cache.admit((layer, expert)) if self.admit_loads else None
            if load is None:  # no slot to be had: the CPU runs it (starting up if it had nothing)
                extra_cpu_ms += costs.cpu_ms(counts[expert]) + (0.0 if cpu else costs.cpu_first_extra_ms)
                cpu += (expert,)
                continue
            loads.append(load)
            in_flight.pop(expert, None)
        n_loads = len(loads)
        copying = n_loads > 0 or (backlog_ms > 0 and costs.overlaps)  # copies run beside the CPU's experts
        cpu_ms, host_ms, stall_ms = self._expert_phase(plan, counts, loads, extra_cpu_ms, stall_ms, copying)
        finish_ms = max(cpu_ms, host_ms)
        deferred.start_ms, deferred.cpu_ms, deferred.host_ms, deferred.cpu = start_ms, cpu_ms, host_ms, cpu
        timeline.clock_ms = start_ms + finish_ms
        # Prefetches queue on the copy engine behind this layer's loads, during its expert phase.
        load_ms = costs.load_ms
        timeline.pcie_free_ms = max(timeline.pcie_free_ms, start_ms) + n_loads * load_ms
        idle_ms = max(0.0, before_ms + finish_ms - n_loads * load_ms)
        timeline.pcie_idle_ms += 0.1 * (idle_ms - timeline.pcie_idle_ms)
        self._deferred = deferred

        gpu = plan.gpu
        stats.stall_ms += stall_ms
        stats.hits += hits
        stats.misses += len(counts) - hits
        stats.demand_loads += n_loads
        stats.gpu_experts += len(gpu) + n_loads
        stats.cpu_experts += len(cpu)
        slot_row = cache.slot_row(layer)
        slots = {expert: slot_row[expert] for expert in gpu}
        load_experts = ()
        if loads:
            load_experts = tuple([expert for (_, expert), _ in loads])
            for (_, expert), slot in loads:
                slots[expert] = slot
        return LayerPlan(layer, gpu, load_experts, cpu, slots, tuple(loads), finish_ms)

    def plan_prefetch(self) -> tuple[SlotLoad, ...]:
        """Copies for the layers after the last planned one (and a baseline's refill copies), queued
        on the copy engine behind its loads. Also runs that layer's score update if `plan_layer` had
        no demand loads."""
        deferred, self._deferred = self._deferred, None
        if deferred is None:
            raise RuntimeError("plan_prefetch called without a plan_layer before it")
        if not deferred.observed:
            self._observe(deferred)
        prefetch = self._choose_prefetch(deferred) if self._prefetches else []
        if self.refill is not None:
            prefetch += self.refill.after_layer(self.cache, deferred.layer, deferred.counts, deferred.cpu)
        self._end_layer(deferred, len(prefetch))
        if prefetch:
            load_ms, in_flight = self.costs.load_ms, self._in_flight
            pcie_free_ms = self._timeline.pcie_free_ms
            for (target, expert), _ in prefetch:
                pcie_free_ms += load_ms
                in_flight[target][expert] = pcie_free_ms
            self._timeline.pcie_free_ms = pcie_free_ms
            self.stats.prefetch_loads += len(prefetch)
        return tuple(prefetch)

    def _expert_phase(
        self, plan: sched.LayerSchedule, counts: Mapping[int, int], loads: list[SlotLoad], extra_cpu_ms: float,
        stall_ms: float, copying: bool,
    ) -> tuple[float, float, float]:
        """(CPU worker ms, the other side's ms, stall ms) of a layer's expert phase, from its start.

        On a GPU the other side is the GPU (its copies overlap its kernels, as scheduled); on the
        stand-in it is the host thread, which copies and then computes, and never stalls.
        `copying`: copies run during the phase, so CPU experts and copies slow each other.
        """
        costs = self.costs
        cpu_ms = plan.cpu_end_ms + extra_cpu_ms
        copy_slowdown = 1.0
        if cpu_ms and copying:
            cpu_ms *= costs.cpu_slowdown
            copy_slowdown = costs.copy_slowdown
        copies_ms = len(loads) * costs.load_ms
        if costs.overlaps:  # slowed copies arrive later, and the GPU waits for them
            return cpu_ms, plan.gpu_end_ms + stall_ms + copies_ms * (copy_slowdown - 1.0), stall_ms
        gpu_ms = costs.gpu_ms
        host_ms = copies_ms * copy_slowdown + sum([gpu_ms(counts[expert]) for expert in plan.gpu])
        host_ms += sum([gpu_ms(counts[expert]) for (_, expert), _ in loads])
        return cpu_ms, host_ms, 0.0

    def _end_layer(self, deferred: _Deferred, n_prefetches: int) -> None:
        """Charges the prefetch choice and, on the stand-in, the prefetch copies, where nothing hides them."""
        costs = self.costs
        choice_ms = self._plan_prefetch_ms(deferred.topk_ids.shape[0])
        if costs.overlaps:  # the host chooses while the layer's experts run
            host_ms = choice_ms
        else:  # the stand-in's host thread chooses and copies after its own experts
            copies_ms = n_prefetches * costs.load_ms * (costs.copy_slowdown if deferred.cpu_ms else 1.0)
            host_ms = deferred.host_ms + choice_ms + copies_ms
        end_ms = deferred.start_ms + max(deferred.cpu_ms, host_ms)
        if end_ms > self._timeline.clock_ms:
            self._timeline.clock_ms = end_ms

    def _observe(self, deferred: _Deferred) -> None:
        """The layer's score update (MRS); it waits until a priority is read, that is, an admit."""
        self.cache.observe(deferred.layer, deferred.topk_ids, deferred.router_probs, deferred.topk_weights)
        deferred.observed = True

    def _protect(self, deferred: _Deferred) -> dict[int, dict[int, int]]:
        """Protects what the layer and the predicted layers need; returns (and records) the
        predicted layers' counts."""
        predicted_counts = {target: token_counts(ids) for target, ids in deferred.predicted_topk.items()}
        self.cache.protect(_needed_by_layer(deferred.layer, deferred.counts, predicted_counts))
        deferred.predicted_counts = predicted_counts
        return predicted_counts

    def _choose_prefetch(self, deferred: _Deferred) -> list[SlotLoad]:
        timeline, layer, n_tokens = self._timeline, deferred.layer, deferred.topk_ids.shape[0]
        # When a step's tokens can activate every expert (prefill), the next layer's own loads keep
        # the copy engine busy: looking further ahead only queues copies in front of them.
        depth = self.prefetch_depth if n_tokens * self.dims.top_k < self.dims.n_experts else 1
        # Copies should land before the next layer's expert phase, or in the copy time later
        # layers are expected to leave idle, so they do not delay those layers' own loads.
        # The next layer's dense part and overhead are taken as this layer's.
        deadline_ms = timeline.clock_ms + deferred.before_ms + (depth - 1) * timeline.pcie_idle_ms
        idle_ms = deadline_ms - timeline.pcie_free_ms
        max_loads = math.floor(idle_ms / self.costs.load_ms) if idle_ms > 0 else 0
        if max_loads <= 0:
            return []
        predicted_counts = deferred.predicted_counts
        if predicted_counts is None:
            predicted_counts = self._protect(deferred)
        later = self._later[layer][depth]
        if self.prefetch == "top-score":
            return top_score_prefetch(self.cache, later[0], max_loads)
        if tuple(predicted_counts) != later:
            predicted_counts = {target: predicted_counts[target] for target in later if target in predicted_counts}
        return impact_prefetch(
            self.cache, predicted_counts, max_loads, self._layer_time, warm_layers=later, decode_time=self._decode_time
        )


def _needed_by_layer(
    layer: int, counts: Mapping[int, int], predicted_counts: Mapping[int, Mapping[int, int]]
) -> dict[int, Collection[int]]:
    """Layer -> the experts this layer and the predicted layers need (a target may be this layer)."""
    needed: dict[int, Collection[int]] = {layer: counts}
    for target, counts_of_target in predicted_counts.items():
        if target in needed:
            needed[target] = needed[target].keys() | counts_of_target.keys()
        else:
            needed[target] = counts_of_target
    return needed


def frequency_ranking(frequencies: np.ndarray) -> list[ExpertId]:
    """[L, E] activation counts -> every ExpertId, most frequent first (ties by layer, expert)."""
    n_layers, n_experts = frequencies.shape
    order = np.lexsort((np.tile(np.arange(n_experts), n_layers), np.repeat(np.arange(n_layers), n_experts),
                        -frequencies.ravel()))
    return [(int(i) // n_experts, int(i) % n_experts) for i in order]


def _uniform(dims: ModelDims, capacity: int) -> tuple[ExpertId, ...]:
    """kTransformers' default placement: the slots spread evenly over the layers, lowest ids first."""
    sizes = even_pool_sizes(capacity, dims.n_layers)
    return tuple((layer, e) for layer, size in enumerate(sizes) for e in range(min(size, dims.n_experts)))


def cache_capacity(dims: ModelDims, cache_ratio: float) -> int:
    return int(round(cache_ratio * dims.n_layers * dims.n_experts))


def _static_planner(
    dims: ModelDims, costs: CostModel, resident: tuple[ExpertId, ...], planning: PlanningMs
) -> PolicyPlanner:
    """A fixed resident set (the cache holds exactly it): resident experts on the GPU, the rest on the CPU."""
    cache = ExpertCache(dims.n_layers, dims.n_experts, len(resident), layout="shared", policy="static")
    return PolicyPlanner(dims, costs, cache, sched.schedule_static, admit_loads=False, warm=resident,
                         planning_ms=planning)


def _ktransformers_dynamic_planner(
    dims: ModelDims, costs: CostModel, capacity: int, frequencies: np.ndarray | None, baseline: BaselineParams,
    planning: PlanningMs,
) -> PolicyPlanner:
    rates = None
    if frequencies is not None:  # activations per token of each expert
        rates = dims.top_k * frequencies / np.maximum(frequencies.sum(axis=1, keepdims=True), 1)
    count = ActivationCountPolicy(baseline.refresh_decay, rates)
    cache = ExpertCache(dims.n_layers, dims.n_experts, capacity, layout="shared", policy=count)
    refresh = PeriodicRefresh(dims.n_layers, baseline.refresh_steps, baseline.refresh_prefill_tokens)
    start = tuple(frequency_ranking(frequencies)[:capacity]) if frequencies is not None else _uniform(dims, capacity)
    return PolicyPlanner(dims, costs, cache, sched.schedule_static, admit_loads=False, warm=start,
                         planning_ms=planning, refill=refresh)


def _llamacpp_lru_planner(
    dims: ModelDims, costs: CostModel, capacity: int, baseline: BaselineParams, planning: PlanningMs
) -> PolicyPlanner:
    n_layers, n_experts = dims.n_layers, dims.n_experts
    cpu_layers = n_layers if baseline.lru_cpu_layers is None else baseline.lru_cpu_layers
    gpu_layers = n_layers - cpu_layers
    if not 0 <= cpu_layers <= n_layers:
        raise ValueError(f"llamacpp-lru's CPU layers must be in [0, {n_layers}], got {cpu_layers}")
    if gpu_layers * n_experts > capacity:
        raise ValueError(
            f"llamacpp-lru with {cpu_layers} CPU layers needs {gpu_layers * n_experts} slots for the rest; "
            f"the cache has {capacity}"
        )
    lru_slots = even_pool_sizes(capacity - gpu_layers * n_experts, cpu_layers) if cpu_layers else []
    cache = ExpertCache(n_layers, n_experts, capacity, layout="per-layer", policy=baseline.eviction,
                        pool_sizes=lru_slots + [n_experts] * gpu_layers)
    warm = tuple((layer, e) for layer in range(cpu_layers, n_layers) for e in range(n_experts))
    return PolicyPlanner(dims, costs, cache, sched.schedule_static, admit_loads=False, warm=warm,
                         planning_ms=planning, refill=InsertMisses(baseline.lru_inserts))


def make_planner(
    strategy: str,
    dims: ModelDims,
    costs: CostModel,
    policy: PolicyConfig,
    capacity: int,
    frequencies: np.ndarray | None = None,  # [L, E] from a profiling workload
    baseline: BaselineParams = BaselineParams(),
) -> PolicyPlanner:
    """Builds one strategy's planner; `capacity` counts experts the accelerator cache holds."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if not costs.has_accelerator:
        strategy, capacity = "cpu-only", 0
    planning = costs.planning_ms(strategy)
    n_layers, n_experts = dims.n_layers, dims.n_experts
    capacity = max(0, min(capacity, n_layers * n_experts))
    ranking = frequency_ranking(frequencies) if frequencies is not None else []

    if strategy == "cpu-only":
        cache = ExpertCache(n_layers, n_experts, 0, policy="static")  # no slots: no scores to keep
        return PolicyPlanner(dims, costs, cache, sched.schedule_cpu_only, admit_loads=False, planning_ms=planning)
    if strategy in ("ktransformers", "static-oracle"):
        if frequencies is None:
            raise ValueError(f"{strategy} needs expert frequencies")
        return _static_planner(dims, costs, tuple(ranking[:capacity]), planning)
    if strategy == "ktransformers-front":
        front = tuple((layer, e) for layer in range(n_layers) for e in range(n_experts))[:capacity]
        return _static_planner(dims, costs, front, planning)
    if strategy == "ktransformers-dynamic":
        return _ktransformers_dynamic_planner(dims, costs, capacity, frequencies, baseline, planning)
    if strategy == "llamacpp-lru":
        return _llamacpp_lru_planner(dims, costs, capacity, baseline, planning)
    if strategy == "llamacpp":
        n_gpu_layers = capacity // n_experts
        warm = tuple((layer, e) for layer in range(n_layers - n_gpu_layers, n_layers) for e in range(n_experts))
        return _static_planner(dims, costs, warm, planning)
    if strategy == "gpu-offload":
        cache = ExpertCache(n_layers, n_experts, capacity, layout=policy.cache_layout, policy=baseline.eviction)
        return PolicyPlanner(dims, costs, cache, sched.schedule_gpu_only, admit_loads=True, planning_ms=planning)
    cache = ExpertCache(
        n_layers,
        n_experts,
        capacity,
        layout=policy.cache_layout,
        policy=policy.cache_policy,
        mrs_alpha=policy.mrs_alpha,
        mrs_top_p=policy.mrs_top_p or 2 * dims.top_k,
    )
    # `fill` skips experts whose pool is full, so per-layer pools each take their layer's favourites.
    warm = tuple(ranking) if policy.warm_start else ()
    return PolicyPlanner(
        dims,
        costs,
        cache,
        sched.schedule_hybrid,
        prefetch=policy.prefetch,
        prefetch_depth=policy.prefetch_depth,
        admit_loads=True,
        warm=warm,
        planning_ms=planning,
    )
