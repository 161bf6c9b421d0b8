"""Weight-only quantized routed experts: int8 and int4, group-wise, kept packed.

Shapes: E = experts in a stack, O = a projection's output size, K = its input size, g = group
size (K / g groups per row). A stacked projection [E, O, K] (or [E, K, O] when `transposed`,
GPT-OSS) becomes
    qdata [E, O, K]      int8, values in [-128, 127]           (int8)
          [E, O, K / 2]  uint8, two 4-bit values per byte,    (int4: low nibble = even k,
                         each stored as value + 8 in [0, 15])  high nibble = odd k)
    scale [E, O, K / g]  float32
and an expert's weight is qdata * scale, cast to the compute dtype.

Design choices:
- The arithmetic is torchao's weight-only affine quantization (`choose_qparams_affine` /
  `quantize_affine` / `dequantize_affine`, SYMMETRIC mapping, as `Int8WeightOnlyConfig` with
  `PerGroup(g)` does: the group's largest magnitude over half the integer range, computed in the
  weight's dtype, float32 scales and epsilon, round half to even, zero point 0), re-stated here
  in a few torch ops so the runtime needs no torchao; the tests check it against torchao itself.
  int4 is the same with the range [-8, 7] (torchao's `IntxWeightOnlyConfig` arithmetic with
  float32 scales).
- Kernels are torch's own, as torchao's CPU path for group-wise weight-only tensors runs them:
  the experts a kernel call runs are dequantized to the compute dtype, then the usual grouped
  matmuls run (`kernels.py`). Only those experts are dequantized, never a whole stack.
- A quantized stack is plain named tensors (`gate_up_proj_qdata`, `gate_up_proj_scale`, ...), so
  the host store pools them, slots hold them and a load copies them as it copies any weight: an
  expert's bytes are its packed bytes everywhere. The format is read back from the tensors
  themselves (int8 or packed uint8; K / g from the scale's last dimension).
- Biases stay in the compute dtype; the dense part stays in the checkpoint's dtype
  (`quantize_dense` quantizes its linear layers with torchao, an optional dependency).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hybrimoe.errors import UserError

PROJECTIONS = ("gate_up_proj", "down_proj")
_RANGES = {"int8": (-128, 127), "int4": (-8, 7)}
_EPS = torch.finfo(torch.float32).eps  # torchao's choice for every weight dtype


def quantize_stack(weight: torch.Tensor, quantize: str, group_size: int, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, O, K] ([E, K, O] if transposed) -> (qdata, scale) as in the module docstring."""
    w = weight.transpose(-2, -1) if transposed else weight  # [E, O, K]
    n, o, k = w.shape
    groups = w.reshape(n, o, k // group_size, group_size)  # [E, O, K/g, g]
    q_min, q_max = _RANGES[quantize]
    magnitude = groups.abs().amax(dim=-1)  # [E, O, K/g], in the weight's dtype
    scale = (magnitude / ((q_max - q_min) / 2)).clamp(min=_EPS).float()
    q = torch.clamp(torch.round(groups * (1.0 / scale[..., None])), q_min, q_max).to(torch.int8)
    q = q.reshape(n, o, k)
    if quantize == "int4":
        nibbles = (q + 8).to(torch.uint8)  # [E, O, K] in [0, 15]
        q = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)  # [E, O, K/2]
    return q.contiguous(), scale.contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] uint8 -> [..., K] int8 in [-8, 7]."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)


def dequantize(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, transposed: bool) -> torch.Tensor:
    """(qdata, scale) of N experts -> their weights [N, O, K] ([N, K, O] view if transposed)."""
    values = unpack_int4(qdata) if qdata.dtype == torch.uint8 else qdata  # [N, O, K] int8
    n, o, k = values.shape
    groups = values.reshape(n, o, scale.shape[-1], -1).to(dtype)  # [N, O, K/g, g]
    weight = (groups * scale[..., None]).to(dtype).reshape(n, o, k)
    return weight.transpose(-2, -1) if transposed else weight


def is_quantized(weights: dict[str, torch.Tensor]) -> bool:
    return "gate_up_proj_qdata" in weights


def dense_experts(
    weights: dict[str, torch.Tensor], indices: torch.Tensor | slice, dtype: torch.dtype, transposed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate_up and down weights of the experts at `indices` ([N] on the stacks' device, or a
    slice) of a quantized stack, dequantized: [N, 2I, D] and [N, D, I] (or their transposed layout)."""
    return tuple(
        dequantize(weights[f"{name}_qdata"][indices], weights[f"{name}_scale"][indices], dtype, transposed)
        for name in PROJECTIONS
    )


def quantize_experts(experts: nn.Module, quantize: str, group_size: int) -> None:
    """Replaces an experts module's stacked projections by their packed stacks, in place; the
    projections' own attributes stay, set to None (their memory is freed)."""
    transposed = bool(experts.is_transposed)
    for name in PROJECTIONS:
        qdata, scale = quantize_stack(getattr(experts, name).data, quantize, group_size, transposed)
        experts.register_parameter(name, None)
        experts.register_parameter(f"{name}_qdata", nn.Parameter(qdata, requires_grad=False))
        experts.register_parameter(f"{name}_scale", nn.Parameter(scale, requires_grad=False))


def quantize_dense_layers(model: nn.Module, skip: Sequence[nn.Module], quantize: str, group_size: int) -> int:
    """Quantizes the dense part's linear layers (not the routers in `skip`) with torchao's
    weight-only configs, the same arithmetic as the experts'; returns how many were quantized."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup, quantize_
    except ImportError:
        raise UserError("--quantize-dense needs torchao: pip install 'hybrimoe[quantize]'") from None
    skipped = {id(module) for module in skip}
    chosen = [
        module for module in model.modules()
        if isinstance(module, nn.Linear) and id(module) not in skipped and module.in_features % group_size == 0
    ]
    chosen_ids = {id(module) for module in chosen}
    if quantize == "int8":
        config = Int8WeightOnlyConfig(granularity=PerGroup(group_size))
    else:
        config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    quantize_(model, config, filter_fn=lambda module, _: id(module) in chosen_ids)
    return len(chosen)
