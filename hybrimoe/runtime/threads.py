"""CPU threads: how many the CPU expert worker uses, and what the launching thread keeps.

Design choices:
- One setting, `threads`: the CPU expert worker's intra-op threads (the profile's, as it was
  measured with; `--threads` overrides; by default every core but one on CUDA, every core without
  an accelerator, where the dense part and the experts take turns rather than overlap). It is set in
  the worker thread itself (torch's intra-op thread count is per calling thread), so the two
  threads of a run do not share one process-wide number.
- The launching thread (the model's forward, routing, planning, kernel launches) keeps the core
  the worker leaves free: on CUDA it computes nothing on the CPU but small host-side bookkeeping,
  so it runs one intra-op thread; on the CPU stand-in it also computes the dense parts and the
  stand-in's "accelerator" experts, so it uses the same count as the worker (they take turns in
  each layer more than they overlap).
- A count is set for a block and restored after it, so a library caller's setting survives.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def default_threads(is_cuda: bool) -> int:
    """Every core but one on CUDA (the launching thread keeps one), every core on the CPU stand-in:
    there the dense part and the CPU experts of a layer run one after the other, and a core left
    idle is bandwidth left unread (measured: benchmarks/bench_cpu_peer.py)."""
    cores = os.cpu_count() or 1
    return max(1, cores - 1) if is_cuda else cores


def default_threads_source(is_cuda: bool) -> str:
    return "every core but one, on CUDA" if is_cuda else "every core, without an accelerator"


def launching_threads(threads: int, is_cuda: bool) -> int:
    """Intra-op threads of the thread that runs the model and launches each layer's work."""
    return 1 if is_cuda else threads


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Sets this thread's torch intra-op threads for a block (None: leaves them), restoring them after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
