"""The hybrid runtime on one loaded model: store + executor + hooks, installed and removed together.

Design choices:
- The planner is passed in (the runtime never decides placement); its warm-start copies are made
  before the first step.
- `begin_step()` is called by the generation loop before every forward step and tells the planner
  (its timeline models the step's cost); `end_step()` after it: the executor hands back the step's
  per-layer routing when recording.
"""

from __future__ import annotations

from hybrimoe.policy.plan import Planner
from hybrimoe.runtime.accelerator import Accelerator
from hybrimoe.runtime.executor import LayerExecutor, LayerRecord
from hybrimoe.runtime.hooks import Installed
from hybrimoe.runtime.loading import LoadedModel
from hybrimoe.runtime.replay import RoutingReplay
from hybrimoe.runtime.stats import RunCounters
from hybrimoe.runtime.store import ExpertStore


class HybridRuntime:
    def __init__(
        self,
        loaded: LoadedModel,
        planner: Planner,
        accelerator: Accelerator,
        capacity: int,
        record_depth: int | None = None,
        replay: RoutingReplay | None = None,
        cpu_threads: int | None = None,
    ):
        """`capacity`: expert slots on the accelerator. `record_depth`: record routing (for a trace)
        with this many later layers' predictions; None records nothing. `replay`: route as this
        recorded trace says instead of as the model's routers do. `cpu_threads`: the CPU expert
        worker's threads (`threads.py`)."""
        self.loaded, self.planner, self.accelerator = loaded, planner, accelerator
        self.counters = RunCounters()
        self.store = ExpertStore(loaded.layers, accelerator, capacity)
        self.executor = LayerExecutor(
            loaded.layers, self.store, planner, accelerator, loaded.n_experts, self.counters, record_depth, replay,
            cpu_threads,
        )
        self._installed = Installed(loaded, self.executor)
        self.counters.warm_loads = self.store.load(planner.initial_loads())

    def begin_step(self, n_tokens: int, context_tokens: int) -> None:
        self.planner.begin_step(n_tokens, context_tokens)

    def end_step(self) -> list[LayerRecord]:
        return self.executor.end_step()

    def close(self) -> None:
        self._installed.remove()
        self.executor.close()

    def __enter__(self) -> HybridRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
