"""The expert kernels every placement runs, so CPU and accelerator agree and `profile` times them.

Shapes: T = tokens routed to one expert, R = rows of a group of experts (their tokens, expert after
expert), D = hidden size, I = expert intermediate size, N = experts (or cache slots) in a stacked
weight. Weights keep transformers' stacked-experts layout: one expert's `gate_up` is [2I, D] and
`down` [D, I], or [D, 2I] and [I, D] when `transposed` (GPT-OSS).

Design choices:
- A layer's experts on one device run as one grouped matmul per projection over the stacked
  weights they live in (the host's [E, ...] per layer, the accelerator's [C, ...] slots), the way
  transformers' own `grouped_mm` experts path runs them: two kernels for the layer instead of a few
  per expert. `torch.nn.functional.grouped_mm` serves every dtype on the CPU and bfloat16 on CUDA
  (compute capability 8.0+); elsewhere, or on an older torch, the same groups run expert by expert.
- The groups are one contiguous range of the stacked weight (a view, never a gather of weights);
  experts of the range that run nothing are empty groups. Packed (quantized) stacks are the
  exception: on the CPU they run expert by expert through torch's packed int8/int4 matmuls;
  otherwise only the non-empty groups' experts are dequantized, into a stack of their own.
- Decode-sized CPU groups run the native kernels instead (`native/`), chosen by the executor for
  a whole side and by `stacked_expert_mlp` for one expert, so `profile` times what runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hybrimoe.runtime import native
from hybrimoe.runtime.quantized import dense_experts, is_quantized, packed_linear, runs_packed_kernel


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


@dataclass(frozen=True)
class Groups:
    """Token-expert pairs grouped for one stacked weight: groups `first`..`first + G - 1` of it."""

    pairs: np.ndarray  # [R] pair indices, group after group
    first: int  # the stacked weight's index of the first group
    ends: np.ndarray  # [G] int32: the end row of each group (empty groups repeat the previous end)
    runs: tuple[tuple[int, int, int], ...]  # (stacked index, start row, stop row) of each non-empty group

    @property
    def n_groups(self) -> int:
        return len(self.ends)

    @property
    def max_rows(self) -> int:
        """The most rows (tokens) of one group."""
        return max(stop - start for _, start, stop in self.runs)

    def run_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The non-empty groups' stacked indices [G'] and end rows [G'], int64."""
        runs = np.array(self.runs, dtype=np.int64).reshape(-1, 3)
        return runs[:, 0], runs[:, 2]

    def index_arrays(self) -> np.ndarray:
        """[R + G + 2G'] int64, for one copy to the weights' device: the pairs, the groups' ends,
        then the non-empty groups' stacked indices and end rows (`split_indices` takes it apart)."""
        run_indices, run_ends = self.run_arrays()
        return np.concatenate([self.pairs, self.ends, run_indices, run_ends]).astype(np.int64, copy=False)


@dataclass(frozen=True)
class GroupIndex:
    """A `Groups`' index arrays on the weights' device."""

    ends: torch.Tensor  # [G] int32
    run_indices: torch.Tensor  # [G'] int64: the stacked index of each non-empty group
    run_ends: torch.Tensor  # [G'] int32: its end row


def split_indices(indices: torch.Tensor, groups: Groups) -> tuple[torch.Tensor, GroupIndex]:
    """`groups.index_arrays()` (on any device) -> the pairs [R] and the groups' index."""
    n_pairs, n_groups, n_runs = len(groups.pairs), groups.n_groups, len(groups.runs)
    pairs, ends, run_indices, run_ends = indices.split([n_pairs, n_groups, n_runs, n_runs])
    return pairs, GroupIndex(ends.int(), run_indices, run_ends.int())


def group_pairs(
    order: np.ndarray,  # [P] pair indices sorted by expert
    span: dict[int, tuple[int, int]],  # expert -> its (start, stop) in `order`
    index_of: dict[int, int],  # expert -> its index in the stacked weight (its slot, or itself)
) -> Groups:
    """The pairs of the experts in `index_of`, grouped by stacked index (ascending)."""
    by_index = sorted(index_of.items(), key=lambda item: item[1])
    first, last = by_index[0][1], by_index[-1][1]
    sizes = np.zeros(last - first + 1, dtype=np.int32)
    chunks, runs, row = [], [], 0
    for expert, index in by_index:
        start, stop = span[expert]
        chunks.append(order[start:stop])
        sizes[index - first] = stop - start
        runs.append((index, row, row + stop - start))
        row += stop - start
    return Groups(np.concatenate(chunks), first, np.cumsum(sizes, dtype=np.int32), tuple(runs))


def packed_expert_mlp(
    x: torch.Tensor,  # [T, D]
    weights: dict[str, torch.Tensor],  # packed stacks (quantized.py), biases
    index: int,  # the expert's index in the stacks
    apply_gate: Callable[[torch.Tensor], torch.Tensor] = silu_gate,
) -> torch.Tensor:  # [T, D]
    """One quantized expert through torch's packed CPU matmuls (packed weights are [O, K] whatever
    the family's layout)."""
    gate_up_bias, down_bias = weights.get("gate_up_proj_bias"), weights.get("down_proj_bias")
    h = packed_linear(x, weights["gate_up_proj_qdata"][index], weights["gate_up_proj_scale"][index])  # [T, 2I]
    if gate_up_bias is not None:
        h = h + gate_up_bias[index]
    out = packed_linear(apply_gate(h), weights["down_proj_qdata"][index], weights["down_proj_scale"][index])
    return out + down_bias[index] if down_bias is not None else out


def stacked_expert_mlp(
    x: torch.Tensor,  # [T, D]
    weights: dict[str, torch.Tensor],  # stacked [N, ...]: dense or packed (quantized.py), biases
    index: int,  # the expert's index in the stacks
    apply_gate: Callable[[torch.Tensor], torch.Tensor] = silu_gate,
) -> torch.Tensor:  # [T, D]
    """One expert of a stack, with the kernel the executor gives it (what `profile` times): the
    native kernel for a few tokens where it serves the stacks, else `grouped_experts_mlp`'s; the
    stacks are in transformers' untransposed layout."""
    n_tokens = x.shape[0]
    if apply_gate is silu_gate and native.runs(weights, x, n_tokens, standard_gate=True):
        out = torch.zeros(x.shape, dtype=torch.float32)  # [T, D]
        native.add_experts(out, x, np.arange(n_tokens), torch.ones(n_tokens), np.array([index]),
                           np.array([n_tokens]), weights)
        return out.to(x.dtype)
    if is_quantized(weights) and runs_packed_kernel(weights, x):
        return packed_expert_mlp(x, weights, index, apply_gate)
    if is_quantized(weights):
        one = {name: stack[index : index + 1] for name, stack in weights.items()}
        gate_up, down = (w[0] for w in dense_experts(one, slice(None), x.dtype, transposed=False))
    else:
        gate_up, down = weights["gate_up_proj"][index], weights["down_proj"][index]
    gate_up_bias, down_bias = weights.get("gate_up_proj_bias"), weights.get("down_proj_bias")
    return expert_mlp(x, gate_up, down, apply_gate,
                      None if gate_up_bias is None else gate_up_bias[index],
                      None if down_bias is None else down_bias[index])


def groups_natively(weight: torch.Tensor) -> bool:
    """Whether torch has a grouped matmul kernel for this stacked weight: one whose rows (and so the
    activations' rows, of the same sizes) start at multiples of 16 bytes, as `grouped_mm` needs."""
    if not hasattr(F, "grouped_mm"):
        return False
    if any(stride * weight.element_size() % 16 for stride in weight.stride()[:-1]):
        return False
    if weight.device.type == "cpu":
        return True
    return (
        weight.device.type == "cuda"
        and weight.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(weight.device) >= (8, 0)
    )


def grouped_experts_mlp(
    x: torch.Tensor,  # [R, D]: the groups' rows, group after group
    weights: dict[str, torch.Tensor],  # stacked [N, ...]: gate_up_proj, down_proj (+ _bias), or their packed stacks
    groups: Groups,
    index: GroupIndex,  # `groups`' index arrays on x's device
    apply_gate: Callable[[torch.Tensor], torch.Tensor] = silu_gate,
    transposed: bool = False,
) -> torch.Tensor:  # [R, D]
    """The experts of `groups`, as two grouped matmuls (or expert by expert where torch has none).

    Dense stacks are used in place over the groups' window; packed ones (`quantized.py`) run
    expert by expert through torch's packed matmuls on the CPU, else are dequantized for the
    non-empty groups only, which then are the groups."""
    gate_up_bias, down_bias = weights.get("gate_up_proj_bias"), weights.get("down_proj_bias")
    if is_quantized(weights) and runs_packed_kernel(weights, x):
        return torch.cat([
            packed_expert_mlp(x[start:stop], weights, stacked, apply_gate) for stacked, start, stop in groups.runs
        ])
    if is_quantized(weights):
        gate_up, down = dense_experts(weights, index.run_indices, x.dtype, transposed)  # [G', ...]
        group_indices, offsets = index.run_indices, index.run_ends
        positions = range(len(groups.runs))  # each run's position in the dequantized stacks
    else:
        window = slice(groups.first, groups.first + groups.n_groups)
        gate_up, down = weights["gate_up_proj"][window], weights["down_proj"][window]
        group_indices = torch.arange(window.start, window.stop, device=x.device)
        offsets = index.ends
        positions = [stacked - groups.first for stacked, _, _ in groups.runs]
    if not (groups_natively(gate_up) and groups_natively(down)):
        return torch.cat([
            expert_mlp(
                x[start:stop], gate_up[position], down[position], apply_gate,
                None if gate_up_bias is None else gate_up_bias[stacked],
                None if down_bias is None else down_bias[stacked],
                transposed,
            )
            for position, (stacked, start, stop) in zip(positions, groups.runs)
        ])
    if not transposed:
        gate_up, down = gate_up.transpose(-2, -1), down.transpose(-2, -1)
    h = F.grouped_mm(x, gate_up, offs=offsets)  # [R, 2I]
    row_index = None
    if gate_up_bias is not None or down_bias is not None:
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
        row_index = torch.repeat_interleave(group_indices, counts)  # [R]: each row's stacked index
    if gate_up_bias is not None:
        h = h + gate_up_bias[row_index]
    out = F.grouped_mm(apply_gate(h), down, offs=offsets)  # [R, D]
    return out + down_bias[row_index] if down_bias is not None else out
