"""The accelerator behind one small interface: CUDA, or a CPU stand-in with the same code path.

Design choices:
- The store and the executor only call these methods, so one code path serves both backends. On
  the CPU stand-in, streams and events are no-ops and a copy is complete when issued; slots are
  still separate tensors and copies still happen, so every decision (slots, loads, prefetches, the
  CPU worker, the combine) is exercised on a machine without a GPU.
- CUDA: one dedicated copy stream; events order a slot's copy after the kernels that last read it
  and the kernels after the copy that fills it. Host tensors that feed `non_blocking` copies are
  pinned (the caching host allocator keeps a pinned block alive until its copy has completed).
- Every host-accelerator synchronisation point is a method here, named in the callers' comments.
  The host never waits for the whole stream: `wait_host` waits for one event, so work queued
  after it (the later layers' routers) keeps the accelerator busy while the host plans.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from hybrimoe.errors import UserError
from hybrimoe.run_options import check_device


class CpuStandIn:
    """The CPU plays the accelerator: no streams, events are None, copies are synchronous."""

    is_cuda = False

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    def copy_stream(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def new_event(self) -> None:
        return None

    def record(self, event: None) -> None:
        pass

    def wait(self, event: None) -> None:
        pass

    def is_done(self, event: None) -> bool:
        return True  # copies are synchronous

    def host_zeros(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype)

    def to_host_async(self, tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], None]:
        return list(tensors), None

    def wait_host(self, event: None) -> None:
        pass

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host

    def index_to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array)

    def synchronize(self) -> None:
        pass

    def free_memory_bytes(self) -> int | None:
        return None

    def reset_peak_memory(self) -> None:
        pass

    def describe(self) -> str:
        return "CPU stand-in (no accelerator)"


class CudaAccelerator:
    is_cuda = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._copy_stream = torch.cuda.Stream(device)

    def copy_stream(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self._copy_stream)

    def new_event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    def record(self, event: torch.cuda.Event) -> None:
        event.record(torch.cuda.current_stream(self.device))

    def wait(self, event: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)

    def is_done(self, event: torch.cuda.Event) -> bool:
        """Whether the work before `event` has finished; a query, not a sync point."""
        return event.query()

    def host_zeros(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, pin_memory=True)

    def to_host_async(self, tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        """Pinned host copies, queued on the current stream, and the event that marks them done."""
        host = [t.to("cpu", non_blocking=True) for t in tensors]
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return host, done

    def wait_host(self, event: torch.cuda.Event) -> None:
        """Blocks the calling thread until the work before `event` is done (and only that work)."""
        event.synchronize()

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host.to(self.device, non_blocking=True)  # `host` is pinned (host_zeros)

    def index_to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).pin_memory().to(self.device, non_blocking=True)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def free_memory_bytes(self) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        return free

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_bytes(self) -> int:
        """The most memory torch's allocator held on the device since the last reset."""
        return torch.cuda.max_memory_allocated(self.device)

    def describe(self) -> str:
        return torch.cuda.get_device_name(self.device)


Accelerator = CpuStandIn | CudaAccelerator


def make_accelerator(device: str | None = None) -> Accelerator:
    """`None` means CUDA when present, else the CPU stand-in."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    dev = torch.device(device)
    if dev.type == "cpu":
        return CpuStandIn()
    if not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA device is available")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise UserError(f"no CUDA device {dev.index}; this machine has {torch.cuda.device_count()}")
    return CudaAccelerator(dev)
