"""The planner's model of time: the clock, the copy engine's queue, and what a layer's expert phase costs.

Design choices:
- One clock for the run, in ms: each layer adds its dense part, host work and `plan_layer` time
  (`LayerContext.before_ms`), then its expert phase; each step adds the work outside the layers.
- The copy engine is a queue (`pcie_free_ms`): a layer's demand loads queue from its start, the
  prefetches chosen next queue behind them, and `pcie_idle_ms` (a moving average) says how much
  copy time a layer usually leaves unused, so prefetches can use it without delaying later loads.
- On a GPU a layer's expert phase is its schedule: the GPU's copies overlap its kernels. On the CPU
  stand-in the host thread copies and then computes beside the CPU worker, and also pays the
  prefetch choice and copies, since nothing hides them there. CPU experts and copies running at
  once slow each other by the profile's interference factors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from hybrimoe.policy.costs import CostModel
from hybrimoe.policy.plan import LayerContext, SlotLoad
from hybrimoe.policy.scheduler import LayerSchedule


class Timeline:
    def __init__(self, costs: CostModel):
        self.costs = costs
        self.clock_ms = 0.0
        self.pcie_free_ms = 0.0
        self.pcie_idle_ms = 0.0  # moving average of the copy-engine time a layer leaves unused
        self._backlog_step_ms = costs.load_ms / 16 if math.isfinite(costs.load_ms) else 1.0

    def backlog_ms(self, start_ms: float) -> float:
        """The copy engine's backlog at a layer's start, rounded up to a 1/16 of a load so decode
        plans stay memoized."""
        backlog_ms = self.pcie_free_ms - start_ms
        if backlog_ms <= 0:
            return 0.0
        return math.ceil(backlog_ms / self._backlog_step_ms) * self._backlog_step_ms

    def expert_phase_ms(
        self, schedule: LayerSchedule, counts: Mapping[int, int], loads: list[SlotLoad], extra_cpu_ms: float,
        stall_ms: float, copying: bool,
    ) -> tuple[float, float, float]:
        """(CPU worker ms, the other side's ms, stall ms) of a layer's expert phase, from its start.

        On a GPU the other side is the GPU (its copies overlap its kernels, as scheduled); on the
        stand-in it is the host thread, which copies and then computes, and never stalls.
        `copying`: copies run during the phase, so CPU experts and copies slow each other.
        """
        costs = self.costs
        cpu_ms = schedule.cpu_end_ms + extra_cpu_ms
        copy_slowdown = 1.0
        if cpu_ms and copying:
            cpu_ms *= costs.cpu_slowdown
            copy_slowdown = costs.copy_slowdown
        copies_ms = costs.copies_ms(len(loads))
        if costs.overlaps:  # slowed copies arrive later, and the GPU waits for them
            return cpu_ms, schedule.gpu_end_ms + stall_ms + copies_ms * (copy_slowdown - 1.0), stall_ms
        gpu_ms = costs.gpu_ms
        host_ms = copies_ms * copy_slowdown + sum([gpu_ms(counts[expert]) for expert in schedule.gpu])
        host_ms += sum([gpu_ms(counts[expert]) for (_, expert), _ in loads])
        return cpu_ms, host_ms, 0.0

    def advance(self, ctx: LayerContext, finish_ms: float, n_loads: int, stall_ms: float) -> None:
        """Moves the clock past a layer's expert phase; its loads queue on the copy engine.

        The copy time the layer leaves idle is its length without its wait for copies in flight
        (the copy engine was busy then) less its own loads' copy time.
        """
        self.clock_ms = ctx.start_ms + finish_ms
        loads_ms = self.costs.copies_ms(n_loads)
        self.pcie_free_ms = max(self.pcie_free_ms, ctx.start_ms) + loads_ms
        unstalled_ms = max(ctx.cpu_ms, ctx.host_ms - stall_ms)
        idle_ms = max(0.0, ctx.before_ms + unstalled_ms - loads_ms)
        self.pcie_idle_ms += 0.1 * (idle_ms - self.pcie_idle_ms)

    def end_layer(self, ctx: LayerContext, n_prefetches: int, choice_ms: float) -> None:
        """Charges the prefetch choice and, on the stand-in, the prefetch copies, where nothing hides them."""
        costs = self.costs
        if costs.overlaps:  # the host chooses while the layer's experts run
            host_ms = choice_ms
        else:  # the stand-in's host thread chooses and copies after its own experts
            copies_ms = costs.copies_ms(n_prefetches) * (costs.copy_slowdown if ctx.cpu_ms else 1.0)
            host_ms = ctx.host_ms + choice_ms + copies_ms
        end_ms = ctx.start_ms + max(ctx.cpu_ms, host_ms)
        if end_ms > self.clock_ms:
            self.clock_ms = end_ms

    def queue_prefetches(self, prefetch: list[SlotLoad], in_flight: list[dict[int, float]]) -> None:
        """Queues copies behind the engine's backlog, noting when each lands (layer -> expert -> ms)."""
        pcie_free_ms, load_ms = self.pcie_free_ms, self.costs.load_ms
        for (target, expert), _ in prefetch:
            pcie_free_ms += load_ms
            in_flight[target][expert] = pcie_free_ms
        self.pcie_free_ms = pcie_free_ms
