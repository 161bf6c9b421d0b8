"""The shipped demo checkpoint (shape facts, offline loading, determinism) and its training script."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from hybrimoe import demo
from hybrimoe.demo import DEMO_MODEL_DIR, DEMO_PROMPT, demo_model_path
from hybrimoe.errors import ModelError

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_CHECKPOINT_BYTES = 16_000_000


@pytest.fixture(scope="module")
def demo_model():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_model_path(), local_files_only=True)
    return model.eval()


@pytest.fixture(scope="module")
def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_path(), local_files_only=True)


def test_demo_model_path_is_the_shipped_directory():
    assert demo_model_path() == DEMO_MODEL_DIR
    assert (DEMO_MODEL_DIR / "model.safetensors").is_file()
    assert (DEMO_MODEL_DIR / "README.md").is_file()


def test_demo_model_path_reports_a_missing_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "DEMO_MODEL_DIR", tmp_path / "demo_model")
    with pytest.raises(ModelError, match="demo model is missing"):
        demo.demo_model_path()


def test_checkpoint_fits_the_size_budget():
    total_bytes = sum(f.stat().st_size for f in DEMO_MODEL_DIR.iterdir() if f.is_file())
    assert total_bytes <= MAX_CHECKPOINT_BYTES


def test_shape_facts(demo_model):
    cfg = demo_model.config
    assert cfg.model_type == "qwen2_moe"
    assert cfg.num_hidden_layers >= 4
    assert cfg.num_experts >= 16
    assert cfg.num_experts_per_tok >= 2
    assert cfg.shared_expert_intermediate_size > 0
    assert demo_model.dtype == torch.float32
    for layer in demo_model.model.layers:
        moe = layer.mlp
        assert moe.experts.gate_up_proj.shape == (cfg.num_experts, 2 * cfg.moe_intermediate_size, cfg.hidden_size)
        assert moe.experts.down_proj.shape == (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        assert moe.gate.top_k == cfg.num_experts_per_tok
        assert moe.shared_expert.gate_proj.out_features == cfg.shared_expert_intermediate_size
        assert moe.shared_expert_gate.out_features == 1


def test_tokenizer_is_byte_level(demo_tokenizer):
    text = "ROMEO:\nO, she doth teach the torches to burn bright! \u00e9"
    ids = demo_tokenizer(text).input_ids
    assert ids == list(text.encode("utf-8"))
    assert demo_tokenizer.decode(ids) == text
    assert demo_tokenizer.eos_token_id == 256


def test_greedy_generation_is_deterministic(demo_model, demo_tokenizer):
    ids = demo_tokenizer(DEMO_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        first = demo_model.generate(ids, max_new_tokens=24, do_sample=False)
        second = demo_model.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(first, second)
    assert first.shape == (1, ids.shape[1] + 24)
    assert demo_tokenizer.decode(first[0]).startswith(DEMO_PROMPT)


def _load_training_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("train_demo_model", REPO_ROOT / "scripts" / "train_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_training_script_lowers_the_loss(tmp_path, monkeypatch):
    lines = [
        "ROMEO:\nBut soft, what light through yonder window breaks?\n\n",
        "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n\n",
        "MERCUTIO:\nA plague o' both your houses!\n\n",
    ]
    data = tmp_path / "input.txt"
    data.write_text("".join(lines[i % 3] for i in range(300)))
    out = tmp_path / "model"
    script = _load_training_script(monkeypatch)
    script.main([
        "--data", str(data), "--out", str(out), "--max-steps", "40", "--warmup-steps", "5",
        "--batch-size", "8", "--context-bytes", "64", "--eval-every", "20", "--eval-windows", "4",
        "--hidden-size", "32", "--n-heads", "2", "--n-layers", "4", "--n-experts", "16",
        "--expert-intermediate", "16", "--shared-intermediate", "32",
    ])
    log = json.loads((out / "training_log.json").read_text())
    first, last = log["curve"][0], log["curve"][-1]
    assert last["step"] == 39
    assert last["train_loss"] < first["train_loss"] - 1.0
    assert log["held_out_loss"] < first["train_loss"] - 1.0
    card = (out / "README.md").read_text()
    assert "nats per byte" in card and "--max-steps 40" in card


def test_quantized_experts_keep_the_held_out_loss(demo_model, monkeypatch):
    """int8 experts within 1% and int4 within 5% of float32 (the model card's table, on 16 windows)."""
    data = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
    if not data.is_file():
        pytest.skip(f"the held-out text is in ../shared, absent here ({data})")
    script = _load_training_script(monkeypatch)
    _, held_ids = script.load_bytes(data)
    windows = script.held_out_windows(held_ids, demo_model.config.max_position_embeddings)[:16]
    baseline = script.held_out_loss(demo_model, windows)
    losses = script.quantized_losses(demo_model, windows)
    assert set(losses) == set(script.QUANTIZED)
    for (quantize, _), loss in losses.items():
        assert loss <= baseline * (1.01 if quantize == "int8" else 1.05), (quantize, loss, baseline)
    assert script.held_out_loss(demo_model, windows) == baseline  # the model's weights are restored
