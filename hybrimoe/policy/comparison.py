"""Comparing strategies on one workload: what `hybrimoe simulate` prints, cell by cell.

Design choices:
- Baselines that place by frequency count on a profiling workload: another trace (`profiling`, as
  a user who profiled last week's prompts would), or else the first `profile_fraction` of the
  trace's tokens (a separate part of the same batch), the rest being replayed. `static-oracle`
  counts on the replayed part itself.
- Each cell (strategy, cache ratio) is a fresh planner replayed by `simulator.simulate`. Two
  reference rows go beside them (`references`): `belady-oracle`, hybrimoe's planner with Belady's
  clairvoyant cache and the true routing as predictions (it minimises misses, not time, so a
  strategy may beat it), and `lower-bound` (`bound.py`), a time no strategy can beat under the
  cost model, the same at every cache size.
- `best_baseline` is the fastest strategy a user could deploy today (`names.BASELINES`).
- A cache size whose experts exceed the profile's accelerator memory (`card.py`, `run`'s
  arithmetic) is still simulated, as a what-if for a larger card, but `fits` says so, the tables
  mark it and `vs_best_baseline_range` (the summary) leaves it out.
- Shapes: E = experts, L = MoE layers.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from hybrimoe.config import HardwareProfile, PolicyConfig
from hybrimoe.errors import PolicyError
from hybrimoe.policy import scheduler as sched
from hybrimoe.policy.baselines import BaselineParams
from hybrimoe.policy.cache import ExpertCache
from hybrimoe.policy.card import CardBudget, card_budget
from hybrimoe.policy.costs import CostModel
from hybrimoe.policy.bound import lower_bound
from hybrimoe.policy.names import BASELINES, BELADY_ORACLE, LOWER_BOUND, MODES, STRATEGIES, check_name
from hybrimoe.policy.planner import ModelDims, PolicyPlanner
from hybrimoe.policy.prefetch import token_counts
from hybrimoe.policy.simulator import SimResult, simulate
from hybrimoe.policy.strategies import cache_capacity, make_planner
from hybrimoe.trace import RoutingTrace, TraceStep


@dataclass(frozen=True)
class Comparison:
    """Every strategy at every cache ratio, in one mode, with the workload split it used."""

    mode: str
    ratios: tuple[float, ...]
    results: dict[tuple[str, float], SimResult]
    baseline: str
    profile_name: str
    trace_model: str
    replay_tokens: int
    profiling_tokens: int
    seconds: float
    greedy_vs_exact: tuple[float, float] | None = None  # (mean, worst) greedy/exact time ratio
    profiling_trace: str | None = None  # the other trace frequencies were counted on; None: this one's first part
    expert_format: str = ""  # how the profile keeps the experts: "bfloat16", "int4 g128"
    expert_bytes: int = 0  # one expert in that format
    n_experts_total: int = 0  # routed experts over all MoE layers
    budget: CardBudget | None = None  # what the profile's accelerator holds; None: unknown
    prompt_capped: bool = False  # prefill: the prompt length asked was more than the tokens replayed

    def cache_bytes(self, ratio: float) -> int:
        """The accelerator memory the expert cache takes at `ratio`."""
        return round(ratio * self.n_experts_total) * self.expert_bytes

    def fits(self, ratio: float) -> bool:
        """Whether the expert cache at `ratio` fits the profile's accelerator (True when unknown)."""
        return self.budget is None or self.budget.fits(round(ratio * self.n_experts_total))

    def vs_best_baseline_range(self, strategy: str) -> tuple[float, float] | None:
        """(lowest, highest) ratio of `strategy` to the best baseline over the cache sizes that fit."""
        ratios = [self.vs_best_baseline(strategy, ratio) for ratio in self.ratios if self.fits(ratio)]
        ratios = [ratio for ratio in ratios if ratio is not None]
        return (min(ratios), max(ratios)) if ratios else None

    def speedup(self, strategy: str, ratio: float) -> float | None:
        base = self.results.get((self.baseline, ratio))
        mine = self.results.get((strategy, ratio))
        if base is None or mine is None or mine.step_ms == 0:
            return None
        return base.step_ms / mine.step_ms

    def best_baseline(self, ratio: float) -> str | None:
        """The fastest deployable baseline in this comparison at `ratio` (see names.BASELINES)."""
        timed = [(self.results[(s, ratio)].step_ms, s) for s in BASELINES if (s, ratio) in self.results]
        return min(timed)[1] if timed else None

    def vs_best_baseline(self, strategy: str, ratio: float) -> float | None:
        """How many times faster `strategy` is than the best baseline at `ratio`."""
        best = self.best_baseline(ratio)
        mine = self.results.get((strategy, ratio))
        if best is None or mine is None or mine.step_ms == 0:
            return None
        return self.results[(best, ratio)].step_ms / mine.step_ms


@dataclass
class Workload:
    """The replayed trace, and the expert frequencies baselines place by."""

    replay: RoutingTrace
    profiling_frequencies: np.ndarray  # [L, E]
    replay_frequencies: np.ndarray  # [L, E]
    profiling_tokens: int


def make_workload(
    trace: RoutingTrace,
    mode: str,
    profile_fraction: float,
    prefill_tokens: int,
    max_tokens: int | None,
    profiling: RoutingTrace | None = None,
) -> Workload:
    """The profiling workload (`profiling`, or else the first `profile_fraction` of the trace's
    tokens) and the replayed tokens, shaped one token per step for decode and as prompts of
    `prefill_tokens` tokens for prefill."""
    check_name("mode", mode, MODES)
    n_tokens = trace.n_tokens
    if profiling is not None:
        check_same_routing(trace, profiling)
        n_profiling = 0
    else:
        if not 0.0 < profile_fraction < 1.0:
            raise PolicyError(f"the profiling fraction must be in (0, 1), got {profile_fraction}")
        n_profiling = round(profile_fraction * n_tokens)
        if n_profiling == 0:
            raise PolicyError(f"a trace of {n_tokens} tokens is too short to split at {profile_fraction}")
        profiling = trace.tokens(0, n_profiling)
    n_replay = n_tokens - n_profiling if max_tokens is None else min(max_tokens, n_tokens - n_profiling)
    if n_replay <= 0:
        raise PolicyError(f"a trace of {n_tokens} tokens is too short to split at {profile_fraction}")
    replay = trace.tokens(n_profiling, n_profiling + n_replay)
    replay = replay.as_decode() if mode == "decode" else as_prompts(replay, prefill_tokens)
    return Workload(
        replay=replay,
        profiling_frequencies=profiling.expert_frequencies(),
        replay_frequencies=replay.expert_frequencies(),
        profiling_tokens=profiling.n_tokens,
    )


def check_same_routing(trace: RoutingTrace, profiling: RoutingTrace) -> None:
    """A profiling trace must route like the replayed one: same layers, experts and top-k."""
    if profiling.meta.routing_shape != trace.meta.routing_shape:
        raise PolicyError(
            f"the profiling trace ({profiling.meta.model}: {profiling.meta.n_layers} layers x "
            f"{profiling.meta.n_experts} experts, top-{profiling.meta.top_k}) does not route like the replayed "
            f"one ({trace.meta.model}: {trace.meta.n_layers} x {trace.meta.n_experts}, top-{trace.meta.top_k})"
        )


def as_prompts(trace: RoutingTrace, n_tokens: int) -> RoutingTrace:
    """The token stream regrouped into steps of `n_tokens` tokens (the last may be shorter)."""
    steps = []
    for start in range(0, trace.n_tokens, n_tokens):
        parts = trace.tokens(start, min(start + n_tokens, trace.n_tokens)).steps
        steps.append(parts[0] if len(parts) == 1 else _concat_steps(parts))
    return RoutingTrace(trace.meta, tuple(steps))


def _concat_steps(parts) -> TraceStep:
    def cat(name: str, axis: int):
        arrays = [getattr(part, name) for part in parts]
        return None if arrays[0] is None else np.concatenate(arrays, axis=axis)

    return TraceStep(cat("topk_ids", 1), cat("topk_weights", 1), cat("router_probs", 1), cat("lookahead", 2))


def _planner_for_cell(
    strategy: str, ratio: float, dims: ModelDims, costs: CostModel, policy: PolicyConfig, workload: Workload,
    baseline: BaselineParams,
) -> PolicyPlanner:
    """One cell's planner, placing by the profiling workload (static-oracle: by the replay itself)."""
    freqs = workload.replay_frequencies if strategy == "static-oracle" else workload.profiling_frequencies
    try:
        return make_planner(strategy, dims, costs, policy, cache_capacity(dims, ratio), freqs, baseline)
    except PolicyError as exc:  # a baseline setting that does not fit this cache
        raise PolicyError(f"{strategy} at {ratio:.0%} cache: {exc}") from None


def compare_strategies(
    trace: RoutingTrace,
    profile: HardwareProfile,
    ratios: Iterable[float] = (0.25, 0.5, 0.75),
    strategies: Iterable[str] = STRATEGIES,
    mode: str = "decode",
    policy: PolicyConfig | None = None,
    predictor: str = "recent",
    profile_fraction: float = 0.25,
    prefill_tokens: int = 512,
    max_tokens: int | None = None,
    references: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
    profiling: RoutingTrace | None = None,
    profiling_name: str | None = None,
    baseline: BaselineParams = BaselineParams(),
) -> Comparison:
    """Every strategy at every cache ratio on one workload: what `hybrimoe simulate` prints.
    `profiling`: the trace frequency placement is counted on (named `profiling_name`); None:
    the first `profile_fraction` of `trace`. `progress(done, total, cell)` is called before each
    cell (a strategy, or the bound, at one ratio) with the cells done and in all."""
    strategies = tuple(check_name("strategy", strategy, STRATEGIES) for strategy in strategies)
    ratios = tuple(ratios)
    if any(not 0.0 <= r <= 1.0 for r in ratios):
        raise PolicyError("cache ratios must be in [0, 1]")
    profile.check_trace_experts(trace.meta.expert_shape())
    if predictor == "recorded" and trace.lookahead_depth == 0:
        raise PolicyError("predictor 'recorded' needs a trace with recorded look-ahead (a run's recorded routing has it) "
                          "and this one has none: use recent or oracle")
    policy = policy or profile.policy or PolicyConfig()
    costs = CostModel(profile)
    dims = ModelDims(trace.meta.n_layers, trace.meta.n_experts, trace.meta.top_k)
    baseline.check_layers(dims.n_layers)
    workload = make_workload(trace, mode, profile_fraction, prefill_tokens, max_tokens, profiling)
    started = time.perf_counter()
    results = {}
    n_cells = len(ratios) * (len(strategies) + references) + references

    def report(text: str) -> None:
        if progress is not None:
            progress(len(results), n_cells, text)

    for ratio in ratios:
        for strategy in strategies:
            report(f"{strategy} at {ratio:.0%} cache")
            planner = _planner_for_cell(strategy, ratio, dims, costs, policy, workload, baseline)
            results[(strategy, ratio)] = simulate(
                workload.replay, planner, predictor, strategy=strategy, cache_ratio=ratio, mode=mode
            )
    if references:
        for ratio in ratios:
            report(f"{BELADY_ORACLE} at {ratio:.0%} cache")
            planner = belady_oracle_planner(workload.replay, dims, costs, policy, cache_capacity(dims, ratio))
            results[(BELADY_ORACLE, ratio)] = simulate(
                workload.replay, planner, "oracle", strategy=BELADY_ORACLE, cache_ratio=ratio, mode=mode
            )
        report(LOWER_BOUND)
        bound = lower_bound(workload.replay, costs, mode)
        results.update({(LOWER_BOUND, ratio): dataclasses.replace(bound, cache_ratio=ratio) for ratio in ratios})
    return Comparison(
        mode=mode,
        ratios=ratios,
        results=results,
        baseline="ktransformers",
        profile_name=profile.name,
        trace_model=trace.meta.model,
        replay_tokens=workload.replay.n_tokens,
        profiling_tokens=workload.profiling_tokens,
        seconds=time.perf_counter() - started,
        greedy_vs_exact=_greedy_vs_exact(workload.replay, costs) if mode == "decode" else None,
        profiling_trace=None if profiling is None else (profiling_name or profiling.meta.model),
        expert_format=profile.expert_shape.format,
        expert_bytes=profile.expert_shape.expert_bytes,
        n_experts_total=dims.n_layers * dims.n_experts,
        budget=card_budget(profile, trace.meta),
        prompt_capped=mode == "prefill" and prefill_tokens > workload.replay.n_tokens,
    )


def belady_oracle_planner(
    trace: RoutingTrace, dims: ModelDims, costs: CostModel, policy: PolicyConfig, capacity: int
) -> PolicyPlanner:
    """Belady's clairvoyant cache, hybrid schedule, impact prefetch fed the true routing: fewest
    misses, not a bound on time."""
    accesses = [
        (layer, np.unique(step.topk_ids[layer]).tolist()) for step in trace.steps for layer in range(dims.n_layers)
    ]
    cache = ExpertCache(dims.n_layers, dims.n_experts, capacity, layout=policy.cache_layout, policy="belady",
                        accesses=accesses)
    depth = max(policy.prefetch_depth, 1)
    first_use = list(dict.fromkeys((layer, e) for layer, experts in accesses for e in experts))
    return PolicyPlanner(
        dims, costs, cache, sched.schedule_hybrid, prefetch="impact", prefetch_depth=depth, warm=tuple(first_use)
    )


def _greedy_vs_exact(trace: RoutingTrace, costs: CostModel, samples: int = 200) -> tuple[float, float] | None:
    """Greedy/exact schedule time on sampled decode layers, with a deterministic resident set."""
    if not costs.has_accelerator or not trace.steps:
        return None
    rng = np.random.default_rng(0)
    ratios = []
    n_layers = trace.meta.n_layers
    for i in range(samples):
        step = trace.steps[(i * 7919) % len(trace.steps)]
        ids = step.topk_ids[i % n_layers]
        counts = token_counts(ids)
        if len(counts) > sched.EXACT_MAX_EXPERTS:
            continue
        resident = {e for e in counts if rng.random() < 0.5}
        exact = sched.schedule_exact(counts, resident, costs).finish_ms
        greedy = sched.schedule_hybrid(counts, resident, costs).finish_ms
        if exact > 0:
            ratios.append(greedy / exact)
    if not ratios:
        return None
    return float(np.mean(ratios)), float(np.max(ratios))


def simulate_files(
    trace_path,
    profile_path,
    modes: Iterable[str] = MODES,
    accelerator_from=None,
    profiling_trace=None,
    **options,
) -> list[Comparison]:
    """Loads a trace and a profile (optionally borrowing another's accelerator, optionally
    counting frequencies on another trace) and compares."""
    from hybrimoe.config import load_profile
    from hybrimoe.trace import load_trace

    profile = load_profile(profile_path)
    if accelerator_from is not None:
        profile = profile.with_accelerator_from(load_profile(accelerator_from))
    if not profile.has_accelerator:
        raise PolicyError(
            f"profile {profile.name!r} has no accelerator section: simulate with the accelerator of a profile "
            "that has one (accelerator_from)"
        )
    trace = load_trace(trace_path)
    if profiling_trace is not None:
        options.update(profiling=load_trace(profiling_trace), profiling_name=str(profiling_trace))
    return [compare_strategies(trace, profile, mode=mode, **options) for mode in modes]
