"""Hardware profile YAML: round trip, and one-line ProfileErrors for every kind of bad file."""

from __future__ import annotations

import dataclasses
import os

import pytest
import yaml

from hybrimoe.config import (
    CurvePoint,
    ExpertShape,
    HardwareProfile,
    LatencyCurve,
    LinearFit,
    PolicyConfig,
    Transfer,
    load_profile,
    profile_from_dict,
    profile_to_dict,
    save_profile,
)
from hybrimoe.errors import ProfileError


def make_profile(**changes) -> HardwareProfile:
    profile = HardwareProfile(
        name="test",
        expert_shape=ExpertShape(hidden_size=64, intermediate_size=32, dtype="float32"),
        cpu_expert=LatencyCurve(points=(CurvePoint(1, 0.5, 0.01), CurvePoint(4, 1.1), CurvePoint(16, 3.5)),
                                fit=LinearFit(0.3, 0.2, r2=0.99, max_rel_error=0.05)),
        dense_layer=LatencyCurve(fit=LinearFit(0.1, 0.001)),
        gpu_expert=LatencyCurve(points=(CurvePoint(1, 0.02), CurvePoint(64, 0.03))),
        transfer=Transfer(expert_load_ms=0.4, h2d_pinned_gbps=25.0, h2d_pageable_gbps=11.0),
        layer_overhead_ms=0.05,
        cpu_first_expert_extra_ms=0.04,
        estimated=True,
        sources=("a datasheet",),
        policy=PolicyConfig(cache_ratio=0.5, mrs_top_p=16),
    )
    return dataclasses.replace(profile, **changes)


def test_yaml_round_trip(tmp_path):
    profile = make_profile()
    path = save_profile(profile, tmp_path / "p.yaml")
    assert load_profile(path) == profile
    assert yaml.safe_load(path.read_text())["schema_version"] == 1
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_small_values_keep_six_significant_digits(tmp_path):
    profile = make_profile(dense_layer=LatencyCurve(fit=LinearFit(0.1, 9.123456789e-05)))
    back = load_profile(save_profile(profile, tmp_path / "p.yaml"))
    assert back.dense_layer.fit.per_token_ms == pytest.approx(9.12346e-05, rel=1e-9)


def test_save_refuses_overwrite(tmp_path):
    path = save_profile(make_profile(), tmp_path / "p.yaml")
    with pytest.raises(ProfileError, match="--force"):
        save_profile(make_profile(), path)
    save_profile(make_profile(name="other"), path, overwrite=True)
    assert load_profile(path).name == "other"


def test_curve_interpolates_and_extrapolates():
    curve = make_profile().cpu_expert
    assert curve.ms(1) == 0.5
    assert curve.ms(2) == pytest.approx(0.5 + (1.1 - 0.5) / 3)
    assert curve.ms(0) == 0.5
    assert curve.ms(20) == pytest.approx(3.5 + 0.2 * 4)  # beyond the points: the fit's slope
    assert make_profile().dense_layer.ms(100) == pytest.approx(0.2)


def _write(tmp_path, text: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def _good_dict() -> dict:
    return profile_to_dict(make_profile())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(schema_version=2), "schema_version 2 is not supported"),
        (lambda d: d.pop("schema_version"), "schema_version None is not supported"),
        (lambda d: d.update(colour="blue"), "unknown field\\(s\\) colour"),
        (lambda d: d["transfer"].update(speed=1), "transfer: unknown field\\(s\\) speed"),
        (lambda d: d.update(layer_overhead_ms=-1.0), "layer_overhead_ms: must be a finite number, not negative"),
        (lambda d: d["transfer"].update(expert_load_ms="fast"), "expert_load_ms: expected a number"),
        (lambda d: d["expert_shape"].update(dtype="float13"), "unknown dtype 'float13'"),
        (lambda d: d["expert_shape"].update(hidden_size=0), "sizes must be positive"),
        (lambda d: d["cpu_expert"].update(points=[[4, 1.0], [1, 0.5]]), "strictly increasing"),
        (lambda d: d["cpu_expert"].update(points=[[1]]), "expected \\[n_tokens, ms\\]"),
        (lambda d: d.pop("transfer"), "both gpu_expert and transfer"),
        (lambda d: d.pop("cpu_expert"), "cpu_expert"),
        (lambda d: d["policy"].update(cache_ratio=1.5), "cache_ratio must be in \\[0, 1\\]"),
        (lambda d: d.update(estimated="yes"), "expected true or false"),
    ],
)
def test_bad_profiles_rejected_with_one_line(tmp_path, mutate, message):
    data = _good_dict()
    mutate(data)
    path = _write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["name: [unclosed\n", "a: b: c\n", "key: 'open\n"])
def test_malformed_yaml_rejected(tmp_path, text):
    with pytest.raises(ProfileError, match="malformed YAML") as info:
        load_profile(_write(tmp_path, text))
    assert "bad.yaml" in str(info.value) and "\n" not in str(info.value)


def test_not_a_mapping_and_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="must be a YAML mapping"):
        load_profile(_write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ProfileError, match="profile not found"):
        load_profile(tmp_path / "missing.yaml")


def test_mismatched_expert_shape_rejected():
    profile = make_profile()
    profile.check_expert_shape(ExpertShape(64, 32, "float32"))
    for other in (ExpertShape(2048, 768, "float32"), ExpertShape(64, 32, "bfloat16"), ExpertShape(64, 32, "int4")):
        with pytest.raises(ProfileError, match="made for experts 3 x 64 x 32 float32") as info:
            profile.check_expert_shape(other)
        assert "\n" not in str(info.value)


def test_with_accelerator_from():
    cpu_box = make_profile(gpu_expert=None, transfer=None, name="box")
    combined = cpu_box.with_accelerator_from(make_profile(name="gpu"))
    assert combined.has_accelerator and combined.name == "box+gpu"
    with pytest.raises(ProfileError, match="no accelerator"):
        make_profile().with_accelerator_from(cpu_box)
    other_shape = make_profile(expert_shape=ExpertShape(128, 32, "float32"))
    with pytest.raises(ProfileError, match="is for experts"):
        cpu_box.with_accelerator_from(other_shape)


def test_profile_from_dict_names_the_source():
    with pytest.raises(ProfileError, match="^somewhere: schema_version"):
        profile_from_dict({"schema_version": 0}, "somewhere")


def test_non_numeric_or_negative_curve_points_are_one_line_errors(tmp_path):
    import yaml

    from hybrimoe.config import load_profile
    from hybrimoe.errors import ProfileError

    good = tmp_path / "good.yaml"
    for bad_point in ([1, "fast"], [1, -0.5], [0, 1.0]):
        data = {
            "schema_version": 1,
            "name": "x",
            "expert_shape": {"hidden_size": 8, "intermediate_size": 4},
            "cpu_expert": {"points": [bad_point]},
            "dense_layer": {"fit": {"intercept_ms": 0.1, "per_token_ms": 0.0}},
        }
        good.write_text(yaml.safe_dump(data))
        with pytest.raises(ProfileError, match=r"cpu_expert\.points\[0\]"):
            load_profile(good)
