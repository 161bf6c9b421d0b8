"""The command line's own streams, as a shell leaves them: stdout closed or full, an ASCII-only
encoding, a COLUMNS of 0. Each runs the real entry point in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRACE = str(REPO / "traces" / "qwen3-30b-a3b.npz")  # its provenance holds non-ASCII text
HYBRIMOE = [sys.executable, "-c", "from hybrimoe.cli import main; main()"]


def _trace_info(env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*HYBRIMOE, "trace", "info", TRACE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, **kwargs)


def test_a_closed_stdout_is_one_line():
    done = subprocess.run([*HYBRIMOE, "trace", "info", TRACE], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=120, preexec_fn=lambda: os.close(1))
    assert done.returncode == 2 and done.stderr.strip() == "error: stdout is closed: redirect it to a file or /dev/null"


def test_a_full_stdout_is_one_line():
    with open("/dev/full", "w") as full:
        done = subprocess.run([*HYBRIMOE, "trace", "info", TRACE], stdout=full, stderr=subprocess.PIPE, text=True,
                              timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == "error: cannot write the output: No space left on device"


def test_an_ascii_only_encoding_prints_what_it_can():
    done = _trace_info({"PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0 and "Traceback" not in done.stderr and "Qwen3-30B-A3B" in done.stdout


def test_a_width_of_zero_columns_is_ignored():
    done = _trace_info({"COLUMNS": "0"})
    assert done.returncode == 0 and "Qwen3-30B-A3B" in done.stdout
