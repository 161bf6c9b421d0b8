"""The SQLite storage local workers share: a waiting (enqueued) trial is claimed by one worker only;
opening a new database races safely; trials left running without a heartbeat are retried.

Python's sqlite3 opens a transaction at the first write, so two processes could both read a waiting
trial and both set it running (measured: 8 double claims in 30 rounds of 4 processes); then one
fails telling a trial the other completed. `open_storage` begins every transaction with the write
lock, so a transaction that has only read already keeps every other writer out.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from hybrimoe.tune.study import open_storage


def test_a_reading_transaction_already_holds_the_write_lock(tmp_path):
    path = tmp_path / "study.db"
    storage = open_storage(SimpleNamespace(storage_url=f"sqlite:///{path}"))
    other = sqlite3.connect(path, timeout=0.1)
    with storage.engine.begin() as connection:
        connection.exec_driver_sql("SELECT count(*) FROM trials")  # read only, as a pop starts
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("UPDATE trials SET state = 'RUNNING'")
    other.execute("UPDATE trials SET state = 'RUNNING'")  # free again once it ends


def test_a_waiting_trial_is_still_claimed_once_through_the_locking_transactions(tmp_path):
    storage = open_storage(SimpleNamespace(storage_url=f"sqlite:///{tmp_path / 'study.db'}"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s", storage=storage)
    study.enqueue_trial({"x": 1.0})
    assert study._pop_waiting_trial_id() is not None
    assert study._pop_waiting_trial_id() is None


def test_a_process_that_loses_the_schema_race_opens_again(tmp_path, monkeypatch):
    """Two processes creating the tables of a new SQLite database at once: the loser's CREATE TABLE
    fails with "table ... already exists" (seen once in a fresh clone); it must open again, not fail."""
    from sqlalchemy.exc import OperationalError

    from hybrimoe.tune import study

    real, calls = study._Storage, []

    def first_loses(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            real(*args, **kwargs)  # the winner's tables now exist
            raise OperationalError("CREATE TABLE trial_intermediate_values", {}, Exception(
                "table trial_intermediate_values already exists"))
        return real(*args, **kwargs)

    monkeypatch.setattr(study, "_Storage", first_loses)
    storage = open_storage(SimpleNamespace(storage_url=f"sqlite:///{tmp_path / 'study.db'}"))
    assert len(calls) == 2 and storage.get_all_studies() == []


def test_a_running_trial_that_never_beat_is_failed_and_retried(tmp_path):
    """A process that died (or could not start its heartbeat thread) between claiming a trial and
    its first heartbeat left it RUNNING for good; it must become stale after the grace period."""
    import time

    from hybrimoe.tune.study import _fail_stale_trials

    storage = open_storage(SimpleNamespace(storage_url=f"sqlite:///{tmp_path / 'study.db'}"))
    study = optuna.create_study(storage=storage)
    silent = storage.create_new_trial(study._study_id)  # RUNNING, no heartbeat recorded
    storage.grace_period = 0  # instead of waiting out GRACE_S
    time.sleep(0.05)
    _fail_stale_trials(study)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert storage.get_trial(silent).state == optuna.trial.TrialState.FAIL
    assert states.count(optuna.trial.TrialState.WAITING) == 1  # enqueued again with its parameters


def test_a_heartbeat_thread_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    """Optuna starts a heartbeat thread per trial; when the system refuses a thread, the run ends in
    one line (the claimed trial is retried by the next run, as the test above shows)."""
    import threading

    from hybrimoe.cli import app
    from typer.testing import CliRunner

    real_start = threading.Thread.start

    def refuse_heartbeats(self):
        if "heartbeat" in getattr(self._target, "__name__", ""):
            raise RuntimeError("can't start new thread")
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", refuse_heartbeats)
    repo = Path(__file__).resolve().parents[2]
    result = CliRunner().invoke(app, [
        "tune", "--trace", str(repo / "traces/qwen3-30b-a3b.npz"),
        "--profile", str(repo / "profiles/rtx4090-desktop.qwen3-30b-a3b.yaml"), "--out", str(tmp_path / "t.yaml"),
        "--trials", "3", "--max-tokens", "60", "--objective", "decode", "--cache-ratio", "0.25",
    ])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "could not start a thread" in lines[0], result.output
