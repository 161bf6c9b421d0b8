"""Statistics of one run: expert placement counters (updated per layer) and the run's summary.

Design choices:
- The expert counters are the policy core's (`policy/counters.py`: what an activation, a hit and a
  used prefetch are), so a run and its simulation report the same set; the runtime adds bytes,
  warm-start copies and the planners' time. Plain integers bumped once per MoE layer; ratios are
  derived at the end, so the per-layer cost is a few additions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hybrimoe.policy.counters import ExpertCounters


@dataclass
class RunCounters(ExpertCounters):
    """The policy core's expert counters (the simulator reports the same set), plus what only a
    run has: bytes copied, copies before the first step, the planners' own time."""

    bytes_loaded: int = 0  # on-demand and prefetch copies
    warm_loads: int = 0  # copies before the first step (the planner's warm start), not in bytes_loaded
    planned_ms: float = 0.0  # the planners' own simulated expert time, summed over layers
    layers_planned: int = 0  # MoE layer calls planned (layers x forward steps)
    planning_ns: int = 0  # wall time in `plan_layer`, before each layer's experts start, summed
    prefetch_planning_ns: int = 0  # wall time in `plan_prefetch`, while each layer's experts run, summed

    @property
    def planning_us_per_layer(self) -> float | None:
        return self.planning_ns / self.layers_planned / 1000 if self.layers_planned else None

    @property
    def prefetch_planning_us_per_layer(self) -> float | None:
        return self.prefetch_planning_ns / self.layers_planned / 1000 if self.layers_planned else None


@dataclass
class RunStats:
    """What `hybrimoe run` reports; `to_dict` is its --json form."""

    model: str
    family: str
    device: str
    profile: str  # the profile's name, or that the built-in default was used
    planner: str
    capacity: int  # expert slots on the accelerator
    capacity_source: str  # which flag, profile or budget set it
    threads: int  # CPU threads for expert kernels
    threads_source: str  # which flag or profile set them
    n_experts_total: int  # routed experts over all MoE layers
    batch_size: int
    n_prompt_tokens: int  # per sequence, padding included
    n_new_tokens: int  # per sequence
    ttft_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float | None  # per sequence; None when only one token was generated
    counters: RunCounters = field(default_factory=RunCounters)
    weights: str = ""  # the routed experts' format (and the dense part's when quantized), in words
    host_memory: str = ""  # the pooled host experts (pinned or not), in words
    accelerator_memory: str = ""  # dense weights, slots, peak and reserve, in words
    stand_in: bool = False  # the "accelerator" is the CPU stand-in (no GPU)
    prediction_from_estimate: bool = False  # the simulator's prediction used a built-in estimate, not this machine's profile
    profile_machine: str | None = None  # the machine kind the profile describes, when it is not this one
    host_expert_bytes: int = 0  # the pooled routed experts
    slot_bytes: int = 0  # the expert slots (on the accelerator, or the CPU stand-in's)
    accelerator_dense_bytes: int = 0  # the dense weights on the accelerator (0 without one)
    accelerator_peak_bytes: int = 0  # the most allocated on the accelerator (0 without one)
    simulated_decode_tokens_per_s: float | None = None  # the simulator's prediction for this run
    simulated_ttft_s: float | None = None
    trace_path: str | None = None  # where the run's routing was recorded
    replay_trace: str | None = None  # the trace whose routing the run replayed

    @property
    def decode_ratio(self) -> float | None:
        """Measured over predicted decode time per token (above 1: slower than predicted)."""
        if not self.decode_tokens_per_s or not self.simulated_decode_tokens_per_s:
            return None
        return self.simulated_decode_tokens_per_s / self.decode_tokens_per_s

    @property
    def ttft_ratio(self) -> float | None:
        """Measured over predicted time to first token."""
        return self.ttft_s / self.simulated_ttft_s if self.simulated_ttft_s else None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["decode_measured_over_predicted"] = self.decode_ratio
        data["ttft_measured_over_predicted"] = self.ttft_ratio
        counters = self.counters
        data["counters"] = {
            **asdict(counters),
            "hit_rate": counters.hit_rate,
            "ready_hit_rate": counters.ready_hit_rate,
            "waited_hit_rate": counters.waited_hit_rate,
            "cpu_share": counters.cpu_share,
            "accelerator_share": counters.accelerator_share,
            "prefetch_precision": counters.prefetch_precision,
            "prefetch_recall": counters.prefetch_recall,
            "planning_us_per_layer": counters.planning_us_per_layer,
            "prefetch_planning_us_per_layer": counters.prefetch_planning_us_per_layer,
        }
        return data
