"""`hybrimoe run` end to end on a tiny checkpoint, and its one-line refusals (exit code 2)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hybrimoe.cli import app
from hybrimoe.config import save_profile
from hybrimoe.runtime.generate import Sampling
from hybrimoe.run import RunOptions, run
from hybrimoe.trace import load_trace

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(checkpoint):
    return str(checkpoint("qwen2_moe"))


def _run(*args, input=None):
    return runner.invoke(app, ["run", "--device", "cpu", *args], input=input)


def test_streams_text_and_prints_the_summary(model_dir):
    result = _run("--model", model_dir, "--prompt", "ROMEO:", "-n", "6")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ROMEO:")
    assert "ready, 0.0% waited for a copy" in result.stdout
    for label in ("Time to first token", "Decode", "Cache hit rate", "Prefetch precision", "Planning",
                  "built-in estimate", "measured/predicted", "CPU threads", "Host memory", "Accelerator memory"):
        assert label in result.stdout
    assert "in 3 buffers" in result.stdout  # the pooled host experts, one buffer per MoE layer


def test_host_memory_is_checked_before_the_weights(model_dir, monkeypatch):
    from hybrimoe.runtime import loading

    monkeypatch.setattr("hybrimoe.run.available_ram_bytes", lambda: 1000)
    monkeypatch.setattr(loading, "check_weight_files", lambda *a: pytest.fail("weights were reached"))
    result = _run("--model", model_dir, "--prompt", "x")
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: the weights and the CPU stand-in's expert slots need")
    assert "this machine has 0.0 GiB available" in result.output and len(result.output.strip().splitlines()) == 1


def test_the_cpu_worker_runs_the_threads_setting(model_dir):
    from planners import RulePlanner

    from hybrimoe.runtime.accelerator import CpuStandIn
    from hybrimoe.runtime.hybrid import HybridRuntime
    from hybrimoe.runtime.loading import load_model
    from hybrimoe.runtime.threads import launching_threads

    loaded = load_model(model_dir, with_tokenizer=False, show_progress=False)
    before = torch.get_num_threads()
    planner = RulePlanner("cpu", 0, loaded.n_layers, loaded.n_experts)
    with HybridRuntime(loaded, planner, CpuStandIn(), 0, cpu_threads=before + 2) as runtime:
        assert runtime.executor.worker_threads() == before + 2
        assert torch.get_num_threads() == before  # the launching thread keeps its own
    assert launching_threads(6, is_cuda=True) == 1 and launching_threads(6, is_cuda=False) == 6
    data = json.loads(_run("--model", model_dir, "--prompt", "x", "-n", "2", "--json", "--threads", "3").stdout)
    assert (data["threads"], data["threads_source"]) == (3, "--threads")


def test_json_statistics(model_dir):
    result = _run("--model", model_dir, "--prompt", "ROMEO:", "-n", "5", "--json", "--cache-experts", "0")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["n_new_tokens"] == 5 and data["capacity"] == 0
    assert data["counters"]["accelerator_share"] == 0.0
    assert data["counters"]["activations"] > 0
    counters = data["counters"]  # the stand-in copies synchronously: no hit ever waits for a copy
    assert counters["waited_hits"] == 0 and counters["ready_hit_rate"] == counters["hit_rate"] == 0.0
    assert data["counters"]["layers_planned"] > 0 and data["counters"]["planning_us_per_layer"] > 0
    assert data["counters"]["prefetch_planning_us_per_layer"] > 0  # the score update runs there at least
    assert data["simulated_decode_tokens_per_s"] > 0
    assert data["decode_measured_over_predicted"] > 0 and data["ttft_measured_over_predicted"] > 0
    assert len(data["texts"]) == 1
    assert data["host_expert_bytes"] > 0 and data["slot_bytes"] == 0  # memory as numbers, not only prose
    assert data["accelerator_dense_bytes"] == data["accelerator_peak_bytes"] == 0  # no accelerator


def test_this_machines_profile_is_the_default(model_dir, tmp_path, monkeypatch):
    from pathlib import Path

    from hybrimoe.profile.directory import default_profile_path, this_machine_key
    from hybrimoe.profile.estimate import estimate_for_this_machine
    from hybrimoe.runtime.loading import load_model
    from hybrimoe.runtime.planning import model_shape

    shape = model_shape(load_model(model_dir, "cpu", show_progress=False), Path(model_dir).name)
    mine = dataclasses.replace(estimate_for_this_machine(shape, "cpu"), name="mine", estimated=False,
                               machine=dataclasses.replace(estimate_for_this_machine(shape, "cpu").machine, threads=1))
    path = default_profile_path(this_machine_key("cpu"), Path(model_dir).name)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_profile(mine, path)
    data = json.loads(_run("--model", model_dir, "--prompt", "ROMEO:", "-n", "3", "--json").stdout)
    assert data["profile"].startswith("mine, this machine's") and str(path) in data["profile"]
    assert (data["threads"], data["threads_source"]) == (1, "the profile")
    flagged = json.loads(_run("--model", model_dir, "--prompt", "ROMEO:", "-n", "3", "--json", "--threads", "2").stdout)
    assert (flagged["threads"], flagged["threads_source"]) == (2, "--threads")
    path.unlink()
    data = json.loads(_run("--model", model_dir, "--prompt", "ROMEO:", "-n", "3", "--json").stdout)
    assert data["profile"].startswith("built-in estimate")
    assert data["stand_in"] and data["prediction_from_estimate"]  # said so in the summary, not "accelerator"


def test_prompt_from_stdin_and_trace_recording(model_dir, tmp_path):
    trace_path = tmp_path / "run.npz"
    result = _run("--model", model_dir, "--prompt", "-", "-n", "4", "--json", "--record-trace", str(trace_path),
                  input="ROMEO: hi")
    assert result.exit_code == 0, result.output
    trace = load_trace(trace_path)
    assert trace.n_steps == 4 and trace.steps[0].n_tokens == len("ROMEO: hi")
    assert trace.has_router_probs and trace.has_weights and trace.lookahead_depth == 3
    assert (trace.meta.n_layers, trace.meta.n_experts, trace.meta.n_shared_experts) == (3, 8, 1)
    again = _run("--model", model_dir, "--prompt", "x", "-n", "1", "--record-trace", str(trace_path))
    assert again.exit_code == 2 and "--force" in again.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "   "], "the prompt is empty"),
        ([], "give a prompt"),
        (["--prompt", "x", "--cache-experts", "3", "--cache-ratio", "0.5"], "not both"),
        (["--prompt", "x", "--cache-experts", "999"], "--cache-experts must be in [0, 24]"),
        (["--prompt", "x", "--gpu-memory-gb", "0.1"], "is not enough"),
        (["--prompt", "x", "--strategy", "fastest"], "unknown strategy"),
        (["--prompt", "x", "--strategy", "ktransformers"], "needs expert frequencies"),
        (["--prompt", "x", "--max-new-tokens", "0"], "at least 1"),
        (["--prompt", "x", "--top-p", "0"], "--top-p"),
        (["--prompt", "x", "--record-trace", "trace.json"], "must end in .npz"),
    ],
)
def test_user_errors_are_one_line(model_dir, args, message):
    result = _run("--model", model_dir, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_model_path_is_one_line(tmp_path):
    result = _run("--model", str(tmp_path / "nope"), "--prompt", "x")
    assert result.exit_code == 2
    assert "no such directory" in result.stderr


def test_profile_for_other_expert_shapes_is_refused(model_dir, tmp_path):
    from hybrimoe.profile.estimate import estimate_profile
    from hybrimoe.shapes import get_preset

    path = save_profile(estimate_profile("rtx4090-desktop", get_preset("demo")), tmp_path / "p.yaml")
    result = _run("--model", model_dir, "--prompt", "x", "--profile", str(path))
    assert result.exit_code == 2
    assert "was made for experts" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(model_dir):
    result = runner.invoke(app, ["run", "--model", model_dir, "--prompt", "x", "--device", "cuda"])
    assert result.exit_code == 2
    assert "no CUDA device" in result.stderr


def test_library_runs_a_batch_and_seeded_sampling_repeats(model_dir):
    from pathlib import Path

    options = RunOptions(
        prompts=("ROMEO: good", "JULIET: a longer prompt"),
        model=Path(model_dir),
        max_new_tokens=6,
        sampling=Sampling(temperature=0.8, top_p=0.9, seed=7),
        device="cpu",
    )
    first = run(options, show_progress=False)
    second = run(options, show_progress=False)
    assert len(first.texts) == 2 and first.texts == second.texts
    assert first.stats.batch_size == 2 and first.stats.n_new_tokens == 6


def test_the_cli_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, hybrimoe.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_a_profile_of_another_machine_is_flagged(model_dir, tmp_path):
    est = tmp_path / "est.yaml"
    made = runner.invoke(app, ["profile", "--estimate", "rtx4090-desktop", "--model", model_dir, "--out", str(est)])
    assert made.exit_code == 0, made.output
    data = json.loads(_run("--model", model_dir, "--prompt", "ROMEO:", "-n", "3", "--json", "--profile", str(est)).stdout)
    assert data["profile_machine"] == "rtx-4090" and data["prediction_from_estimate"]
    summary = _run("--model", model_dir, "--prompt", "ROMEO:", "-n", "3", "--profile", str(est)).stdout
    assert "another machine (rtx-4090)" in " ".join(summary.replace("│", " ").split())


def test_without_a_model_runs_the_demo():
    from hybrimoe.demo import demo_model_path
    from hybrimoe.errors import ModelError

    try:
        demo_model_path()
    except ModelError:
        pytest.skip("this checkout has no demo model")
    result = _run("--prompt", "ROMEO:", "-n", "8", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "demo" and data["family"] == "qwen2_moe"
    assert data["profile"].startswith("built-in estimate")


def test_quantized_run_keeps_packed_experts_and_says_so(model_dir):
    result = _run("--model", model_dir, "--prompt", "ROMEO:", "-n", "4", "--json", "--quantize", "int4",
                  "--group-size", "16", "--cache-ratio", "0.25")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["weights"].startswith("routed experts int4 g16") and "dense part float32" in data["weights"]
    assert data["counters"]["accelerator_runs"] > 0 and data["decode_tokens_per_s"] > 0
    # a slot and a load are an expert's packed bytes: 4 bits a weight and a float32 scale per 16
    n_weights = 3 * 32 * 48
    assert data["counters"]["bytes_loaded"] % (n_weights // 2 + n_weights // 16 * 4) == 0


def test_quantized_dense_part(model_dir):
    pytest.importorskip("torchao", reason="--quantize-dense uses torchao (pip install 'hybrimoe[quantize]')")
    result = _run("--model", model_dir, "--prompt", "ROMEO:", "-n", "3", "--json", "--quantize", "int8",
                  "--group-size", "16", "--quantize-dense")
    assert result.exit_code == 0, result.output
    assert "dense part int8 g16" in json.loads(result.stdout)["weights"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quantize", "int3"], "unknown quantization 'int3'"),
        (["--quantize", "int4", "--group-size", "128"], "group size 128 does not divide"),
        (["--quantize-dense"], "--quantize-dense needs --quantize"),
        (["--group-size", "32"], "--group-size needs --quantize"),
    ],
)
def test_quantization_errors_are_one_line(model_dir, args, message):
    result = _run("--model", model_dir, "--prompt", "x", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_profile_of_another_format_is_refused(model_dir, tmp_path):
    """A bfloat16 (here the checkpoint's float32) profile for an int4 run, and the other way round."""
    from pathlib import Path

    from hybrimoe.profile.estimate import estimate_for_this_machine
    from hybrimoe.runtime.loading import load_model
    from hybrimoe.runtime.planning import model_shape

    shape = model_shape(load_model(model_dir, "cpu", show_progress=False), Path(model_dir).name)
    plain = save_profile(estimate_for_this_machine(shape, "cpu"), tmp_path / "plain.yaml")
    int4 = save_profile(estimate_for_this_machine(shape.quantized("int4", 16), "cpu"), tmp_path / "int4.yaml")
    refused = _run("--model", model_dir, "--prompt", "x", "--profile", str(plain), "--quantize", "int4", "--group-size", "16")
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "kept as float32, but this run keeps them as int4 g16" in refused.stderr
    assert "hybrimoe profile --quantize int4 --group-size 16" in refused.stderr
    refused = _run("--model", model_dir, "--prompt", "x", "--profile", str(int4))
    assert refused.exit_code == 2 and "(--quantize int4 --group-size 16)" in refused.stderr
    accepted = _run("--model", model_dir, "--prompt", "x", "-n", "2", "--profile", str(int4),
                    "--quantize", "int4", "--group-size", "16")
    assert accepted.exit_code == 0, accepted.output


def test_a_tuned_profile_chooses_the_format(model_dir, tmp_path):
    from pathlib import Path

    from hybrimoe.config import PolicyConfig
    from hybrimoe.profile.estimate import estimate_for_this_machine
    from hybrimoe.runtime.loading import load_model
    from hybrimoe.runtime.planning import model_shape

    shape = model_shape(load_model(model_dir, "cpu", show_progress=False), Path(model_dir).name).quantized("int8", 16)
    tuned = dataclasses.replace(estimate_for_this_machine(shape, "cpu"), policy=PolicyConfig(quantize="int8", group_size=16))
    path = save_profile(tuned, tmp_path / "tuned.yaml")
    data = json.loads(_run("--model", model_dir, "--prompt", "x", "-n", "2", "--json", "--profile", str(path)).stdout)
    assert data["weights"].startswith("routed experts int8 g16")


def test_a_refusal_after_loading_is_one_line_without_import_noise(model_dir):
    """Installed optional libraries (torchao, imported by transformers) and transformers' progress bars
    must not add lines to stderr: a prompt of more tokens than the model's positions (but few enough
    characters to pass the check before the import) is refused after tokenizing, in one line."""
    import subprocess
    import sys

    positions = json.loads((Path(model_dir) / "config.json").read_text())["max_position_embeddings"]
    result = subprocess.run(
        [sys.executable, "-c", "from hybrimoe.cli import main; main()", "run", "--model", str(model_dir), "--prompt",
         "x " * (positions + 10), "-n", "1"],
        capture_output=True, text=True, timeout=300,
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr


@pytest.mark.parametrize("args", [
    ["--strategy", "nope"], ["--top-p", "2"], ["--temperature", "-1"], ["--profile", "/nonexistent.yaml"],
    ["--model", "/nonexistent"], ["--replay-trace", "/nonexistent.npz"], ["--record-trace", "t.txt"],
    ["--threads", "100000"], ["--cache-ratio", "0.5", "--cache-experts", "4"], ["--seed", str(10**20)],
])
def test_bad_run_flags_are_refused_before_torch_is_imported(args):
    """A refusal must not wait for torch and transformers (seconds to a minute on a loaded machine):
    checked by what was imported, not by the clock."""
    import subprocess
    import sys

    code = ("import sys\nfrom hybrimoe.cli import main\ntry:\n    main()\nexcept SystemExit as exc:\n"
            "    print(exc.code, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, "run", "--prompt", "x", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stdout + result.stderr


def test_repeated_prompts_run_as_one_batch(model_dir):
    result = _run("--model", model_dir, "--prompt", "ROMEO:", "--prompt", "JULIET: O", "-n", "4", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["texts"]) == 2  # neither prompt dropped
    shown = _run("--model", model_dir, "--prompt", "ROMEO:", "--prompt", "JULIET: O", "-n", "4")
    assert shown.exit_code == 0 and "sequence 2" in shown.stdout and "JULIET: O" in shown.stdout


def test_a_profile_without_an_accelerator_runs_every_expert_on_the_cpu(model_dir, tmp_path):
    """A CPU-only profile (no gpu_expert or transfer section, as `profile` writes without CUDA):
    the planner's copies are impossible, and the run says every expert ran on the CPU."""
    from pathlib import Path

    from hybrimoe.profile.estimate import estimate_for_this_machine
    from hybrimoe.runtime.loading import load_model
    from hybrimoe.runtime.planning import model_shape

    shape = model_shape(load_model(model_dir, "cpu", show_progress=False), Path(model_dir).name)
    cpu_only = dataclasses.replace(estimate_for_this_machine(shape, "cpu"), gpu_expert=None, transfer=None)
    path = save_profile(cpu_only, tmp_path / "cpu_only.yaml")
    data = json.loads(_run("--model", model_dir, "--prompt", "ROMEO:", "-n", "4", "--profile", str(path), "--json").stdout)
    assert data["planner"] == "cpu-only" and data["counters"]["cpu_share"] == 1.0


def test_the_early_prompt_bound_reads_the_vocabulary_the_tokenizer_has():
    """`run` refuses an over-long prompt from tokenizer.json before transformers is imported; the
    bound must be the one the loaded tokenizer gives, or the early check would refuse what fits."""
    from transformers import AutoTokenizer

    from hybrimoe.demo import demo_model_path
    from hybrimoe.run_options import _longest_token_chars

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path())
    assert _longest_token_chars(demo_model_path()) == max(map(len, tokenizer.get_vocab()))
