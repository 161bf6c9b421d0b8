"""Host expert store and the accelerator's fixed expert slots.

Shapes: L = MoE layers, E = experts per layer, C = cache slots, D = hidden size, I = expert
intermediate size; a slot holds one expert in transformers' layout (`gate_up` [2I, D], `down` [D, I],
or transposed for GPT-OSS), or its packed quantized form (`quantized.py`), plus its biases when the
family has them.

Design choices:
- The host side is the model's own stacked expert parameters (pooled per layer and page-locked on
  CUDA by `host_experts.py`): no copy.
- Slots are allocated once, as one stacked tensor per weight ([C, ...]); which expert each slot
  holds is plain bookkeeping here, and the planner decides it (shared pool or per layer is the
  planner's business). Loading an expert into a slot is one copy per weight on the copy stream.
- Slot reuse is guarded by two events per slot: `ready` (recorded after the copy that fills it) and
  `free` (recorded after the kernels that read it); a copy waits on `free`, a kernel on `ready`.
- The store checks every plan it executes against what the slots really hold, so a planner bug
  fails loudly instead of computing with the wrong expert's weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from hybrimoe.policy.plan import ExpertId, SlotLoad
from hybrimoe.runtime.accelerator import Accelerator
from hybrimoe.runtime.loading import MoeLayer

# the experts' weights a slot holds: dense stacks, or packed ones (`quantized.py`), and biases
_WEIGHT_NAMES = (
    "gate_up_proj", "down_proj",
    "gate_up_proj_qdata", "gate_up_proj_scale", "down_proj_qdata", "down_proj_scale",
    "gate_up_proj_bias", "down_proj_bias",
)


class ExpertStore:
    def __init__(self, layers: Sequence[MoeLayer], accelerator: Accelerator, capacity: int):
        self.accelerator = accelerator
        self.capacity = capacity
        # host[name][layer]: [E, ...] stacked weights of that layer (the module's own parameter)
        self.host: dict[str, list[torch.Tensor]] = {
            name: [getattr(layer.experts, name) for layer in layers]
            for name in _WEIGHT_NAMES
            if getattr(layers[0].experts, name, None) is not None
        }
        # slots[name]: [C, ...] on the accelerator, allocated and written once: on the host (the
        # stand-in) a first copy into untouched pages pays the kernel's page zeroing, ~7x a copy
        self.slots: dict[str, torch.Tensor] = {
            name: torch.zeros((capacity, *stacked[0].shape[1:]), dtype=stacked[0].dtype, device=accelerator.device)
            for name, stacked in self.host.items()
        }
        # per-slot views, made once: the executor asks for a slot's weights once per expert run
        self._slot_views = [{name: w[slot] for name, w in self.slots.items()} for slot in range(capacity)]
        self.expert_bytes = sum(stacked[0][0].nbytes for stacked in self.host.values())
        self.resident: list[ExpertId | None] = [None] * capacity  # slot -> expert it holds
        self.slot_of: dict[ExpertId, int] = {}  # expert -> slot holding it
        self._ready = [accelerator.new_event() for _ in range(capacity)]
        self._free = [accelerator.new_event() for _ in range(capacity)]

    def load(self, loads: Iterable[SlotLoad]) -> int:
        """Issues the copies on the copy stream, in order; returns the number of experts copied."""
        acc, n_loads = self.accelerator, 0
        with acc.copy_stream():
            for load in loads:
                if not 0 <= load.slot < self.capacity:
                    raise RuntimeError(f"planner bug: slot {load.slot} outside 0..{self.capacity - 1}")
                layer, expert = load.expert
                acc.wait(self._free[load.slot])  # the slot's previous expert is no longer read
                for name, slot_weights in self._slot_views[load.slot].items():
                    slot_weights.copy_(self.host[name][layer][expert], non_blocking=acc.is_cuda)
                acc.record(self._ready[load.slot])
                old = self.resident[load.slot]
                if old is not None and self.slot_of.get(old) == load.slot:
                    del self.slot_of[old]
                self.resident[load.slot] = load.expert
                self.slot_of[load.expert] = load.slot
                n_loads += 1
        return n_loads

    def wait_ready(self, slots: Iterable[int]) -> None:
        """Orders the kernels issued next on the current stream after these slots' copies."""
        for slot in slots:
            self.accelerator.wait(self._ready[slot])

    def copying(self, slot: int) -> bool:
        """Whether the copy that fills `slot` is still in flight (asked, not waited for)."""
        return not self.accelerator.is_done(self._ready[slot])

    def release(self, slots: Iterable[int]) -> None:
        """Marks the kernels issued so far as the last readers of these slots."""
        for slot in slots:
            self.accelerator.record(self._free[slot])

    def host_layer(self, layer: int) -> dict[str, torch.Tensor]:
        """One layer's stacked host weights, [E, ...] each."""
        return {name: stacked[layer] for name, stacked in self.host.items()}

    def check_resident(self, layer: int, slot_of: dict[int, int], experts: Sequence[int]) -> None:
        for expert in experts:
            slot = slot_of.get(expert)
            if slot is None or not 0 <= slot < self.capacity or self.resident[slot] != (layer, expert):
                held = None if slot is None or not 0 <= slot < self.capacity else self.resident[slot]
                raise RuntimeError(
                    f"planner bug: expert {(layer, expert)} planned from slot {slot}, which holds {held}"
                )
