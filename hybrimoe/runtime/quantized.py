"""Weight-only quantized routed experts: int8 and int4, group-wise, kept packed.

Shapes: E = experts in a stack, O = a projection's output size, K = its input size, g = group
size (K / g groups per row). A stacked projection [E, O, K] (or [E, K, O] when `transposed`,
GPT-OSS) becomes
    int8: qdata [E, K / g, O, g]  int8, values in [-128, 127], group after group (each group's
                                  [O, g] block contiguous, as torch's int8 matmul reads it);
                                  scale [E, O, K / g] float32
    int4: qdata [E, O, K / 2]  uint8, two 4-bit values (value + 8) per byte, in the layout torch's
                               CPU int4 kernel reads (`_convert_weight_to_int4pack_for_cpu`:
                               blocks of rows interleaved, not row after row);
                               scale [E, O, K / g] in the weights' dtype
and an expert's weight is qdata * scale, cast to the compute dtype.

Design choices:
- The arithmetic is torchao's weight-only affine quantization (`choose_qparams_affine` /
  `quantize_affine` / `dequantize_affine`, SYMMETRIC mapping: the group's largest magnitude over
  half the integer range, computed in the weights' dtype, round half to even, zero point 0):
  int8 as its `Int8WeightOnlyConfig(granularity=PerGroup(g))` (float32 scales, float32 epsilon),
  int4 as its `IntxWeightOnlyConfig(torch.int4, PerGroup(g))` (scales in the weights' dtype).
  It is re-stated here in a few torch ops, so the runtime needs no torchao; the tests check it
  against torchao itself.
- On the CPU, decode-sized groups run the native kernels (`native/`) on these stacks as they are;
  larger groups run torch's own: int4 (group sizes 32-256) its packed int4 matmul
  (`_weight_int4pack_mm_for_cpu`), so the host store keeps its layout (which depends on the CPU:
  blocks of 64 rows on AVX-512, 32 on AVX2); int8 its int8 matmul (`_weight_int8pack_mm`, one
  scale per output row) once per group, the groups' products summed in float32, so the host store
  keeps each group's block contiguous. Elsewhere (CUDA, int4 at other group sizes) the experts a
  kernel call runs are dequantized to the compute dtype, as torchao's group-wise weight-only
  tensors do, and the usual grouped matmuls run (`kernels.py`); only those experts are
  dequantized, never a whole stack. Dequantizing costs a CPU several times the matmul itself,
  which is why the CPU has the packed kernels.
- The int4 layout is not re-derived by hand: the order of its 4-bit values is read off torch's own
  converter once per shape (`_int4_order`), and packing and unpacking are one gather each.
- A quantized stack is plain named tensors (`gate_up_proj_qdata`, `gate_up_proj_scale`, ...), so
  the host store pools them, slots hold them and a load copies them as it copies any weight: an
  expert's bytes are its packed bytes everywhere. The format is read back from the tensors
  themselves (int8, or packed uint8; K / g from the scale's last dimension).
- Biases stay in the compute dtype; the dense part stays in the checkpoint's dtype
  (`quantize_dense_layers` quantizes its linear layers with torchao, an optional dependency).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from hybrimoe.errors import UserError

PROJECTIONS = ("gate_up_proj", "down_proj")
INT4_KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 matmul takes
# torch's CPU int8 matmul reads a row in vectors of 16: on AVX-512 CPUs with bfloat16 activations a
# shorter tail reads past the row (wrong numbers, or a crash), so it gets only groups of whole vectors
INT8_KERNEL_GROUP_MULTIPLE = 16
_RANGES = {"int8": (-128, 127), "int4": (-8, 7)}


@functools.cache
def _int4_order(o: int, k: int) -> torch.Tensor:
    """[O * K] int64: for each 4-bit position of torch's CPU int4 layout of an [O, K] weight (low
    nibble first), the flat index o * K + k of the value it holds; read off the converter by
    packing the indices themselves, four bits at a time."""
    index = torch.arange(o * k, dtype=torch.int64)
    order = torch.zeros(o * k, dtype=torch.int64)
    for shift in range(0, max(4, (o * k - 1).bit_length()), 4):
        digits = ((index >> shift) & 0xF).to(torch.int32).reshape(o, k)
        packed = torch._convert_weight_to_int4pack_for_cpu(digits, 1)  # [O, K/2] uint8
        nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(-1).to(torch.int64)
        order |= nibbles << shift
    return order


@functools.cache
def _int4_positions(o: int, k: int, device: torch.device) -> torch.Tensor:
    """[O * K]: where the value of flat index o * K + k sits in the layout (the inverse order)."""
    return torch.argsort(_int4_order(o, k)).to(device)


def quantize_stack(weight: torch.Tensor, quantize: str, group_size: int, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, O, K] ([E, K, O] if transposed) -> (qdata, scale) as in the module docstring."""
    w = weight.transpose(-2, -1) if transposed else weight  # [E, O, K]
    n, o, k = w.shape
    groups = w.reshape(n, o, k // group_size, group_size)  # [E, O, K/g, g]
    q_min, q_max = _RANGES[quantize]
    magnitude = groups.abs().amax(dim=-1)  # [E, O, K/g], in the weight's dtype
    # torchao's smallest scale: float32's epsilon for int8 (Int8WeightOnlyConfig), the dtype's
    # smallest normal number for int4 (IntxWeightOnlyConfig's default)
    smallest = torch.finfo(torch.float32).eps if quantize == "int8" else torch.finfo(w.dtype).tiny
    scale = (magnitude / ((q_max - q_min) / 2)).clamp(min=smallest)
    if quantize == "int8":
        scale = scale.float()
    q = torch.clamp(torch.round(groups * (1.0 / scale[..., None])), q_min, q_max).to(torch.int8)  # [E, O, K/g, g]
    q = pack_int4(q.reshape(n, o, k)) if quantize == "int4" else q.transpose(1, 2)  # int8: [E, K/g, O, g]
    return q.contiguous(), scale.contiguous()


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """[N, O, K] int8 in [-8, 7] -> [N, O, K/2] uint8 in torch's CPU int4 layout."""
    n, o, k = values.shape
    nibbles = (values + 8).to(torch.uint8).reshape(n, o * k)[:, _int4_order(o, k)]  # [N, O*K] in layout order
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).reshape(n, o, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, O, K/2] uint8 in torch's CPU int4 layout -> [N, O, K] int8 in [-8, 7]."""
    n, o, half = packed.shape
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(n, o * 2 * half)
    values = nibbles[:, _int4_positions(o, 2 * half, packed.device)]
    return (values.to(torch.int8) - 8).reshape(n, o, 2 * half)


def _values(qdata: torch.Tensor) -> torch.Tensor:
    """The int8 values of N experts' packed weights, [N, O, K]."""
    if qdata.dtype == torch.uint8:
        return unpack_int4(qdata)
    n, n_groups, o, group_size = qdata.shape
    return qdata.transpose(1, 2).reshape(n, o, n_groups * group_size)


def dequantize(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, transposed: bool) -> torch.Tensor:
    """(qdata, scale) of N experts -> their weights [N, O, K] ([N, K, O] view if transposed)."""
    values = _values(qdata)  # [N, O, K] int8
    n, o, k = values.shape
    groups = values.reshape(n, o, scale.shape[-1], -1).to(dtype)  # [N, O, K/g, g]
    weight = (groups * scale[..., None]).to(dtype).reshape(n, o, k)
    return weight.transpose(-2, -1) if transposed else weight


def _int4_group_size(qdata: torch.Tensor, scale: torch.Tensor) -> int:
    """Weights per scale of a packed int4 weight: K (two per byte) over the scales per row."""
    return 2 * qdata.shape[-1] // scale.shape[-1]


def runs_packed_kernel(weights: dict[str, torch.Tensor], x: torch.Tensor) -> bool:
    """Whether torch's packed matmuls run these (quantized) experts on x: on the CPU, int8 with
    groups of whole vectors; int4 with scales in x's dtype and a group size the kernel takes."""
    qdata, scale = weights["gate_up_proj_qdata"], weights["gate_up_proj_scale"]
    if x.device.type != "cpu" or qdata.device.type != "cpu":
        return False
    if qdata.dtype == torch.int8:  # [K/g, O, g]
        return qdata.shape[-1] % INT8_KERNEL_GROUP_MULTIPLE == 0
    return scale.dtype == x.dtype and _int4_group_size(qdata, scale) in INT4_KERNEL_GROUP_SIZES


def packed_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T, K] times one expert's packed weight transposed, with torch's CPU kernels: [T, O].
    int4: qdata [O, K/2]; int8: qdata [K/g, O, g]; scale [O, K/g]."""
    x = x.contiguous()
    if qdata.dtype == torch.uint8:
        scales_and_zeros = torch.stack((scale.t(), torch.zeros_like(scale.t())), dim=-1)  # [K/g, O, 2]
        return torch._weight_int4pack_mm_for_cpu(x, qdata, _int4_group_size(qdata, scale), scales_and_zeros)
    n_groups, _, group_size = qdata.shape
    x_groups = x.view(x.shape[0], n_groups, group_size)  # [T, K/g, g]
    scales = scale.t().to(x.dtype).contiguous()  # [K/g, O]: the kernel scales each output row
    out = torch._weight_int8pack_mm(x_groups[:, 0].contiguous(), qdata[0], scales[0]).float()  # [T, O]
    for group in range(1, n_groups):
        out += torch._weight_int8pack_mm(x_groups[:, group].contiguous(), qdata[group], scales[group])
    return out.to(x.dtype)


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
