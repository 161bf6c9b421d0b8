"""The one expert kernel every placement runs, so CPU and accelerator agree and `profile` times it.

Shapes: T = tokens routed to the expert, D = hidden size, I = expert intermediate size.
Weights keep transformers' stacked-experts layout for one expert: `gate_up` is [2I, D] and `down`
is [D, I], or [D, 2I] and [I, D] when `transposed` (GPT-OSS).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def silu_gate(gate_up_out: torch.Tensor) -> torch.Tensor:
    """The standard SwiGLU gate: [T, 2I] (gate half, then up half) -> [T, I]."""
    gate, up = gate_up_out.chunk(2, dim=-1)
    return F.silu(gate) * up


def expert_mlp(
    x: torch.Tensor,  # [T, D]
    gate_up: torch.Tensor,  # [2I, D] ([D, 2I] if transposed)
    down: torch.Tensor,  # [D, I] ([I, D] if transposed)
    apply_gate: Callable[[torch.Tensor], torch.Tensor] = silu_gate,
    gate_up_bias: torch.Tensor | None = None,  # [2I]
    down_bias: torch.Tensor | None = None,  # [D]
    transposed: bool = False,
) -> torch.Tensor:  # [T, D]
    if transposed:
        h = x @ gate_up
        if gate_up_bias is not None:
            h = h + gate_up_bias
        h = apply_gate(h)
        out = h @ down
        return out + down_bias if down_bias is not None else out
    h = apply_gate(F.linear(x, gate_up, gate_up_bias))
    return F.linear(h, down, down_bias)
