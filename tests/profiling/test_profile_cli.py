import json

import pytest
import yaml
from typer.testing import CliRunner

from hybrimoe.cli import app
from hybrimoe.config import load_profile
from hybrimoe.profile import report
from hybrimoe.profile.estimate import estimate_profile
from hybrimoe.shapes import get_preset

runner = CliRunner()
TINY = ["profile", "--hidden-size", "32", "--intermediate-size", "48", "--dtype", "float32",
        "--device", "cpu", "--quick", "--max-repeats", "2", "--llc-mb", "1"]


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_quick_profile_writes_a_stand_in_profile(tmp_path):
    out = tmp_path / "p.yaml"
    result = runner.invoke(app, [*TINY, "--out", str(out), "--note", "from the CLI test"])
    assert result.exit_code == 0, result.output
    assert "profile written" in result.output
    assert "CPU expert" in result.output
    profile = load_profile(out)
    assert profile.stand_in and profile.gpu_expert == profile.cpu_expert
    assert profile.name == "measured-" + profile.name.split("-", 1)[1]
    assert profile.provenance.created_by.startswith("hybrimoe profile --hidden-size 32")
    assert "from the CLI test" in profile.notes

    again = runner.invoke(app, [*TINY, "--out", str(out)])
    assert again.exit_code == 2 and "--force" in error_line(again)


def test_estimate_lists_the_datasheets():
    result = runner.invoke(app, ["profile", "--estimate"])
    assert result.exit_code == 0, result.output
    assert "RTX 4090" in result.output and "rtx4090-desktop" in result.output


def test_estimate_builds_a_profile_marked_estimated(tmp_path):
    out = tmp_path / "e.yaml"
    result = runner.invoke(app, ["profile", "--estimate", "rtx4090-desktop", "--preset", "demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(out.read_text())
    assert data["estimated"] is True and load_profile(out).has_accelerator
    missing_out = runner.invoke(app, ["profile", "--estimate", "rtx4090-desktop", "--preset", "demo"])
    assert missing_out.exit_code == 2 and "--out" in error_line(missing_out)
    unknown = runner.invoke(
        app, ["profile", "--estimate", "nope", "--preset", "demo", "--out", str(tmp_path / "x.yaml")]
    )
    assert unknown.exit_code == 2 and "unknown machine" in error_line(unknown)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["profile", "rtx4090-desktop", "--preset", "demo"], "goes with --estimate"),
        (["profile", "--preset", "demo", "--hidden-size", "8", "--intermediate-size", "8"], "give one of"),
        (["profile", "--model", "demo", "--preset", "demo"], "give one of"),
        (["profile", "--preset", "nope"], "unknown model preset"),
        (["profile", "--preset", "demo", "--dtype", "int4"], "--dtype"),
        (["profile", "--preset", "demo", "--device", "tpu"], "cpu or cuda"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in error_line(result)


def test_model_config_and_plot(tmp_path, monkeypatch):
    """--model reads only config.json; --plot writes a PNG or says in one line that it cannot."""
    config = {
        "model_type": "mixtral", "_name_or_path": "tiny-mixtral", "num_hidden_layers": 2, "num_attention_heads": 4,
        "hidden_size": 64, "vocab_size": 100, "num_local_experts": 4, "num_experts_per_tok": 2,
        "intermediate_size": 32, "torch_dtype": "float32",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    seen = {}

    def fake_profile_machine(options, progress=None):
        seen["model"] = options.model
        progress("CPU expert", 0, 6)
        return estimate_profile("rtx4090-desktop", options.model)

    monkeypatch.setattr("hybrimoe.profile.run.profile_machine", fake_profile_machine)
    png = tmp_path / "plot.png"
    result = runner.invoke(app, ["profile", "--model", str(tmp_path), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert (seen["model"].hidden_size, seen["model"].intermediate_size) == (64, 32)
    assert "crossover" in result.output
    if report.png_available():
        assert png.read_bytes()[:4] == b"\x89PNG"
    else:
        assert "matplotlib is not installed" in result.output and not png.exists()


def test_report_renders_estimated_and_cpu_only_profiles():
    estimated = estimate_profile("a6000-xeon5220r", get_preset("qwen3-30b-a3b"))
    series = report.plot_series(estimated)
    assert series.crossover is not None and series.load_ms == estimated.transfer.expert_load_ms
    assert "up to" in report.crossover_line(estimated)
    plot = report.terminal_plot(estimated, color=False).plain
    assert "crossover" in plot and "load" in plot


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_profile_times_packed_experts(tmp_path, quantize):
    """`profile --quantize` times the packed kernel and a packed expert's load, and says so in the
    profile's expert shape and name; a run with another format refuses it."""
    out = tmp_path / "p.yaml"
    result = runner.invoke(app, [*TINY, "--quantize", quantize, "--group-size", "16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    profile = load_profile(out)
    shape = profile.expert_shape
    assert (shape.quantize, shape.group_size) == (quantize, 16) and profile.name.endswith(f".{quantize}g16")
    n_weights = 3 * 32 * 48
    packed = n_weights // (1 if quantize == "int8" else 2) + n_weights // 16 * 4
    assert shape.expert_bytes == packed
    # the load copied the packed bytes: bandwidth x time, each written with 6 significant digits
    copied = profile.transfer.h2d_pinned_expert_gbps * profile.transfer.expert_load_ms * 1e6
    assert copied == pytest.approx(packed, rel=1e-5)
    assert f"--quantize {quantize} --group-size 16" in profile.provenance.created_by


def test_quantized_estimate_and_its_refusals(tmp_path):
    out = tmp_path / "e.yaml"
    result = runner.invoke(app, ["profile", "--estimate", "rtx4090-desktop", "--preset", "qwen3-30b-a3b",
                                 "--quantize", "int4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_profile(out).expert_shape.format == "int4 g128"
    bad = runner.invoke(app, [*TINY, "--quantize", "int4", "--group-size", "64", "--out", str(tmp_path / "x.yaml")])
    assert bad.exit_code == 2 and "group size 64 does not divide" in error_line(bad)
    bad = runner.invoke(app, [*TINY, "--quantize", "int2", "--out", str(tmp_path / "x.yaml")])
    assert bad.exit_code == 2 and "unknown quantization 'int2'" in error_line(bad)
