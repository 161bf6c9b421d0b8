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

    real, calls = optuna.storages.RDBStorage, []

    def first_loses(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            real(*args, **kwargs)  # the winner's tables now exist
            raise OperationalError("CREATE TABLE trial_intermediate_values", {}, Exception(
                "table trial_intermediate_values already exists"))
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", first_loses)
    storage = open_storage(SimpleNamespace(storage_url=f"sqlite:///{tmp_path / 'study.db'}"))
    assert len(calls) == 2 and storage.get_all_studies() == []
