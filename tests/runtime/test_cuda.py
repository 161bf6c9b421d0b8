"""The same exactness checks with the CUDA backend: copy stream, events, pinned host experts.

Skipped without an NVIDIA GPU. TF32 is off so float32 matmuls are exact enough for 1e-4; the
bfloat16 checkpoints are held to test_exactness.BF16_TOLERANCE.
"""

from __future__ import annotations

import pytest
import torch
from test_exactness import BF16_CASES, BF16_TOLERANCE, _check, _loaded
from tiny_models import FAMILIES

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize(
    "schedule, capacity, depth, batch",
    [
        ("mixed", "partial", 2, 2),
        ("accelerator", "full", 0, 1),
        ("cpu", "zero", 0, 2),
        # two slots for up to eight experts a layer: every layer evicts slots the previous one
        # still reads, so only the events keep the copies behind the kernels
        ("accelerator", "tight", 2, 2),
    ],
)
def test_cuda_matches_transformers(checkpoint, family, schedule, capacity, depth, batch):
    _check(str(checkpoint(family)), schedule, capacity, depth, batch, device="cuda")


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "gpt_oss"])
@pytest.mark.parametrize("schedule, capacity, depth, batch", BF16_CASES)
def test_cuda_bfloat16_matches_transformers(bf16_checkpoint, family, schedule, capacity, depth, batch):
    """bfloat16 on CUDA: the grouped kernels (compute capability 8.0+) against transformers' eager
    experts, within BF16_TOLERANCE of the logits and with the same greedy tokens."""
    _check(str(bf16_checkpoint(family)), schedule, capacity, depth, batch, device="cuda", tolerance=BF16_TOLERANCE)


@pytest.mark.parametrize("quantize, family, group", [("int8", "qwen3_moe", 16), ("int4", "qwen3_moe", 16),
                                                    ("int4", "gpt_oss", 32)])
@pytest.mark.parametrize("schedule, capacity, depth, batch", [("mixed", "partial", 2, 2), ("accelerator", "tight", 2, 2)])
def test_cuda_quantized_matches_transformers(checkpoint, quantize, family, group, schedule, capacity, depth, batch):
    """Packed experts copied into CUDA slots and dequantized there (the CPU worker's int4 ones run
    torch's CPU int4 matmul at group 32), against test_quantized_exactness's references."""
    pytest.importorskip("torchao", reason="torchao is the reference (pip install 'hybrimoe[test]')")
    from test_quantized_exactness import _check as check_quantized

    check_quantized(str(checkpoint(family)), quantize, schedule, capacity, depth, batch, group, device="cuda")


def test_dense_parts_on_the_gpu_and_experts_pinned_on_the_host(checkpoint):
    loaded = _loaded(str(checkpoint("deepseek_v3")), "cuda")
    experts = {id(p) for layer in loaded.layers for p in layer.experts.parameters()}
    for name, param in loaded.model.named_parameters():
        if id(param) in experts:
            assert param.device.type == "cpu" and param.is_pinned(), name  # registered in place
        else:
            assert param.device.type == "cuda", name
    assert loaded.host_experts.pinned and len(loaded.host_experts.buffers) == loaded.n_layers
