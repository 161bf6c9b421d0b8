"""What the tuner replays, and the objective it minimises: one configuration's simulated time.

Design choices:
- The training traces are split as `simulate` splits a trace: the first `profile_split` of each
  trace's tokens is the profiling workload (the expert frequencies that the warm start and the
  frequency-placed baselines use); the rest is replayed. With profiling traces, the frequencies
  are theirs and the training traces are replayed whole. The holdout is never seen by the search:
  either other traces, or the last `holdout_split` of every training trace's tokens. It is
  replayed with the training traces' frequencies, as a user profiles one workload and serves
  another.
- Objectives, per trace, in ms: `decode` is ms per generated token, `prefill` the mean TTFT of the
  trace's tokens cut into prompts of `prefill_tokens`, `weighted` a request's time: TTFT plus
  `decode_tokens` generated tokens. Over several traces, the mean.
- Multi-fidelity: the decode replay (prefill's, for the prefill objective) reports the running
  objective estimate after each of `CHECKPOINTS` slices of each trace, so a pruner can stop a
  hopeless trial early. The estimate at a step is computed the same way in every trial.
- The planner is the policy core's `make_planner`, as in `simulate` and `run`.
- Shapes: L = MoE layers, E = experts per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from hybrimoe.config import HardwareProfile, PolicyConfig
from hybrimoe.errors import UserError
from hybrimoe.policy.costs import CostModel
from hybrimoe.policy.comparison import as_prompts
from hybrimoe.policy.simulator import simulate
from hybrimoe.policy.strategies import ModelDims, make_planner
from hybrimoe.trace import RoutingTrace, TraceMeta

OBJECTIVES = ("weighted", "decode", "prefill")
UNITS = {"decode": "ms/token", "prefill": "TTFT ms", "weighted": "ms/request"}  # of each objective
CHECKPOINTS = 4  # intermediate values per trace


@dataclass(frozen=True)
class Replay:
    """One trace's replayed tokens, shaped for each mode the objective needs."""

    name: str
    decode: RoutingTrace | None  # one token per step
    prefill: RoutingTrace | None  # prompts of prefill_tokens tokens


@dataclass(frozen=True)
class Evaluation:
    objective_ms: float
    decode_ms_per_token: float | None
    ttft_ms: float | None
    ready_hit_rate: float  # hits whose expert was resident and ready (not still copying): decode's when
    # decode is replayed, else prefill's


@dataclass(frozen=True)
class Workload:
    meta: TraceMeta
    frequencies: np.ndarray  # [L, E] activation counts of the profiling tokens
    train: tuple[Replay, ...]
    holdout: tuple[Replay, ...]
    objective: str
    decode_tokens: int

    @property
    def n_checkpoints(self) -> int:
        return CHECKPOINTS * len(self.train)

    def evaluate(
        self,
        replays: Sequence[Replay],
        profile: HardwareProfile,
        strategy: str,
        policy: PolicyConfig,
        slots: int,
        report: Callable[[int, float], None] | None = None,
    ) -> Evaluation:
        """Simulates one configuration on `replays`; `report(step, estimate)` after each slice."""
        costs = CostModel(profile)
        dims = ModelDims(self.meta.n_layers, self.meta.n_experts, self.meta.top_k)

        def planner():
            return make_planner(strategy, dims, costs, policy, slots, self.frequencies)

        totals, ttft_values, decode_values, hit_rates = [], [], [], []
        for i, replay in enumerate(replays):
            def on_partial(fraction_done: float, partial_ms: float, i: int = i) -> None:
                report(i * CHECKPOINTS + round(CHECKPOINTS * fraction_done), (sum(totals) + partial_ms) / (i + 1))

            ttft_ms, decode_ms, hit_rate = self._replay(replay, planner, on_partial if report else None)
            totals.append(self.combine(decode_ms, ttft_ms))
            ttft_values += [ttft_ms] if ttft_ms is not None else []
            decode_values += [decode_ms] if decode_ms is not None else []
            hit_rates.append(hit_rate)
        return Evaluation(
            objective_ms=float(np.mean(totals)),
            decode_ms_per_token=float(np.mean(decode_values)) if decode_values else None,
            ttft_ms=float(np.mean(ttft_values)) if ttft_values else None,
            ready_hit_rate=float(np.mean(hit_rates)),
        )

    def _replay(
        self, replay: Replay, planner: Callable, on_partial: Callable[[float, float], None] | None
    ) -> tuple[float | None, float | None, float]:
        """(TTFT ms, decode ms/token, ready hit rate) on one trace. The last mode replayed reports the
        running objective, `on_partial(fraction of its steps done, objective so far)`."""
        ttft_ms = decode_ms = None
        hit_rate = 0.0

        def watcher(trace: RoutingTrace, objective_of: Callable[[float], float]):
            if on_partial is None:
                return None
            return lambda done, ms: on_partial(done / trace.n_steps, objective_of(ms / done))

        if replay.prefill is not None:
            watch = watcher(replay.prefill, lambda mean_ms: self.combine(None, mean_ms)) if replay.decode is None else None
            result = simulate(replay.prefill, planner(), mode="prefill",
                              checkpoints=CHECKPOINTS if watch else 0, on_checkpoint=watch)
            ttft_ms, hit_rate = result.step_ms, result.ready_hit_rate
        if replay.decode is not None:
            watch = watcher(replay.decode, lambda mean_ms: self.combine(mean_ms, ttft_ms))
            result = simulate(replay.decode, planner(), mode="decode",
                              checkpoints=CHECKPOINTS if watch else 0, on_checkpoint=watch)
            decode_ms, hit_rate = result.step_ms, result.ready_hit_rate
        return ttft_ms, decode_ms, hit_rate

    def combine(self, decode_ms: float | None, ttft_ms: float | None) -> float:
        if self.objective == "decode":
            return decode_ms
        if self.objective == "prefill":
            return ttft_ms
        return ttft_ms + self.decode_tokens * decode_ms


def build_workload(
    traces: Sequence[tuple[str, RoutingTrace]],
    holdout: Sequence[tuple[str, RoutingTrace]],
    holdout_split: float,
    objective: str = "weighted",
    decode_tokens: int = 256,
    profile_split: float = 0.25,
    prefill_tokens: int = 512,
    max_tokens: int | None = None,
    profiling: Sequence[tuple[str, RoutingTrace]] = (),
) -> Workload:
    """Splits and shapes the traces (all of one model); see the module's design choices."""
    if objective not in OBJECTIVES:
        raise UserError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    if not traces:
        raise UserError("give at least one --trace to tune on")
    if holdout and holdout_split:
        raise UserError("pass --holdout or --holdout-split, not both")
    if not 0.0 <= holdout_split < 1.0:
        raise UserError(f"--holdout-split must be in [0, 1), got {holdout_split}")
    if not 0.0 < profile_split < 1.0:
        raise UserError(f"--profile-split must be in (0, 1), got {profile_split}")
    meta = traces[0][1].meta
    for name, trace in [*traces, *holdout, *profiling]:
        _check_same_model(meta, trace.meta, name)
    modes = {"decode": ("decode",), "prefill": ("prefill",), "weighted": ("prefill", "decode")}[objective]

    def shaped(name: str, trace: RoutingTrace) -> Replay:
        if max_tokens is not None:
            trace = trace.tokens(0, min(max_tokens, trace.n_tokens))
        return Replay(
            name,
            trace.as_decode() if "decode" in modes else None,
            as_prompts(trace, prefill_tokens) if "prefill" in modes else None,
        )

    frequencies = np.zeros((meta.n_layers, meta.n_experts))
    for _, trace in profiling:
        frequencies += trace.expert_frequencies()
    train, held = [], [shaped(name, trace) for name, trace in holdout]
    for name, trace in traces:
        n_train = trace.n_tokens - round(holdout_split * trace.n_tokens)
        n_profiling = 0 if profiling else round(profile_split * n_train)
        if (n_profiling == 0 and not profiling) or n_train - n_profiling <= 0 or (
            holdout_split and n_train == trace.n_tokens
        ):
            raise UserError(f"{name}: {trace.n_tokens} tokens are too few to split for tuning")
        if not profiling:
            frequencies += trace.tokens(0, n_profiling).expert_frequencies()
        train.append(shaped(name, trace.tokens(n_profiling, n_train)))
        if holdout_split:
            held.append(shaped(f"{name} (last {holdout_split:.0%})", trace.tokens(n_train, trace.n_tokens)))
    return Workload(meta, frequencies, tuple(train), tuple(held), objective, decode_tokens)


def _check_same_model(meta: TraceMeta, other: TraceMeta, name: str) -> None:
    if meta.routing_shape != other.routing_shape:
        raise UserError(
            f"{name} is a trace of {other.model} ({other.n_layers} layers x {other.n_experts} experts), "
            f"not of {meta.model} like the first trace: tune on traces of one model"
        )
