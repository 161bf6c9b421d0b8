"""Packing round trips, and the arithmetic against torchao's own weight-only quantization."""

from __future__ import annotations

import pytest
import torch

from hybrimoe.config import ExpertShape
from hybrimoe.errors import UserError
from hybrimoe.runtime.quantized import (
    dequantize, pack_int4, packed_linear, quantize_stack, runs_packed_kernel, unpack_int4,
)

E, O, K, G = 3, 16, 64, 16  # experts, output rows (int4: a multiple of 16), input size, group size


def _weights(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(E, O, K, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)


@pytest.mark.parametrize("o, k", [(16, 32), (32, 64), (96, 32), (128, 256), (192, 64)])
def test_int4_is_torchs_cpu_layout_and_unpacks_exactly(o, k):
    values = torch.randint(-8, 8, (2, o, k), dtype=torch.int8, generator=torch.Generator().manual_seed(o))
    packed = pack_int4(values)
    assert packed.shape == (2, o, k // 2) and packed.dtype == torch.uint8
    for e in range(2):
        assert torch.equal(packed[e], torch._convert_weight_to_int4pack_for_cpu((values[e] + 8).to(torch.int32), 1))
    assert torch.equal(unpack_int4(packed), values)


@pytest.mark.parametrize("quantize, group", [("int4", 32), ("int8", 16), ("int8", 64)])
def test_packed_kernels_match_the_dequantized_weights(quantize, group):
    w = _weights(torch.float32)  # [E, 16, 64]
    qdata, scale = quantize_stack(w, quantize, group, transposed=False)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    for e in range(E):
        expected = x @ dequantize(qdata[e : e + 1], scale[e : e + 1], torch.float32, False)[0].t()
        assert (packed_linear(x, qdata[e], scale[e]) - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group, packed", [(16, True), (32, True), (8, False), (40, False)])
def test_int8_groups_of_part_vectors_stay_off_torchs_kernel(dtype, group, packed):
    """torch's CPU int8 matmul reads 16-wide vectors: with bfloat16 on an AVX-512 CPU a group of 40
    gave numbers of 1e16 or a crash; such groups take the dequantizing path."""
    qdata, scale = quantize_stack(torch.randn(2, 16, 160).to(dtype), "int8", group, transposed=False)
    weights = {"gate_up_proj_qdata": qdata, "gate_up_proj_scale": scale}
    assert runs_packed_kernel(weights, torch.zeros(1, 160, dtype=dtype)) == packed


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("transposed", [False, True])
def test_quantize_round_trip(quantize, transposed):
    w = _weights()
    stored = w.transpose(-2, -1).contiguous() if transposed else w
    qdata, scale = quantize_stack(stored, quantize, G, transposed)
    assert qdata.dtype == (torch.int8 if quantize == "int8" else torch.uint8)
    assert qdata.shape == ((E, K // G, O, G) if quantize == "int8" else (E, O, K // 2)) and scale.shape == (E, O, K // G)
    assert scale.dtype == torch.float32  # the weights' dtype for int4, float32 for int8 whatever it is
    back = dequantize(qdata, scale, torch.float32, transposed)
    assert back.shape == stored.shape
    # each weight is within half a step of its group's scale (the largest magnitude maps to the
    # range's half-width, 127.5 or 7.5 steps, and is clamped by half a step)
    step = scale.repeat_interleave(G, dim=-1)  # [E, O, K]
    error = (back.transpose(-2, -1) if transposed else back) - w
    assert (error.abs() <= step / 2 + 1e-7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_the_arithmetic_is_torchaos(dtype, quantize):
    pytest.importorskip("torchao", reason="torchao is the reference (pip install 'hybrimoe[test]')")
    from torchao.quantization.quant_primitives import (
        MappingType, choose_qparams_affine, dequantize_affine, quantize_affine,
    )

    w = _weights(dtype)
    q_min, q_max = {"int8": (-128, 127), "int4": (-8, 7)}[quantize]
    block = (1, 1, G)
    # int8 as Int8WeightOnlyConfig chooses them, int4 as IntxWeightOnlyConfig does (its defaults)
    extra = dict(eps=torch.finfo(torch.float32).eps, scale_dtype=torch.float32) if quantize == "int8" else {}
    scale, zero = choose_qparams_affine(
        w, MappingType.SYMMETRIC, block, torch.int8, q_min, q_max, zero_point_dtype=torch.int8, keepdim=True, **extra
    )
    q = quantize_affine(w, block, scale, zero, torch.int8, q_min, q_max)
    expected = dequantize_affine(q, block, scale, zero, torch.int8, q_min, q_max, output_dtype=dtype)
    qdata, mine = quantize_stack(w, quantize, G, transposed=False)
    assert torch.equal(mine, scale)
    values = unpack_int4(qdata) if quantize == "int4" else qdata.transpose(1, 2).reshape(q.shape)
    assert torch.equal(values, q)
    assert torch.equal(dequantize(qdata, mine, dtype, transposed=False), expected)


def test_group_sizes_that_do_not_split_the_rows_are_refused():
    shape = ExpertShape(hidden_size=96, intermediate_size=64)
    assert shape.quantized("int4", 32).group_size == 32
    with pytest.raises(UserError, match="does not divide"):
        shape.quantized("int4", 128)
    with pytest.raises(UserError, match="group size 3 is not an even number"):
        shape.quantized("int8", 3)
    with pytest.raises(UserError, match="unknown quantization"):
        shape.quantized("int3", 32)
    with pytest.raises(UserError, match="cannot be quantized"):
        ExpertShape(hidden_size=96, intermediate_size=64, dtype="int8").quantized("int4", 32)


def test_packed_bytes():
    shape = ExpertShape(hidden_size=2048, intermediate_size=768, dtype="bfloat16")
    n = 3 * 2048 * 768
    assert shape.expert_bytes == 2 * n
    assert shape.quantized("int8").expert_bytes == n + n // 128 * 4
    assert shape.quantized("int4", 64).expert_bytes == n // 2 + n // 64 * 2  # bfloat16 scales
    assert shape.quantized("int4").describe() == "3 x 2048 x 768 bfloat16 as int4 g128"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_an_expert_shapes_bytes_are_its_packed_tensors(dtype, quantize):
    """What capacity, copies and the simulator count is what the packed tensors really take."""
    d, i, group = 64, 32, 16
    shape = ExpertShape(hidden_size=d, intermediate_size=i, dtype=str(dtype).removeprefix("torch.")).quantized(quantize, group)
    tensors = [*quantize_stack(torch.zeros(1, 2 * i, d, dtype=dtype), quantize, group, transposed=False),
               *quantize_stack(torch.zeros(1, d, i, dtype=dtype), quantize, group, transposed=False)]
    assert shape.expert_bytes == sum(t.nbytes for t in tensors)
