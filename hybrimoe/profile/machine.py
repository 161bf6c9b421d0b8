"""Facts about the machine being profiled: CPU, caches, memory, accelerator, load.

Design choices:
- Read from Linux's /proc and /sys, with plain fallbacks elsewhere; nothing here measures. Host
  memory is read in `hybrimoe.host`, which the runtime uses too.
- The last-level cache size decides how many experts' weights a benchmark rotates over, so timings
  see weights coming from RAM; it is the largest cache /sys lists (64 MiB when unreadable).
- Accelerator facts come from torch; the driver version from `nvidia-smi` when it is on PATH.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

from hybrimoe.config import Machine
from hybrimoe.host import total_ram_bytes

MiB = 1 << 20
DEFAULT_LLC_BYTES = 64 * MiB
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_cache_size(text: str) -> int | None:
    """'307200K' / '32M' / '1024' (as /sys writes them) -> bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, flags=re.IGNORECASE)
    if match is None:
        return None
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


def llc_bytes(cache_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The largest CPU cache (the last level) in bytes, or 64 MiB when the system does not say."""
    sizes = []
    for index in cache_dir.glob("index*"):
        try:
            size = parse_cache_size((index / "size").read_text())
        except OSError:
            continue
        if size:
            sizes.append(size)
    return max(sizes, default=DEFAULT_LLC_BYTES)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def load_average() -> float | None:
    """The 1-minute load average (runnable processes), to record contention during a profile."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def describe_machine(device: str, threads: int) -> Machine:
    """The machine section of a profile; GPU fields only when profiling on an accelerator."""
    import torch

    total = total_ram_bytes()
    gpu = gpu_memory_gb = driver = cuda = None
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        gpu, gpu_memory_gb = props.name, round(props.total_memory / 1e9, 1)
        driver, cuda = _driver_version(), torch.version.cuda
    return Machine(
        cpu=cpu_model(),
        cores=os.cpu_count(),
        threads=threads,
        ram_gb=round(total / 1e9, 1) if total else None,
        gpu=gpu,
        gpu_memory_gb=gpu_memory_gb,
        driver=driver,
        cuda=cuda,
        torch=torch.__version__.split("+")[0],
    )


def accelerator_cache_bytes(device) -> int:
    """The accelerator's L2 cache, which its benchmarks rotate weights past (64 MiB when unknown)."""
    import torch

    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_LLC_BYTES)
