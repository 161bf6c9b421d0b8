"""Timing primitives for the profile micro-benchmarks: repeat until the median settles, keep the spread.

Design choices:
- A measurement is a function that runs the work once and returns its own milliseconds, so host work
  (`perf_counter`) and accelerator work (CUDA events on the stream doing it) share one loop.
- Warm-up first (at most `warmup` runs, or a quarter of the time cap); then samples in rounds, until
  the median of all samples moved less than `settle_rel` over the last round, or a repeat or time cap
  is hit. The spread is max - min of the samples, as the profile stores it.
- `Budget` holds every knob, so `--quick`, tests and benchmarks shrink a whole run in one place.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class Budget:
    warmup: int = 3
    min_repeats: int = 7
    max_repeats: int = 60
    round_size: int = 5
    max_seconds: float = 3.0  # per measurement
    settle_rel: float = 0.02
    max_tokens: int = 2048  # a latency curve stops here ...
    curve_stop_ms: float = 1000.0  # ... or after the first point slower than this
    large_copy_bytes: int = 256 * MiB
    window_s: float = 1.0  # how long a background stream's throughput is sampled alone

    def capped(self, max_repeats: int | None) -> Budget:
        """The same budget with at most `max_repeats` timed runs (and warm-ups) per measurement."""
        if max_repeats is None:
            return self
        return dataclasses.replace(
            self,
            max_repeats=max_repeats,
            min_repeats=min(self.min_repeats, max_repeats),
            warmup=min(self.warmup, max_repeats),
        )


FULL = Budget()
QUICK = Budget(
    warmup=1, min_repeats=3, max_repeats=9, round_size=3, max_seconds=0.3, settle_rel=0.05,
    max_tokens=256, curve_stop_ms=100.0, large_copy_bytes=64 * MiB, window_s=0.2,
)


@dataclass(frozen=True)
class Sample:
    median_ms: float
    spread_ms: float  # max - min over the repeats
    n_repeats: int


def settle(run_once: Callable[[], float], budget: Budget) -> Sample:
    """Warms up, then repeats `run_once` (which returns ms) until the median settles or a cap hits."""
    start = time.perf_counter()
    for _ in range(budget.warmup):
        run_once()
        if time.perf_counter() - start > budget.max_seconds / 4:
            break
    samples: list[float] = []
    previous = None
    start = time.perf_counter()
    while True:
        samples.append(run_once())
        n = len(samples)
        if n >= budget.max_repeats:
            break
        if n >= 3 and time.perf_counter() - start > budget.max_seconds:
            break
        if n >= budget.min_repeats and n % budget.round_size == 0:
            median = statistics.median(samples)
            if previous is not None and abs(median - previous) <= budget.settle_rel * previous:
                break
            previous = median
    return Sample(statistics.median(samples), max(samples) - min(samples), len(samples))


def host_ms(work: Callable[[], object]) -> Callable[[], float]:
    """Times host-side work with the wall clock."""

    def run_once() -> float:
        start = time.perf_counter()
        work()
        return (time.perf_counter() - start) * 1e3

    return run_once


def cuda_ms(work: Callable[[], object], stream) -> Callable[[], float]:
    """Times work enqueued on `stream` (a `torch.cuda.Stream`) with CUDA events recorded on it."""
    import torch

    def run_once() -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        # Sync point (device side): inputs made on the current stream are ready before `stream` reads them.
        current = torch.cuda.current_stream(stream.device)
        if current != stream:
            stream.wait_stream(current)
        with torch.cuda.stream(stream):
            start.record(stream)
            work()
            end.record(stream)
        end.synchronize()  # sync point: the host waits for this repetition to finish
        return start.elapsed_time(end)

    return run_once


def device_timer(device, stream=None) -> Callable[[Callable[[], object]], Callable[[], float]]:
    """The timer for work on `device`: the wall clock on the CPU, CUDA events on `stream` otherwise
    (default: the device's current stream)."""
    if device.type == "cpu":
        return host_ms
    import torch

    stream = stream if stream is not None else torch.cuda.current_stream(device)
    return lambda work: cuda_ms(work, stream)
