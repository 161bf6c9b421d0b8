"""This host's memory, read by the runtime (before it loads weights) and the profiler alike.

Design choices:
- Read from Linux's /proc/meminfo; None where it is unreadable (other systems), and each caller
  decides what an unknown amount means.
- A top-level module that imports nothing of hybrimoe, so the runtime reads host memory without
  importing the profile package.
"""

from __future__ import annotations

from pathlib import Path


def _meminfo_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_ram_bytes() -> int | None:
    return _meminfo_bytes("MemAvailable")


def total_ram_bytes() -> int | None:
    return _meminfo_bytes("MemTotal")
