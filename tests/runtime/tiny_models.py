"""Tiny random MoE models of every supported family, and a byte-level tokenizer for them.

Hidden 32, 3 decoder layers, 8 experts, top-2, float32. Weights are drawn with a larger spread than
transformers' default so routing is decisive and an expert mix-up changes the logits visibly.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300  # 256 bytes + a few specials, for the byte-level tokenizer

_COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    initializer_range=0.15,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
_MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)

FAMILIES: dict[str, dict] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=64,
        decoder_sparse_step=1, norm_topk_prob=False,
    ),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=8, norm_topk_prob=True),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=None, n_group=1, topk_group=1, **_MLA,
    ),
    "deepseek_v3": dict(
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=24, n_group=2, topk_group=1, **_MLA,
    ),
    "gpt_oss": dict(
        num_local_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
}


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**_COMMON, **FAMILIES[family], **overrides})


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("e_score_correction_bias") or "norm" in name:
                continue
            if name.endswith("_bias") or name.endswith(".bias"):
                param.normal_(0.0, 0.1)  # GPT-OSS: biases the default init leaves at zero
    return model.eval()


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: every byte is a token; ids 256+ are specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>")
    return tokenizer


def save_checkpoint(family: str, directory: Path, with_tokenizer: bool = True, seed: int = 0) -> Path:
    model = tiny_model(family, seed)
    model.save_pretrained(directory)
    if with_tokenizer:
        byte_tokenizer().save_pretrained(directory)
    return directory
