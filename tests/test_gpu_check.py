"""benchmarks/gpu_check.sh end to end on the CPU (slow), and its overlap arithmetic on a hand-made trace."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TABLE_FILES = (
    "key_table.md", "key_table.json", "quantized_table.md", "quantized_table.json", "smoke.txt", "smoke.json", "overlap.txt", "overlap.json", "overlap_trace.json",
)


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_cpu_check_runs_and_writes_every_table(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--small"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in TABLE_FILES:
        path = tmp_path / name
        assert path.is_file() and path.stat().st_size > 0, name


def test_overlap_counts_copy_time_under_kernels_once():
    events = [
        {"ph": "X", "cat": "kernel", "name": "a", "ts": 0, "dur": 10},
        {"ph": "X", "cat": "kernel", "name": "b", "ts": 5, "dur": 10},  # overlaps a: busy 0..15
        {"ph": "X", "cat": "kernel", "name": "c", "ts": 30, "dur": 10},  # busy 30..40
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 12, "dur": 20,
         "args": {"bytes": 2**20}},  # 12..32: 3 under b, 2 under c
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)", "ts": 0, "dur": 40},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100},
    ]
    summary = _gpu_check().gpu_summary({"traceEvents": events})
    assert summary["kernels"] == 3 and summary["h2d_copies"] == 1
    assert summary["kernel_ms"] == pytest.approx(0.025)
    assert summary["h2d_ms"] == pytest.approx(0.020)
    assert summary["overlap_ms"] == pytest.approx(0.005)
    assert summary["overlap_share_of_copy"] == pytest.approx(0.25)
    assert summary["h2d_mib"] == pytest.approx(1.0)
