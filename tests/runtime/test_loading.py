"""Loading: what is found in a checkpoint, where it is placed, and every refusal as one ModelError."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model

from hybrimoe.errors import ModelError
from hybrimoe.runtime.loading import from_model, load_model


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "family, n_layers, has_bias",
    [("mixtral", 3, False), ("deepseek_v2", 2, False), ("gpt_oss", 3, True)],
)
def test_finds_moe_layers_and_shape(checkpoint, family, n_layers, has_bias):
    loaded = load_model(checkpoint(family), show_progress=False)
    assert loaded.n_layers == n_layers  # DeepSeek's first layer is dense
    assert (loaded.n_experts, loaded.top_k) == (8, 2)
    assert loaded.expert_shape.has_bias == has_bias
    assert loaded.expert_shape.dtype == "float32"
    assert loaded.tokenizer is not None
    assert [layer.index for layer in loaded.layers] == list(range(n_layers))
    assert loaded.layers[0].decoder_layer == (1 if family == "deepseek_v2" else 0)


def test_not_a_directory_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no such directory"):
        load_model("mistralai/Mixtral-8x7B-v0.1", show_progress=False)
    with pytest.raises(ModelError, match="no such directory"):
        load_model(tmp_path / "missing", show_progress=False)


def test_dense_model_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="dense model"):
        load_model(tmp_path, show_progress=False)


def test_unknown_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-moe", "hidden_size": 8}))
    with pytest.raises(ModelError, match="unknown architecture 'no-such-moe'"):
        load_model(tmp_path, show_progress=False)


def test_missing_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        load_model(tmp_path, show_progress=False)


def test_shipped_code_of_an_unknown_model_needs_trust_remote_code(checkpoint, tmp_path):
    path = _copy(checkpoint("mixtral"), tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "evil_moe"
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="--trust-remote-code"):
        load_model(path, show_progress=False)


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_a_native_model_loads_natively_despite_auto_map(checkpoint, tmp_path, capsys, trust_remote_code):
    """DeepSeek-V2-Lite's config names its own code; transformers has the model, so that code is
    never imported (the module it names does not even exist here)."""
    path = _copy(checkpoint("deepseek_v2"), tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
                          "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tokenizer_config.get("tokenizer_class")
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    loaded = load_model(path, trust_remote_code=trust_remote_code, show_progress=False)
    reference = load_model(checkpoint("deepseek_v2"), show_progress=False)
    assert type(loaded.model) is type(reference.model)
    assert type(loaded.model).__module__.startswith("transformers.models.deepseek_v2")
    assert loaded.n_layers == 2 and loaded.tokenizer is not None
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 2 and "'deepseek_v2'" in notes[0] and "auto_map" in notes[0]


def test_truncated_weights_are_refused(checkpoint, tmp_path):
    path = _copy(checkpoint("mixtral"), tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated"):
        load_model(path, show_progress=False)


def test_missing_shard_is_refused(checkpoint, tmp_path):
    path = _copy(checkpoint("mixtral"), tmp_path)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(ModelError, match="missing weight shard"):
        load_model(path, show_progress=False)


def test_missing_tensors_are_refused(checkpoint, tmp_path):
    from safetensors.torch import save_file

    path = _copy(checkpoint("mixtral"), tmp_path)
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.self_attn.q_proj.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="missing from the checkpoint"):
        load_model(path, show_progress=False)


def test_no_weights_is_refused(checkpoint, tmp_path):
    path = _copy(checkpoint("mixtral"), tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no weights"):
        load_model(path, show_progress=False)


def test_pickle_weights_need_opt_in(checkpoint, tmp_path):
    path = _copy(checkpoint("mixtral"), tmp_path)
    state = load_file(path / "model.safetensors")
    torch.save(state, path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="--allow-pickle"):
        load_model(path, show_progress=False)
    loaded = load_model(path, allow_pickle=True, show_progress=False)
    reference = tiny_model("mixtral")
    assert torch.equal(loaded.layers[0].experts.gate_up_proj, reference.model.layers[0].mlp.experts.gate_up_proj)


def test_missing_tokenizer_is_refused(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="tokenizer"):
        load_model(tmp_path, show_progress=False)
    assert load_model(tmp_path, with_tokenizer=False, show_progress=False).tokenizer is None


def test_placement_moves_dense_parts_and_pools_experts_on_the_host():
    """Placing on the meta device shows the rule without a GPU: every tensor but the experts moves."""
    model = tiny_model("qwen2_moe", tie_word_embeddings=True)
    loaded = from_model(model, device="meta")
    experts = {id(p) for layer in loaded.layers for p in layer.experts.parameters()}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        expected = "cpu" if id(tensor) in experts else "meta"
        assert tensor.device.type == expected, name
    assert loaded.layers[0].experts.gate_up_proj.data_ptr() == loaded.host_experts.buffers[0].data_ptr()
    assert not loaded.layers[0].experts.gate_up_proj.requires_grad
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
