"""Datasheet roofline estimates and model-shape presets."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybrimoe.config import load_profile, profile_to_dict
from hybrimoe.errors import UserError
from hybrimoe.profile.estimate import (
    COPY_LAUNCH_MS,
    MACHINES,
    N_TOKENS_POINTS,
    SHIPPED_MODELS,
    Roofline,
    datasheet_rows,
    estimate_profile,
    SHIPPED_QUANTIZED,
    shipped_profile_path,
)
from hybrimoe.shapes import PRESETS, get_preset, shape_from_hf_config

PROFILES = Path(__file__).resolve().parents[1] / "profiles"
QWEN3 = PRESETS["qwen3-30b-a3b"]


@pytest.mark.parametrize("machine", sorted(MACHINES))
@pytest.mark.parametrize("model", sorted(PRESETS))
def test_curves_monotone_and_gpu_wins_at_large_counts(machine, model):
    profile = estimate_profile(machine, PRESETS[model])
    assert profile.estimated and profile.sources
    for curve in (profile.cpu_expert, profile.gpu_expert, profile.dense_layer):
        values = [curve.ms(n) for n in (*N_TOKENS_POINTS, 3000, 5000)]
        assert all(b >= a for a, b in zip(values, values[1:]))
        assert [p.n_tokens for p in curve.points] == list(N_TOKENS_POINTS)
    assert profile.gpu_expert.ms(2048) < profile.cpu_expert.ms(2048) / 5
    assert profile.gpu_expert.ms(1) < profile.cpu_expert.ms(1)


def test_load_time_is_bytes_over_pinned_bandwidth():
    for machine in MACHINES:
        profile = estimate_profile(machine, QWEN3)
        transfer = profile.transfer
        expected = profile.expert_shape.expert_bytes / (transfer.h2d_pinned_gbps * 1e6) + COPY_LAUNCH_MS
        assert transfer.expert_load_ms == pytest.approx(expected)


def test_qwen3_on_the_4090_desktop_matches_the_expected_scale():
    profile = estimate_profile("rtx4090-desktop", QWEN3)
    assert profile.expert_shape.expert_bytes == 9_437_184
    assert 0.3 < profile.transfer.expert_load_ms < 0.5
    assert 0.15 < profile.cpu_expert.ms(1) < 0.25
    assert 0.01 < profile.gpu_expert.ms(1) < 0.03
    # CPU time grows about linearly once compute-bound; GPU time barely moves at small counts.
    assert profile.cpu_expert.ms(2048) == pytest.approx(2 * profile.cpu_expert.ms(1024), rel=0.05)
    assert profile.gpu_expert.ms(64) < 1.1 * profile.gpu_expert.ms(1)


def test_pcie_link_is_the_slower_end():
    paper = Roofline.of(MACHINES["a6000-xeon5220r"], "bfloat16")  # A6000 is PCIe 4.0, the Xeon 3.0
    desktop = Roofline.of(MACHINES["rtx4090-desktop"], "bfloat16")
    assert paper.pinned_gbps == pytest.approx(desktop.pinned_gbps / 2)


def test_gpu_override_and_unknown_names():
    profile = estimate_profile("rtx4090-desktop", QWEN3, gpu="H100 PCIe")
    assert profile.machine.gpu == "H100 PCIe"
    assert profile.gpu_expert.ms(1) < estimate_profile("rtx4090-desktop", QWEN3).gpu_expert.ms(1)
    with pytest.raises(UserError, match="unknown machine"):
        estimate_profile("nope", QWEN3)
    with pytest.raises(UserError, match="unknown GPU"):
        estimate_profile("rtx4090-desktop", QWEN3, gpu="nope")


def test_datasheet_rows():
    rows = datasheet_rows()
    names = {row["name"] for row in rows}
    assert {"RTX 4090", "RTX A6000", "AMD Ryzen 9 7950X"} <= names
    assert all(row["source"] for row in rows)


def _without_provenance(profile) -> dict:
    data = profile_to_dict(profile)
    data.pop("provenance")
    return data


@pytest.mark.parametrize("machine", sorted(MACHINES))
@pytest.mark.parametrize(
    "model, quantize", [(model, None) for model in SHIPPED_MODELS] + list(SHIPPED_QUANTIZED)
)
def test_shipped_profiles_load_and_match_regeneration(machine, model, quantize):
    shape = PRESETS[model].quantized(quantize)
    path = shipped_profile_path(PROFILES, machine, shape)
    shipped = load_profile(path)
    assert shipped.estimated and shipped.expert_shape.quantize == quantize
    regenerated = estimate_profile(machine, shape)
    assert _without_provenance(shipped) == _without_provenance(regenerated), (
        f"{path} is stale: run `python -m hybrimoe.profile.estimate --all`"
    )


# ---------------------------------------------------------------------------------------------
# presets and transformers configs


def test_preset_expert_shapes():
    assert QWEN3.expert_shape().expert_bytes == 3 * 2048 * 768 * 2
    assert PRESETS["demo"].expert_shape().dtype == "float32"
    assert {"mixtral-8x7b", "qwen3-30b-a3b", "qwen2-57b-a14b", "deepseek-v2-lite", "olmoe-1b-7b", "demo"} <= set(PRESETS)
    with pytest.raises(UserError, match="unknown model preset"):
        get_preset("gpt-5")


HF_CONFIGS = {
    "mixtral-8x7b": {
        "model_type": "mixtral", "_name_or_path": "mixtral-8x7b", "num_hidden_layers": 32, "num_local_experts": 8,
        "num_experts_per_tok": 2, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 32000, "torch_dtype": "bfloat16",
    },
    "qwen2-57b-a14b": {
        "model_type": "qwen2_moe", "_name_or_path": "qwen2-57b-a14b", "num_hidden_layers": 28, "num_experts": 64,
        "num_experts_per_tok": 8, "moe_intermediate_size": 2560, "shared_expert_intermediate_size": 20480,
        "intermediate_size": 18944, "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
        "vocab_size": 151936, "decoder_sparse_step": 1, "mlp_only_layers": [], "torch_dtype": "bfloat16",
    },
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe", "_name_or_path": "qwen3-30b-a3b", "num_hidden_layers": 48, "num_experts": 128,
        "num_experts_per_tok": 8, "moe_intermediate_size": 768, "intermediate_size": 6144, "hidden_size": 2048,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "torch_dtype": "bfloat16",
    },
    "deepseek-v2-lite": {
        "model_type": "deepseek_v2", "_name_or_path": "deepseek-v2-lite", "num_hidden_layers": 27,
        "n_routed_experts": 64, "num_experts_per_tok": 6, "n_shared_experts": 2, "moe_intermediate_size": 1408,
        "intermediate_size": 10944, "first_k_dense_replace": 1, "moe_layer_freq": 1, "hidden_size": 2048,
        "num_attention_heads": 16, "num_key_value_heads": 16, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "vocab_size": 102400, "torch_dtype": "bfloat16",
    },
    "olmoe-1b-7b": {
        "model_type": "olmoe", "_name_or_path": "olmoe-1b-7b", "num_hidden_layers": 16, "num_experts": 64,
        "num_experts_per_tok": 8, "intermediate_size": 1024, "hidden_size": 2048, "num_attention_heads": 16,
        "num_key_value_heads": 16, "vocab_size": 50304, "torch_dtype": "bfloat16",
    },
}


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_shape_from_hf_config_matches_presets(name):
    assert shape_from_hf_config(HF_CONFIGS[name]) == PRESETS[name]


def test_shape_from_hf_config_gpt_oss_and_errors():
    config = {
        "model_type": "gpt_oss", "_name_or_path": "openai/gpt-oss-20b", "num_hidden_layers": 24,
        "num_local_experts": 32, "experts_per_token": 4, "intermediate_size": 2880, "hidden_size": 2880,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 201088,
        "torch_dtype": "bfloat16", "quantization_config": {"quant_method": "mxfp4"},
    }
    with pytest.raises(UserError, match="quantized \\(mxfp4\\)"):
        shape_from_hf_config(config)
    shape = shape_from_hf_config(config, dtype="int4")
    assert (shape.n_layers, shape.n_experts, shape.top_k, shape.expert_bias) == (24, 32, 4, True)
    assert shape.expert_shape().has_bias
    with pytest.raises(UserError, match="unsupported model_type 'llama'"):
        shape_from_hf_config({"model_type": "llama"})
    broken = dict(HF_CONFIGS["qwen3-30b-a3b"])
    del broken["moe_intermediate_size"]
    with pytest.raises(UserError, match="missing moe_intermediate_size"):
        shape_from_hf_config(broken)
    unnamed = {k: v for k, v in HF_CONFIGS["olmoe-1b-7b"].items() if k != "_name_or_path"}
    with pytest.raises(UserError, match="give the model name"):
        shape_from_hf_config(unnamed)
    assert shape_from_hf_config(unnamed, name="x").name == "x"


def test_qwen_sparse_step_and_mlp_only_layers():
    config = dict(HF_CONFIGS["qwen3-30b-a3b"], decoder_sparse_step=2, mlp_only_layers=[1])
    shape = shape_from_hf_config(config)
    assert (shape.n_layers, shape.n_dense_layers) == (23, 25)  # odd layers except layer 1
    assert shape.dense_intermediate_size == 6144


def test_quantized_estimates_follow_the_runtimes_kernels():
    """Loads copy packed bytes; CPU experts stream packed weights (torch's int8 and int4 matmuls),
    GPU experts also write and read back the dequantized weights."""
    plain, int8, int4 = (estimate_profile("rtx4090-desktop", QWEN3.quantized(q)) for q in (None, "int8", "int4"))
    assert int4.name == "rtx4090-desktop.qwen3-30b-a3b.int4g128"
    load = {p.expert_shape.quantize: p.transfer.expert_load_ms for p in (plain, int8, int4)}
    assert load["int4"] < load["int8"] < load[None] / 1.8
    assert int4.cpu_expert.ms(1) < plain.cpu_expert.ms(1) / 2.5 and int8.cpu_expert.ms(1) < plain.cpu_expert.ms(1) / 1.5
    assert plain.gpu_expert.ms(1) < int4.gpu_expert.ms(1)
