"""The tuning report's files, from small real studies (a few trials of 60 replayed tokens; the first eight are the default and the baselines)."""

import csv
import sys
import time
from pathlib import Path

import pytest

from hybrimoe.errors import UserError
from hybrimoe.tune.report_files import write_report
from hybrimoe.tune.result import summarize
from hybrimoe.tune.setup import TuneOptions, load_inputs
from hybrimoe.tune.study import run_study

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _study(out_dir: Path, trials: int, **budget):
    options = TuneOptions(
        traces=(REPO / "traces/qwen3-30b-a3b.npz",), out=out_dir / "tuned.yaml",
        profile=REPO / "profiles/rtx4090-desktop.qwen3-30b-a3b.yaml", storage="memory", trials=trials, max_tokens=60,
        objective="decode", **budget,
    )
    inputs = load_inputs(options)
    started_s = time.perf_counter()
    study = run_study(inputs)
    return study, summarize(inputs, study, time.perf_counter() - started_s)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _study(tmp_path_factory.mktemp("single"), 10, cache_ratio=0.25)


def _check_files(written: list[Path], directory: Path, study, expected_images: set[str]) -> str:
    assert all(path.parent == directory and path.is_file() for path in written)
    assert {path.name for path in written} == {"trials.csv", "index.md", *expected_images}
    with open(directory / "trials.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(row["number"]) for row in rows] == [t.number for t in study.trials]
    assert "user_attrs_slots" in rows[0]
    for name in expected_images:
        assert (directory / name).read_bytes().startswith(PNG_SIGNATURE)
    index = (directory / "index.md").read_text()
    for path in written:
        if path.name != "index.md":
            assert f"]({path.name})" in index
    return index


def test_writes_csv_images_and_index(single, tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    facecolor = matplotlib.rcParams["axes.facecolor"]
    study, result = single
    directory = tmp_path / "report"
    directory.mkdir()  # an existing directory is fine
    written = write_report(study, result, directory, "ms/token")
    # two tuned trials: too few for importances
    index = _check_files(written, directory, study, {"history.png", "latency_vs_slots.png"})
    assert result.study_name in index
    assert f"{result.trials} trials finished ({result.pruned} pruned" in index
    assert "| tuned |" in index and "| ktransformers |" in index
    assert "train ms/token" in index
    assert plt.get_fignums() == []  # every figure closed
    assert matplotlib.rcParams["axes.facecolor"] == facecolor  # Optuna's ggplot style does not leak


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_each_reference_has_its_own_style_and_legends_sit_outside(single):
    import matplotlib.pyplot as plt

    from hybrimoe.tune.report_files import REFERENCE_STYLES, _history_figure, _latency_vs_slots_figure

    assert len(set(REFERENCE_STYLES)) == len(REFERENCE_STYLES)
    study, result = single
    for fig in (_latency_vs_slots_figure(study, result, "ms/token"), _history_figure(study, None, "ms/token")):
        ax = fig.axes[0]
        references = [c for c in ax.collections if c.get_label() in {"default", "ktransformers", "llamacpp", "cpu-only"}]
        assert len(references) >= 3
        styles = {(tuple(c.get_facecolor()[0]), c.get_paths()[0].vertices.tobytes()) for c in references}
        assert len(styles) == len(references)  # no two references look alike
        fig.canvas.draw()
        assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1  # beside the data, not on it
        plt.close(fig)


def test_pareto_study_draws_the_front_and_importances(tmp_path):
    study, result = _study(tmp_path, 14, gpu_memory_gb=24, pareto=True)
    directory = tmp_path / "nested" / "report"
    written = write_report(study, result, directory, "ms/token")
    _check_files(written, directory, study, {"history.png", "importances.png", "latency_vs_slots.png", "pareto.png"})


def test_without_matplotlib_writes_csv_and_index(single, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    study, result = single
    written = write_report(study, result, tmp_path, "ms/token")
    index = _check_files(written, tmp_path, study, set())
    assert "`plot` extra" in index
    assert not list(tmp_path.glob("*.png"))


def test_unwritable_directory_is_a_user_error(single, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="report directory .*file"):
        write_report(*single, blocker / "report", "ms/token")


def test_a_resumed_study_reports_its_own_time(tmp_path):
    """A rerun of a finished study runs no trial: its report gives the study's own trial time."""
    options = TuneOptions(
        traces=(REPO / "traces/qwen3-30b-a3b.npz",), out=tmp_path / "tuned.yaml",
        profile=REPO / "profiles/rtx4090-desktop.qwen3-30b-a3b.yaml", storage="memory", trials=4, max_tokens=60,
        objective="decode", cache_ratio=0.25,
    )
    inputs = load_inputs(options)
    study = run_study(inputs)
    rerun = summarize(inputs, study, 0.0)
    finished = [t for t in study.trials if t.datetime_complete is not None]
    assert rerun.seconds == 0.0 and rerun.trial_seconds > 0
    assert rerun.trial_seconds == pytest.approx(sum((t.datetime_complete - t.datetime_start).total_seconds() for t in finished))
