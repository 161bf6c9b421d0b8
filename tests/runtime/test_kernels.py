"""The grouped expert kernel against the per-expert loop, on the groups the executor builds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrimoe.runtime import kernels
from hybrimoe.runtime.kernels import expert_mlp, group_pairs, grouped_experts_mlp, split_indices
from hybrimoe.runtime.quantized import dense_experts, quantize_stack

N, D, I, K = 6, 16, 8, 2  # stacked experts (or slots), hidden, intermediate, top-k


def _stacked(transposed: bool, bias: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = {"gate_up_proj": (N, D, 2 * I) if transposed else (N, 2 * I, D),
              "down_proj": (N, I, D) if transposed else (N, D, I)}
    if bias:
        shapes |= {"gate_up_proj_bias": (N, 2 * I), "down_proj_bias": (N, D)}
    return {name: torch.randn(shape, generator=gen).to(dtype) for name, shape in shapes.items()}


def _routing():
    """Six tokens, top-2: experts 1, 2, 4 and 5 are used; 3 is an empty group inside the window."""
    ids = np.array([[1, 4], [2, 1], [4, 5], [1, 2], [5, 4], [2, 1]])  # [T, k]
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=N)
    stops = np.cumsum(counts)
    span = {e: (int(stops[e] - counts[e]), int(stops[e])) for e in np.flatnonzero(counts)}
    return order, span


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_kernel_matches_the_per_expert_loop(monkeypatch, transposed, bias, dtype):
    weights = _stacked(transposed, bias, dtype)
    order, span = _routing()
    slot_of = {1: 5, 2: 1, 4: 2, 5: 4}  # slots 1..5 used, slot 3 empty: one window of five groups
    groups = group_pairs(order, span, slot_of)
    assert groups.first == 1 and groups.n_groups == 5
    assert [index for index, _, _ in groups.runs] == [1, 2, 4, 5]
    x = torch.randn(len(order) // K, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    rows = x[torch.from_numpy(groups.pairs) // K]  # [R, D]
    _, index = split_indices(torch.from_numpy(groups.index_arrays()), groups)
    grouped = grouped_experts_mlp(rows, weights, groups, index, transposed=transposed)
    monkeypatch.setattr(kernels, "groups_natively", lambda weight: False)
    loop = grouped_experts_mlp(rows, weights, groups, index, transposed=transposed)
    by_expert = torch.cat([
        expert_mlp(rows[start:stop], weights["gate_up_proj"][s], weights["down_proj"][s],
                   gate_up_bias=weights["gate_up_proj_bias"][s] if bias else None,
                   down_bias=weights["down_proj_bias"][s] if bias else None, transposed=transposed)
        for s, start, stop in groups.runs
    ])
    assert torch.equal(loop, by_expert)
    # float32 without biases: the same products summed in the same order. Biases are added after
    # the matmul rather than fused into it, and bfloat16 kernels may block their sums differently.
    if dtype == torch.float32 and not bias:
        assert torch.equal(grouped, loop)
    scale = loop.abs().max().item()
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]  # of the largest output
    assert (grouped.float() - loop.float()).abs().max().item() <= tolerance * scale


@pytest.mark.parametrize("hidden, intermediate", [(65, 8), (16, 9)])  # rows of 130 or 18 bfloat16 bytes
def test_rows_that_grouped_mm_cannot_take_run_expert_by_expert(hidden, intermediate):
    """torch's grouped_mm wants rows at multiples of 16 bytes ("strides should be multiple of 16
    bytes"): other sizes run through the per-expert loop."""
    weights = {"gate_up_proj": torch.randn(N, 2 * intermediate, hidden).to(torch.bfloat16),
               "down_proj": torch.randn(N, hidden, intermediate).to(torch.bfloat16)}
    assert not (kernels.groups_natively(weights["gate_up_proj"]) and kernels.groups_natively(weights["down_proj"]))
    order, span = _routing()
    groups = group_pairs(order, span, {1: 5, 2: 1, 4: 2, 5: 4})
    rows = torch.randn(len(order), hidden).to(torch.bfloat16)  # [R, D]
    _, index = split_indices(torch.from_numpy(groups.index_arrays()), groups)
    out = grouped_experts_mlp(rows, weights, groups, index)
    by_expert = torch.cat([expert_mlp(rows[start:stop], weights["gate_up_proj"][s], weights["down_proj"][s])
                           for s, start, stop in groups.runs])
    assert torch.equal(out, by_expert)


def test_groups_follow_the_stacked_index_not_the_expert_id():
    order, span = _routing()
    groups = group_pairs(order, span, {5: 0, 1: 3})
    expert_of_pair = {int(p): e for e, (a, b) in span.items() for p in order[a:b]}
    assert [expert_of_pair[int(p)] for p in groups.pairs] == [5, 5, 1, 1, 1, 1]
    assert groups.ends.tolist() == [2, 2, 2, 6] and groups.ends.dtype == np.int32


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_stacks_run_as_their_dequantized_weights(monkeypatch, quantize, transposed, bias):
    """A packed stack gives what the dense kernel gives on its dequantized weights, grouped or not."""
    weights = _stacked(transposed, bias, torch.float32)
    packed = {name: w for name, w in weights.items() if name.endswith("_bias")}
    for name in ("gate_up_proj", "down_proj"):
        packed[f"{name}_qdata"], packed[f"{name}_scale"] = quantize_stack(weights[name], quantize, 4, transposed)
    dequantized = dict(packed)
    dequantized["gate_up_proj"], dequantized["down_proj"] = dense_experts(packed, torch.arange(N), torch.float32, transposed)
    order, span = _routing()
    groups = group_pairs(order, span, {1: 5, 2: 1, 4: 2, 5: 4})
    x = torch.randn(len(order) // K, D, generator=torch.Generator().manual_seed(1))
    rows = x[torch.from_numpy(groups.pairs) // K]
    _, index = split_indices(torch.from_numpy(groups.index_arrays()), groups)
    reference = grouped_experts_mlp(rows, dequantized, groups, index, transposed=transposed)
    scale = reference.abs().max().item()
    assert (grouped_experts_mlp(rows, packed, groups, index, transposed=transposed) - reference).abs().max() <= 1e-6 * scale
    for stacked, start, stop in groups.runs:  # one expert at a time, as `profile` times it
        one = kernels.stacked_expert_mlp(rows[start:stop], packed, stacked)
        assert (one - reference[start:stop]).abs().max() <= 1e-6 * scale
    monkeypatch.setattr(kernels, "groups_natively", lambda weight: False)
    assert (grouped_experts_mlp(rows, packed, groups, index, transposed=transposed) - reference).abs().max() <= 1e-6 * scale
