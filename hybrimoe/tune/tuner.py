"""`hybrimoe tune` as two library calls: `prepare` (every check) and `tune` (the work).

Design choices:
- Everything a user can get wrong is checked by `prepare`, before the first trial (`setup.py`,
  the storage, the model for `--measure-top`).
- The tuned profile is written atomically at the end, so an interrupted study leaves its storage
  (to resume) and never a half-written profile; the report directory and the exports follow it.
- Choosing the experts' format (`--allow-quantize`): one study per format, each with that format's
  profile and its packed expert bytes in the budget (`prepare_formats` checks them all before any
  storage opens); `tune_formats` writes only the one fastest on the holdout.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hybrimoe.tune.ktransformers_export import KTransformersPlacement, write_ktransformers_placement
from hybrimoe.tune.llamacpp_export import LlamaCppPlacement, llamacpp_placement
from hybrimoe.tune.measure import Measured, as_results, best, candidates, check_model, measure, read_prompts
from hybrimoe.tune.result import TuneResult, summarize, write_tuned_profile
from hybrimoe.tune.setup import Inputs, TuneOptions, check_outputs, load_inputs
from hybrimoe.tune.study import Progress, open_storage, run_study
from hybrimoe.tune.workload import UNITS


@dataclass(frozen=True)
class TuneOutcome:
    result: TuneResult
    profile_path: Path
    measured: tuple[Measured, ...] = ()
    llamacpp: LlamaCppPlacement | None = None
    ktransformers: KTransformersPlacement | None = None
    report_files: tuple[Path, ...] = ()


def prepare(options: TuneOptions) -> Inputs:
    """Every check that can fail on the user's input, before any trial."""
    inputs = _checked(options)
    open_storage(inputs)  # an unreachable storage fails here, not after the first trial
    return inputs


def _checked(options: TuneOptions) -> Inputs:
    check_outputs(options)
    inputs = load_inputs(options)
    if options.measure_top:
        check_model(inputs, options.model)
        read_prompts(options.prompts)
    return inputs


@dataclass(frozen=True)
class FormatChoice:
    """One format's study, when `tune_formats` compares the experts' formats."""

    inputs: Inputs
    study: object  # its optuna.Study
    result: TuneResult
    measured: tuple[Measured, ...]

    @property
    def objective_ms(self) -> float:
        """The tuned policy's objective on the holdout (on train when nothing is held out)."""
        tuned = self.result.tuned
        return (tuned.holdout or tuned.train).objective_ms


def prepare_formats(options: TuneOptions) -> list[Inputs]:
    """Every check, for the checkpoint's format and each allowed quantized one (a study each)."""
    formats = (None, *dict.fromkeys(options.allow_quantize))
    studies = [_checked(dataclasses.replace(options, quantize=quantize)) for quantize in formats]
    for inputs in studies:  # storages open once every format's inputs are known good
        open_storage(inputs)
    return studies


def tune_formats(
    studies: list[Inputs],
    on_progress: Callable[[Progress], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> tuple[TuneOutcome, list[FormatChoice]]:
    """Tunes each format's study, then finishes (profile, report, exports) the one whose tuned
    policy is fastest on the holdout; the others are compared, not written."""
    phase = on_phase or (lambda text: None)
    choices = []
    for inputs in studies:
        phase(f"experts kept as {inputs.profile.expert_shape.format}: {inputs.budget}")
        choices.append(FormatChoice(inputs, *_search(inputs, on_progress, phase)))
    chosen = min(choices, key=lambda choice: choice.objective_ms)
    return _finish(chosen.inputs, chosen.study, chosen.result, chosen.measured, phase), choices


def tune(
    inputs: Inputs,
    on_progress: Callable[[Progress], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> TuneOutcome:
    phase = on_phase or (lambda text: None)
    return _finish(inputs, *_search(inputs, on_progress, phase), phase)


def _search(inputs: Inputs, on_progress, phase):
    """The study, the holdout and `--measure-top`: (study, result, measured)."""
    options = inputs.options
    started_s = time.perf_counter()
    study = run_study(inputs, on_progress, phase)
    phase("simulating the holdout")
    result = summarize(inputs, study, time.perf_counter() - started_s)
    measured: list[Measured] = []
    if options.measure_top:
        measured = measure(inputs, candidates(result, options.measure_top), options.model,
                           read_prompts(options.prompts), options.measure_tokens, progress=phase)
        result = summarize(inputs, study, time.perf_counter() - started_s, best(measured).row.trial,
                           as_results(measured), earlier=result)
    return study, result, tuple(measured)


def _finish(inputs: Inputs, study, result: TuneResult, measured: tuple[Measured, ...], phase) -> TuneOutcome:
    """Writes the tuned profile, then the report directory and the exports."""
    options = inputs.options
    profile_path = write_tuned_profile(inputs, result)
    report_files: tuple[Path, ...] = ()
    if options.report_dir is not None:
        from hybrimoe.tune.report_files import write_report

        phase(f"writing the report to {options.report_dir}")
        report_files = tuple(write_report(study, result, options.report_dir, UNITS[options.objective]))
    return TuneOutcome(
        result=result,
        profile_path=profile_path,
        measured=measured,
        llamacpp=llamacpp_placement(inputs, result) if "llamacpp" in options.exports else None,
        ktransformers=write_ktransformers_placement(inputs, result) if "ktransformers" in options.exports else None,
        report_files=report_files,
    )
