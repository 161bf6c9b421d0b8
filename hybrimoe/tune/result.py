"""What a finished study says: the best policy, its comparison on train and holdout, and the tuned profile.

Design choices:
- The tuned configuration is the best completed hybrimoe trial (in a Pareto study, the fastest on
  the front), or the best measured one with `--measure-top`. The default policy and the baselines are read from their enqueued trials for the
  training replay, then all of them are simulated once more on the holdout, which the search never
  saw.
- The tuned profile is the input profile unchanged but for its `policy` section (the best trial)
  and a `tuning` record: study, storage without password, trial counts, traces and their hashes,
  objective, budget, and every simulated value the report shows.
- Importances come from Optuna's default evaluator (PED-ANOVA in Optuna 5) over the knobs every
  tuned trial chose (the conditional ones are left out); they need a few completed trials and are
  absent otherwise.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from hybrimoe.config import PolicyConfig, TunedResult, TuningRecord, save_profile
from hybrimoe.tune.setup import Inputs
from hybrimoe.tune.study import BASELINES, PAST_TARGET, is_baseline, storage_display, tuned_trials
from hybrimoe.tune.workload import Evaluation

TOP = 5
MIN_IMPORTANCE_TRIALS = 4


@dataclass(frozen=True)
class Row:
    """One configuration in the report: its simulated values on train and holdout."""

    config: str  # "tuned", "default", or a baseline strategy
    strategy: str
    policy: PolicyConfig
    slots: int
    train: Evaluation
    holdout: Evaluation | None
    trial: int


@dataclass(frozen=True)
class TuneResult:
    study_name: str
    storage: str
    trials: int  # finished: complete and pruned
    pruned: int
    failed: int
    rows: tuple[Row, ...]  # tuned, default, then the baselines
    top: tuple[Row, ...]  # the best distinct tuned configurations on train (holdout not simulated)
    importances: dict[str, float] | None
    pareto_front: tuple[Row, ...]  # Pareto studies only, fewest slots first
    record: TuningRecord
    seconds: float  # this run's search (a rerun of a finished study: nearly 0)
    trial_seconds: float  # the study's own time: its finished trials' durations, over every run and worker

    @property
    def tuned(self) -> Row:
        return self.rows[0]

    def row(self, config: str) -> Row | None:
        return next((row for row in self.rows if row.config == config), None)


def _evaluation(trial: FrozenTrial) -> Evaluation:
    attrs = trial.user_attrs
    return Evaluation(trial.values[0], attrs.get("decode_ms_per_token"), attrs.get("ttft_ms"),
                      attrs.get("ready_hit_rate", 0.0))


def _row(inputs: Inputs, config: str, trial: FrozenTrial, holdout: bool) -> Row:
    strategy = trial.user_attrs.get("strategy", "hybrimoe")
    if strategy == "hybrimoe":
        policy, slots = inputs.space.policy_of(trial.params), inputs.space.slots_of(trial.params)
    else:
        policy, slots = PolicyConfig(), inputs.max_slots
    held = None
    if holdout and inputs.workload.holdout:
        held = inputs.workload.evaluate(inputs.workload.holdout, inputs.profile, strategy, policy, slots)
    return Row(config, strategy, policy, slots, _evaluation(trial), held, trial.number)


def summarize(
    inputs: Inputs,
    study: optuna.Study,
    seconds: float,
    chosen_trial: int | None = None,
    measured: tuple[TunedResult, ...] = (),
    earlier: TuneResult | None = None,
) -> TuneResult:
    """The report's contents; simulates the holdout for the tuned, default and baseline configs.

    The tuned configuration is the best simulated one, or trial `chosen_trial` (chosen by
    measurement, whose results `measured` joins the tuning record); an `earlier` summary of the
    same study lends the holdout values it already simulated."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    tuned = sorted(tuned_trials(study), key=lambda t: t.values)
    if not tuned:
        raise RuntimeError("the study has no completed tuned trial")
    pareto = inputs.options.pareto
    best = tuned[0] if chosen_trial is None else study.trials[chosen_trial]
    references = {}
    for t in complete:
        config = t.user_attrs.get("config")
        if config is not None and config not in references:
            references[config] = t
    simulated = {row.trial: row for row in earlier.rows} if earlier is not None else {}

    def with_holdout(config: str, trial: FrozenTrial) -> Row:
        if trial.number in simulated:
            return dataclasses.replace(simulated[trial.number], config=config)
        return _row(inputs, config, trial, holdout=True)

    rows = [with_holdout("tuned", best)]
    rows += [with_holdout(name, references[name]) for name in ("default", *BASELINES) if name in references]
    front = ()
    if pareto:
        front_trials = [t for t in study.best_trials if not is_baseline(t)]
        front = tuple(sorted((_row(inputs, "front", t, holdout=False) for t in front_trials), key=lambda r: r.slots))
    n_pruned = sum(t.state == TrialState.PRUNED for t in trials)
    distinct = [t for t in tuned if "repeat_of" not in t.user_attrs]
    record = _record(inputs, rows, len(complete) + n_pruned, n_pruned, measured)
    return TuneResult(
        study_name=inputs.study_name,
        storage=storage_display(inputs.storage_url),
        trials=len(complete) + n_pruned,
        pruned=n_pruned,
        failed=sum(t.state == TrialState.FAIL and PAST_TARGET not in t.user_attrs for t in trials),
        rows=tuple(rows),
        top=tuple(_row(inputs, f"#{t.number}", t, holdout=False) for t in distinct[:TOP]),
        importances=None if pareto else _importances(tuned),
        pareto_front=front,
        record=record,
        seconds=seconds,
        trial_seconds=sum(
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.datetime_start and t.datetime_complete
        ),
    )


def importance_study(tuned: list[FrozenTrial]) -> tuple[optuna.Study, list[str]] | None:
    """The completed tuned trials as a single-objective study of their time (a Pareto study's first
    value), with the knobs every one of them chose; None with too few trials or no common knob."""
    if len(tuned) < MIN_IMPORTANCE_TRIALS:
        return None
    common = sorted(set.intersection(*(set(t.params) for t in tuned)))
    if not common:
        return None
    study = optuna.create_study()
    study.add_trials(
        [optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=t.values[0]) for t in tuned]
    )
    return study, common


def _importances(tuned: list[FrozenTrial]) -> dict[str, float] | None:
    """Optuna's importances over the knobs every completed tuned trial chose."""
    found = importance_study(tuned)
    if found is None:
        return None
    study, knobs = found
    try:
        return optuna.importance.get_param_importances(study, params=knobs)
    except (RuntimeError, ValueError):  # too few distinct values to fit
        return None


def _record(
    inputs: Inputs, rows: list[Row], n_finished: int, n_pruned: int, measured: tuple[TunedResult, ...]
) -> TuningRecord:
    results = []
    for row in rows:
        for part, value in (("train", row.train), ("holdout", row.holdout)):
            if value is not None:
                results.append(TunedResult(row.config, part, value.objective_ms, value.decode_ms_per_token,
                                           value.ttft_ms, value.ready_hit_rate))
    options = inputs.options
    return TuningRecord(
        study=inputs.study_name,
        storage=storage_display(inputs.storage_url),
        objective=options.objective,
        decode_tokens=options.decode_tokens,
        budget=inputs.budget,
        cache_experts=rows[0].slots,
        trials=n_finished,
        pruned=n_pruned,
        traces=inputs.traces,
        holdout=inputs.holdout,
        results=(*results, *measured),
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def write_tuned_profile(inputs: Inputs, result: TuneResult, path: Path | None = None) -> Path:
    """The input profile with the tuned policy section (naming the experts' format when quantized,
    so `run` keeps them so) and the tuning record."""
    policy, experts = result.tuned.policy, inputs.profile.expert_shape
    if experts.quantize is not None:
        policy = dataclasses.replace(policy, quantize=experts.quantize, group_size=experts.group_size)
    out = path or inputs.options.out
    name = f"{inputs.profile.name}, tuned ({out.stem})"  # tables of several --profile tell them apart
    tuned = dataclasses.replace(inputs.profile, name=name, policy=policy, tuning=result.record)
    return save_profile(tuned, out, overwrite=inputs.options.force)
