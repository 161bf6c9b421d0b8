"""Complete strategies: one planner class (`planner.py`), configured as hybrimoe or as each baseline.

Design choices:
- Every strategy is a `PolicyPlanner`: an expert cache with its eviction policy, a schedule rule,
  a prefetch rule and whether on-demand loads are admitted into the cache; the baselines' own
  mechanisms (settings, background copies, placements) are in `baselines.py`. The runtime and the
  simulator call the same planner, so what is simulated is what runs.
- `hybrimoe`: HybriMoE scheduling (`greedy.py`), the MRS cache (or the configured policy),
  impact-driven prefetch, warm start from profiled frequencies.
- Without an accelerator every strategy plans as `cpu-only`.
- Shapes: E = experts per layer, L = MoE layers.
"""

from __future__ import annotations

import numpy as np

from hybrimoe.config import PolicyConfig
from hybrimoe.errors import PolicyError
from hybrimoe.policy import scheduler as sched
from hybrimoe.policy.baselines import (
    BaselineParams,
    frequency_ranking,
    ktransformers_dynamic_planner,
    llamacpp_lru_planner,
    static_planner,
)
from hybrimoe.policy.cache import ExpertCache
from hybrimoe.policy.costs import CostModel
from hybrimoe.policy.names import STRATEGIES, check_name
from hybrimoe.policy.plan import ExpertId
from hybrimoe.policy.planner import ModelDims, PlanningMs, PolicyPlanner


def cache_capacity(dims: ModelDims, cache_ratio: float) -> int:
    return int(round(cache_ratio * dims.n_layers * dims.n_experts))


def make_planner(
    strategy: str,
    dims: ModelDims,
    costs: CostModel,
    policy: PolicyConfig,
    capacity: int,
    frequencies: np.ndarray | None = None,  # [L, E] from a profiling workload
    baseline: BaselineParams = BaselineParams(),
) -> PolicyPlanner:
    """Builds one strategy's planner; `capacity` counts experts the accelerator cache holds."""
    check_name("strategy", strategy, STRATEGIES)
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
            raise PolicyError(f"{strategy} needs expert frequencies")
        return static_planner(dims, costs, tuple(ranking[:capacity]), planning)
    if strategy == "ktransformers-front":
        front = tuple((layer, e) for layer in range(n_layers) for e in range(n_experts))[:capacity]
        return static_planner(dims, costs, front, planning)
    if strategy == "ktransformers-dynamic":
        return ktransformers_dynamic_planner(dims, costs, capacity, frequencies, baseline, planning)
    if strategy == "llamacpp-lru":
        return llamacpp_lru_planner(dims, costs, capacity, baseline, planning)
    if strategy == "llamacpp":
        n_gpu_layers = capacity // n_experts
        warm = tuple((layer, e) for layer in range(n_layers - n_gpu_layers, n_layers) for e in range(n_experts))
        return static_planner(dims, costs, warm, planning)
    if strategy == "gpu-offload":
        cache = ExpertCache(n_layers, n_experts, capacity, layout=policy.cache_layout, policy=baseline.eviction)
        return PolicyPlanner(dims, costs, cache, sched.schedule_gpu_only, admit_loads=True, planning_ms=planning)
    return _hybrimoe_planner(dims, costs, policy, capacity, ranking, planning)


def _hybrimoe_planner(
    dims: ModelDims, costs: CostModel, policy: PolicyConfig, capacity: int, ranking: list[ExpertId],
    planning: PlanningMs,
) -> PolicyPlanner:
    cache = ExpertCache(
        dims.n_layers, dims.n_experts, capacity, layout=policy.cache_layout, policy=policy.cache_policy,
        mrs_alpha=policy.mrs_alpha, mrs_top_p=policy.mrs_top_p or 2 * dims.top_k,
    )
    # `fill` skips experts whose pool is full, so per-layer pools each take their layer's favourites.
    warm = tuple(ranking) if policy.warm_start else ()
    return PolicyPlanner(
        dims, costs, cache, sched.schedule_hybrid, prefetch=policy.prefetch, prefetch_depth=policy.prefetch_depth,
        admit_loads=True, warm=warm, planning_ms=planning,
    )
