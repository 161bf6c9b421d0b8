"""`--measure-top K`: the K best simulated configurations and the default, run on the real runtime.

Design choices:
- Each candidate runs through `hybrimoe run`'s library call with the input profile carrying the
  candidate's policy (written to a temporary file, as `run` reads profiles from paths) and its
  cache capacity, on the user's prompts (batched, `max_new_tokens` each), so the measurement is
  what `hybrimoe run --profile tuned.yaml` would do.
- Candidates run in interleaved rounds and each keeps its median, so the machine's drift during
  the check slows them alike. The runtime's own prediction for the same run (the simulator, same
  profile, routing and planner) is kept beside each measurement.
- The measured objective is the study's: decode ms/token, TTFT, or TTFT plus `decode_tokens`
  tokens at the measured rate. The best measured candidate becomes the tuned policy.
- Only a model of the traces' shape can check them; another is refused before any trial.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hybrimoe.config import TunedResult, save_profile
from hybrimoe.errors import UserError
from hybrimoe.files import read_text
from hybrimoe.tune.result import Row, TuneResult
from hybrimoe.tune.setup import Inputs

DEFAULT_PROMPTS = ("ROMEO:", "To be, or not to be, that is the question:")


@dataclass(frozen=True)
class Measured:
    row: Row
    measured_ms: float  # the objective, measured
    predicted_ms: float | None  # the objective, as the runtime's simulator predicts that run
    decode_ms_per_token: float | None
    ttft_ms: float


def check_model(inputs: Inputs, model: Path | None) -> None:
    """Refuses a model that is not of the traces' shape (`None`: the demo model)."""
    from hybrimoe.profile.inputs import resolve_model

    meta = inputs.workload.meta
    shape = resolve_model(model_path=model)
    if meta.routing_shape != shape.routing_shape:
        raise UserError(
            f"--measure-top runs the model the traces were recorded on: the traces are of {meta.model} "
            f"({meta.n_layers} x {meta.n_experts} experts), the model is {shape.name} "
            f"({shape.n_layers} x {shape.n_experts})"
        )


def read_prompts(path: Path | None) -> tuple[str, ...]:
    """One prompt per non-empty line of `path`; a few built-in prompts without one."""
    if path is None:
        return DEFAULT_PROMPTS
    prompts = tuple(line for line in read_text(path, "--prompts").splitlines() if line.strip())
    if not prompts:
        raise UserError(f"--prompts {path} holds no prompt")
    return prompts


def candidates(result: TuneResult, k: int) -> list[Row]:
    """The k best distinct simulated configurations, then the default."""
    chosen: list[Row] = []
    for row in result.top:
        if len(chosen) < k and all((row.policy, row.slots) != (c.policy, c.slots) for c in chosen):
            chosen.append(row)
    default = result.row("default")
    if default is not None and all((default.policy, default.slots) != (c.policy, c.slots) for c in chosen):
        chosen.append(default)
    return chosen


def measure(
    inputs: Inputs,
    rows: list[Row],
    model: Path | None,
    prompts: tuple[str, ...],
    max_new_tokens: int = 32,
    rounds: int = 3,
    progress: Callable[[str], None] | None = None,
) -> list[Measured]:
    from hybrimoe.run import RunOptions, run

    runs: dict[int, list] = {i: [] for i in range(len(rows))}
    with tempfile.TemporaryDirectory(prefix="hybrimoe-measure-") as tmp:
        paths = []
        for i, row in enumerate(rows):
            path = Path(tmp) / f"candidate-{i}.yaml"
            save_profile(dataclasses.replace(inputs.profile, policy=row.policy, tuning=None), path)
            paths.append(path)
        for round_ in range(rounds):
            for i, row in enumerate(rows):
                if progress is not None:
                    progress(f"measuring {row.config} (round {round_ + 1} of {rounds})")
                experts = inputs.profile.expert_shape  # the run keeps its experts in the profile's format
                options = RunOptions(prompts=prompts, model=model, max_new_tokens=max_new_tokens,
                                     profile=paths[i], cache_experts=row.slots,
                                     quantize=experts.quantize, group_size=experts.group_size)
                runs[i].append(run(options, show_progress=False).stats)
    return [_measured(inputs, row, runs[i]) for i, row in enumerate(rows)]


def _measured(inputs: Inputs, row: Row, stats: list) -> Measured:
    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    decode = median(1000.0 / s.decode_tokens_per_s if s.decode_tokens_per_s else None for s in stats)
    ttft_ms = median(1000.0 * s.ttft_s for s in stats)
    predicted_decode = median(
        1000.0 / s.simulated_decode_tokens_per_s if s.simulated_decode_tokens_per_s else None for s in stats
    )
    predicted_ttft = median(1000.0 * s.simulated_ttft_s if s.simulated_ttft_s else None for s in stats)
    combine = inputs.workload.combine
    predicted = None
    if predicted_ttft is not None and (predicted_decode is not None or inputs.options.objective == "prefill"):
        predicted = combine(predicted_decode, predicted_ttft)
    return Measured(row, combine(decode or 0.0, ttft_ms), predicted, decode, ttft_ms)


def best(measured: list[Measured]) -> Measured:
    return min(measured, key=lambda m: m.measured_ms)


def as_results(measured: list[Measured]) -> tuple[TunedResult, ...]:
    """Measured and predicted values for the tuning record, each labelled by its trial."""
    results = []
    for m in measured:
        label = m.row.config if m.row.config in ("default", "tuned") else f"#{m.row.trial}"
        results.append(TunedResult(label, "measured", m.measured_ms, m.decode_ms_per_token, m.ttft_ms))
        if m.predicted_ms is not None:
            results.append(TunedResult(label, "predicted", m.predicted_ms))
    return tuple(results)
