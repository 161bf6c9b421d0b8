"""GGUF as an input: the header's shapes and per-tensor bytes (mixed types, leading dense blocks),
`profile --model X.gguf`, and `tune --model X.gguf --export llamacpp` placing, at a 24 GB budget,
as many layers' experts as the file's own tensor sizes fit.

The files are written with gguf's own GGUFWriter (`tests/gguf_files.py`), quantized types declared
and the data left as a sparse hole; no llama.cpp build is needed.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from gguf_files import Q, write_gguf  # skips this module without the gguf package
from hybrimoe.cli import app
from hybrimoe.config import load_profile
from hybrimoe.errors import ModelError
from hybrimoe import gguf_reader
from hybrimoe.gguf_header import read_gguf
from hybrimoe.profile.inputs import resolve_model
from hybrimoe.capacity import GIB, reserve_for
from hybrimoe.tune.llamacpp_export import llamacpp_placement

REPO = Path(__file__).resolve().parents[1]
QWEN_TRACE = REPO / "traces" / "qwen3-30b-a3b.npz"
QWEN_PROFILE = REPO / "profiles" / "rtx4090-desktop.qwen3-30b-a3b.yaml"
QWEN = dict(n_blocks=48, n_experts=128, top_k=8, hidden=2048, ff_expert=768, vocab=151936, n_heads=32,
            n_kv_heads=4, head_dim=128)
runner = CliRunner()


def q8_with_q6k_down_in_odd_blocks(block: int, role: str):
    """A Q4_K_M-like mix: one projection's type changes from block to block."""
    return Q.Q6_K if role == "down" and block % 2 else Q.Q8_0


def expert_bytes_of_block(sizes: dict[str, int], block: int) -> int:
    return sum(n for name, n in sizes.items() if name.startswith(f"blk.{block}.") and "_exps." in name)


def test_header_gives_shapes_and_the_bytes_of_each_tensor(tmp_path):
    path = tmp_path / "mixed.gguf"
    sizes = write_gguf(path, n_blocks=5, n_dense_blocks=1, arch="deepseek2", n_shared=2,
                       expert_type=lambda block, role: Q.Q6_K if role == "down" and block % 2 else Q.Q4_K)
    model = read_gguf(path)
    shape = model.shape
    assert (shape.n_layers, shape.n_dense_layers, shape.moe_decoder_layers) == (4, 1, (1, 2, 3, 4))
    assert (shape.n_experts, shape.top_k, shape.hidden_size, shape.intermediate_size) == (8, 2, 256, 256)
    assert (shape.n_shared_experts, shape.shared_intermediate_size, shape.dense_intermediate_size) == (2, 256, 512)
    assert model.layer_expert_bytes == tuple(expert_bytes_of_block(sizes, b) for b in (1, 2, 3, 4))
    assert model.layer_expert_bytes[0] != model.layer_expert_bytes[1]  # Q6_K down in odd blocks only
    on_cpu = sizes["token_embd.weight"]  # llama.cpp keeps the input layer on the CPU
    assert model.gpu_dense_bytes == sum(sizes.values()) - model.all_expert_bytes - on_cpu
    assert model.expert_types == "down Q6_K x2, Q4_K x2; gate Q4_K; up Q4_K"
    assert model.max_expert_bytes == -(-max(model.layer_expert_bytes) // 8)
    assert shape.dtype == "bfloat16"  # quantized experts: hybrimoe's own runtime would run them so


def test_profile_estimate_takes_the_shape_of_a_gguf(tmp_path):
    path = tmp_path / "qwen3-q8.gguf"
    write_gguf(path, **QWEN)
    assert resolve_model(model_path=path).routing_shape == (48, 128, 8, 2048, 768)
    out = tmp_path / "p.yaml"
    result = runner.invoke(app, ["profile", "--estimate", "rtx4090-desktop", "--model", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    experts = load_profile(out).expert_shape
    assert (experts.hidden_size, experts.intermediate_size, experts.dtype) == (2048, 768, "bfloat16")


def test_llamacpp_export_at_24_gb_places_as_many_layers_as_the_gguf_bytes_fit(tmp_path):
    path = tmp_path / "qwen3-30b-a3b-q8-q6k.gguf"
    sizes = write_gguf(path, **QWEN, expert_type=q8_with_q6k_down_in_odd_blocks)
    out = tmp_path / "tuned.yaml"
    result = runner.invoke(app, ["tune", "--trace", str(QWEN_TRACE), "--profile", str(QWEN_PROFILE), "--out", str(out),
                                 "--model", str(path), "--gpu-memory-gb", "24", "--export", "llamacpp", "--storage",
                                 "memory", "--trials", "4", "--max-tokens", "120", "--objective", "decode"])
    assert result.exit_code == 0, result.output
    n_cpu_moe = int(re.search(r"--n-cpu-moe (\d+)", result.output).group(1))
    assert f"llama-server -m {path} -ngl 99 --n-cpu-moe {n_cpu_moe} -c 4096" in result.output
    # the room, from the writer's own sizes: 24 GiB less what -ngl 99 puts on the GPU besides the
    # experts (every tensor but the experts and the input embedding) and the reserve for the context
    dense_gpu = sum(n for name, n in sizes.items() if "_exps." not in name and name != "token_embd.weight")
    room = 24 * GIB - dense_gpu - reserve_for(read_gguf(path).shape, 1, 4096, 0).total_bytes
    on_gpu = [expert_bytes_of_block(sizes, block) for block in range(48)]
    assert sum(on_gpu[n_cpu_moe:]) <= room < sum(on_gpu[n_cpu_moe - 1:])  # one layer more would not fit
    assert 0 < n_cpu_moe < 48
    assert "--fit" in result.output and "already set by user" in result.output


def test_leading_dense_blocks_shift_the_llamacpp_block_numbers(tmp_path):
    """DeepSeek-style: block 0 dense; keeping the first two MoE layers on the CPU is --n-cpu-moe 3."""
    path = tmp_path / "deepseek-like.gguf"
    write_gguf(path, arch="deepseek2", n_blocks=5, n_dense_blocks=1, expert_type=lambda block, role: Q.Q4_K)
    model = read_gguf(path)
    room = sum(model.layer_expert_bytes[2:])  # the last two MoE layers fit, the third does not
    inputs = SimpleNamespace(
        workload=SimpleNamespace(meta=SimpleNamespace(n_layers=4, n_experts=8)), model=model.shape, gguf=model,
        options=SimpleNamespace(model=path, context_tokens=4096), expert_room_bytes=room,
        profile=SimpleNamespace(machine=SimpleNamespace(cores=8)),
    )
    result = SimpleNamespace(row=lambda name: None, tuned=None)
    placement = llamacpp_placement(inputs, result)
    assert (placement.n_cpu_moe_layers, placement.cpu_blocks, placement.n_cpu_moe) == (2, (1, 2), 3)
    assert placement.override == "blk\\.(1|2)\\.ffn_.*_exps\\.=CPU"
    assert placement.command == f"llama-server -m {path} -ngl 99 --n-cpu-moe 3 -c 4096 -t 8"


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"GGUF" + b"\x00" * 3), "not a GGUF file"),
    (lambda p: write_gguf(p, truncate_bytes=4096), "truncated"),
    (lambda p: write_gguf(p, arch="falcon"), "unsupported architecture"),
    (lambda p: write_gguf(p, arch="llama", n_dense_blocks=4), "not a MoE model"),
    (lambda p: write_gguf(p, drop=("blk.1.ffn_up_exps.weight",)), "no blk.1.ffn_up_exps.weight"),
])
def test_bad_gguf_is_a_model_error(tmp_path, make, message):
    path = tmp_path / "bad.gguf"
    make(path)
    with pytest.raises(ModelError, match=message):
        read_gguf(path)


def test_the_bounded_header_reader_reads_what_ggufs_own_reader_reads(tmp_path):
    from gguf import GGUFReader

    path = tmp_path / "mixed.gguf"
    write_gguf(path, arch="deepseek2", n_blocks=3, n_dense_blocks=1, n_shared=1,
               expert_type=q8_with_q6k_down_in_odd_blocks)
    header, reference = gguf_reader.read_header(path), GGUFReader(path)
    assert [(t.name, t.dims, t.type_name, t.n_bytes, t.data_offset) for t in header.tensors] == [
        (t.name, tuple(int(n) for n in t.shape), t.tensor_type.name, int(t.n_bytes), t.data_offset)
        for t in reference.tensors]
    for key, field in reference.fields.items():
        if key.startswith("GGUF."):
            continue
        expected = None if key == "tokenizer.ggml.tokens" else field.contents()  # string arrays are skipped
        assert header.fields[key] == expected, key


def _header(*fields: bytes, n_tensors: int = 0, tensors: bytes = b"") -> bytes:
    """A GGUF v3 header of these raw fields (each key, type and value) and tensor infos."""
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(fields)) + b"".join(fields) + tensors


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name.encode())) + name.encode()


@pytest.mark.parametrize("raw, message", [
    (_header(_key("x.arr") + struct.pack("<IIQ", 9, 0, 1 << 62)), "declares 4611686018427387904 entries"),
    (_header(_key("x.arr") + struct.pack("<IIQ", 9, 0, 1000)), "truncated: x.arr runs past the end"),
    (_header(_key("x.arr") + struct.pack("<IIQIIQ", 9, 9, 1, 9, 9, 1)), "an array of GGUF value type 9"),
    (_header(_key("x.arr") + struct.pack("<IIQ", 9, 8, 2) + struct.pack("<Q", 1 << 40)), "truncated: x.arr"),
    (_header(struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<IB", 0, 1)), "a metadata key is not UTF-8"),
    (_header(_key("a") + struct.pack("<IB", 0, 1), _key("a") + struct.pack("<IB", 0, 1)), "has the key 'a' twice"),
    (_header(_key("a") + struct.pack("<I", 77)), "unknown GGUF value type 77"),
    (_header(_key("general.alignment") + struct.pack("<II", 4, 3)), "not a power of two"),
    (_header(n_tensors=1, tensors=_key("w") + struct.pack("<I5QIQ", 5, 1, 1, 1, 1, 1, 0, 0)), "5 dimensions"),
    (_header(n_tensors=1, tensors=_key("w") + struct.pack("<I1QIQ", 1, 4, 999, 0)), "unknown GGML type 999"),
    (_header(n_tensors=1 << 60), "truncated: a tensor name"),
    (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "GGUF version 1"),
])
def test_a_header_that_declares_more_than_it_holds_is_refused_at_once(tmp_path, raw, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(raw)
    with pytest.raises(ModelError, match=re.escape(message)):
        gguf_reader.read_header(path)


def test_an_array_past_the_entry_limit_is_refused_before_it_is_walked(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_reader, "MAX_ARRAY_ITEMS", 1000)
    path = tmp_path / "vocab.gguf"
    path.write_bytes(_header(_key("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1001) + bytes(8 * 1001)))
    with pytest.raises(ModelError, match="declares 1001 entries; hybrimoe reads at most 1000"):
        gguf_reader.read_header(path)
