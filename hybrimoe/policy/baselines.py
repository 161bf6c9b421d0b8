"""The baselines' mechanisms: their settings, their background copies, and their planners.

Design choices:
- Baselines, as they place experts:
  * `ktransformers`: a static GPU-resident set of the most frequent experts, counted on a separate
    profiling workload; all other routed experts on the CPU; no loads. Prefill uses the same static
    split (kTransformers' CPU kernels compute non-resident experts for every batch size).
  * `static-oracle`: the same, with frequencies counted on the replayed trace itself (a bound).
  * `ktransformers-front`: kTransformers' front-loading placement: the cache filled from the first
    layer onwards (lowest expert ids first in the last, partly filled layer), the rest on the CPU.
  * `ktransformers-dynamic`: kTransformers' dynamic expert update. Its documentation says only that
    it updates the GPU experts during inference, triggered by prefills of at least
    `--kt-gpu-prefill-token-threshold` tokens; modelled as frequency placement (from the profiling
    workload, or kTransformers' default uniform placement without one) refreshed to the top
    experts of an online activation count (decayed per token) after every `refresh_steps`-th step
    and every step of at least `refresh_prefill_tokens` tokens. The refresh's copies queue on the
    copy engine like prefetches; between refreshes, misses run on the CPU.
  * `llamacpp`: `--n-cpu-moe N`: the experts of the first N layers on the CPU, all later layers'
    experts resident, N the smallest that fits the cache; prefill uses the same split.
  * `llamacpp-lru`: llama.cpp's open expert-cache change (pull request 27861): the experts of the
    first `lru_cpu_layers` layers (default: every layer) live on the CPU, each of those layers with
    an LRU pool of the cache's slots left after the fully resident later layers (split evenly);
    resident experts run on the GPU, the rest on the CPU, and after each layer up to `lru_inserts`
    of its CPU experts are copied into its pool for later steps (`--moe-expert-cache-inserts`).
  * `gpu-offload`: every expert computed on the accelerator; misses loaded on demand into an LRU
    cache that starts empty (accelerate-style offload).
  * The caches of `gpu-offload` and `llamacpp-lru` evict by `BaselineParams.eviction` (LRU by
    default; any admitting policy, e.g. least-stale).
  * `cpu-only`: every routed expert on the CPU.
- Each baseline is a `PolicyPlanner` (`planner.py`) with its own cache, schedule rule and, for the
  dynamic ones, a `Refill`: the background copies its peer makes, asked after each layer.
- Shapes: E = experts per layer, L = MoE layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from hybrimoe.errors import PolicyError
from hybrimoe.policy import scheduler as sched
from hybrimoe.policy.cache import ExpertCache
from hybrimoe.policy.cache_policies import ActivationCountPolicy
from hybrimoe.policy.costs import CostModel
from hybrimoe.policy.names import ADMITTING_POLICIES, even_pool_sizes
from hybrimoe.policy.plan import ExpertId, SlotLoad
from hybrimoe.policy.planner import ModelDims, PlanningMs, PolicyPlanner


@dataclass(frozen=True)
class BaselineParams:
    """Settings of the peer mechanisms the dynamic baselines model (see the module docstring)."""

    refresh_steps: int = 32  # ktransformers-dynamic: forward steps between placement refreshes
    refresh_prefill_tokens: int = 512  # a step of at least this many tokens also refreshes (kTransformers' threshold)
    refresh_decay: float = 0.99  # per-token decay of the online activation count
    lru_inserts: int = 2  # llamacpp-lru: experts uploaded per layer per step (--moe-expert-cache-inserts)
    lru_cpu_layers: int | None = None  # llamacpp-lru: --n-cpu-moe, layers with an LRU; None: every layer
    eviction: str = "lru"  # the cache policy of gpu-offload and llamacpp-lru (e.g. least-stale)

    # which strategies read each setting
    USED_BY: ClassVar[dict[str, tuple[str, ...]]] = {
        "refresh_steps": ("ktransformers-dynamic",),
        "refresh_prefill_tokens": ("ktransformers-dynamic",),
        "refresh_decay": ("ktransformers-dynamic",),
        "lru_inserts": ("llamacpp-lru",),
        "lru_cpu_layers": ("llamacpp-lru",),
        "eviction": ("gpu-offload", "llamacpp-lru"),
    }

    def __post_init__(self) -> None:
        if self.refresh_steps < 1 or self.refresh_prefill_tokens < 1 or self.lru_inserts < 0:
            raise PolicyError("refresh_steps and refresh_prefill_tokens must be at least 1, lru_inserts at least 0")
        if not 0.0 <= self.refresh_decay < 1.0:
            raise PolicyError(f"refresh_decay must be in [0, 1), got {self.refresh_decay}")
        if self.eviction not in ADMITTING_POLICIES:
            raise PolicyError(f"eviction must be one of {', '.join(ADMITTING_POLICIES)}, got {self.eviction!r}")

    def check_layers(self, n_layers: int) -> None:
        """Refuses settings a model of `n_layers` MoE layers cannot take, before any cell runs."""
        if self.lru_cpu_layers is not None and not 0 <= self.lru_cpu_layers <= n_layers:
            raise PolicyError(f"llamacpp-lru's CPU layers must be in [0, {n_layers}], got {self.lru_cpu_layers}")


class PeriodicRefresh:
    """kTransformers' dynamic expert update, as modelled here: after the last layer of every
    `every_steps`-th step, and of every step of at least `prefill_tokens` tokens, the resident set
    becomes the `capacity` experts the cache's priorities (an online activation count) rank first."""

    def __init__(self, n_layers: int, every_steps: int, prefill_tokens: int):
        self._last_layer = n_layers - 1
        self.every_steps, self.prefill_tokens = every_steps, prefill_tokens
        self._steps_since = 0
        self._n_tokens = 0

    def begin_step(self, n_tokens: int) -> None:
        self._steps_since += 1
        self._n_tokens = n_tokens

    def after_layer(
        self, cache: ExpertCache, layer: int, counts: Mapping[int, int], cpu: tuple[int, ...]
    ) -> list[SlotLoad]:
        due = self._steps_since >= self.every_steps or self._n_tokens >= self.prefill_tokens
        if layer != self._last_layer or not due:
            return []
        self._steps_since = 0
        cache.protect({layer: counts})  # in use until this layer's experts finish
        loads = [cache.admit(eid, only_if_better=True) for eid in cache.top_experts_overall(cache.capacity)]
        return [load for load in loads if load is not None]


class InsertMisses:
    """llama.cpp's expert LRU (its open pull request 27861), as modelled here: after a layer runs, up
    to `per_step` of the experts it ran on the CPU (most tokens first) are copied into the layer's
    LRU slots, for its later steps."""

    def __init__(self, per_step: int):
        self.per_step = per_step

    def begin_step(self, n_tokens: int) -> None:
        pass

    def after_layer(
        self, cache: ExpertCache, layer: int, counts: Mapping[int, int], cpu: tuple[int, ...]
    ) -> list[SlotLoad]:
        if not cpu or not self.per_step:
            return []
        cache.protect({layer: counts})  # in use until this layer's experts finish
        chosen = sorted(cpu, key=lambda expert: (-counts[expert], expert))[: self.per_step]
        loads = [cache.admit((layer, expert)) for expert in chosen]
        return [load for load in loads if load is not None]


def frequency_ranking(frequencies: np.ndarray) -> list[ExpertId]:
    """[L, E] activation counts -> every ExpertId, most frequent first (ties by layer, expert)."""
    n_layers, n_experts = frequencies.shape
    order = np.lexsort((np.tile(np.arange(n_experts), n_layers), np.repeat(np.arange(n_layers), n_experts),
                        -frequencies.ravel()))
    return [(int(i) // n_experts, int(i) % n_experts) for i in order]


def uniform_placement(dims: ModelDims, capacity: int) -> tuple[ExpertId, ...]:
    """kTransformers' default placement: the slots spread evenly over the layers, lowest ids first."""
    sizes = even_pool_sizes(capacity, dims.n_layers)
    return tuple((layer, e) for layer, size in enumerate(sizes) for e in range(min(size, dims.n_experts)))


def static_planner(
    dims: ModelDims, costs: CostModel, resident: tuple[ExpertId, ...], planning: PlanningMs
) -> PolicyPlanner:
    """A fixed resident set (the cache holds exactly it): resident experts on the GPU, the rest on the CPU."""
    cache = ExpertCache(dims.n_layers, dims.n_experts, len(resident), layout="shared", policy="static")
    return PolicyPlanner(dims, costs, cache, sched.schedule_static, admit_loads=False, warm=resident,
                         planning_ms=planning)


def ktransformers_dynamic_planner(
    dims: ModelDims, costs: CostModel, capacity: int, frequencies: np.ndarray | None, baseline: BaselineParams,
    planning: PlanningMs,
) -> PolicyPlanner:
    rates = None
    if frequencies is not None:  # activations per token of each expert
        rates = dims.top_k * frequencies / np.maximum(frequencies.sum(axis=1, keepdims=True), 1)
    count = ActivationCountPolicy(baseline.refresh_decay, rates)
    cache = ExpertCache(dims.n_layers, dims.n_experts, capacity, layout="shared", policy=count)
    refresh = PeriodicRefresh(dims.n_layers, baseline.refresh_steps, baseline.refresh_prefill_tokens)
    start = tuple(frequency_ranking(frequencies)[:capacity]) if frequencies is not None else uniform_placement(dims, capacity)
    return PolicyPlanner(dims, costs, cache, sched.schedule_static, admit_loads=False, warm=start,
                         planning_ms=planning, refill=refresh)


def llamacpp_lru_planner(
    dims: ModelDims, costs: CostModel, capacity: int, baseline: BaselineParams, planning: PlanningMs
) -> PolicyPlanner:
    n_layers, n_experts = dims.n_layers, dims.n_experts
    baseline.check_layers(n_layers)
    cpu_layers = n_layers if baseline.lru_cpu_layers is None else baseline.lru_cpu_layers
    gpu_layers = n_layers - cpu_layers
    if gpu_layers * n_experts > capacity:
        raise PolicyError(
            f"llamacpp-lru with {cpu_layers} CPU layers needs {gpu_layers * n_experts} slots for the rest; "
            f"the cache has {capacity}"
        )
    lru_slots = even_pool_sizes(capacity - gpu_layers * n_experts, cpu_layers) if cpu_layers else []
    cache = ExpertCache(n_layers, n_experts, capacity, layout="per-layer", policy=baseline.eviction,
                        pool_sizes=lru_slots + [n_experts] * gpu_layers)
    warm = tuple((layer, e) for layer in range(cpu_layers, n_layers) for e in range(n_experts))
    return PolicyPlanner(dims, costs, cache, sched.schedule_static, admit_loads=False, warm=warm,
                         planning_ms=planning, refill=InsertMisses(baseline.lru_inserts))
