"""Cost model: milliseconds for each unit of work the scheduler places, from a hardware profile.

Design choices:
- Expert costs depend only on the expert's token count, so lookups are memoized per count.
- Loading one expert over PCIe costs a constant `load_ms` (the paper's first observation).
- Schedules depend only on these costs, so the scheduler memoizes them on the cost model
  (`schedule_memo`); a changed cost model is a new object with an empty memo.
- A machine without an accelerator has no GPU or load costs: `has_accelerator` is False and
  planners fall back to CPU-only placement.
"""

from __future__ import annotations

import copy
import functools

from hybrimoe.config import HardwareProfile


class CostModel:
    def __init__(self, profile: HardwareProfile):
        self.profile = profile
        self.has_accelerator = profile.has_accelerator
        self.load_ms = profile.transfer.expert_load_ms if profile.transfer else float("inf")
        self.cpu_first_extra_ms = profile.cpu_first_expert_extra_ms
        self.layer_overhead_ms = profile.layer_overhead_ms
        self.expert_bytes = profile.expert_shape.expert_bytes
        self.cpu_ms = functools.lru_cache(maxsize=4096)(profile.cpu_expert.ms)
        gpu = profile.gpu_expert
        self.gpu_ms = functools.lru_cache(maxsize=4096)(gpu.ms if gpu else lambda n_tokens: float("inf"))
        self.dense_ms = functools.lru_cache(maxsize=4096)(profile.dense_layer.ms)
        self.schedule_memo: dict = {}  # the scheduler's memo for these costs (see scheduler.py)

    def without_loads(self) -> CostModel:
        """The same costs with copies impossible, for caches that never admit (static placement)."""
        costs = copy.copy(self)
        costs.load_ms = float("inf")
        costs.schedule_memo = {}
        return costs
