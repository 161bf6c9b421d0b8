"""The SQLite storage local workers share: a waiting (enqueued) trial is claimed by one worker only.

Python's sqlite3 opens a transaction at the first write, so two processes could both read a waiting
trial and both set it running (measured: 8 double claims in 30 rounds of 4 processes); then one
fails telling a trial the other completed. `open_storage` begins every transaction with the write
lock, so a transaction that has only read already keeps every other writer out.
"""

from __future__ import annotations

import sqlite3
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
