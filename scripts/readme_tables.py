"""Regenerates README.md's simulated tables ("Simulated comparison on real routing") and the worked
example of `hybrimoe tune` from the commands that print them, or, with `--check`, says which tables
have drifted from what those commands print now.

Each block sits between `<!-- generated: NAME -->` and `<!-- end generated: NAME -->`. A table
block is the `--markdown` output of `hybrimoe simulate` on the shipped trace with the block's
arguments (`BLOCKS`); the simulator is deterministic and the inputs are shipped files, so those
blocks depend on the code only, never on the machine (all four take 7-10 minutes on 2 cores), and
`tests/test_readme_tables.py` reruns one column of one as a drift check. The tune example's times
are the machine's, so `--check` leaves it out.

Usage: python scripts/readme_tables.py [--check] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TRACE = "traces/qwen3-30b-a3b.npz"
ANOTHER_BATCH = ("--profiling-trace", "traces/qwen3-30b-a3b-batch2.npz")
RTX4090 = ("--profile", "profiles/rtx4090-desktop.qwen3-30b-a3b.yaml", "--cache-ratio", "0.25,0.35,0.5,0.75")
A6000 = ("--profile", "profiles/a6000-xeon5220r.qwen3-30b-a3b.yaml")
BLOCKS: dict[str, tuple[str, ...]] = {  # name -> `hybrimoe simulate` arguments after --trace and --markdown
    "rtx4090-in-batch": RTX4090,
    "rtx4090-another-batch": (*RTX4090, *ANOTHER_BATCH),
    "a6000-in-batch": A6000,
    "a6000-another-batch": (*A6000, *ANOTHER_BATCH),
}


TUNE_EXAMPLE = "tune-example"  # the worked example of `hybrimoe tune` (its times are the machine's)


def block_pattern(name: str) -> re.Pattern:
    """A generated block's markers and text (group 1) in the README."""
    return re.compile(rf"(?<=<!-- generated: {re.escape(name)} -->\n)(.*?)(?=<!-- end generated: {re.escape(name)} -->)",
                      re.DOTALL)


def simulate_markdown(arguments: tuple[str, ...]) -> str:
    """What `hybrimoe simulate --trace TRACE --markdown ARGUMENTS` prints, run in this process from
    the repository's root (the arguments name shipped files relative to it)."""
    import os

    from typer.testing import CliRunner

    from hybrimoe.cli import app

    here = Path.cwd()
    os.chdir(REPO)
    try:
        result = CliRunner().invoke(app, ["simulate", "--trace", TRACE, "--markdown", *arguments])
    finally:
        os.chdir(here)
    if result.exit_code != 0:
        raise SystemExit(f"hybrimoe simulate {' '.join(arguments)} failed: {result.output.strip()}")
    return result.stdout


def tune_example() -> str:
    """The worked example of "Tuning the policy": `hybrimoe tune` as a user runs it (a terminal 110
    columns wide), in a scratch directory whose path is left out of the output. Its times depend on
    the machine, so `--check` leaves it out; the text around it is written by hand."""
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run(
            ["hybrimoe", "tune", "--trace", str(REPO / TRACE), "--profile", str(REPO / RTX4090[1]),
             "--gpu-memory-gb", "24", "--out", "tuned.yaml", "--export", "llamacpp"],
            cwd=scratch, capture_output=True, text=True, env={**os.environ, "COLUMNS": "110"}, check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"hybrimoe tune failed: {done.stderr.strip()}")
        output = (done.stderr + done.stdout).replace(f"{scratch}/", "").replace(str(REPO) + "/", "")
    output = "\n".join(line.rstrip() for line in output.strip().splitlines())  # rich pads lines to the width
    command = ("hybrimoe tune --trace traces/qwen3-30b-a3b.npz --profile profiles/rtx4090-desktop.qwen3-30b-a3b.yaml \\\n"
               "    --gpu-memory-gb 24 --out tuned.yaml --export llamacpp")
    return f"```bash\n{command}\n```\n\n```text\n{output}\n```\n"


def readme_block(name: str, text: str | None = None) -> str:
    """The README's current text of block `name`."""
    match = block_pattern(name).search(README.read_text() if text is None else text)
    if match is None:
        raise SystemExit(f"README.md has no generated block {name!r}")
    return match.group(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say which blocks have drifted (exit 1 if any)")
    parser.add_argument("--only", nargs="+", choices=sorted([*BLOCKS, TUNE_EXAMPLE]), help="these blocks only")
    args = parser.parse_args()
    text = README.read_text()
    drifted = []
    names = args.only or [*BLOCKS, *([] if args.check else [TUNE_EXAMPLE])]
    for name in names:
        print(f"running {name} ...", file=sys.stderr)
        fresh = tune_example() if name == TUNE_EXAMPLE else simulate_markdown(BLOCKS[name]).strip() + "\n"
        current = readme_block(name, text)
        if fresh == current:
            continue
        drifted.append(name)
        if args.check:
            sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), fresh.splitlines(True), name, "now"))
        else:
            text = block_pattern(name).sub(lambda _: fresh, text, count=1)
    if args.check:
        print(f"drifted: {', '.join(drifted)}" if drifted else "no drift", file=sys.stderr)
        raise SystemExit(1 if drifted else 0)
    README.write_text(text)
    print(f"regenerated: {', '.join(drifted) or 'nothing changed'}", file=sys.stderr)


if __name__ == "__main__":
    main()
