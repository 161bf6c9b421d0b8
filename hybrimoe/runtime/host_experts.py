"""Routed experts in host memory: one buffer per MoE layer, every expert weight a view into it.

Shapes: E = routed experts per layer; each weight keeps transformers' stacked layout [E, ...].

Design choices:
- Each layer's stacked expert weights (gate_up, down, and their biases when present) are copied
  into one contiguous byte buffer of exactly their size (each weight starting on a 64-byte
  boundary), and the module's parameters become views of it; the old tensors are freed layer by
  layer, so at most one layer's experts exist twice while pooling.
- On CUDA each buffer is page-locked in place with `cudaHostRegister`, so copies from it are
  asynchronous and pinned memory is the weights' size. Pinning each tensor with `pin_memory()`
  would go through PyTorch's pinned allocator, which rounds every block up to a power of two
  (Qwen3-30B-A3B's 54 GiB of experts would take about 72 GiB pinned).
- A failed registration (a memlock limit, a driver that refuses) leaves the buffer pageable:
  copies stay correct but synchronous; the run summary says so.
- The same pooling runs on the CPU stand-in (nothing to register there), so the code path that
  builds the views is the one the tests exercise.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

_ALIGN_BYTES = 64


@dataclass
class HostExperts:
    """The pooled buffers of every MoE layer, and whether they are page-locked."""

    buffers: list[torch.Tensor] = field(default_factory=list)  # one uint8 buffer per MoE layer
    pinned: bool = False
    pin_error: str | None = None  # why registration failed, when it did

    @property
    def n_bytes(self) -> int:
        return sum(buffer.numel() for buffer in self.buffers)

    def add(self, buffer: torch.Tensor) -> None:
        """Keeps a layer's buffer, page-locking it while pinning works (CUDA)."""
        self.buffers.append(buffer)
        if self.pinned:
            self.pin_error = _register(buffer)
            self.pinned = self.pin_error is None

    def describe(self) -> str:
        size = f"{self.n_bytes / 2**30:.2f} GiB in {len(self.buffers)} buffers"
        if self.pinned:
            return f"{size}, pinned"
        return f"{size}, pageable ({self.pin_error})" if self.pin_error else f"{size}, pageable"


def _aligned(n_bytes: int) -> int:
    return -(-n_bytes // _ALIGN_BYTES) * _ALIGN_BYTES


def pool_layer(experts: nn.Module) -> torch.Tensor:
    """Moves one experts module's parameters into one new buffer; returns the buffer."""
    params = list(experts.named_parameters(recurse=False))
    offsets, total = [], 0
    for _, param in params:
        offsets.append(total)
        total += _aligned(param.nbytes)
    buffer = torch.empty(total, dtype=torch.uint8)
    for (_, param), offset in zip(params, offsets):
        view = buffer[offset : offset + param.nbytes].view(param.dtype).view(param.shape)
        view.copy_(param.data)
        param.data = view
    return buffer


def _register(buffer: torch.Tensor) -> str | None:
    """Page-locks a host buffer in place (CUDA); returns the error's name, or None."""
    cudart = torch.cuda.cudart()
    error = cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    if error != cudart.cudaError.success:
        return f"cudaHostRegister failed: {cudart.cudaGetErrorString(error)}"
    weakref.finalize(buffer, cudart.cudaHostUnregister, buffer.data_ptr())
    return None
