"""Cost model: milliseconds for each unit of work the planners place and time, from a hardware profile.

Design choices:
- Expert costs depend only on the expert's token count, so lookups are memoized per count.
- Loading one expert over PCIe costs a constant `load_ms` (the paper's first observation).
- Schedules depend only on these costs, so the scheduler memoizes them per cost model (its own
  memo, keyed by this object): a changed cost model must be a new object (`without_loads`).
- A machine without an accelerator has no GPU or load costs: `has_accelerator` is False and
  planners fall back to CPU-only placement.
- Besides the experts, a forward step costs: the work outside the decoder layers (`outside_ms`,
  once per step), each layer's dense part (`dense_ms`, plus `dense_context_ms` per new token and
  cached token, for attention over the KV cache), the executor's own host work per MoE layer
  (`host_ms`) and the planner's wall time (`planning_ms`). A profile measured on a model
  (`model_costs`) gives all of them; an estimated one only a fixed `layer_overhead_ms` per layer.
- `overlaps` says what runs at once. On a GPU: CPU-worker experts, GPU kernels and copies all
  overlap (the scheduler's three timelines). On the CPU stand-in (`overlaps` False) the host
  thread copies and then runs the "accelerator" experts one after another, beside the CPU worker;
  copies are synchronous, so nothing is ever in flight.
- When CPU experts and copies run at once they slow each other by the profile's measured
  interference factors (`cpu_slowdown`, `copy_slowdown`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

from hybrimoe.config import HardwareProfile


class CostModel:
    def __init__(self, profile: HardwareProfile):
        self.profile = profile
        self.has_accelerator = profile.has_accelerator
        self.overlaps = not profile.stand_in
        self.load_ms = profile.transfer.expert_load_ms if profile.transfer else float("inf")
        self.cpu_first_extra_ms = profile.cpu_first_expert_extra_ms
        self.expert_bytes = profile.expert_shape.expert_bytes
        self.cpu_ms = functools.lru_cache(maxsize=4096)(profile.cpu_expert.ms)
        gpu = profile.gpu_expert
        self.gpu_ms = functools.lru_cache(maxsize=4096)(gpu.ms if gpu else lambda n_tokens: float("inf"))
        self.dense_ms = functools.lru_cache(maxsize=4096)(profile.dense_layer.ms)
        self.cpu_slowdown = profile.interference.cpu_slowdown
        self.copy_slowdown = profile.interference.copy_slowdown
        model = profile.model_costs
        if model is None:
            self.dense_context_ms = 0.0
            self.host_ms = lambda n_tokens: profile.layer_overhead_ms
            self.outside_ms = no_time
        else:
            self.dense_context_ms = model.dense_ms_per_context_token
            self.host_ms = functools.lru_cache(maxsize=4096)(model.host_layer.ms)
            self.outside_ms = functools.lru_cache(maxsize=4096)(model.outside_step.ms)

    def copies_ms(self, n_copies: int) -> float:
        """Copy-engine time of `n_copies` expert loads (none costs nothing, even where loads are
        impossible and `load_ms` is infinite)."""
        return n_copies * self.load_ms if n_copies else 0.0

    def planning_ms(self, strategy: str) -> tuple[Callable[[int], float], Callable[[int], float]]:
        """n_tokens -> wall ms per MoE layer of `strategy`'s plan_layer and plan_prefetch, where
        measured; an estimated profile counts planning in its `layer_overhead_ms`."""
        model = self.profile.model_costs
        cost = model.planner(strategy) if model is not None else None
        if cost is None:
            return no_time, no_time
        return (functools.lru_cache(maxsize=4096)(cost.plan_layer.ms),
                functools.lru_cache(maxsize=4096)(cost.plan_prefetch.ms))

    def without_loads(self) -> CostModel:
        """The same costs with copies impossible, for caches that never admit (static placement)."""
        costs = copy.copy(self)
        costs.load_ms = float("inf")
        return costs


def no_time(n_tokens: int) -> float:
    """The cost of work a profile does not measure separately."""
    return 0.0
