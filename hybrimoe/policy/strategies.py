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
  * `llamacpp`: `--n-cpu-moe N`: the experts of the first N layers on the CPU, all later layers'
    experts resident, N the smallest that fits the cache; prefill uses the same split.
  * `gpu-offload`: every expert computed on the accelerator; misses loaded on demand into an LRU
    cache that starts empty (accelerate-style offload).
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

import numpy as np

from hybrimoe.config import PolicyConfig
from hybrimoe.policy import scheduler as sched
from hybrimoe.policy.cache import ExpertCache
from hybrimoe.policy.costs import CostModel, no_time
from hybrimoe.policy.plan import ExpertId, LayerPlan, SlotLoad
from hybrimoe.policy.prefetch import impact_prefetch, token_counts, top_score_prefetch

_MEMO_MAX = 1 << 16
STRATEGIES = ("hybrimoe", "ktransformers", "static-oracle", "llamacpp", "gpu-offload", "cpu-only")


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
                 "observed", "predicted_counts", "start_ms", "cpu_ms", "host_ms")

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


@dataclass
class _Timeline:
    """The planner's model of time since the run started, in ms."""

    clock_ms: float = 0.0
    pcie_free_ms: float = 0.0
    pcie_idle_ms: float = 0.0  # moving average of the copy-engine time a layer leaves unused


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
        planning_ms: tuple[Callable[[int], float], Callable[[int], float]] | None = None,
    ):
        """`planning_ms`: n_tokens -> this planner's measured plan_layer and plan_prefetch wall ms
        per layer (`CostModel.planning_ms`); None: planning costs no modelled time."""
        self.dims = dims
        self.costs = costs
        self.cache = cache
        self.schedule = schedule
        self.prefetch = prefetch
        self.prefetch_depth = prefetch_depth
        self.lookahead_layers = prefetch_depth if prefetch == "impact" else 0
        self.admit_loads = admit_loads
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
        deferred.start_ms, deferred.cpu_ms, deferred.host_ms = start_ms, cpu_ms, host_ms
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
        """Copies for the layers after the last planned one, queued on the copy engine behind its
        loads. Also runs that layer's score update if `plan_layer` had no demand loads."""
        deferred, self._deferred = self._deferred, None
        if deferred is None:
            raise RuntimeError("plan_prefetch called without a plan_layer before it")
        if not deferred.observed:
            self._observe(deferred)
        prefetch = self._choose_prefetch(deferred) if self._prefetches else []
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


def cache_capacity(dims: ModelDims, cache_ratio: float) -> int:
    return int(round(cache_ratio * dims.n_layers * dims.n_experts))


def make_planner(
    strategy: str,
    dims: ModelDims,
    costs: CostModel,
    policy: PolicyConfig,
    capacity: int,
    frequencies: np.ndarray | None = None,  # [L, E] from a profiling workload
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
        cache = ExpertCache(n_layers, n_experts, capacity, layout="shared", policy="static")
        return PolicyPlanner(
            dims, costs, cache, sched.schedule_static, admit_loads=False, warm=tuple(ranking[:capacity]),
            planning_ms=planning,
        )
    if strategy == "llamacpp":
        n_gpu_layers = capacity // n_experts
        warm = tuple((layer, e) for layer in range(n_layers - n_gpu_layers, n_layers) for e in range(n_experts))
        cache = ExpertCache(n_layers, n_experts, len(warm), layout="shared", policy="static")
        return PolicyPlanner(
            dims, costs, cache, sched.schedule_static, admit_loads=False, warm=warm, planning_ms=planning
        )
    if strategy == "gpu-offload":
        cache = ExpertCache(n_layers, n_experts, capacity, layout=policy.cache_layout, policy="lru")
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
