"""`hybrimoe profile` on a model's config: the rest of a step measured on its own modules."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hybrimoe.policy.names import STRATEGIES
from hybrimoe.profile.inputs import resolve_model
from hybrimoe.profile.model_costs import build_random_model
from hybrimoe.profile.run import ProfileOptions, profile_machine

from .conftest import TINY_CACHE_BYTES

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_config_dir(tmp_path_factory):
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "qwen2_moe", hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, max_position_embeddings=64, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=48, shared_expert_intermediate_size=64, dtype="float32",
    )
    directory = tmp_path_factory.mktemp("tiny-qwen2-moe")
    (directory / "config.json").write_text(json.dumps(config.to_dict()))
    return directory


@pytest.fixture(scope="module")
def measured(tiny_config_dir):
    options = ProfileOptions(
        resolve_model(model_path=tiny_config_dir), device="cpu", quick=True, max_repeats=2,
        cache_bytes=TINY_CACHE_BYTES, model_config=tiny_config_dir / "config.json",
    )
    return profile_machine(options)


def test_the_model_costs_cover_a_whole_step(measured):
    costs = measured.model_costs
    assert costs is not None and measured.stand_in
    assert costs.outside_step.ms(1) > 0 and costs.host_layer.ms(1) > 0
    assert costs.dense_ms_per_context_token >= 0
    assert {p.strategy for p in costs.planners} == set(STRATEGIES)
    assert all(p.plan_layer.ms(1) > 0 for p in costs.planners)
    assert measured.layer_overhead_ms == pytest.approx(costs.host_layer.ms(1))
    assert "model's own modules" in measured.notes and "stand-in measured" not in measured.notes


def test_the_model_costs_round_trip_through_yaml(measured, tmp_path):
    from hybrimoe.config import load_profile, profile_to_dict, save_profile

    path = save_profile(measured, tmp_path / "m.yaml")
    assert profile_to_dict(load_profile(path)) == profile_to_dict(measured)


def test_a_config_file_of_another_name_builds_its_model(tiny_config_dir, tmp_path):
    """`profile --model tiny.json`: the shapes and the measured model come from the same file."""
    renamed = tmp_path / "tiny-qwen2-moe.json"
    shutil.copyfile(tiny_config_dir / "config.json", renamed)
    loaded = build_random_model(renamed, torch.device("cpu"))
    assert loaded.n_experts == 8 and loaded.expert_shape.hidden_size == 32
