"""How many expert slots the accelerator gets: from a flag, the profile's policy, or the default,
capped by a memory budget.

Design choices:
- A pure function over numbers, so every rule is tested without a model or a GPU.
- The budget covers everything the runtime puts on the accelerator: the dense weights, the slots,
  and a reserve for activations and the KV cache. Without --gpu-memory-gb it is the accelerator's
  free memory (measured before the weights are placed); the CPU stand-in has no budget.
- A budget the dense weights and the reserve alone exceed is an error, not a silent zero cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrimoe.errors import UserError

GIB = 1 << 30
RESERVE_BYTES = 1 * GIB  # activations and KV cache


@dataclass(frozen=True)
class Capacity:
    slots: int
    source: str  # where the number came from, for the summary


def resolve_capacity(
    n_experts_total: int,  # routed experts over all MoE layers
    expert_bytes: int,
    dense_bytes: int,
    policy_ratio: float,  # the profile's (or the default) policy.cache_ratio
    policy_source: str,
    cache_experts: int | None = None,
    cache_ratio: float | None = None,
    budget_bytes: int | None = None,  # --gpu-memory-gb, or free accelerator memory
    budget_source: str = "",
    kv_cache_bytes: int = 0,  # beyond what the reserve holds (`hybrimoe tune --context`)
) -> Capacity:
    if cache_experts is not None and cache_ratio is not None:
        raise UserError("pass --cache-experts or --cache-ratio, not both")
    if cache_experts is not None:
        if not 0 <= cache_experts <= n_experts_total:
            raise UserError(f"--cache-experts must be in [0, {n_experts_total}] (the model's routed experts)")
        slots, source = cache_experts, "--cache-experts"
    elif cache_ratio is not None:
        if not 0.0 <= cache_ratio <= 1.0:
            raise UserError(f"--cache-ratio must be in [0, 1], got {cache_ratio}")
        slots, source = round(cache_ratio * n_experts_total), f"--cache-ratio {cache_ratio:g}"
    else:
        slots, source = round(policy_ratio * n_experts_total), f"cache ratio {policy_ratio:g} from {policy_source}"
    if budget_bytes is None:
        return Capacity(slots, source)
    fits = slots_in_budget(budget_bytes, budget_source, expert_bytes, dense_bytes, kv_cache_bytes)
    if fits < slots:
        return Capacity(fits, f"{source}, capped to {fits} experts by {budget_source}")
    return Capacity(slots, source)


def slots_in_budget(
    budget_bytes: int, budget_source: str, expert_bytes: int, dense_bytes: int, kv_cache_bytes: int = 0
) -> int:
    """Expert slots left once the dense weights, the reserve and the KV cache are placed."""
    room = budget_bytes - dense_bytes - RESERVE_BYTES - kv_cache_bytes
    if room < 0:
        kv = f", {kv_cache_bytes / GIB:.2f} GiB for the KV cache" if kv_cache_bytes else ""
        raise UserError(
            f"{budget_source} is not enough: the dense weights need {dense_bytes / GIB:.2f} GiB "
            f"plus {RESERVE_BYTES / GIB:.0f} GiB for activations{kv}"
        )
    return int(room // expert_bytes)
