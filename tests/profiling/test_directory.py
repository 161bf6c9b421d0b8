"""This machine's profile directory, and `hybrimoe profile` saving there without --out."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hybrimoe.cli import app
from hybrimoe.config import load_profile
from hybrimoe.profile.directory import (
    default_profile_path,
    find_profile,
    machine_key,
    model_slug,
    profile_dir,
    this_machine_key,
    this_machines_profile_for,
)
from hybrimoe.errors import UserError
from hybrimoe.profile.estimate import estimate_for_this_machine, estimate_profile
from hybrimoe.shapes import get_preset

runner = CliRunner()
# --llc-mb 1: the demo's experts rotate past a 1 MiB cache, so the quick profile takes about a second.
DEMO = ["profile", "--preset", "demo", "--quick", "--max-repeats", "1", "--device", "cpu", "--llc-mb", "1"]


def squeezed(text: str) -> str:
    """The console output without whitespace: rich wraps long paths at the runner's 80 columns."""
    return "".join(text.split())


def test_env_var_overrides_xdg_and_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HYBRIMOE_PROFILE_DIR", str(tmp_path / "mine"))
    assert profile_dir() == tmp_path / "mine"


def test_xdg_then_home_fallback(tmp_path, monkeypatch):
    monkeypatch.delenv("HYBRIMOE_PROFILE_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert profile_dir() == tmp_path / "xdg" / "hybrimoe" / "profiles"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert profile_dir() == tmp_path / "home" / ".local" / "share" / "hybrimoe" / "profiles"


@pytest.mark.parametrize(
    ("gpu", "cores", "key"),
    [
        ("NVIDIA H200", 16, "nvidia-h200"),
        ("NVIDIA GeForce RTX 4090", 32, "nvidia-geforce-rtx-4090"),
        ("NVIDIA A100-SXM4-80GB", 8, "nvidia-a100-sxm4-80gb"),
        ("  AMD Instinct MI300X (gfx942) ", 8, "amd-instinct-mi300x-gfx942"),
        (None, 2, "cpu-standin-2core"),
        ("", 64, "cpu-standin-64core"),
    ],
)
def test_machine_keys_are_slugs(gpu, cores, key):
    assert machine_key(gpu, cores) == key


def test_paths_are_safe_file_names(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIMOE_PROFILE_DIR", str(tmp_path))
    assert model_slug("Qwen/Qwen3-30B-A3B") == "qwen-qwen3-30b-a3b"
    assert model_slug("../..") == "model"
    path = default_profile_path("nvidia-h200", "Qwen/Qwen3-30B-A3B")
    assert path == tmp_path / "nvidia-h200.qwen-qwen3-30b-a3b.yaml"
    assert this_machine_key("cpu").startswith("cpu-standin-")


def test_find_profile_hit_and_miss(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIMOE_PROFILE_DIR", str(tmp_path / "profiles"))
    assert find_profile("cpu-standin-2core", "demo") is None  # the directory does not exist yet
    path = default_profile_path("cpu-standin-2core", "demo")
    path.parent.mkdir()
    path.write_text("schema_version: 1\n")
    assert find_profile("cpu-standin-2core", "demo") == path
    assert find_profile("cpu-standin-4core", "demo") is None
    assert find_profile("cpu-standin-2core", "qwen3-30b-a3b") is None


def test_a_saved_profile_that_cannot_be_read_is_named_when_none_fits(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIMOE_PROFILE_DIR", str(tmp_path / "profiles"))
    shape = get_preset("demo").expert_shape()
    path = default_profile_path(this_machine_key("cpu"), "demo")
    path.parent.mkdir()
    path.write_text("schema_version: 1\nname: [\n")
    with pytest.raises(UserError, match=r"no profile of this machine .* 1 could not be read: .*demo\.yaml: malformed YAML"):
        this_machines_profile_for(shape)


def test_profile_without_out_saves_this_machines_profile_and_replaces_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIMOE_PROFILE_DIR", str(tmp_path / "profiles"))
    expected = tmp_path / "profiles" / f"{this_machine_key('cpu')}.demo.yaml"

    first = runner.invoke(app, DEMO)
    assert first.exit_code == 0, first.output
    assert find_profile(this_machine_key("cpu"), "demo") == expected
    assert f"profilewrittento{expected}" in squeezed(first.output)
    assert "replacing" not in first.output
    assert load_profile(expected).expert_shape == get_preset("demo").expert_shape()

    # The second run is this machine's current measurement: it replaces the first, no --force needed.
    def fake_profile_machine(options, progress=None):
        return estimate_profile("rtx4090-desktop", options.model)

    monkeypatch.setattr("hybrimoe.profile.run.profile_machine", fake_profile_machine)
    second = runner.invoke(app, DEMO)
    assert second.exit_code == 0, second.output
    assert f"{expected},replacingthismachine'spreviousprofile" in squeezed(second.output)
    assert load_profile(expected).name == "rtx4090-desktop.demo"
    assert sorted(p.name for p in expected.parent.iterdir()) == [expected.name]


def test_explicit_out_still_needs_force(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIMOE_PROFILE_DIR", str(tmp_path / "profiles"))
    out = tmp_path / "mine.yaml"
    out.write_text("taken\n")
    result = runner.invoke(app, [*DEMO, "--out", str(out)])
    assert result.exit_code == 2 and "--force" in result.output
    assert out.read_text() == "taken\n" and not (tmp_path / "profiles").exists()


def test_stand_in_estimate_is_the_cpu_on_both_sides():
    shape = get_preset("demo")
    profile = estimate_for_this_machine(shape, "cpu")
    assert profile.has_accelerator and profile.stand_in and profile.estimated
    assert profile.gpu_expert == profile.cpu_expert
    assert profile.machine.gpu is None
    # copies are host memcpys: each byte read and written at the CPU's effective memory bandwidth
    assert profile.transfer.h2d_pinned_gbps == pytest.approx(profile.host_memory_gbps / 2)
    assert profile.interference.cpu_slowdown == profile.interference.copy_slowdown >= 1.0

    on_gpu = estimate_for_this_machine(shape, "cuda:0")
    assert not on_gpu.stand_in and on_gpu.machine.gpu == "RTX 4090"
    assert on_gpu.gpu_expert.ms(64) < profile.gpu_expert.ms(64)


def test_stand_in_estimate_round_trips_through_yaml(tmp_path):
    from hybrimoe.config import save_profile

    profile = estimate_for_this_machine(get_preset("qwen3-30b-a3b"), "cpu")
    loaded = load_profile(save_profile(profile, tmp_path / "s.yaml"))
    assert loaded.stand_in and loaded.gpu_expert == loaded.cpu_expert
    assert Path(tmp_path / "s.yaml").read_text().count("stand_in: true") == 1
