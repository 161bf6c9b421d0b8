"""Micro-benchmarks behind `hybrimoe profile`: expert kernels, memory, copies, interference.

Shapes: N = experts in a pool, T = tokens routed to an expert, D = hidden size,
I = expert intermediate size.

Design choices:
- Experts run through `hybrimoe.runtime.kernels.stacked_expert_mlp`, the kernel the runtime gives
  one expert (dense, or packed as `run --quantize` keeps it), in the dtype and with the thread
  setting the runtime uses (the caller sets `torch.set_num_threads`).
- Weights really come from memory: a pool holds at least twice the cache size in experts, stacked as
  the runtime stacks them, and each call takes the next expert, so no timing sees cache-hot weights.
- Copies go from pinned host memory (`torch.empty(..., pin_memory=True)`) on a dedicated copy stream
  and are timed with CUDA events on that stream; pageable copies are blocking, for comparison.
- Interference runs a background stream of memory traffic in a thread (torch and numpy release the
  GIL while copying) and times the foreground with and without it. With an accelerator the stream is
  host-to-device copies; without one it is a host memcpy loop, which on a machine with no spare core
  also takes CPU time from the expert kernel (the notes of a profile say so).
- The first expert of a layer is timed after a short idle gap and a pass over other memory, as
  between layers in the runtime (worker threads fall asleep, caches hold other data).
"""

from __future__ import annotations

import itertools
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from hybrimoe.config import DTYPE_BYTES, CurvePoint, ExpertShape
from hybrimoe.errors import UserError
from hybrimoe.host import available_ram_bytes
from hybrimoe.profile.fit import NOISY_SPREAD
from hybrimoe.profile.machine import MiB
from hybrimoe.profile.timing import Budget, Sample, cuda_ms, device_timer, host_ms, settle
from hybrimoe.runtime.kernels import stacked_expert_mlp
from hybrimoe.runtime.quantized import quantize_stack
from hybrimoe.runtime.threads import torch_threads

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FILL_BLOCK = 1 << 20  # elements of random values tiled over large weight buffers


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise UserError(
            f"profiling times expert_mlp in {', '.join(TORCH_DTYPES)}; {name!r} is not one: pass --dtype"
        ) from None


def fill_weights(tensor: torch.Tensor) -> torch.Tensor:
    """Small random values, written by tiling one random block (GBs of randn would take seconds)."""
    flat = tensor.view(-1)
    block = (torch.randn(min(flat.numel(), _FILL_BLOCK), device=tensor.device) * 0.02).to(tensor.dtype)
    whole = flat.numel() // block.numel()
    flat[: whole * block.numel()].view(whole, block.numel()).copy_(block.expand(whole, -1))
    flat[whole * block.numel():].copy_(block[: flat.numel() - whole * block.numel()])
    return tensor


def pool_size(item_bytes: int, cache_bytes: int) -> int:
    """How many items to rotate over so that their bytes exceed twice the cache (and at least 2)."""
    return max(2, math.ceil(2 * cache_bytes / item_bytes))


def check_fits_in_ram(n_bytes: int, what: str) -> None:
    free = available_ram_bytes()
    if free is not None and n_bytes > free // 2:
        raise UserError(
            f"{what} needs {n_bytes / 1e9:.1f} GB, over half the {free / 1e9:.1f} GB of free RAM: "
            "close other programs or pass a smaller --llc-mb"
        )


class ExpertPool:
    """N experts' weights in the runtime's stacked layout, handed out in turn so each call reads RAM."""

    def __init__(self, shape: ExpertShape, dtype: torch.dtype, device: torch.device, cache_bytes: int):
        d, i = shape.hidden_size, shape.intermediate_size
        n = pool_size(shape.expert_bytes, cache_bytes)
        if device.type == "cpu":
            check_fits_in_ram(n * shape.expert_bytes, f"a pool of {n} experts")
        self.shape, self.dtype, self.device = shape, dtype, device
        gate_up = fill_weights(torch.empty(n, 2 * i, d, dtype=dtype, device=device))  # [N, 2I, D]
        down = fill_weights(torch.empty(n, d, i, dtype=dtype, device=device))  # [N, D, I]
        # the stacks an expert run reads and a load copies: dense, or packed as the runtime keeps them
        if shape.quantize is None:
            self.weights = {"gate_up_proj": gate_up, "down_proj": down}
        else:
            self.weights = {}
            for name, stack in (("gate_up_proj", gate_up), ("down_proj", down)):
                qdata, scale = quantize_stack(stack, shape.quantize, shape.group_size, transposed=False)
                self.weights |= {f"{name}_qdata": qdata, f"{name}_scale": scale}
            del gate_up, down
        if shape.has_bias:
            self.weights["gate_up_proj_bias"] = fill_weights(torch.empty(n, 2 * i, dtype=dtype, device=device))  # [N, 2I]
            self.weights["down_proj_bias"] = fill_weights(torch.empty(n, d, dtype=dtype, device=device))  # [N, D]
        self.n_experts = n
        self._next = 0

    def tokens(self, n_tokens: int) -> torch.Tensor:  # [T, D]
        return fill_weights(torch.empty(n_tokens, self.shape.hidden_size, dtype=self.dtype, device=self.device))

    def expert(self, e: int) -> dict[str, torch.Tensor]:
        """Expert e's weight tensors, as one load copies them."""
        return {name: stack[e] for name, stack in self.weights.items()}

    def run(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, D] -> [T, D]
        e = self._next
        self._next = (e + 1) % self.n_experts
        return stacked_expert_mlp(x, self.weights, e)


def token_counts(max_tokens: int) -> Iterator[int]:
    """1, 2, 4, ... up to max_tokens."""
    n = 1
    while n <= max_tokens:
        yield n
        n *= 2


def latency_curve(
    run: Callable[[int], Callable[[], float]],
    budget: Budget,
    counts: Iterator[int] | None = None,
    on_point: Callable[[int], None] | None = None,
) -> list[CurvePoint]:
    """Points of `run(n_tokens)` (a timed repetition) as tokens grow, until over `curve_stop_ms`; a
    point whose repeats spread over more than its median (`fit.NOISY_SPREAD`) is measured twice."""
    points = []
    for n_tokens in token_counts(budget.max_tokens) if counts is None else counts:
        if on_point is not None:
            on_point(n_tokens)
        sample = settle(run(n_tokens), budget)
        if sample.spread_ms > NOISY_SPREAD * sample.median_ms:  # measured once more: the steadier one is kept
            again = settle(run(n_tokens), budget)
            sample = min(sample, again, key=lambda s: s.spread_ms / s.median_ms)
        points.append(CurvePoint(n_tokens, sample.median_ms, sample.spread_ms))
        if sample.median_ms > budget.curve_stop_ms and len(points) >= 2:  # a fit needs two points
            break
    return points


def expert_timer(pool: ExpertPool, stream=None) -> Callable[[int], Callable[[], float]]:
    """n_tokens -> one timed expert call: wall clock on the CPU, CUDA events on `stream` otherwise."""
    timer = device_timer(pool.device, stream)

    def run(n_tokens: int) -> Callable[[], float]:
        x = pool.tokens(n_tokens)
        return timer(lambda: pool.run(x))

    return run


def host_read_gbps(cache_bytes: int, budget: Budget) -> float:
    """Read bandwidth with the current threads over twice the cache: the faster of two plain reads.

    A BLAS matrix-vector product streams its matrix once with hardware-friendly prefetching, often
    the fastest read torch offers, but some BLAS builds run it on one thread whatever the setting
    (measured on an AMD EPYC: 20.7 GB/s at 1 and 2 threads, where a `sum` reads 34 at 2); a `sum`
    splits over the threads but its cascaded adds can cost ALU time. Filled with ones: denormals
    would slow the multiply-adds and measure the ALU, not the memory.
    """
    n_bytes = max(2 * cache_bytes, 64 * MiB)
    check_fits_in_ram(n_bytes, "the memory bandwidth buffer")
    columns = 4096
    matrix = torch.ones(n_bytes // (4 * columns), columns, dtype=torch.float32)  # [rows, 4096]
    vector = torch.ones(columns, dtype=torch.float32)
    fastest_ms = min(
        settle(host_ms(read), budget).median_ms for read in (lambda: torch.mv(matrix, vector), matrix.sum)
    )
    return matrix.numel() * 4 / fastest_ms / 1e6


@dataclass(frozen=True)
class FirstExpert:
    first: Sample  # the first expert a layer runs on the CPU
    later: Sample  # the others of the same layer

    @property
    def extra_ms(self) -> float:
        return max(0.0, self.first.median_ms - self.later.median_ms)


def first_expert(pool: ExpertPool, experts_per_layer: int, budget: Budget, gap_s: float = 0.002) -> FirstExpert:
    """Times 1-token experts layer by layer: the first after an idle gap and a pass over other memory."""
    x = pool.tokens(1)
    scratch = torch.ones(8 * MiB // 4, dtype=torch.float32)  # stands for the runtime's work between layers
    firsts: list[float] = []
    laters: list[float] = []
    per_layer = max(2, experts_per_layer)
    start = time.perf_counter()
    for layer in range(budget.warmup + max(budget.max_repeats, 3)):
        scratch.sum()
        time.sleep(gap_s)
        times = [host_ms(lambda: pool.run(x))() for _ in range(per_layer)]
        if layer < budget.warmup:
            continue
        firsts.append(times[0])
        laters.extend(times[1:])
        if len(firsts) >= 3 and time.perf_counter() - start > budget.max_seconds:
            break
    return FirstExpert(_sample(firsts), _sample(laters))


def _sample(values: list[float]) -> Sample:
    return Sample(statistics.median(values), max(values) - min(values), len(values))


# ---------------------------------------------------------------------------------------------
# memory traffic in the background, and interference


class _Rotation:
    """Offsets of successive `chunk`-byte slices of an `n_bytes` buffer, wrapping around."""

    def __init__(self, n_bytes: int, chunk: int):
        self._offsets = list(range(0, n_bytes - chunk + 1, chunk))
        self._i = 0

    def next(self) -> int:
        offset = self._offsets[self._i]
        self._i = (self._i + 1) % len(self._offsets)
        return offset


class Background:
    """Runs `step` (one unit of memory traffic, returning its bytes) in a thread until the block ends."""

    def __init__(self, step: Callable[[], int]):
        self._step = step
        self._stop = threading.Event()
        self._running = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hybrimoe-background", daemon=True)
        self._error: BaseException | None = None
        self.bytes = 0
        self.seconds = 0.0

    def _loop(self) -> None:
        try:
            self._step()  # the first step warms up outside the measured window
            self._running.set()
            start = time.perf_counter()
            while not self._stop.is_set():
                self.bytes += self._step()
            self.seconds = time.perf_counter() - start
        except BaseException as exc:  # handed to the foreground thread, raised there
            self._error = exc
        finally:
            self._running.set()

    def __enter__(self) -> Background:
        self._thread.start()
        self._running.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise self._error

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def memcpy_stream(cache_bytes: int, chunk_bytes: int = 16 * MiB) -> Callable[[], int]:
    """A host memcpy loop over two buffers as large as the cache; numpy copies release the GIL."""
    n_bytes = max(cache_bytes, 4 * chunk_bytes)
    check_fits_in_ram(2 * n_bytes, "the memcpy stream")
    src = np.ones(n_bytes, dtype=np.uint8)
    dst = np.ones(n_bytes, dtype=np.uint8)  # written now, so the loop never pays first-touch page faults
    offsets = _Rotation(n_bytes, chunk_bytes)

    def step() -> int:
        offset = offsets.next()
        np.copyto(dst[offset: offset + chunk_bytes], src[offset: offset + chunk_bytes])
        return chunk_bytes

    return step


def h2d_stream(device: torch.device, cache_bytes: int, chunk_bytes: int = 64 * MiB) -> Callable[[], int]:
    """A loop of pinned host-to-device copies on its own copy stream, each waited for."""
    n_bytes = max(2 * cache_bytes, 4 * chunk_bytes)
    pinned = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    target = torch.empty(chunk_bytes, dtype=torch.uint8, device=device)
    copy_stream = torch.cuda.Stream(device)
    copy_stream.wait_stream(torch.cuda.current_stream(device))  # sync point: the buffers exist
    offsets = _Rotation(n_bytes, chunk_bytes)

    def step() -> int:
        offset = offsets.next()
        # Inference mode is per thread, and the buffers may have been made under it.
        with torch.inference_mode(), torch.cuda.stream(copy_stream):
            target.copy_(pinned[offset: offset + chunk_bytes], non_blocking=True)
        copy_stream.synchronize()  # sync point: one copy at a time, so the byte count is honest
        return chunk_bytes

    return step


@dataclass(frozen=True)
class InterferenceResult:
    cpu_alone: Sample  # CPU expert at 1 token, nothing else running
    cpu_busy: Sample  # the same while the background stream runs
    stream_alone_gbps: float  # background stream throughput alone
    stream_busy_gbps: float  # ... while the CPU computes experts

    @property
    def cpu_slowdown(self) -> float:
        return self.cpu_busy.median_ms / self.cpu_alone.median_ms

    @property
    def copy_slowdown(self) -> float:
        return self.stream_alone_gbps / self.stream_busy_gbps if self.stream_busy_gbps > 0 else 1.0


def interference(
    pool: ExpertPool, stream_step: Callable[[], int], budget: Budget, threads: int | None = None
) -> InterferenceResult:
    """CPU expert time with and without the background stream, and the stream's throughput either way.

    `threads` (default: unchanged) sets the expert's threads for both timings; a host memcpy stream
    needs a core of its own, or the ratio would measure core sharing rather than memory sharing.
    """
    with torch_threads(threads):
        return _interference(pool, stream_step, budget)


def _interference(pool: ExpertPool, stream_step: Callable[[], int], budget: Budget) -> InterferenceResult:
    x = pool.tokens(1)
    expert = host_ms(lambda: pool.run(x))
    with Background(stream_step) as alone:
        time.sleep(budget.window_s)
    cpu_alone = settle(expert, budget)
    with Background(stream_step) as busy:
        cpu_busy = settle(expert, budget)
    return InterferenceResult(cpu_alone, cpu_busy, alone.gbps, busy.gbps)


# ---------------------------------------------------------------------------------------------
# host <-> accelerator copies


@dataclass(frozen=True)
class TransferResult:
    expert_load: Sample  # one expert, pinned host -> device, one copy per weight tensor as the runtime does
    h2d_pinned_expert_gbps: float
    h2d_pinned_gbps: float  # large transfers
    h2d_pageable_gbps: float
    d2h_gbps: float  # device -> pinned host, large transfers


def slot_copy(pool: ExpertPool, budget: Budget) -> Sample:
    """The CPU stand-in's expert load: one expert's weights copied into a slot, one copy per
    weight tensor as the runtime's store does, from a pool larger than the cache."""
    slot = {name: torch.empty_like(weight) for name, weight in pool.expert(0).items()}
    calls = itertools.count()

    def copy() -> None:
        for name, weight in pool.expert(next(calls) % pool.n_experts).items():
            slot[name].copy_(weight)

    return settle(host_ms(copy), budget)


def weight_bytes(shape: ExpertShape) -> list[int]:
    """Bytes of each weight tensor of one expert: the runtime loads an expert one copy per tensor."""
    d, i, item = shape.hidden_size, shape.intermediate_size, DTYPE_BYTES[shape.dtype]
    biases = [int(2 * i * item), int(d * item)] if shape.has_bias else []
    if shape.quantize is None:
        return [int(2 * i * d * item), int(d * i * item)] + biases
    packed = DTYPE_BYTES[shape.quantize]
    pieces = [(n * packed, n // shape.group_size * shape.scale_bytes) for n in (2 * i * d, d * i)]
    return [int(n) for piece in pieces for n in piece] + biases


def transfers(shape: ExpertShape, device: torch.device, cache_bytes: int, budget: Budget) -> TransferResult:
    """Copy costs through a dedicated copy stream, from host buffers larger than the cache."""
    pieces = weight_bytes(shape)
    expert_bytes = sum(pieces)
    large = max(budget.large_copy_bytes, expert_bytes)
    host_bytes = max(2 * cache_bytes, 2 * large)
    check_fits_in_ram(2 * host_bytes, "the transfer buffers")
    pinned = torch.empty(host_bytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    pageable = torch.ones(host_bytes, dtype=torch.uint8)  # written now: no first-touch page faults later
    target = torch.empty(large, dtype=torch.uint8, device=device)
    copy_stream = torch.cuda.Stream(device)

    def h2d(source: torch.Tensor, sizes: list[int], pinned_source: bool) -> Sample:
        """One copy per entry of `sizes` (bytes), back to back from one host region."""
        n_bytes = sum(sizes)
        offsets = _Rotation(host_bytes, n_bytes)

        def work() -> None:
            offset = offsets.next()
            for size in sizes:
                # A pageable source gets a blocking copy: non_blocking from pageable memory is a bug.
                target[:size].copy_(source[offset: offset + size], non_blocking=pinned_source)
                offset += size

        return settle(cuda_ms(work, copy_stream), budget)

    def d2h() -> Sample:
        offsets = _Rotation(host_bytes, large)

        def work() -> None:
            offset = offsets.next()
            pinned[offset: offset + large].copy_(target, non_blocking=True)

        return settle(cuda_ms(work, copy_stream), budget)

    expert_load = h2d(pinned, pieces, pinned_source=True)
    large_pinned = h2d(pinned, [large], pinned_source=True)
    large_pageable = h2d(pageable, [large], pinned_source=False)
    back = d2h()
    return TransferResult(
        expert_load=expert_load,
        h2d_pinned_expert_gbps=expert_bytes / expert_load.median_ms / 1e6,
        h2d_pinned_gbps=large / large_pinned.median_ms / 1e6,
        h2d_pageable_gbps=large / large_pageable.median_ms / 1e6,
        d2h_gbps=large / back.median_ms / 1e6,
    )
