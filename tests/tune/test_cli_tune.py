"""`hybrimoe tune` end to end: a tuned profile that `run` and `simulate` use, resume after SIGKILL,
local workers sharing one SQLite study, the budget as a hard limit, exports, and one line with exit
code 2 for every malformed input, before any trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from typer.testing import CliRunner

from hybrimoe.cli import app
from hybrimoe.config import load_profile
from hybrimoe.capacity import GIB, reserve_for
from hybrimoe.shapes import get_preset

REPO = Path(__file__).resolve().parents[2]
QWEN_TRACE = REPO / "traces" / "qwen3-30b-a3b.npz"
QWEN_PROFILE = REPO / "profiles" / "rtx4090-desktop.qwen3-30b-a3b.yaml"
DEMO_PROFILE = REPO / "profiles" / "measured-2core-cpu.demo.yaml"
QWEN_INT4_PROFILE = REPO / "profiles" / "rtx4090-desktop.qwen3-30b-a3b.int4g128.yaml"
QUICK = ["--max-tokens", "120", "--objective", "decode"]
HYBRIMOE = [sys.executable, "-c", "from hybrimoe.cli import main; main()"]

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["tune", *map(str, args)])


def _opened(storage: str):
    """The storage as `tune` opens it: a test reading a database that a running `tune` is still
    creating would lose the schema race (a UNIQUE constraint on alembic_version) and fail itself."""
    from types import SimpleNamespace

    from hybrimoe.tune.study import open_storage

    return open_storage(SimpleNamespace(storage_url=storage))


def study_names(storage: str) -> list[str]:
    return optuna.get_all_study_names(_opened(storage))


def finished(storage: str, study_name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=study_name, storage=_opened(storage))
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))


@pytest.fixture(scope="module")
def demo_trace(tmp_path_factory) -> Path:
    """The demo model's own routing, recorded by `hybrimoe run`."""
    from hybrimoe.run import RunOptions, run

    path = tmp_path_factory.mktemp("trace") / "demo.npz"
    prompt = "ROMEO: What light through yonder window breaks? It is the east, and Juliet is the sun."
    run(RunOptions(prompts=(prompt,), max_new_tokens=48, device="cpu", profile=DEMO_PROFILE, record_trace=path),
        show_progress=False)
    return path


def test_tuned_profile_is_used_by_run_and_simulate(tmp_path, demo_trace):
    out = tmp_path / "tuned.yaml"
    result = invoke("--trace", demo_trace, "--profile", DEMO_PROFILE, "--out", out, "--storage", "memory",
                    "--trials", "8", "--cache-experts", "24", "--decode-tokens", "16")
    assert result.exit_code == 0, result.output
    assert "tuned vs default vs baselines" in result.output and "tuned profile written" in result.output
    assert "…" not in result.output  # every number whole at the runner's 80 columns
    tuned = load_profile(out)
    assert tuned.name == f"{load_profile(DEMO_PROFILE).name}, tuned (tuned)"  # not the untuned one's name
    original = load_profile(DEMO_PROFILE)
    assert tuned.cpu_expert == original.cpu_expert and tuned.transfer == original.transfer  # hardware unchanged
    assert tuned.tuning.cache_experts == 24 and tuned.tuning.storage == "memory"
    assert tuned.tuning.trials >= 8 and tuned.tuning.traces[0].sha256
    configs = {(r.config, r.part) for r in tuned.tuning.results}
    assert {("tuned", "train"), ("tuned", "holdout"), ("default", "holdout"), ("ktransformers", "train")} <= configs
    assert round(tuned.policy.cache_ratio * 4 * 16) == 24

    ran = runner.invoke(app, ["run", "--prompt", "ROMEO:", "-n", "4", "--device", "cpu", "--profile", str(out), "--json"])
    assert ran.exit_code == 0, ran.output
    stats = json.loads(ran.output)
    assert stats["capacity"] == 24 and "profile" in stats["capacity_source"]
    simulated = runner.invoke(app, ["simulate", "--trace", str(demo_trace), "--profile", str(out), "--mode", "decode",
                                    "--cache-ratio", "0.375"])
    assert simulated.exit_code == 0, simulated.output


@pytest.mark.slow
def test_the_study_beside_the_output_goes_into_a_folder_made_for_it(tmp_path):
    out = tmp_path / "new" / "folder" / "tuned.yaml"
    result = invoke("--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--out", out, "--trials", "3", *QUICK)
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.with_suffix(".optuna.db").is_file()


def test_measure_top_runs_candidates_on_the_runtime(tmp_path, demo_trace):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\nJULIET: O Romeo\n")
    out = tmp_path / "tuned.yaml"
    result = invoke("--trace", demo_trace, "--profile", DEMO_PROFILE, "--out", out, "--storage", "memory",
                    "--trials", "7", "--cache-experts", "16", "--measure-top", "1", "--prompts", prompts,
                    "--measure-tokens", "4")
    assert result.exit_code == 0, result.output
    assert "measured on the runtime" in result.output
    parts = {r.part for r in load_profile(out).tuning.results}
    assert {"measured", "predicted"} <= parts


def test_budget_is_never_exceeded(tmp_path):
    out = tmp_path / "tuned.yaml"
    result = invoke("--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--out", out, "--trials", "12",
                    "--gpu-memory-gb", "8", "--context", "2048", *QUICK)
    assert result.exit_code == 0, result.output
    shape = get_preset("qwen3-30b-a3b")
    room = 8 * GIB - shape.dense_bytes - reserve_for(shape, 1, 2048, 0).total_bytes
    max_slots = room // shape.expert_shape().expert_bytes
    tuned = load_profile(out)
    assert 0 < tuned.tuning.cache_experts <= max_slots
    storage = f"sqlite:///{out.with_suffix('.optuna.db')}"
    slots = [t.user_attrs["slots"] for t in finished(storage, tuned.tuning.study) if "slots" in t.user_attrs]
    assert slots and max(slots) <= max_slots


def test_placement_learned_on_another_trace(tmp_path):
    """With --profiling-trace, the training trace is replayed whole and the baselines place by the other batch."""
    from hybrimoe.trace import load_trace
    from hybrimoe.tune.setup import TuneOptions, load_inputs

    batch2 = REPO / "traces" / "qwen3-30b-a3b-batch2.npz"
    options = TuneOptions(traces=(QWEN_TRACE,), out=tmp_path / "t.yaml", profile=QWEN_PROFILE, storage="memory",
                          max_tokens=120, objective="decode", cache_ratio=0.25)
    in_batch = load_inputs(options)
    learned = load_inputs(TuneOptions(**{**options.__dict__, "profiling_traces": (batch2,)}))
    assert learned.study_name != in_batch.study_name
    assert (learned.workload.frequencies == load_trace(batch2).expert_frequencies()).all()
    first_token = load_trace(QWEN_TRACE).tokens(0, 1).steps[0].topk_ids
    assert (learned.workload.train[0].decode.steps[0].topk_ids == first_token).all()  # replayed from the start
    assert not (in_batch.workload.train[0].decode.steps[0].topk_ids == first_token).all()


def test_exports_for_other_engines(tmp_path):
    out = tmp_path / "tuned.yaml"
    result = invoke("--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--out", out, "--storage", "memory",
                    "--trials", "6", "--cache-ratio", "0.25", "--export", "llamacpp", "--export", "ktransformers", *QUICK)
    assert result.exit_code == 0, result.output
    assert "--n-cpu-moe 36" in result.output  # 48 layers, 12 of them fit in a quarter of the experts
    counts = torch.load(out.with_suffix(".ktransformers.pt"), weights_only=True)["logical_count"]
    assert counts.shape == (1, 48, 128)
    assert "--kt-num-gpu-experts 32" in result.output  # 1536 experts: 32 per layer


def test_pareto_front(tmp_path):
    result = invoke("--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--out", tmp_path / "t.yaml", "--storage",
                    "memory", "--trials", "10", "--gpu-memory-gb", "16", "--pareto", *QUICK)
    assert result.exit_code == 0, result.output
    assert "Pareto front" in result.output


@pytest.mark.slow
def test_resume_after_sigkill_loses_no_trial(tmp_path):
    out = tmp_path / "tuned.yaml"
    storage = f"sqlite:///{out.with_suffix('.optuna.db')}"
    args = [*HYBRIMOE, "tune", "--trace", str(QWEN_TRACE), "--profile", str(QWEN_PROFILE), "--out", str(out),
            "--trials", "14", "--cache-ratio", "0.25", "--max-tokens", "300", "--objective", "decode"]
    env = {**os.environ, "COLUMNS": "120"}
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    study_name = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.5)
        names = study_names(storage) if out.with_suffix(".optuna.db").exists() else []
        if names:
            study_name = names[0]
            if len(finished(storage, study_name)) >= 6:
                break
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert study_name is not None, process.stderr.read().decode()
    before = {t.number: t.values for t in finished(storage, study_name)}
    assert 6 <= len(before) < 14
    assert not out.exists()  # nothing half-written

    time.sleep(11)  # past the heartbeat's grace period: the killed trial is stale
    rerun = subprocess.run(args, env=env, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()
    after = {t.number: t.values for t in finished(storage, study_name)}
    assert len(after) >= 14
    assert all(after[number] == values for number, values in before.items())  # none lost or changed
    assert load_profile(out).tuning.study == study_name


@pytest.mark.slow
def test_two_local_workers_share_one_sqlite_study(tmp_path):
    out = tmp_path / "tuned.yaml"
    result = invoke("--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--out", out, "--trials", "14",
                    "--cache-ratio", "0.25", "--workers", "2", *QUICK)
    assert result.exit_code == 0, result.output
    tuned = load_profile(out)
    trials = finished(f"sqlite:///{out.with_suffix('.optuna.db')}", tuned.tuning.study)
    assert len(trials) == 14  # the target, not a trial more per worker
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}
    assert tuned.tuning.trials == len(trials)


def test_a_trial_started_past_the_target_runs_nothing_and_is_not_counted(tmp_path):
    """Two workers may both see room for one more trial; the later one's trial stops before it runs."""
    from hybrimoe.tune.setup import TuneOptions, load_inputs
    from hybrimoe.tune.study import PAST_TARGET, PastTarget, objective, open_storage, open_study

    options = TuneOptions(traces=(QWEN_TRACE,), out=tmp_path / "t.yaml", profile=QWEN_PROFILE, storage="memory",
                          trials=2, max_tokens=60, cache_ratio=0.25)
    inputs = load_inputs(options)
    study = open_study(inputs, open_storage(inputs))
    study.ask(), study.ask()  # two workers' running trials fill the target
    late = study.ask()
    with pytest.raises(PastTarget):
        objective(inputs)(late)
    assert late.user_attrs[PAST_TARGET]  # the report does not count it as a failure


def _spawned_children(pid: int) -> list[int]:
    """The multiprocessing workers a process started (not its resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker process through /proc (Linux)")
def test_a_killed_worker_is_one_line_and_the_study_still_completes(tmp_path):
    out = tmp_path / "tuned.yaml"
    storage = f"sqlite:///{out.with_suffix('.optuna.db')}"
    args = [*HYBRIMOE, "tune", "--trace", str(QWEN_TRACE), "--profile", str(QWEN_PROFILE), "--out", str(out),
            "--trials", "14", "--workers", "2", "--cache-ratio", "0.25", *QUICK]
    process = subprocess.Popen(args, env={**os.environ, "COLUMNS": "120"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline, killed = time.monotonic() + 120, False
    while time.monotonic() < deadline and not killed and process.poll() is None:
        time.sleep(0.2)
        names = study_names(storage) if out.with_suffix(".optuna.db").exists() else []
        workers = _spawned_children(process.pid)
        if names and workers and len(finished(storage, names[0])) >= 4:
            os.kill(workers[0], signal.SIGKILL)
            killed = True
    stdout, stderr = process.communicate(timeout=300)
    assert killed, stderr
    assert process.returncode == 0, stderr
    assert "worker 1 stopped early (signal 9)" in stdout and "Traceback" not in stderr
    tuned = load_profile(out)
    assert len(finished(storage, tuned.tuning.study)) == 14


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker process through /proc (Linux)")
def test_a_worker_dies_with_its_main_process(tmp_path):
    """Killed, `hybrimoe tune` takes its workers with it: none goes on adding trials as an orphan."""
    out = tmp_path / "tuned.yaml"
    args = [*HYBRIMOE, "tune", "--trace", str(QWEN_TRACE), "--profile", str(QWEN_PROFILE), "--out", str(out),
            "--trials", "200", "--workers", "2", "--cache-ratio", "0.25", *QUICK]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, workers = time.monotonic() + 120, []
    while time.monotonic() < deadline and not workers and process.poll() is None:
        time.sleep(0.2)
        workers = _spawned_children(process.pid)
    assert workers, process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _running(workers[0]):
        time.sleep(0.2)
    assert not _running(workers[0])
    assert not out.exists()


def _running(pid: int) -> bool:
    """Whether a process runs: not gone, nor dead and waiting to be reaped (a zombie)."""
    try:
        return b"State:\tZ" not in Path(f"/proc/{pid}/status").read_bytes()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "at least one --trace"),
        (["--trace", "{demo}", "--profile", QWEN_PROFILE], "was made for experts"),
        (["--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--gpu-memory-gb", "3"], "is not enough"),
        (["--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--objective", "fastest"], "unknown objective"),
        (["--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--storage", "postgresql://u:pw@127.0.0.1:1/db"],
         "cannot open storage"),
        (["--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--storage", "sqlite://"], "in-memory SQLite"),
        (["--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--storage", "sqlite:///:memory:"], "in-memory SQLite"),
        (["--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--storage", "not a url"], "not a database URL"),
        (["--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--out", "{existing}"], "pass --force"),
        (["--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--export", "vllm"], "unknown --export"),
        (["--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--workers", "2", "--storage", "memory"], "shared storage"),
        (["--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--measure-top", "2"], "--measure-top runs the model"),
        (["--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--trials", "0"], "--trials must be"),
        (["--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--allow-quantize", "int3"], "unknown --allow-quantize"),
        (["--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--profile", QWEN_INT4_PROFILE], "more only with --allow-quantize"),
        (["--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--allow-quantize", "int8"], "--quantize int8 --group-size 128"),
        (["--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--profiling-trace", "{demo}"], "not of Qwen3"),
    ],
)
def test_bad_input_is_one_line_before_any_trial(tmp_path, demo_trace, args, message):
    existing = tmp_path / "existing.yaml"
    existing.write_text("x")
    args = [str(a).replace("{demo}", str(demo_trace)).replace("{existing}", str(existing)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "tuned.yaml")]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in result.output, result.output
    assert "pw" not in result.output
    assert not (tmp_path / "tuned.optuna.db").exists()  # no study was started


def test_tune_chooses_the_experts_format_within_the_quality_budget(tmp_path):
    """bfloat16 and int4 (the quality budget), each tuned at the same 24 GB: the faster is written, and
    its policy names the format, so `run` keeps the experts so."""
    out = tmp_path / "tuned.yaml"
    result = invoke("--trace", QWEN_TRACE, "--profile", QWEN_PROFILE, "--profile", QWEN_INT4_PROFILE,
                    "--allow-quantize", "int4", "--gpu-memory-gb", "24", "--trials", "6", "--out", out,
                    "--storage", "memory", *QUICK)
    assert result.exit_code == 0, result.output
    assert "Experts' format" in result.output and "int4 g128" in result.output and "chosen" in result.output
    tuned = load_profile(out)
    assert tuned.policy.quantize == tuned.expert_shape.quantize
    # at 24 GB int4 experts all fit on the GPU (bfloat16 ones: about a third), and the estimate's
    # int4 decode is the faster
    assert tuned.policy.quantize == "int4" and tuned.tuning.cache_experts <= 6144
    n_weights = 3 * 2048 * 768
    assert f"{(n_weights // 2 + n_weights // 128 * 2) / 2**20:.2f} MiB" in result.output  # bfloat16 scales
