"""The planner: composes the three decisions for every MoE layer of every step, and keeps the clock.

The decisions live where they are named: the layer's CPU/GPU/copy split in `scheduler.py` (the
greedy in `greedy.py`), which resident to evict in `cache.py` (ranked by `cache_policies.py`), what
to prefetch in `prefetch.py`. A `PolicyPlanner` is configured with one of each by `strategies.py`.

Design choices:
- A layer is planned in two calls. `plan_layer` (what the layer's experts wait for): the schedule,
  the wait for prefetches still in flight, the demand loads admitted into the cache; it returns the
  `LayerPlan` with a `LayerContext`, which the runtime hands back to `plan_prefetch` (the prefetch
  choice and a baseline's refill copies, made while the layer's experts run).
- The cache's priorities are read only by admits, so the layer's score update and the protection
  of what it and the predicted layers need wait for the first admit (`_prepare`, the one place
  this laziness lives); results are the same as running them first.
- The planner keeps a model of time (`timeline.py`): the step's work outside the layers
  (`begin_step`), each layer's dense part at the KV cache's length, the executor's host work and
  `plan_layer`'s measured wall time before its experts, then the expert phase as scheduled, and the
  copy engine's queue, so it knows how much PCIe time each layer leaves idle for prefetches across
  layer and step boundaries. A prefetched expert still in flight when its layer starts delays that
  layer's accelerator queue.
- Written for speed (it runs at every MoE layer of every step, in the runtime as in the
  simulator): plain loops over a layer's few experts, memoized layer times, numpy only where a
  whole row or pool is touched.
- Shapes: T = tokens in the step, k = top-k, E = experts per layer, L = MoE layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from hybrimoe.policy import scheduler as sched
from hybrimoe.policy.cache import ExpertCache
from hybrimoe.policy.costs import CostModel, no_time
from hybrimoe.policy.counters import ExpertCounters
from hybrimoe.policy.names import PREFETCHES, check_name
from hybrimoe.policy.plan import ExpertId, LayerContext, LayerPlan, SlotLoad
from hybrimoe.policy.prefetch import LayerTimes, impact_prefetch, token_counts, top_score_prefetch
from hybrimoe.policy.timeline import Timeline

PlanningMs = tuple[Callable[[int], float], Callable[[int], float]]  # n_tokens -> plan_layer ms, plan_prefetch ms


@dataclass(frozen=True)
class ModelDims:
    n_layers: int
    n_experts: int
    top_k: int


class Refill(Protocol):
    """A baseline's own background copies (not HybriMoE's prefetch): asked after each layer."""

    def begin_step(self, n_tokens: int) -> None: ...

    def after_layer(
        self, cache: ExpertCache, layer: int, counts: Mapping[int, int], cpu: tuple[int, ...]
    ) -> list[SlotLoad]:
        """Copies to queue now; `counts`: expert -> tokens of this layer; `cpu`: experts it ran on the CPU."""
        ...


class PolicyPlanner:
    """Plans every MoE layer: `plan_layer`, then `plan_prefetch` with its plan (see the module docstring)."""

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
        self.dims, self.costs, self.cache, self.schedule = dims, costs, cache, schedule
        self.prefetch = check_name("prefetch", prefetch, PREFETCHES)
        self.prefetch_depth = prefetch_depth
        self.lookahead_layers = prefetch_depth if prefetch == "impact" else 0
        self.admit_loads = admit_loads
        self.refill = refill
        # A cache that never admits cannot take copies: schedule as if copies were impossible.
        self._schedule_costs = costs if admit_loads and cache.policy.admits else costs.without_loads()
        self.stats = ExpertCounters()
        self._timeline = Timeline(costs)
        # [L] expert -> when its prefetch lands (ms), for prefetched experts not used yet.
        self._in_flight: list[dict[int, float]] = [{} for _ in range(dims.n_layers)]
        self._layer_times = LayerTimes(schedule, self._schedule_costs)
        self._prefetches = prefetch != "none" and prefetch_depth > 0
        self._plan_layer_ms, self._plan_prefetch_ms = planning_ms or (no_time, no_time)
        self._context_ms_per_token = 0.0  # attention over this step's KV cache, per new token
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

    # -- plan_layer ------------------------------------------------------------------------------

    def plan_layer(
        self,
        layer: int,
        topk_ids: np.ndarray,  # [T, k]
        router_probs: np.ndarray | None,  # [T, E]
        predicted_topk: Mapping[int, np.ndarray],  # later layer -> [T, k]
        topk_weights: np.ndarray | None = None,  # [T, k]
    ) -> LayerPlan:
        """What this layer's experts wait for: the schedule, the wait for prefetches in flight and
        the demand loads admitted; the plan carries the layer's context for `plan_prefetch`."""
        n_tokens = topk_ids.shape[0]
        counts = token_counts(topk_ids)
        resident = self.cache.resident(layer)
        before_ms = (
            self.costs.dense_ms(n_tokens) + self._context_ms_per_token * n_tokens + self.costs.host_ms(n_tokens)
            + self._plan_layer_ms(n_tokens)
        )
        ctx = LayerContext(layer, topk_ids, router_probs, topk_weights, counts, predicted_topk, before_ms)
        ctx.start_ms = self._timeline.clock_ms + before_ms
        backlog_ms = self._timeline.backlog_ms(ctx.start_ms)
        schedule = self.schedule(counts, resident, self._schedule_costs, backlog_ms)
        stall_ms = self._wait_for_prefetches(layer, counts, resident, ctx.start_ms)
        hits = self.cache.access(layer, counts)
        if schedule.load and self.admit_loads:  # the score update and protection come before any admit
            self._prepare(ctx)
        loads, ctx.cpu, extra_cpu_ms = self._admit_loads(ctx, schedule)
        copying = bool(loads) or (backlog_ms > 0 and self.costs.overlaps)  # copies run beside the CPU's experts
        ctx.cpu_ms, ctx.host_ms, stall_ms = self._timeline.expert_phase_ms(
            schedule, counts, loads, extra_cpu_ms, stall_ms, copying
        )
        finish_ms = max(ctx.cpu_ms, ctx.host_ms)
        self._timeline.advance(ctx, finish_ms, len(loads), stall_ms)
        self._count(schedule, counts, hits, len(loads), ctx.cpu, stall_ms)
        slot_of = self.cache.slots_of(layer, schedule.gpu)
        for (_, expert), slot in loads:
            slot_of[expert] = slot
        load_experts = tuple([expert for (_, expert), _ in loads])
        return LayerPlan(layer, schedule.gpu, load_experts, ctx.cpu, slot_of, tuple(loads), finish_ms, ctx)

    def _wait_for_prefetches(
        self, layer: int, counts: Mapping[int, int], resident: AbstractSet[int], start_ms: float
    ) -> float:
        """Counts the prefetched experts this layer uses, and those it waits for; returns how long
        the longest still in flight keeps the accelerator waiting."""
        in_flight = self._in_flight[layer]
        if not in_flight:
            return 0.0
        stall_ms = 0.0
        used = [expert for expert in counts if expert in in_flight and expert in resident]
        for expert in used:
            wait_ms = in_flight.pop(expert) - start_ms
            if wait_ms > 0.0:
                self.stats.waited_hits += 1
            if wait_ms > stall_ms:
                stall_ms = wait_ms
        self.stats.prefetch_used += len(used)
        return stall_ms

    def _admit_loads(
        self, ctx: LayerContext, schedule: sched.LayerSchedule
    ) -> tuple[list[SlotLoad], tuple[int, ...], float]:
        """(loads, CPU experts, extra CPU ms): each scheduled copy gets a slot, or the CPU runs it
        (paying the CPU's start-up cost if it had nothing) when no slot is to be had."""
        loads: list[SlotLoad] = []
        cpu = schedule.cpu
        extra_cpu_ms = 0.0
        in_flight = self._in_flight[ctx.layer]
        for expert in schedule.load:
            load = self.cache.admit((ctx.layer, expert)) if self.admit_loads else None
            if load is None:
                extra_cpu_ms += self.costs.cpu_ms(ctx.counts[expert]) + (0.0 if cpu else self.costs.cpu_first_extra_ms)
                cpu += (expert,)
                continue
            loads.append(load)
            in_flight.pop(expert, None)
        return loads, cpu, extra_cpu_ms

    def _count(
        self, schedule: sched.LayerSchedule, counts: Mapping[int, int], hits: int, n_loads: int,
        cpu: tuple[int, ...], stall_ms: float,
    ) -> None:
        stats = self.stats
        stats.stall_ms += stall_ms
        stats.activations += len(counts)
        stats.hits += hits
        stats.demand_loads += n_loads
        stats.accelerator_runs += len(schedule.gpu) + n_loads
        stats.cpu_runs += len(cpu)

    # -- plan_prefetch ---------------------------------------------------------------------------

    def plan_prefetch(self, plan: LayerPlan) -> tuple[SlotLoad, ...]:
        """Copies for the layers after `plan`'s (and a baseline's refill copies), queued on the copy
        engine behind its loads. Runs the layer's score update if `plan_layer` had no admit."""
        ctx: LayerContext = plan.context
        self._prepare(ctx, protect=False)
        prefetch = self._choose_prefetch(ctx) if self._prefetches else []
        if self.refill is not None:
            prefetch += self.refill.after_layer(self.cache, ctx.layer, ctx.counts, ctx.cpu)
        self._timeline.end_layer(ctx, len(prefetch), self._plan_prefetch_ms(ctx.topk_ids.shape[0]))
        if prefetch:
            self._timeline.queue_prefetches(prefetch, self._in_flight)
            self.stats.prefetch_loads += len(prefetch)
        return tuple(prefetch)

    def _prepare(self, ctx: LayerContext, protect: bool = True) -> None:
        """Once each per layer, before its first admit: the score update (MRS), then, with
        `protect`, the protection of what the layer and the predicted layers need."""
        if not ctx.observed:
            self.cache.observe(ctx.layer, ctx.topk_ids, ctx.router_probs, ctx.topk_weights)
            ctx.observed = True
        if protect and ctx.predicted_counts is None:
            ctx.predicted_counts = {target: token_counts(ids) for target, ids in ctx.predicted_topk.items()}
            self.cache.protect(_needed_by_layer(ctx.layer, ctx.counts, ctx.predicted_counts))

    def _choose_prefetch(self, ctx: LayerContext) -> list[SlotLoad]:
        timeline, layer, n_tokens = self._timeline, ctx.layer, ctx.topk_ids.shape[0]
        # When a step's tokens can activate every expert (prefill), the next layer's own loads keep
        # the copy engine busy: looking further ahead only queues copies in front of them.
        # Top-score copies only the next layer's experts, so only that layer's idle copy time is its
        # budget: copies past it would land after the layer starts, and the layer would wait.
        if self.prefetch == "top-score" or n_tokens * self.dims.top_k >= self.dims.n_experts:
            depth = 1
        else:
            depth = self.prefetch_depth
        # A copy for the d-th layer ahead should land before that layer's experts start: by the
        # next layer's start plus the copy time the d - 1 layers between are expected to leave idle,
        # so it delays neither its own layer nor the loads of those between. The next layer's
        # dense part and overhead are taken as this layer's.
        room_ms = timeline.clock_ms + ctx.before_ms - timeline.pcie_free_ms
        load_ms, idle_ms = self.costs.load_ms, timeline.pcie_idle_ms
        later = self._later[layer][depth]
        load_caps = {target: math.floor((room_ms + d * idle_ms) / load_ms) for d, target in enumerate(later)}
        if load_caps[later[-1]] <= 0:
            return []
        self._prepare(ctx)
        if self.prefetch == "top-score":
            return top_score_prefetch(self.cache, later[0], load_caps[later[0]])
        predicted_counts = ctx.predicted_counts
        if tuple(predicted_counts) != later:
            predicted_counts = {target: predicted_counts[target] for target in later if target in predicted_counts}
        return impact_prefetch(
            self.cache, predicted_counts, load_caps, self._layer_times.layer_time, warm_layers=later,
            decode_time=self._layer_times.decode_time,
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
