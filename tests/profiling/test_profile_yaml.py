import dataclasses
import json

import pytest
import yaml

from hybrimoe.config import ExpertShape, load_profile, profile_to_dict, save_profile
from hybrimoe.errors import ProfileError, UserError
from hybrimoe.profile.inputs import resolve_model
from hybrimoe.profile.run import ProfileOptions, profile_machine

from .conftest import TINY_CACHE_BYTES


@pytest.fixture(scope="module")
def measured():
    model = resolve_model(hidden_size=32, intermediate_size=48, dtype="float32")
    steps = []
    options = ProfileOptions(
        model, device="cpu", quick=True, max_repeats=2, cache_bytes=TINY_CACHE_BYTES, note="test run"
    )
    profile = profile_machine(options, progress=lambda what, done, total: steps.append((done, total)))
    return profile, steps


def test_a_profile_without_a_gpu_profiles_the_stand_in_as_the_accelerator(measured):
    profile, steps = measured
    assert profile.stand_in and profile.has_accelerator and profile.gpu_expert == profile.cpu_expert
    assert profile.transfer.expert_load_ms > 0 and profile.transfer.h2d_pinned_gbps > 0
    assert len(profile.cpu_expert.points) >= 2 and profile.cpu_expert.fit is not None
    assert profile.cpu_expert.fit.r2 is not None and profile.cpu_expert.fit.max_rel_error is not None
    assert len(profile.dense_layer.points) >= 2
    assert profile.host_memory_gbps > 0 and profile.layer_overhead_ms > 0
    assert profile.interference.cpu_slowdown >= 1.0 and profile.interference.copy_slowdown >= 1.0
    assert profile.expert_shape == ExpertShape(32, 48, "float32")
    assert profile.machine.cores and profile.machine.torch and profile.machine.gpu is None
    assert "CPU stand-in" in profile.notes and "test run" in profile.notes and "Interference" in profile.notes
    assert profile.provenance.created_by == "hybrimoe profile" and not profile.estimated
    assert profile.model_costs is None  # shapes only: no model to measure
    assert steps[-1] == (7, 7)


def test_measured_profile_round_trips_through_yaml(measured, tmp_path):
    profile, _ = measured
    path = save_profile(profile, tmp_path / "p.yaml")
    loaded = load_profile(path)
    assert profile_to_dict(loaded) == profile_to_dict(profile)
    assert loaded.cpu_expert.ms(3) == pytest.approx(profile.cpu_expert.ms(3), rel=1e-4)
    assert yaml.safe_load(path.read_text())["schema_version"] == 1
    with pytest.raises(ProfileError, match="--force"):
        save_profile(profile, path)


def test_numbers_written_as_yaml_1_2_reads_them(measured, tmp_path):
    """A hand edit of "5e-2" (no dot) is a number, as YAML 1.2 and JSON read it (PyYAML: a string)."""
    path = save_profile(measured[0], tmp_path / "p.yaml")
    text = path.read_text()
    assert "layer_overhead_ms: " in text
    path.write_text("\n".join("layer_overhead_ms: 5e-2" if line.startswith("layer_overhead_ms:") else line
                              for line in text.splitlines()))
    assert load_profile(path).layer_overhead_ms == 0.05


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(schema_version=2), "schema_version 2 is not supported"),
        (lambda d: d.update(colour="blue"), "unknown field"),
        (lambda d: d["cpu_expert"]["fit"].update(intercept_ms=-1.0), "not negative"),
        (lambda d: d["cpu_expert"]["points"].reverse(), "strictly increasing"),
        (lambda d: d["expert_shape"].update(hidden_size="big"), "expected an integer"),
        (lambda d: d.pop("gpu_expert"), "both gpu_expert and transfer"),
    ],
)
def test_bad_profiles_are_refused_in_one_line(measured, tmp_path, edit, message):
    data = json.loads(json.dumps(profile_to_dict(measured[0])))
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(path)
    assert "\n" not in str(info.value)


def test_a_profile_for_other_expert_shapes_is_refused(measured):
    other = ExpertShape(hidden_size=64, intermediate_size=48, dtype="float32")
    with pytest.raises(ProfileError, match="run `hybrimoe profile`") as info:
        measured[0].check_expert_shape(other)
    assert "\n" not in str(info.value)


def test_model_inputs_are_one_clear_source(tmp_path):
    assert resolve_model(preset="demo").name == "demo"
    assert resolve_model().name == "demo"  # nothing given: the embedded demo model, named as `run` names it
    assert resolve_model(preset="demo", dtype="bfloat16").dtype == "bfloat16"
    custom = resolve_model(hidden_size=256, intermediate_size=64)
    assert (custom.hidden_size, custom.intermediate_size, custom.dtype) == (256, 64, "bfloat16")
    config = {
        "model_type": "qwen3_moe", "_name_or_path": "Qwen/Qwen3-30B-A3B", "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64, "vocab_size": 100,
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    from_dir = resolve_model(model_path=tmp_path)
    assert from_dir.name == tmp_path.name  # by its directory, as `run --model DIR` names it
    assert (from_dir.hidden_size, from_dir.intermediate_size, from_dir.n_experts) == (64, 32, 8)
    assert resolve_model(model_path=tmp_path / "config.json") == from_dir
    for kwargs, message in (
        ({"preset": "demo", "hidden_size": 8, "intermediate_size": 8}, "--preset and --hidden-size"),
        ({"hidden_size": 8}, "go together"),
        ({"preset": "nope"}, "unknown model preset"),
        ({"model_path": tmp_path / "missing"}, "no config.json"),
    ):
        with pytest.raises(UserError, match=message) as info:
            resolve_model(**kwargs)
        assert "\n" not in str(info.value)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="malformed JSON"):
        resolve_model(model_path=tmp_path)


def test_cuda_is_refused_without_a_gpu(tiny_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match="no CUDA device"):
        profile_machine(ProfileOptions(tiny_model, device="cuda"))
    with pytest.raises(UserError, match="cpu or cuda"):
        profile_machine(ProfileOptions(tiny_model, device="tpu"))
    with pytest.raises(UserError, match="float32, float16, bfloat16"):
        profile_machine(ProfileOptions(dataclasses.replace(tiny_model, dtype="int4")))
