"""Whether an expert cache fits the profile's accelerator: `run`'s memory arithmetic
(`hybrimoe/capacity.py`) applied to `simulate`'s cache sizes.

Design choices:
- The card's memory is the profile's `machine.gpu_memory_gb`, read as GiB like `--gpu-memory-gb`.
  The dense weights are those of the model preset that routes like the trace (the simulator has no
  checkpoint); the reserve is one sequence of `DEFAULT_CONTEXT_TOKENS` tokens, the budget `tune`
  plans by default, so `simulate` and `tune` agree on what fits.
- No card size or no matching preset: no budget (`card_budget` returns None), and the tables say
  that nothing could be checked rather than marking every cell as fitting.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrimoe.capacity import DEFAULT_CONTEXT_TOKENS, GIB, Reserve, expert_room_bytes, reserve_for
from hybrimoe.config import HardwareProfile
from hybrimoe.shapes import preset_for_routing
from hybrimoe.trace import TraceMeta


@dataclass(frozen=True)
class CardBudget:
    """The accelerator memory an expert cache may take: the card less dense weights and reserve."""

    gpu: str  # the card's name, for the tables
    gpu_memory_bytes: int
    dense_bytes: int
    reserve: Reserve
    context_tokens: int  # the KV-cache tokens the reserve holds
    expert_bytes: int  # one expert in the profile's format

    @property
    def room_bytes(self) -> int:
        return expert_room_bytes(self.gpu_memory_bytes, self.dense_bytes, self.reserve)

    @property
    def max_slots(self) -> int:
        return max(0, self.room_bytes // self.expert_bytes)

    def fits(self, n_slots: int) -> bool:
        return n_slots <= self.max_slots

    def describe(self) -> str:
        return (
            f"the {self.gpu}'s {self.gpu_memory_bytes / GIB:.0f} GiB less {self.dense_bytes / GIB:.2f} GiB dense "
            f"weights and a {self.reserve.total_bytes / GIB:.2f} GiB reserve ({self.context_tokens} tokens) "
            f"hold {self.max_slots} experts"
        )


def card_budget(
    profile: HardwareProfile, meta: TraceMeta, context_tokens: int = DEFAULT_CONTEXT_TOKENS
) -> CardBudget | None:
    """The budget of `profile`'s accelerator for `meta`'s model; None when either size is unknown."""
    machine = profile.machine
    model = preset_for_routing(meta.routing_shape)
    if machine is None or not machine.gpu_memory_gb or model is None:
        return None
    return CardBudget(
        gpu=machine.gpu or "accelerator",
        gpu_memory_bytes=int(machine.gpu_memory_gb * GIB),
        dense_bytes=model.dense_bytes,
        reserve=reserve_for(model, 1, context_tokens, 0),
        context_tokens=context_tokens,
        expert_bytes=profile.expert_shape.expert_bytes,
    )
