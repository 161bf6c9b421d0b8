"""Two `hybrimoe tune` processes pointed at one real PostgreSQL server share one study.

This is what `--storage URL` is for: tuning on several machines at once. Both processes run the same
command (so the same study name) with their own `--out`; `--trials` is the study's total, so together
they finish about that many trials, not twice as many. Optuna records no process per trial, so the
sharing shows in time instead: one process runs its trials one after another, so two trials that
were running at the same moment were run by the two processes. The URL carries a password (trust
authentication ignores it), which the tuned profiles must not repeat.
"""

from __future__ import annotations

import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import optuna
import pytest
from sqlalchemy.engine import make_url

from hybrimoe.config import load_profile
from hybrimoe.tune.study import FINISHED

REPO = Path(__file__).resolve().parents[2]
TRIALS = 16
OVERSHOOT = 2  # trials the other process was already running when the total was reached
TIMEOUT_S = 180

pytestmark = pytest.mark.slow


def test_two_processes_share_one_postgres_study(postgres_url, tmp_path):
    url = make_url(postgres_url).set(password="secret").render_as_string(hide_password=False)
    outs = [tmp_path / f"tuned-{i}.yaml" for i in (0, 1)]
    logs = [tmp_path / f"tune-{i}.log" for i in (0, 1)]
    command = [
        str(Path(sys.executable).with_name("hybrimoe")), "tune",
        "--trace", str(REPO / "traces/qwen3-30b-a3b.npz"),
        "--profile", str(REPO / "profiles/rtx4090-desktop.qwen3-30b-a3b.yaml"),
        "--trials", str(TRIALS), "--max-tokens", "200", "--objective", "decode", "--cache-ratio", "0.25",
        "--storage", url,
    ]
    # HYBRIMOE_PROFILE_DIR: the processes inherit this test's own empty directory (tests/conftest.py).
    processes = [
        subprocess.Popen([*command, "--out", str(out)], stdout=log.open("w"), stderr=subprocess.STDOUT)
        for out, log in zip(outs, logs)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        codes = [process.wait(timeout=max(1.0, deadline - time.monotonic())) for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    output = "\n".join(f"--- process {i} ---\n{log.read_text()}" for i, log in enumerate(logs))
    assert codes == [0, 0], output

    studies = {load_profile(out).tuning.study for out in outs}
    assert len(studies) == 1, studies
    for out in outs:
        assert "secret" not in out.read_text(), f"{out} repeats the storage password"
    trials = optuna.load_study(study_name=studies.pop(), storage=url).get_trials(states=FINISHED)
    assert TRIALS <= len(trials) <= TRIALS + OVERSHOOT, output
    concurrent = [
        (a.number, b.number) for a, b in combinations(trials, 2)
        if a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
    ]
    assert concurrent, "no two trials ran at the same time: one process ran them all"


def test_a_server_that_stops_mid_study_is_one_line_and_a_rerun_completes_the_target(postgres_server, tmp_path):
    out, target = tmp_path / "tuned.yaml", 24
    command = [
        str(Path(sys.executable).with_name("hybrimoe")), "tune",
        "--trace", str(REPO / "traces/qwen3-30b-a3b.npz"),
        "--profile", str(REPO / "profiles/rtx4090-desktop.qwen3-30b-a3b.yaml"),
        "--trials", str(target), "--max-tokens", "150", "--objective", "decode", "--cache-ratio", "0.25",
        "--workers", "2", "--storage", postgres_server.url, "--out", str(out),
    ]
    before = set(optuna.get_all_study_names(postgres_server.url))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, study_name = time.monotonic() + TIMEOUT_S, None
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
        names = set(optuna.get_all_study_names(postgres_server.url)) - before
        if names:
            study_name = names.pop()
            if len(optuna.load_study(study_name=study_name, storage=postgres_server.url).get_trials(states=FINISHED)) >= 4:
                break
    postgres_server.stop()
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        postgres_server.start()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert study_name is not None and process.returncode == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: lost the storage"), stderr
    assert not out.exists()

    time.sleep(13)  # past the heartbeat's grace period: the interrupted trials are stale
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert rerun.returncode == 0, rerun.stderr
    trials = optuna.load_study(study_name=study_name, storage=postgres_server.url).get_trials(states=FINISHED)
    assert len(trials) == target
