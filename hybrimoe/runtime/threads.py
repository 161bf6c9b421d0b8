"""CPU threads for expert kernels: the default count, and setting it for a block of work.

Design choices:
- The default is one less than the cores (at least one): the thread that launches each layer's
  work and plans needs a core of its own beside the CPU experts; on a busy 2-core machine two
  expert threads made every kernel wait for a descheduled one.
- `torch.set_num_threads` is process-wide, so it is set for a block and restored after it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def default_threads() -> int:
    """Every core but one, at least one."""
    return max(1, (os.cpu_count() or 1) - 1)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Sets torch's intra-op threads for a block (None: leaves them), restoring them afterwards."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
