"""The Optuna study: storage, sampler, pruner, the objective, and the worker processes.

Design choices:
- Storage: an Optuna RDB storage (SQLite beside `--out` by default, any URL with `--storage`: one
  PostgreSQL study shared by `hybrimoe tune` on several machines), or memory. RDB storages keep a
  heartbeat: a trial whose process died (SIGKILL) is failed when a worker next starts a trial and
  rerun with its parameters (`RetryHeartbeatStaleTrialCallback`), so completed trials are never lost and
  the interrupted one is not skipped. SQLite transactions take the write lock first, so local
  workers never claim the same waiting trial (`_transactions_lock_first`).
- `--trials` is the study's total, counted over every worker and every rerun (finished trials:
  complete or pruned), so a rerun after an interruption completes the study rather than adding to it.
- Sampler: TPE, seeded (worker i uses seed + i so workers do not propose the same trial),
  multivariate with group decomposition for the conditional knobs, and a constant liar so parallel
  workers do not all chase the same region. The default policy and each baseline strategy are
  enqueued first, at the same budget: baseline trials carry a `strategy` user attribute and
  suggest no knobs, so the report compares against them without them informing the sampler.
- Pruning: Hyperband over the objective's checkpoints (see workload.py). Pareto studies (time and
  expert-cache memory) are not pruned: Optuna prunes single-objective studies only.
- Workers are processes, not threads: the simulator is Python and would hold the GIL. Each opens
  the same storage; the main process is worker 0 and reports progress for all.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import multiprocessing
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from hybrimoe.config import PolicyConfig
from hybrimoe.errors import UserError, first_line
from hybrimoe.policy.names import BASELINES
from hybrimoe.capacity import GIB
from hybrimoe.tune.setup import Inputs, TuneOptions, load_inputs

HEARTBEAT_S = 2
GRACE_S = 10  # a running trial without a heartbeat for this long is failed and retried
MAX_RETRIES = 2
OPEN_ATTEMPTS = 5
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PAST_TARGET = "past_target"  # a trial's user attribute: started past --trials by a racing worker, ran nothing
WORKER_FAILED = 3  # a worker's exit code when its study failed (it printed why, unless the storage went away)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
RESULT_ATTRS = ("slots", "decode_ms_per_token", "ttft_ms", "ready_hit_rate")


@dataclass(frozen=True)
class Progress:
    finished: int
    pruned: int
    target: int | None
    best_ms: float | None  # the best tuned (not baseline) value so far
    elapsed_s: float


def open_storage(inputs: Inputs):
    """The study's storage; a URL that cannot be opened is one line, before any trial.

    Opening creates Optuna's tables in a new database; when several processes start on an empty
    database at once, all but one lose that race (optuna#1092: PostgreSQL says so with an integrity
    or programming error, SQLite with "table ... already exists") and simply open again."""
    if inputs.storage_url is None:
        return optuna.storages.InMemoryStorage()
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    sqlite = inputs.storage_url.startswith("sqlite")
    if sqlite and (database := make_url(inputs.storage_url).database):  # beside --out: its folder may not exist yet
        with contextlib.suppress(OSError):  # one that cannot be made fails to open below, in one line
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {"connect_args": {"timeout": 60}} if sqlite else {}
    for attempt in range(OPEN_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = _Storage(
                    engine_url(inputs.storage_url),
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=MAX_RETRIES
                    ),
                )
            if sqlite:
                _transactions_lock_first(storage.engine)
            return storage
        except (IntegrityError, ProgrammingError, OperationalError) as exc:
            lost_race = not isinstance(exc, OperationalError) or "already exists" in str(exc)
            if not lost_race or attempt == OPEN_ATTEMPTS - 1:
                raise _storage_error(inputs, exc) from None
            time.sleep(0.2 * (attempt + 1))
        except Exception as exc:  # sqlalchemy's and the drivers' errors have no common base
            raise _storage_error(inputs, exc) from None


class _Storage(optuna.storages.RDBStorage):
    """Optuna's RDB storage with one more kind of stale trial: a running trial that never recorded a
    heartbeat and started more than the grace period ago. Its process died (or could not start its
    heartbeat thread) between claiming the trial and the first beat; Optuna skips such trials when
    it looks for stale ones, so they stayed RUNNING for good, were never retried, and counted toward
    --trials. The start time is the claiming machine's clock (Optuna's), compared with this one's."""

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        from optuna.storages._rdb import models

        stale = super()._get_stale_trial_ids(study_id)
        trials = models.TrialModel
        if hasattr(trials, "_datetime_start_utc"):  # Optuna 5 stores UTC, 4 the local time
            started, now = trials._datetime_start_utc, datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        else:
            started, now = trials.datetime_start, datetime.datetime.now()
        session = self.scoped_session()
        try:
            silent = (
                session.query(trials.trial_id)
                .filter(trials.study_id == study_id, trials.state == TrialState.RUNNING, ~trials.heartbeats.any())
                .filter(started < now - datetime.timedelta(seconds=self.grace_period))
                .all()
            )
        finally:
            self.scoped_session.remove()
        return stale + [trial_id for (trial_id,) in silent if trial_id not in stale]


def engine_url(url: str) -> str:
    """The URL SQLAlchemy opens: a plain `postgresql://` (or `postgres://`) names psycopg 3, the
    driver the `postgres` extra installs (SQLAlchemy 2.0 would pick psycopg2 for it, 2.1 psycopg);
    a URL that names its driver is kept."""
    scheme, sep, rest = url.partition("://")
    return f"postgresql+psycopg://{rest}" if sep and scheme in ("postgresql", "postgres") else url


def _transactions_lock_first(engine) -> None:
    """SQLite through Python's sqlite3 opens a transaction only at its first write, so two workers
    can both read a waiting (enqueued) trial and both claim it, and one then fails telling a trial
    the other completed. Every transaction here begins with BEGIN IMMEDIATE instead (SQLAlchemy's
    documented recipe for pysqlite), which takes the write lock first: one worker at a time."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_connection, connection_record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # the connections opened while creating the tables predate the listeners


def _storage_error(inputs: Inputs, exc: Exception) -> UserError:
    return UserError(f"cannot open storage {storage_display(inputs.storage_url)}: {first_line(exc)}")


def storage_display(url: str | None) -> str:
    """The storage URL without its password, as reports and tuned profiles show it."""
    if url is None:
        return "memory"
    from sqlalchemy.engine import make_url

    try:
        return make_url(url)._replace(password=None).render_as_string(hide_password=False)
    except Exception:  # not a URL sqlalchemy parses: show only its scheme
        return url.split(":", 1)[0] + ":..."


def open_study(inputs: Inputs, storage, worker: int = 0) -> optuna.Study:
    options = inputs.options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=(options.seed + worker) % 2**32, multivariate=True, group=True, constant_liar=True,
            n_startup_trials=10,
        )
    pruner = optuna.pruners.NopPruner() if options.pareto else optuna.pruners.HyperbandPruner(
        min_resource=1, max_resource=inputs.workload.n_checkpoints, reduction_factor=3
    )
    directions = ["minimize", "minimize"] if options.pareto else ["minimize"]
    return optuna.create_study(
        study_name=inputs.study_name, storage=storage, sampler=sampler, pruner=pruner,
        directions=directions, load_if_exists=True,
    )


def enqueue_references(study: optuna.Study, inputs: Inputs) -> None:
    """The default policy, then every baseline strategy, as a new study's first trials."""
    default = PolicyConfig()
    study.enqueue_trial(inputs.space.choices_of(default, inputs.workload.meta.top_k), user_attrs={"config": "default"})
    for strategy in BASELINES:
        study.enqueue_trial({}, user_attrs={"config": strategy, "strategy": strategy})


def objective(inputs: Inputs, worker: int = 0) -> Callable[[optuna.Trial], float | tuple[float, float]]:
    """One trial: a baseline strategy at the budget, or the hybrimoe policy the sampler suggests."""
    workload, space = inputs.workload, inputs.space
    expert_bytes = inputs.profile.expert_shape.expert_bytes  # in the format the profile keeps experts in

    def run(trial: optuna.Trial):
        trial.set_user_attr("worker", worker)
        target = inputs.options.trials
        if target is not None and _counted_before(trial) >= target:
            trial.set_user_attr(PAST_TARGET, True)
            raise PastTarget(trial.number)  # `_stop_at_target`, called after it, ends this worker's loop
        strategy = trial.user_attrs.get("strategy", "hybrimoe")
        if strategy == "hybrimoe":
            chosen = space.suggest(trial)
            earlier = _completed_with(trial.study, chosen)
            if earlier is not None:  # the simulator is deterministic: the same choices give the same values
                for name in RESULT_ATTRS:
                    trial.set_user_attr(name, earlier.user_attrs.get(name))
                trial.set_user_attr("repeat_of", earlier.number)
                return earlier.values[0] if len(earlier.values) == 1 else tuple(earlier.values)
            policy, slots = space.policy_of(chosen), space.slots_of(chosen)
        else:
            policy, slots = PolicyConfig(), inputs.max_slots
        report = _pruning_reporter(trial) if strategy == "hybrimoe" and not inputs.options.pareto else None
        result = workload.evaluate(workload.train, inputs.profile, strategy, policy, slots, report)
        values = {"slots": slots, "decode_ms_per_token": result.decode_ms_per_token, "ttft_ms": result.ttft_ms,
                  "ready_hit_rate": result.ready_hit_rate}
        for name in RESULT_ATTRS:
            trial.set_user_attr(name, values[name])
        if inputs.options.pareto:
            return result.objective_ms, slots * expert_bytes / GIB
        return result.objective_ms

    return run


def _pruning_reporter(trial: optuna.Trial) -> Callable[[int, float], None]:
    def report(step: int, value: float) -> None:
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned()

    return report


def is_baseline(trial: optuna.trial.FrozenTrial) -> bool:
    """An enqueued baseline strategy's trial (it suggests no knobs); every other trial tunes hybrimoe."""
    return "strategy" in trial.user_attrs


def tuned_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The completed trials of the hybrimoe policy (the default's included), baselines left out."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if not is_baseline(t)]


def _completed_with(study: optuna.Study, chosen: dict) -> optuna.trial.FrozenTrial | None:
    return next((trial for trial in tuned_trials(study) if trial.params == chosen), None)


def progress_of(study: optuna.Study, target: int | None, started_s: float) -> Progress:
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    tuned = [t.values[0] for t in trials if t.state == TrialState.COMPLETE and not is_baseline(t)]
    return Progress(
        finished=len(trials),
        pruned=sum(t.state == TrialState.PRUNED for t in trials),
        target=target,
        best_ms=min(tuned) if tuned else None,
        elapsed_s=time.perf_counter() - started_s,
    )


def _occupied(study: optuna.Study) -> int:
    """Trials that count toward --trials already: finished ones and those running now."""
    return len(study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)))


class PastTarget(Exception):
    """A trial a worker started after another's filled the target: it ends FAIL, marked, runs nothing."""


def _counted_before(trial: optuna.Trial) -> int:
    """Trials that count toward --trials (finished or running) and were created before `trial`."""
    states = (*FINISHED, TrialState.RUNNING)
    return sum(t.number < trial.number for t in trial.study.get_trials(deepcopy=False, states=states))


def _stop_at_target(target: int) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """After each trial: stop once finished and running trials reach the target, so a worker does not
    start a trial that another's running one will complete the study without (Optuna's
    MaxTrialsCallback counts finished trials only, and the study overshot by a trial per worker).
    Two workers can still pass this check at once; the later of their trials then stops as
    `PastTarget` before it runs (the storage numbers trials in the order they were created)."""
    def stop(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        if _occupied(study) >= target:
            study.stop()

    return stop


def _optimize(inputs: Inputs, study: optuna.Study, worker: int = 0, callbacks=()) -> None:
    options = inputs.options
    remaining = None
    if options.trials is not None:
        _fail_stale_trials(study)  # a dead process's running trials: enqueued again, not counted
        remaining = options.trials - _occupied(study)
        if remaining <= 0:
            return
    stop = [_stop_at_target(options.trials)] if options.trials is not None else []
    study.optimize(
        objective(inputs, worker), n_trials=remaining, timeout=options.timeout_s, callbacks=[*stop, *callbacks],
        gc_after_trial=False, catch=(PastTarget,),
    )


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the process that started it dies, so a worker never
    goes on adding trials as an orphan after `hybrimoe tune` is killed (elsewhere it stops at its
    next trial, `_parent_alive`)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return


def _parent_alive(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
    parent = multiprocessing.parent_process()
    if parent is not None and not parent.is_alive():
        study.stop()


def _worker(options: TuneOptions, worker: int) -> None:
    """A worker process: the same inputs and study, its own sampler seed."""
    _die_with_parent()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # its warnings repeat what the run reports in one line
    inputs = load_inputs(options)
    try:
        _optimize(inputs, open_study(inputs, open_storage(inputs), worker), worker, callbacks=[_parent_alive])
    except Exception as exc:  # the main process reports the exit code (and a lost storage); one line says why
        if _storage_failure(exc) is None:
            print(f"tuning worker {worker}: {first_line(exc)}", file=sys.stderr)
        sys.exit(WORKER_FAILED)


def run_study(
    inputs: Inputs,
    on_progress: Callable[[Progress], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> optuna.Study:
    """Runs the study to its trial target or timeout with `--workers` processes; returns it. A
    worker that dies is reported through `on_note` in one line and the others go on; a storage
    that goes away ends the run with a UserError (the finished trials stay in it for a rerun)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # its warnings repeat what the run reports in one line
    options = inputs.options
    study = open_study(inputs, open_storage(inputs))
    if not study.trials:  # two machines starting at once may both enqueue them; the report reads the first
        enqueue_references(study, inputs)
    started_s = time.perf_counter()

    def report(*_) -> None:
        if on_progress is not None:
            on_progress(progress_of(study, options.trials, started_s))

    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker, args=(options, i), daemon=True) for i in range(1, options.workers)]
    for process in workers:
        process.start()
    try:
        report()
        _optimize(inputs, study, callbacks=[report])
        while any(process.is_alive() for process in workers):
            report()
            time.sleep(0.5)
        dead = [(i, process.exitcode) for i, process in enumerate(workers, start=1) if process.exitcode != 0]
        for i, code in dead:
            if on_note is not None:
                cause = f"signal {-code}" if code < 0 else f"exit code {code}"
                on_note(f"warning: tuning worker {i} stopped early ({cause}); the study goes on without it")
        if dead and options.trials is not None and len(study.get_trials(deepcopy=False, states=FINISHED)) < options.trials:
            _retry_stale_trials(study)
            _optimize(inputs, study, callbacks=[report])
        report()
    except Exception as exc:
        lost = _storage_failure(exc)
        kept = ("the finished trials are kept: rerun the same command to continue" if inputs.storage_url is not None
                else "nothing is kept (in-memory storage)")
        if lost is not None:
            raise UserError(f"lost the storage {storage_display(inputs.storage_url)} during the study "
                            f"({first_line(lost)}); {kept}") from None
        if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):  # a trial's heartbeat thread
            raise UserError(f"could not start a thread (the system's limit on threads or memory); {kept}, and "
                            "the trial it had claimed is retried") from None
        raise
    finally:  # on an interrupt the workers stop too; their running trials are retried on the next run
        for process in workers:
            if process.is_alive():
                process.terminate()
            process.join()
    if not tuned_trials(study):  # a --timeout shorter than one trial
        within = "" if options.timeout_s is None else f" within --timeout {options.timeout_s:g} s: give it more time"
        kept = (f"; a rerun continues the study in {storage_display(inputs.storage_url)}"
                if inputs.storage_url is not None else "")
        raise UserError(f"no trial finished{within}{kept}")
    return study


def _retry_stale_trials(study: optuna.Study) -> None:
    """Once their heartbeat is stale, a dead worker's running trials are failed and enqueued again
    (the retry callback), so this process can run them and complete the study's target."""
    time.sleep(GRACE_S + HEARTBEAT_S)
    _fail_stale_trials(study)


def _fail_stale_trials(study: optuna.Study) -> None:
    """Running trials whose heartbeat is older than the grace period become FAIL, and the retry
    callback enqueues each again with its parameters (Optuna does this only when a trial starts)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _storage_failure(exc: BaseException) -> BaseException | None:
    """The database error behind `exc` when the storage went away (a server stopped, a file removed),
    else None. Optuna can mask it: its trial loop then fails on its own state (UnboundLocalError)
    with the database error as the context."""
    from sqlalchemy.exc import DBAPIError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, DBAPIError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
