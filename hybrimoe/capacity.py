"""How many expert slots the accelerator gets: from a flag, the profile's policy, or the default,
capped by a memory budget.

Design choices:
- Pure functions over numbers, torch-free, so every rule is tested without a model or a GPU and
  the simulator (`policy/comparison.py`) and the tuner apply `run`'s arithmetic too.
- The budget covers everything the runtime puts on the accelerator: the dense weights, the slots,
  and a reserve. Without --gpu-memory-gb it is the accelerator's free memory (measured before the
  weights are placed); the CPU stand-in has no budget.
- The reserve is computed from the model's shapes and the run's tokens (`reserve_for`): the KV
  cache of every sequence at its full length, the largest step's activations (the prefill of the
  prompts), and a fixed margin for kernel workspaces and allocator fragmentation.
- A budget the dense weights and the reserve alone exceed is an error, not a silent zero cache;
  so is a model whose weights do not fit the host's available memory (`check_host_memory`).
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrimoe.config import DTYPE_BYTES
from hybrimoe.errors import UserError
from hybrimoe.shapes import ModelShape

GIB = 1 << 30
DEFAULT_CONTEXT_TOKENS = 4096  # KV-cache tokens per sequence a budget is planned for (tune's --context)
MARGIN_BYTES = 256 << 20  # cuBLAS workspaces, the allocator's rounding and fragmentation
FLOAT32_BYTES = 4


@dataclass(frozen=True)
class Reserve:
    """Accelerator memory beside the dense weights and the expert slots."""

    kv_cache_bytes: int
    activation_bytes: int
    margin_bytes: int = MARGIN_BYTES

    @property
    def total_bytes(self) -> int:
        return self.kv_cache_bytes + self.activation_bytes + self.margin_bytes

    def describe(self) -> str:
        return (
            f"{self.kv_cache_bytes / GIB:.2f} GiB KV cache, {self.activation_bytes / GIB:.2f} GiB activations, "
            f"{self.margin_bytes / GIB:.2f} GiB margin"
        )


def activation_bytes(shape: ModelShape, n_step_tokens: int, n_seqs: int) -> int:
    """The live tensors of one decoder layer for a step of `n_step_tokens` tokens (all sequences),
    plus the last token's logits of each sequence: an upper estimate, not a measurement."""
    H, I, k = shape.hidden_size, shape.intermediate_size, shape.top_k
    dtype_bytes = max(DTYPE_BYTES[shape.dtype], 2)
    attention = (2 * shape.n_heads + 2 * shape.n_kv_heads) * shape.head_dim  # q, k, v, attention out
    routed = k * (H + 3 * I)  # each pair's gathered row, gate_up output, gated output
    dense_mlp = 3 * max(shape.n_shared_experts * shape.shared_intermediate_size, shape.dense_intermediate_size)
    per_token = (6 * H + attention + routed + dense_mlp) * dtype_bytes  # 6: residual, norms, block outputs
    per_token += (k * H + 2 * H + 2 * shape.n_experts) * FLOAT32_BYTES  # weighted rows, sums, router
    return n_step_tokens * per_token + n_seqs * shape.vocab_size * FLOAT32_BYTES


def reserve_for(shape: ModelShape, n_seqs: int, n_prompt_tokens: int, n_new_tokens: int) -> Reserve:
    """The reserve for `n_seqs` sequences of `n_prompt_tokens` (padded) prompt tokens each, then up
    to `n_new_tokens` new tokens each."""
    return Reserve(
        kv_cache_bytes=shape.kv_cache_bytes(n_seqs * (n_prompt_tokens + n_new_tokens)),
        activation_bytes=activation_bytes(shape, n_seqs * n_prompt_tokens, n_seqs),
    )


def check_host_memory(needed_bytes: int, available_bytes: int | None, what: str) -> None:
    """Refuses, before loading, a model whose host-side bytes exceed the available memory."""
    if available_bytes is not None and needed_bytes > available_bytes:
        raise UserError(
            f"{what} need {needed_bytes / GIB:.1f} GiB of host memory; this machine has "
            f"{available_bytes / GIB:.1f} GiB available"
        )


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
    reserve: Reserve = Reserve(0, 0),
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
    fits = slots_in_budget(budget_bytes, budget_source, expert_bytes, dense_bytes, reserve)
    if fits < slots:
        return Capacity(fits, f"{source}, capped to {fits} experts by {budget_source}")
    return Capacity(slots, source)


def slots_in_budget(
    budget_bytes: int, budget_source: str, expert_bytes: int, dense_bytes: int, reserve: Reserve
) -> int:
    """Expert slots left once the dense weights and the reserve are placed."""
    room = expert_room_bytes(budget_bytes, dense_bytes, reserve)
    if room < 0:
        raise UserError(
            f"{budget_source} is not enough: the dense weights need {dense_bytes / GIB:.2f} GiB "
            f"plus a reserve of {reserve.total_bytes / GIB:.2f} GiB ({reserve.describe()})"
        )
    return int(room // expert_bytes)


def expert_room_bytes(budget_bytes: int, dense_bytes: int, reserve: Reserve) -> int:
    """What the budget leaves the expert slots once the dense weights and the reserve are placed
    (negative when they alone exceed it)."""
    return budget_bytes - dense_bytes - reserve.total_bytes
