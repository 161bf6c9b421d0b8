"""`hybrimoe tune` as one library call: check inputs, run the study, summarise, write the profile.

Design choices:
- Everything a user can get wrong is checked before the first trial (`setup.py`); the tuned
  profile is written atomically at the end, so an interrupted study leaves its storage (to resume)
  and never a half-written profile.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from hybrimoe.tune.result import TuneResult, summarize, write_tuned_profile
from hybrimoe.tune.setup import Inputs, TuneOptions, check_outputs, load_inputs
from hybrimoe.tune.study import Progress, open_storage, run_study


def prepare(options: TuneOptions) -> Inputs:
    """Every check that can fail on the user's input, before any trial."""
    check_outputs(options)
    inputs = load_inputs(options)
    open_storage(inputs)  # an unreachable storage fails here, not after the first trial
    return inputs


def tune(
    inputs: Inputs,
    on_progress: Callable[[Progress], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> TuneResult:
    started_s = time.perf_counter()
    study = run_study(inputs, on_progress)
    if on_phase is not None:
        on_phase("simulating the holdout")
    result = summarize(inputs, study, time.perf_counter() - started_s)
    write_tuned_profile(inputs, result)
    return result
