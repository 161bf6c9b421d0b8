"""GGUF files made for the tests with gguf's own GGUFWriter: a real header and tensor infos with the
declared GGML types (quantized ones included), and the tensor data left as a hole in a sparse file
(zeros), so a file with Qwen3-30B-A3B's 17 GB of experts takes no disk and no time to write.

`write_gguf` lays out a llama.cpp-style MoE model: `token_embd`, `output`, per block the attention,
norms, router (`ffn_gate_inp`), shared experts (`ffn_*_shexp`) when asked, the routed experts
(`ffn_{gate,up,down}_exps`) in MoE blocks and a dense MLP (`ffn_{gate,up,down}`) in the leading
dense blocks. `expert_type(block, role)` chooses each expert tensor's type, so a Q4_K_M-like mix
(down projections Q6_K in some blocks) is one lambda.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

gguf = __import__("pytest").importorskip("gguf", reason="the gguf package is not installed (pip install 'hybrimoe[gguf]')")
Q = gguf.GGMLQuantizationType


def tensor_bytes(shape_numpy_order: tuple[int, ...], kind: gguf.GGMLQuantizationType) -> int:
    """Bytes of a tensor of this (outermost-first) shape and GGML type."""
    block, type_bytes = gguf.GGML_QUANT_SIZES[kind]
    n_elements = int(np.prod(shape_numpy_order))
    return n_elements // block * type_bytes


def write_gguf(
    path: Path,
    *,
    arch: str = "qwen3moe",
    n_blocks: int = 4,
    n_dense_blocks: int = 0,
    n_experts: int = 8,
    top_k: int = 2,
    hidden: int = 256,
    ff_expert: int = 256,
    ff_dense: int = 512,
    n_shared: int = 0,
    vocab: int = 512,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int = 64,
    expert_type: Callable[[int, str], gguf.GGMLQuantizationType] = lambda block, role: Q.Q8_0,
    dense_type: gguf.GGMLQuantizationType = Q.Q8_0,
    truncate_bytes: int = 0,
    declared_experts: int | None = None,  # the header's expert_count, when it should lie
    drop: tuple[str, ...] = (),  # tensors left out
) -> dict[str, int]:
    """Writes the GGUF; returns every tensor's bytes by name (what a reader must find)."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(n_blocks)
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_key_length(head_dim)
    writer.add_expert_count(n_experts if declared_experts is None else declared_experts)
    writer.add_expert_used_count(top_k)
    writer.add_expert_feed_forward_length(ff_expert)
    if n_dense_blocks:
        writer.add_leading_dense_block_count(n_dense_blocks)
    if n_shared:
        writer.add_expert_shared_count(n_shared)
    writer.add_token_list([f"t{i}" for i in range(vocab)])  # arrays, as a real file's vocabulary
    writer.add_token_types([1] * vocab)
    sizes: dict[str, int] = {}

    def add(name: str, shape: tuple[int, ...], kind: gguf.GGMLQuantizationType) -> None:
        if name in drop:
            return
        nbytes = tensor_bytes(shape, kind)
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=None if kind == Q.F32 else kind)
        sizes[name] = nbytes

    add("token_embd.weight", (vocab, hidden), dense_type)
    add("output_norm.weight", (hidden,), Q.F32)
    add("output.weight", (vocab, hidden), dense_type)
    for block in range(n_blocks):
        b = f"blk.{block}"
        add(f"{b}.attn_norm.weight", (hidden,), Q.F32)
        add(f"{b}.attn_q.weight", (n_heads * head_dim, hidden), dense_type)
        add(f"{b}.attn_k.weight", (n_kv_heads * head_dim, hidden), dense_type)
        add(f"{b}.attn_v.weight", (n_kv_heads * head_dim, hidden), dense_type)
        add(f"{b}.attn_output.weight", (hidden, n_heads * head_dim), dense_type)
        add(f"{b}.ffn_norm.weight", (hidden,), Q.F32)
        if block < n_dense_blocks:
            add(f"{b}.ffn_gate.weight", (ff_dense, hidden), dense_type)
            add(f"{b}.ffn_up.weight", (ff_dense, hidden), dense_type)
            add(f"{b}.ffn_down.weight", (hidden, ff_dense), dense_type)
            continue
        add(f"{b}.ffn_gate_inp.weight", (n_experts, hidden), Q.F32)
        add(f"{b}.ffn_gate_exps.weight", (n_experts, ff_expert, hidden), expert_type(block, "gate"))
        add(f"{b}.ffn_up_exps.weight", (n_experts, ff_expert, hidden), expert_type(block, "up"))
        add(f"{b}.ffn_down_exps.weight", (n_experts, hidden, ff_expert), expert_type(block, "down"))
        if n_shared:
            add(f"{b}.ffn_gate_shexp.weight", (ff_expert * n_shared, hidden), dense_type)
            add(f"{b}.ffn_up_shexp.weight", (ff_expert * n_shared, hidden), dense_type)
            add(f"{b}.ffn_down_shexp.weight", (hidden, ff_expert * n_shared), dense_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    alignment = writer.data_alignment
    header_end = path.stat().st_size
    data_start = -(-header_end // alignment) * alignment
    data_bytes = sum(-(-n // alignment) * alignment for n in sizes.values())
    os.truncate(path, data_start + data_bytes - truncate_bytes)  # the weights: a hole of zeros
    return sizes
