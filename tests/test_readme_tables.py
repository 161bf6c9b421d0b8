"""README.md's simulated tables are what `scripts/readme_tables.py` prints now: one column of one
block is simulated again (all four blocks take minutes) and compared cell by cell. The simulator
is deterministic and the inputs are shipped files, so this checks the code, not the machine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("readme_tables", REPO / "scripts" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _first_column(markdown: str, heading: str) -> dict[str, str]:
    """strategy -> its first cache size's cell, in the table under the line starting with `heading`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("| ") and not line.startswith("| strategy"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0].strip("*")] = cells[1]
        elif rows and not line.startswith("|"):
            break
    return rows


def test_every_block_is_in_the_readme():
    script = _script()
    for name in script.BLOCKS:
        assert script.readme_block(name).startswith("**decode, ")


@pytest.mark.slow
def test_the_first_rtx4090_column_has_not_drifted():
    script = _script()
    profile = script.RTX4090[:2]
    fresh = script.simulate_markdown((*profile, "--cache-ratio", "0.25", "--mode", "decode"))
    heading = "**decode, rtx4090-desktop.qwen3-30b-a3b**"
    readme = _first_column(script.readme_block("rtx4090-in-batch"), heading)
    assert _first_column(fresh, heading) == readme and len(readme) >= 10, (
        "README.md's tables have drifted from the simulator: run python scripts/readme_tables.py"
    )
