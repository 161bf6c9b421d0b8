"""What happened to the experts of every planned layer: one counter set, counted the same way by
the planner (the simulator reports it) and by the runtime's executor (the run summary reports it).

An activation is one (layer, expert) pair used by at least one token of one forward step; a hit is
an activation whose expert was resident when the layer was planned; a hit waited when the expert's
copy (a prefetch) was still in flight as its layer started, so the layer's accelerator experts
waited for it; the others are ready hits. A prefetched expert counts as used when the next run of
its layer activates it while it is still resident.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ExpertCounters:
    activations: int = 0
    hits: int = 0  # ready and waited
    waited_hits: int = 0  # hits whose copy was still in flight when their layer started
    cpu_runs: int = 0  # activations computed on the CPU
    accelerator_runs: int = 0  # activations computed on the accelerator (resident or loaded)
    demand_loads: int = 0  # copies a layer's own experts waited for
    prefetch_loads: int = 0  # copies for later layers (and a baseline's background refills)
    prefetch_used: int = 0
    stall_ms: float = 0.0  # modelled: accelerator time spent waiting for prefetches still in flight

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.activations if self.activations else None

    @property
    def ready_hit_rate(self) -> float | None:
        return (self.hits - self.waited_hits) / self.activations if self.activations else None

    @property
    def waited_hit_rate(self) -> float | None:
        return self.waited_hits / self.activations if self.activations else None

    @property
    def cpu_share(self) -> float | None:
        return self.cpu_runs / self.activations if self.activations else None

    @property
    def accelerator_share(self) -> float | None:
        return self.accelerator_runs / self.activations if self.activations else None

    @property
    def prefetch_precision(self) -> float | None:
        return self.prefetch_used / self.prefetch_loads if self.prefetch_loads else None

    @property
    def prefetch_recall(self) -> float | None:
        """Of the experts that were not resident or were prefetched, the share prefetches covered."""
        needed = self.prefetch_used + self.activations - self.hits
        return self.prefetch_used / needed if needed else None
