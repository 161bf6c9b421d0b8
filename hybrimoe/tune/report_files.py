"""A finished study as files: its trials as CSV, a few images, and a markdown page linking them.

Design choices:
- `trials.csv` is Optuna's trials dataframe with parameters and user attributes (slots, decode
  ms/token, TTFT, ready hit rate, the reference's name); Optuna's own system attributes are left out.
- The images are Optuna's matplotlib plots (history, importances, Pareto front) and one of ours:
  each completed trial's time against its expert-cache slots. The default policy and each baseline
  get a marker and colour of their own (in the history too, so they stand apart from the search's
  trials), legends sit outside the data, and an axis whose values span more than a decade is
  logarithmic. Baseline trials suggest no knobs, so
  importances (of the time, by Optuna's default evaluator) are computed over the completed tuned
  trials alone and the knobs every one of them chose (`result.importance_study`, shared with the
  report's table); with too few such trials, or when Optuna cannot fit them, the image is skipped
  rather than failing the report.
- matplotlib is optional (`pip install hybrimoe[plot]`): without it the CSV and the page are still
  written, and the page says how to get the images. Figures render off screen (Agg), are closed as
  soon as they are saved, and the style Optuna's plots set globally is undone afterwards.
- Every file is written atomically, so an interrupted report leaves no half-written file; a
  directory that cannot be created or written is a `UserError` naming it.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from hybrimoe.errors import UserError
from hybrimoe.files import write_atomically
from hybrimoe.tune.result import TuneResult, importance_study
from hybrimoe.tune.study import tuned_trials

CSV_NAME = "trials.csv"
INDEX_NAME = "index.md"
IMAGE_NAMES = ("history.png", "importances.png", "latency_vs_slots.png", "pareto.png")
# (marker, colour) of the default policy and each baseline, one each; the tuned trials are blue dots
REFERENCE_STYLES = (
    ("s", "tab:red"), ("^", "tab:green"), ("D", "tab:purple"), ("v", "tab:brown"), ("P", "tab:pink"),
    ("X", "tab:gray"), ("h", "tab:olive"), ("<", "tab:cyan"), (">", "tab:orange"), ("p", "black"),
)
SPREAD_FOR_LOG = 10.0  # a plot axis whose values span more than this factor is drawn on a log scale
CSV_ATTRS = ("number", "value", "datetime_start", "datetime_complete", "duration", "params", "user_attrs", "state")


def write_report(study: optuna.Study, result: TuneResult, directory: Path, unit: str) -> list[Path]:
    """Writes trials.csv, the images matplotlib allows, and index.md into `directory`; returns their paths."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the report directory {directory}: {exc.strerror or exc}") from None
    csv_path = _write(directory / CSV_NAME, study.trials_dataframe(attrs=CSV_ATTRS).to_csv(index=False).encode())
    images = _write_images(study, result, directory, unit)
    index_path = _write(directory / INDEX_NAME, _index_markdown(result, csv_path, images, unit).encode())
    return [csv_path, *(images or []), index_path]


def _write(path: Path, data: bytes) -> Path:
    try:
        return write_atomically(path, lambda fh: fh.write(data))
    except OSError as exc:
        raise UserError(f"cannot write {path.name} in the report directory {path.parent}: {exc.strerror or exc}") from None


def _write_images(study: optuna.Study, result: TuneResult, directory: Path, unit: str) -> list[Path] | None:
    """The images written, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    pareto = len(study.directions) > 1
    time_name = f"time ({unit})"
    time_of = (lambda t: t.values[0]) if pareto else None
    history, importances, latency_vs_slots, pareto_front = IMAGE_NAMES
    figures = {
        history: lambda: _history_figure(study, time_of, time_name),
        importances: lambda: _importances_figure(study, time_name),
        latency_vs_slots: lambda: _latency_vs_slots_figure(study, result, time_name),
    }
    if pareto:
        figures[pareto_front] = lambda: _pareto_figure(study, time_name)
    written = []
    with warnings.catch_warnings(), matplotlib.rc_context():  # Optuna's plots switch the global style to ggplot
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, draw in figures.items():
            fig = draw()
            if fig is not None:
                written.append(_write(directory / name, _png_bytes(fig)))
    return written


def _png_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _importances_figure(study: optuna.Study, time_name: str):
    """Optuna's importances (of the time) over the knobs every completed tuned trial chose; None when too few."""
    found = importance_study(tuned_trials(study))
    if found is None:
        return None
    tuned_only, knobs = found
    try:
        ax = optuna.visualization.matplotlib.plot_param_importances(tuned_only, params=knobs, target_name=time_name)
    except (RuntimeError, ValueError):  # too few distinct values to fit
        return None
    return ax.figure


def _history_figure(study: optuna.Study, time_of, time_name: str):
    """Optuna's optimization history, with the default policy and the baselines marked apart from
    the search's trials."""
    ax = optuna.visualization.matplotlib.plot_optimization_history(study, target=time_of, target_name=time_name)
    for (marker, color), trial in zip(REFERENCE_STYLES, _reference_trials(study)):
        ax.scatter(trial.number, trial.values[0], marker=marker, color=color, s=60, edgecolors="black", zorder=3,
                   label=trial.user_attrs["config"])
    _log_scale_if_spread(ax, "y", _times(study))
    _legend_outside(ax)
    return ax.figure


def _pareto_figure(study: optuna.Study, time_name: str):
    ax = optuna.visualization.matplotlib.plot_pareto_front(study, target_names=[time_name, "expert cache (GiB)"])
    _log_scale_if_spread(ax, "x", _times(study))
    _legend_outside(ax)
    return ax.figure


def _latency_vs_slots_figure(study: optuna.Study, result: TuneResult, time_name: str):
    """Each completed trial's time against its cache slots: tuned trials, the default, each baseline
    (a marker and colour of its own), the best."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    tuned = tuned_trials(study)
    ax.scatter([t.user_attrs["slots"] for t in tuned], [t.values[0] for t in tuned], color="tab:blue", alpha=0.6,
               label="tuned trials")
    references = _reference_trials(study)
    for (marker, color), trial in zip(REFERENCE_STYLES, references):
        ax.scatter(trial.user_attrs["slots"], trial.values[0], marker=marker, color=color, s=60, edgecolors="black",
                   label=trial.user_attrs["config"])
    best = result.tuned
    ax.scatter(best.slots, best.train.objective_ms, marker="*", s=250, color="gold", edgecolors="black", zorder=3,
               label=f"tuned best (trial {best.trial})")
    ax.set_xlabel("expert-cache slots")
    ax.set_ylabel(time_name)
    ax.set_title(f"{result.study_name}: time against cache capacity (train)")
    ax.grid(True, alpha=0.3)
    _log_scale_if_spread(ax, "y", [t.values[0] for t in (*tuned, *references)])
    _legend_outside(ax)
    return fig


def _reference_trials(study: optuna.Study) -> list:
    """The completed trials of the default policy and the baselines (they carry their config's name)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [t for t in complete if "config" in t.user_attrs]


def _times(study: optuna.Study) -> list[float]:
    return [t.values[0] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def _log_scale_if_spread(ax, axis: str, values: list[float]) -> None:
    """A log scale where the values span more than a decade (one outlier would squeeze the rest)."""
    positive = [v for v in values if v > 0]
    if positive and max(positive) > SPREAD_FOR_LOG * min(positive):
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def _legend_outside(ax) -> None:
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _cell(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else f"{value:{spec}}"


def _index_markdown(result: TuneResult, csv_path: Path, images: list[Path] | None, unit: str) -> str:
    tuned = result.tuned
    detail = "holdout" if tuned.holdout is not None else "train"
    lines = [
        f"# Tuning report: {result.study_name}",
        "",
        f"{result.trials} trials finished ({result.pruned} pruned, {result.failed} failed), {result.trial_seconds:.0f} s "
        f"of trials over every run and worker ({result.seconds:.0f} s in the last run); "
        f"storage {result.storage}.",
        "",
        f"## Tuned policy (trial {tuned.trial}, {tuned.slots} expert slots)",
        "",
        *(f"- {field.name}: {getattr(tuned.policy, field.name)}" for field in dataclasses.fields(tuned.policy)),
        "",
        "## Tuned, default and baselines",
        "",
        f"| config | train {unit} | holdout {unit} | decode ms/token | TTFT ms | ready hit rate |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result.rows:
        shown = getattr(row, detail)
        holdout_ms = None if row.holdout is None else row.holdout.objective_ms
        lines.append(
            f"| {row.config} | {_cell(row.train.objective_ms)} | {_cell(holdout_ms)} | "
            f"{_cell(shown.decode_ms_per_token)} | {_cell(shown.ttft_ms, '.1f')} | {shown.ready_hit_rate:.0%} |"
        )
    lines += ["", f"Decode ms/token, TTFT and ready hit rate are on the {detail} tokens.", "", "## Files", "",
              f"- [{csv_path.name}]({csv_path.name}): every trial"]
    if images is None:
        lines.append("- images: not drawn, they need the `plot` extra (`pip install hybrimoe[plot]`)")
    else:
        lines += [f"- [{path.name}]({path.name})\n\n  ![{path.stem}]({path.name})" for path in images]
    return "\n".join(lines) + "\n"
