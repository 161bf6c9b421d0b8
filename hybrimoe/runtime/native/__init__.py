"""hybrimoe's native CPU kernels (`kernels.h`, compiled per instruction set by `avx512.c` and
`avx2.c`), through ctypes, and when they run.

Shapes: T = tokens of the step, R = rows (token-expert pairs, group after group), G = groups,
D = hidden size, I = expert intermediate size, N = experts in a stacked weight.

Design choices:
- Decode is a matrix-vector product per expert and per linear layer, where what counts is reading
  each weight once at the memory's bandwidth: torch's CPU matmuls read bfloat16 weights at about
  half of it for one token (README, "CPU kernels"). `hm_experts` runs a layer's CPU experts in one
  call, its threads splitting the layer's weight rows; `hm_linear` serves the dense part's linear
  layers on the CPU (installed per model by `NativeLinears`, removed with the runtime).
- They run only where they round as torch does and are faster: float32 or bfloat16 activations
  with experts dense in transformers' layout or quantized (`quantized.py`'s int8 and int4, the
  latter where torch's layout is the blocks the kernels read, 64 or 32 rows by CPU, checked
  against torch's converter once per shape; on AVX-512 for bfloat16 only), group sizes of 32 or
  more, the standard SiLU gate, no expert biases; few enough tokens per expert or call (`_MAX_TOKENS`, measured per
  instruction set: beyond it torch's blocked matmuls win), and a CPU with AVX-512 or AVX2 (the
  best it has, per dtype).
  Everything else, and any install where the extension could not be compiled, keeps torch's
  kernels (`kernels.py`, `F.linear`); `HYBRIMOE_NATIVE=0` forces that path, `=avx2` the AVX2
  kernels on an AVX-512 CPU.
- ctypes releases the GIL for the call, so the CPU worker's experts overlap the main thread.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import NamedTuple

import numpy as np
import torch

from hybrimoe.runtime.quantized import PROJECTIONS, _int4_order

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_DENSE, _INT8, _INT4 = 0, 1, 2  # kernels.h's formats
MIN_GROUP_SIZE = 32  # a row block's scales sit on its thread's stack: K / g x 64 floats
_DENSE_NAMES = frozenset(PROJECTIONS)
_PACKED_NAMES = frozenset(f"{name}_{part}" for name in PROJECTIONS for part in ("qdata", "scale"))
_ISAS = ("avx512", "avx2")  # best first; module.c's codes are their indices
# Tokens per expert (or per linear call) up to which the native kernels beat torch's, measured
# with benchmarks/bench_cpu_kernels.py --tokens (README, "CPU kernels"); None: at every count
# measured. AVX-512 (Sapphire Rapids): torch's blocked float32/bfloat16 matmuls win beyond 4
# tokens; its int8/int4 ones lose up to 16, the most measured. AVX2 (AMD Zen 3): torch's bfloat16
# matmul costs each token what it costs at one (the native kernel is 3.4-3.6x faster at 1 to 64
# tokens, linear layers included), and int4 with float32 activations has no torch kernel (it is
# dequantized: 22-36x slower at 1-8 tokens); its float32 matmul wins beyond 8, int8 and
# int4 (bfloat16) beyond 4.
_MAX_TOKENS = {
    ("avx512", _DENSE, torch.float32): 4, ("avx512", _DENSE, torch.bfloat16): 4,
    ("avx512", _INT8, torch.float32): 16, ("avx512", _INT8, torch.bfloat16): 16, ("avx512", _INT4, torch.bfloat16): 16,
    ("avx2", _DENSE, torch.float32): 8, ("avx2", _DENSE, torch.bfloat16): None,
    ("avx2", _INT8, torch.float32): 4, ("avx2", _INT8, torch.bfloat16): 4,
    ("avx2", _INT4, torch.float32): None, ("avx2", _INT4, torch.bfloat16): 4,
}
_INT4_BLOCK_ROWS = {"avx512": 64, "avx2": 32}  # INT4_BLOCK of avx512.c and avx2.c: torch's layout on such CPUs
_P = ctypes.c_void_p


class _Kernels(NamedTuple):
    """One instruction set's entry points in the extension."""

    isa: str
    experts: ctypes._CFuncPtr
    linear: ctypes._CFuncPtr


def _bind(lib: ctypes.CDLL, isa: str) -> _Kernels:
    experts, linear = getattr(lib, f"hm_experts_{isa}"), getattr(lib, f"hm_linear_{isa}")
    experts.restype = linear.restype = ctypes.c_int
    experts.argtypes = [
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64,  # dtype, format, scale dtype, group size
        _P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # x, T, D, I
        _P, _P, ctypes.c_int,  # tokens, row weights, round product
        _P, _P, ctypes.c_int64,  # experts, ends, G
        _P, _P, _P, _P, _P, ctypes.c_int,  # gate_up, its scales, down, its scales, out, threads
    ]
    linear.argtypes = [
        ctypes.c_int, _P, ctypes.c_int64, ctypes.c_int64, _P, ctypes.c_int64, _P, _P, ctypes.c_int,
    ]  # dtype, x, T, K, weight, O, bias, out, threads
    return _Kernels(isa, experts, linear)


@functools.cache
def _library() -> dict[torch.dtype, _Kernels]:
    """For each dtype, the kernels of the best instruction set this CPU runs them with (asked once);
    empty when the extension is absent or disabled. HYBRIMOE_NATIVE=0 disables it; =avx2 (or
    =avx512) allows only that instruction set."""
    choice = os.environ.get("HYBRIMOE_NATIVE", "1").strip().lower()
    if choice not in ("0", "1", *_ISAS):
        from hybrimoe.errors import UserError

        raise UserError(f"HYBRIMOE_NATIVE must be 0, 1, {' or '.join(_ISAS)}, got {os.environ['HYBRIMOE_NATIVE']!r}")
    if choice == "0":
        return {}
    try:
        from hybrimoe.runtime.native import _kernels
    except ImportError:
        return {}
    lib = ctypes.CDLL(_kernels.__file__)
    lib.hm_supports.argtypes, lib.hm_supports.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    allowed = _ISAS if choice == "1" else tuple(isa for isa in _ISAS if isa == choice)
    chosen = {}
    for dtype, code in _DTYPES.items():
        isa = next((isa for isa in allowed if lib.hm_supports(_ISAS.index(isa), code)), None)
        if isa is not None:
            chosen[dtype] = _bind(lib, isa)
    return chosen


def check_setting() -> None:
    """Refuses a HYBRIMOE_NATIVE value it does not know (one line), before any model is loaded."""
    _library()


def available(dtype: torch.dtype) -> bool:
    """Whether this install and CPU run the native kernels for weights of `dtype`."""
    return dtype in _library()


def max_tokens(fmt: int, dtype: torch.dtype) -> int | None:
    """Tokens per expert or linear call up to which the native kernel serves `dtype` activations
    with weights in `fmt` here (None: any number); 0 where it does not run at all."""
    isa = instruction_set(dtype)
    return 0 if isa is None else _MAX_TOKENS.get((isa, fmt, dtype), 0)


def _within(n_tokens: int, limit: int | None) -> bool:
    return limit is None or n_tokens <= limit


def instruction_set(dtype: torch.dtype) -> str | None:
    """The instruction set the native kernels for `dtype` use here ("avx512", "avx2"), or None."""
    kernels = _library().get(dtype)
    return kernels.isa if kernels else None


def _format(weights: dict[str, torch.Tensor]) -> int | None:
    """kernels.h's format of these stacked weights, or None where it has none."""
    names = set(weights)
    if names == _DENSE_NAMES:
        return _DENSE
    if names != _PACKED_NAMES:
        return None
    qdata = weights["gate_up_proj_qdata"]
    return _INT8 if qdata.dtype == torch.int8 else _INT4 if qdata.dtype == torch.uint8 else None


@functools.cache
def _int4_blocks(o: int, k: int, rows: int) -> bool:
    """Whether torch's CPU int4 layout of an [O, K] weight (which depends on the CPU it runs on) is
    the one kernels.h reads with blocks of `rows` rows: [K, rows / 2] bytes each, row d of a block
    in the low nibbles of byte d of each column and row d + rows / 2 in the high ones."""
    half = rows // 2
    if o % rows or k % 2:
        return False
    block, d, column = np.meshgrid(np.arange(o // rows), np.arange(rows), np.arange(k), indexing="ij")
    byte = block * k * half + column * half + d % half
    expected = np.empty(o * k, dtype=np.int64)  # [O * K]: the flat index each nibble holds
    expected[(2 * byte + d // half).reshape(-1)] = ((block * rows + d) * k + column).reshape(-1)
    return bool(np.array_equal(_int4_order(o, k).numpy(), expected))


def _in_features(weights: dict[str, torch.Tensor], name: str) -> int:
    """K of a projection, dense [N, O, K] or packed."""
    if name in weights:
        return weights[name].shape[-1]
    qdata = weights[f"{name}_qdata"]
    return 2 * qdata.shape[-1] if qdata.dtype == torch.uint8 else qdata.shape[1] * qdata.shape[3]


def _group_size(weights: dict[str, torch.Tensor], name: str) -> int:
    """K over the scales per row of a packed projection."""
    return _in_features(weights, name) // weights[f"{name}_scale"].shape[-1]


def _packed_runs(weights: dict[str, torch.Tensor], fmt: int, dtype: torch.dtype) -> bool:
    """Whether the kernels read these packed stacks as they are: one group size of 32 or more for
    both projections; int4 with scales in the activations' dtype, in torch's layout in the blocks
    the instruction set's kernel reads (which activations it serves is `_MAX_TOKENS`' business)."""
    sizes = {_group_size(weights, name) for name in PROJECTIONS}
    if len(sizes) != 1 or sizes.pop() < MIN_GROUP_SIZE:
        return False
    if fmt == _INT8:
        return True
    isa = instruction_set(dtype)
    return isa is not None and all(
        weights[f"{name}_scale"].dtype == dtype
        and _int4_blocks(weights[f"{name}_qdata"].shape[1], _in_features(weights, name), _INT4_BLOCK_ROWS[isa])
        for name in PROJECTIONS
    )


def runs(weights: dict[str, torch.Tensor], x: torch.Tensor, max_rows_per_group: int, standard_gate: bool) -> bool:
    """Whether `add_experts` serves these stacked weights (dense or packed) and rows."""
    fmt = _format(weights)
    if fmt is None or not standard_gate or not _within(max_rows_per_group, max_tokens(fmt, x.dtype)):
        return False
    if x.device.type != "cpu":
        return False
    if not all(w.device.type == "cpu" and w.is_contiguous() for w in weights.values()) or not available(x.dtype):
        return False
    if fmt == _DENSE:
        return x.dtype == weights["gate_up_proj"].dtype
    return _packed_runs(weights, fmt, x.dtype)


def add_experts(
    out: torch.Tensor,  # [T, D] float32, added to
    x: torch.Tensor,  # [T, D]
    tokens: np.ndarray,  # [R] int64: each row's token
    row_weights: torch.Tensor,  # [R]: each row's routing weight
    experts: np.ndarray,  # [G] int64: each group's index in the stacks
    ends: np.ndarray,  # [G] int64: each group's end row
    weights: dict[str, torch.Tensor],  # gate_up_proj [N, 2I, D], down_proj [N, D, I], or their packed stacks
) -> None:
    """out[token] += weight * expert(x[token]) for every row, as torch's kernels round it."""
    fmt = _format(weights)
    x = x.contiguous()
    row_weights_f32 = row_weights.float().contiguous()
    tokens, experts, ends = (np.ascontiguousarray(a, dtype=np.int64) for a in (tokens, experts, ends))
    if fmt == _DENSE:
        gate_up, down = weights["gate_up_proj"], weights["down_proj"]
        gate_up_scale = down_scale = None
        scale_dtype, group_size = 0, 1
    else:
        gate_up, down = weights["gate_up_proj_qdata"], weights["down_proj_qdata"]
        gate_up_scale, down_scale = weights["gate_up_proj_scale"], weights["down_proj_scale"]
        scale_dtype, group_size = _DTYPES[gate_up_scale.dtype], _group_size(weights, "gate_up_proj")
    status = _library()[x.dtype].experts(
        _DTYPES[x.dtype], fmt, scale_dtype, group_size,
        x.data_ptr(), x.shape[0], x.shape[-1], _in_features(weights, "down_proj"),
        tokens.ctypes.data, row_weights_f32.data_ptr(), int(row_weights.dtype == torch.bfloat16),
        experts.ctypes.data, ends.ctypes.data, len(experts),
        gate_up.data_ptr(), None if gate_up_scale is None else gate_up_scale.data_ptr(),
        down.data_ptr(), None if down_scale is None else down_scale.data_ptr(),
        out.data_ptr(), torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("the native expert kernel could not allocate its scratch rows")


def standard_gate(experts: torch.nn.Module) -> bool:
    """Whether a transformers experts module gates as `experts.c` does: silu(gate) * up, the halves
    of gate_up in that order (transformers' default `_apply_gate` with a SiLU activation)."""
    from transformers.integrations.moe import _default_apply_gate

    act = getattr(experts, "act_fn", None)
    return (
        getattr(type(experts), "_apply_gate", None) is _default_apply_gate
        and type(act).__name__ in ("SiLUActivation", "SiLU")
        and not getattr(experts, "is_transposed", False)
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear for a few rows of x [..., K] with weight [O, K] (bias [O]) of x's dtype, on the CPU."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [T, K]
    out = torch.empty((x2.shape[0], weight.shape[0]), dtype=x.dtype)
    status = _library()[weight.dtype].linear(
        _DTYPES[weight.dtype], x2.data_ptr(), x2.shape[0], x2.shape[1], weight.data_ptr(), weight.shape[0],
        None if bias is None else bias.data_ptr(), out.data_ptr(), torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("the native linear kernel could not allocate its scratch rows")
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _native_linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, bias = module.weight, module.bias
    if (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == weight.dtype
        and _within(x.numel() // x.shape[-1], max_tokens(_DENSE, x.dtype))
        and weight.is_contiguous()
        and (bias is None or bias.dtype == weight.dtype)
        and not torch.is_grad_enabled()
    ):
        return linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


class NativeLinears:
    """The native kernel for a model's CPU-resident linear layers (plain `nn.Linear` with float32
    or bfloat16 weights; quantized ones keep their own), until `remove()`."""

    def __init__(self, model: torch.nn.Module):
        self._modules = []
        if not (available(torch.float32) or available(torch.bfloat16)):
            return
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if (
                type(module) is torch.nn.Linear
                and type(weight.data) is torch.Tensor
                and weight.device.type == "cpu"
                and available(weight.dtype)
            ):
                module.forward = functools.partial(_native_linear_forward, module)
                self._modules.append(module)

    def remove(self) -> None:
        for module in self._modules:
            del module.forward
        self._modules = []
