"""benchmarks/bench_quantize.py keeps working: its small mode, end to end, on the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_small_mode_measures_and_simulates_every_format():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_quantize.py"), "--small"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    for name in ("bfloat16", "int8 g64", "int4 g64", "int8 g128", "int4 g128"):
        assert any(line.startswith(f"| {name} |") for line in lines), name
