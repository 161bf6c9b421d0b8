"""`hybrimoe tune` as two library calls: `prepare` (every check) and `tune` (the work).

Design choices:
- Everything a user can get wrong is checked by `prepare`, before the first trial (`setup.py`,
  the storage, the model for `--measure-top`).
- The tuned profile is written atomically at the end, so an interrupted study leaves its storage
  (to resume) and never a half-written profile; the report directory and the exports follow it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hybrimoe.tune.export import LlamaCppPlacement, llamacpp_placement, write_ktransformers_placement
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
    ktransformers_path: Path | None = None
    report_files: tuple[Path, ...] = ()


def prepare(options: TuneOptions) -> Inputs:
    """Every check that can fail on the user's input, before any trial."""
    check_outputs(options)
    inputs = load_inputs(options)
    if options.measure_top:
        check_model(inputs, options.model)
        read_prompts(options.prompts)
    open_storage(inputs)  # an unreachable storage fails here, not after the first trial
    return inputs


def tune(
    inputs: Inputs,
    on_progress: Callable[[Progress], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> TuneOutcome:
    options = inputs.options
    phase = on_phase or (lambda text: None)
    started_s = time.perf_counter()
    study = run_study(inputs, on_progress)
    phase("simulating the holdout")
    result = summarize(inputs, study, time.perf_counter() - started_s)
    measured: list[Measured] = []
    if options.measure_top:
        measured = measure(inputs, candidates(result, options.measure_top), options.model,
                           read_prompts(options.prompts), options.measure_tokens, progress=phase)
        result = summarize(inputs, study, time.perf_counter() - started_s, best(measured).row.trial,
                           as_results(measured), earlier=result)
    profile_path = write_tuned_profile(inputs, result)
    report_files: tuple[Path, ...] = ()
    if options.report_dir is not None:
        from hybrimoe.tune.report_files import write_report

        phase(f"writing the report to {options.report_dir}")
        report_files = tuple(write_report(study, result, options.report_dir, UNITS[options.objective]))
    return TuneOutcome(
        result=result,
        profile_path=profile_path,
        measured=tuple(measured),
        llamacpp=llamacpp_placement(inputs, result) if "llamacpp" in options.exports else None,
        ktransformers_path=write_ktransformers_placement(inputs, result) if "ktransformers" in options.exports else None,
        report_files=report_files,
    )
