"""Every bad input a user can give gets one line on stderr and exit code 2, before any work, with
no file changed or half written; hostile files never run code and nothing opens a socket.

Each case is (id, argv, files): argv may name files made in a scratch directory by `files`
(`{tmp}` is replaced by that directory). The harness snapshots the directory before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from hybrimoe.cli import app
from hybrimoe.runtime import native

REPO = Path(__file__).resolve().parent.parent
TRACE = REPO / "traces" / "qwen3-30b-a3b.npz"
PROFILE = REPO / "profiles" / "rtx4090-desktop.qwen3-30b-a3b.yaml"
DEMO = REPO / "hybrimoe" / "demo_model"
DEMO_PROFILE = REPO / "profiles" / "measured-2core-cpu.demo.yaml"
MARKER = "HYBRIMOE_MARKER"  # a hostile file's payload would create {tmp}/pwned

runner = CliRunner()


# -- files the cases read ----------------------------------------------------------------------


def _profile_with(tmp: Path, name: str, old: str, new: str) -> None:
    text = PROFILE.read_text()
    assert old in text, old
    (tmp / name).write_text(text.replace(old, new, 1))


def _model_dir(tmp: Path, name: str, config=None, weights: bool = True, tokenizer: bool = True) -> Path:
    directory = tmp / name
    directory.mkdir()
    config_text = (DEMO / "config.json").read_text() if config is None else json.dumps(config)
    (directory / "config.json").write_text(config_text)
    if weights:
        os.symlink(DEMO / "model.safetensors", directory / "model.safetensors")
    if tokenizer:
        for part in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(DEMO / part, directory / part)
    return directory


def _demo_config(**changes) -> dict:
    return {**json.loads((DEMO / "config.json").read_text()), **changes}


def _unknown_dtype(header: dict) -> None:
    header["model.norm.weight"]["dtype"] = "XX"


def _overlapping_offsets(header: dict) -> None:
    tensor = header["model.norm.weight"]
    tensor["data_offsets"] = [0, tensor["data_offsets"][1] - tensor["data_offsets"][0]]


def _nested_metadata(header: dict) -> None:
    header["__metadata__"] = {"format": {"nested": "map"}}


_HEADER_CHANGES = {"unknown_dtype": _unknown_dtype, "overlapping_offsets": _overlapping_offsets,
                   "nested_metadata": _nested_metadata}


def _with_changed_header(source: Path, target: Path, change) -> None:
    """`source`'s safetensors file with `change(header)` applied to its JSON header (data offsets
    count from the data's start, so the data follows the new header unchanged)."""
    raw = source.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    change(header)
    new_header = json.dumps(header).encode()
    target.write_bytes(len(new_header).to_bytes(8, "little") + new_header + raw[8 + header_len:])


def make_files(tmp: Path) -> None:
    (tmp / "a_file").write_text("not a directory")
    (tmp / "x.gguf").write_bytes(b"GGUF" + bytes(64))
    (tmp / "a_dir").mkdir()
    os.mkfifo(tmp / "fifo.npz")  # reading it would block forever
    os.symlink("/dev/zero", tmp / "zero.yaml")  # reading it would never end
    (tmp / "a_dir.npz").mkdir()
    (tmp / "existing.npz").write_bytes(b"keep me")
    (tmp / "existing.yaml").write_text("keep: me\n")
    (tmp / "latin1.txt").write_bytes("caf\xe9 \xff\xfe".encode("latin-1"))
    (tmp / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp / "empty.txt").write_text("")
    (tmp / "bad.yaml").write_text("name: [unclosed\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "not.npz").write_text("this is text")
    (tmp / "hostile.yaml").write_text(f'!!python/object/apply:os.system ["touch {tmp}/pwned"]\n')
    _profile_with(tmp, "nan_load.yaml", "expert_load_ms: 0.384491", "expert_load_ms: .nan")
    _profile_with(tmp, "zero_load.yaml", "expert_load_ms: 0.384491", "expert_load_ms: 0")
    _profile_with(tmp, "long_number.yaml", "layer_overhead_ms: 0.05", "layer_overhead_ms: " + "9" * 5000)
    _profile_with(tmp, "key_twice.yaml", "schema_version: 1", "schema_version: 1\nschema_version: 1")
    _profile_with(tmp, "absurd_interference.yaml", "copy_slowdown: 1.0", "copy_slowdown: 1.0e+300")
    _profile_with(tmp, "zero_host_bandwidth.yaml", "host_memory_gbps: 58.24", "host_memory_gbps: 0")
    _profile_with(tmp, "huge_host_bandwidth.yaml", "host_memory_gbps: 58.24", "host_memory_gbps: 1.0e+30")
    _profile_with(tmp, "huge_copy_bandwidth.yaml", "h2d_pinned_gbps: 25.2", "h2d_pinned_gbps: 1.0e+30")
    _profile_with(tmp, "huge_latency.yaml", "  - [1, 0.18218, 0.0]", "  - [1, 1.0e+308, 0.0]")
    _profile_with(tmp, "negative_cores.yaml", "cores: 16,", "cores: -1,")
    _profile_with(tmp, "huge_overhead.yaml", "layer_overhead_ms: 0.05", "layer_overhead_ms: 1.0e+40")
    _profile_with(tmp, "huge_first_expert.yaml", "cpu_first_expert_extra_ms: 0.05", "cpu_first_expert_extra_ms: 1.0e+30")
    _profile_with(tmp, "zero_card.yaml", "gpu_memory_gb: 24.0}", "gpu_memory_gb: 0}")
    _profile_with(tmp, "huge_slope.yaml", "  fit: {intercept_ms: 0.0999347, per_token_ms: 0.00403833,",
                  "  fit: {intercept_ms: 0.0999347, per_token_ms: 1.0e+300,")
    (tmp / "long_number.jsonl").write_text('{"topk_ids": [[0, ' + "9" * 5000 + ']]}\n{"topk_ids": [[0, 1]]}\n')
    (_model_dir(tmp, "foreign_auto_map", config=_demo_config(
        auto_map={"AutoModelForCausalLM": "evil/repo--modeling.Evil"}))).exists()
    _profile_with(tmp, "inf_load.yaml", "expert_load_ms: 0.384491", "expert_load_ms: .inf")
    _profile_with(tmp, "neg_bandwidth.yaml", "h2d_pinned_gbps: 25.2", "h2d_pinned_gbps: -25.2")
    _profile_with(tmp, "nan_point.yaml", "  - [1, 0.18218, 0.0]", "  - [1, .nan, 0.0]")
    _profile_with(tmp, "zero_tokens.yaml", "  - [1, 0.18218, 0.0]", "  - [0, 0.18218, 0.0]")
    (tmp / "huge_comment.yaml").write_text("#" * (5 << 20) + "\n" + PROFILE.read_text())
    _profile_with(tmp, "huge_tokens.yaml", "  - [1, 0.18218, 0.0]", "  - [1.0e+30, 0.18218, 0.0]")
    _profile_with(tmp, "nan_slope.yaml", "per_token_ms: 0.00403833", "per_token_ms: .nan")
    zero_cpu = yaml.safe_load(PROFILE.read_text())
    zero_cpu["cpu_expert"] = {"points": [[n, 0.0, 0.0] for n, _, _ in zero_cpu["cpu_expert"]["points"]]}
    (tmp / "zero_cpu.yaml").write_text(yaml.safe_dump(zero_cpu))
    _profile_with(tmp, "inf_overhead.yaml", "layer_overhead_ms: 0.05", "layer_overhead_ms: .inf")
    _profile_with(tmp, "nan_interference.yaml", "cpu_slowdown: 1.14286", "cpu_slowdown: .nan")
    demo_text = DEMO_PROFILE.read_text()
    load_line = next(line for line in demo_text.splitlines() if "expert_load_ms:" in line)
    old_value = load_line.split("expert_load_ms:")[1].split(",")[0].strip().rstrip("}")
    (tmp / "demo_zero_load.yaml").write_text(demo_text.replace(f"expert_load_ms: {old_value}", "expert_load_ms: 0", 1))
    _profile_with(tmp, "int4_profile.yaml", "dtype: bfloat16", "dtype: float16")
    _profile_with(tmp, "negative_top_p.yaml", "schema_version: 1", "schema_version: 1\npolicy: {mrs_top_p: -5}")
    _profile_with(tmp, "zero_expert_bandwidth.yaml", "h2d_pinned_expert_gbps: 24.5446", "h2d_pinned_expert_gbps: 0")
    _profile_with(tmp, "tiny_card.yaml", "gpu_memory_gb: 24.0}", "gpu_memory_gb: 1.0e-09}")
    (tmp / "huge_outside_step.yaml").write_text(DEMO_PROFILE.read_text().replace(
        "    - [1, 0.988132, 0.833424]", "    - [1, 1.0e+40, 0.833424]", 1))
    (tmp / "typo_planner.yaml").write_text(DEMO_PROFILE.read_text().replace("strategy: hybrimoe", "strategy: hybrid", 1))
    _profile_with(tmp, "unprintable_name.yaml", "name: rtx4090-desktop.qwen3-30b-a3b",
                  'name: "\\e[31mred\\nsecond line"')
    _profile_with(tmp, "int8_policy.yaml", "schema_version: 1", "schema_version: 1\npolicy: {quantize: int8}")
    _profile_with(tmp, "group_size_alone.yaml", "schema_version: 1", "schema_version: 1\npolicy: {group_size: 64}")
    _profile_with(tmp, "card_in_bytes.yaml", "gpu_memory_gb: 24.0}", "gpu_memory_gb: 25769803776}")
    _profile_with(tmp, "r2_of_five.yaml", "r2: 0.999407", "r2: 5")
    _profile_with(tmp, "speedup_interference.yaml", "cpu_slowdown: 1.14286", "cpu_slowdown: 0.5")
    _profile_with(tmp, "ratio_over_one.yaml", "schema_version: 1", "schema_version: 1\npolicy: {cache_ratio: 1.5}")
    no_accelerator = yaml.safe_load(DEMO_PROFILE.read_text())
    for section in ("gpu_expert", "transfer"):
        no_accelerator.pop(section, None)
    (tmp / "demo_cpu_only.yaml").write_text(yaml.safe_dump(no_accelerator))
    # traces
    np.savez(tmp / "pickled.npz", topk_ids=np.array([object()], dtype=object))
    with open(tmp / "pwn.bin", "wb") as fh:
        fh.write(b"cos\nsystem\n(S'touch " + str(tmp).encode() + b"/pwned'\ntR.")
    (tmp / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    ids = list(range(8))  # one token of each of the 48 layers, the first weighted past float32's range
    (tmp / "weight_past_float32.jsonl").write_text("".join(
        json.dumps({"topk_ids": [ids], "topk_weights": [[0.1] * 7 + [1e39 if layer == 0 else 0.1]]}) + "\n"
        for layer in range(48)))
    (tmp / "latin1.jsonl").write_bytes(b'{"topk_ids": [[1, 2]], "note": "\xe9"}\n')
    (tmp / "prompt_latin1.txt").write_bytes(b"ROMEO: caf\xe9\n")
    # model directories
    _model_dir(tmp, "no_tokenizer", tokenizer=False)
    _model_dir(tmp, "no_weights", weights=False)
    (tmp / "config_list").mkdir()
    (tmp / "config_list" / "config.json").write_text("[1, 2, 3]")
    (tmp / "config_bad").mkdir()
    (tmp / "config_bad" / "config.json").write_text("{not json")
    _model_dir(tmp, "dense", config=_demo_config(model_type="llama", architectures=["LlamaForCausalLM"]))
    _model_dir(tmp, "remote_code", config=_demo_config(
        model_type="evil_moe", auto_map={"AutoModelForCausalLM": "someone/elsewhere--modeling_evil.EvilForCausalLM"}))
    remote_tokenizer = _model_dir(tmp, "remote_tokenizer")
    (remote_tokenizer / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["someone/elsewhere--tokenization_evil.EvilTokenizer", None]}}))
    pickled = _model_dir(tmp, "pickled_weights", weights=False)
    (pickled / "pytorch_model.bin").write_bytes((tmp / "pwn.bin").read_bytes())
    # an int4 trace of the same sizes as the profile's bfloat16 experts
    from hybrimoe.trace import RoutingTrace, load_trace, save_trace

    trace = load_trace(TRACE)
    small = trace.tokens(0, 64)
    import dataclasses

    save_trace(RoutingTrace(dataclasses.replace(small.meta, dtype="int4"), small.steps), tmp / "int4.npz")
    save_trace(RoutingTrace(dataclasses.replace(small.meta, n_experts=256), small.steps), tmp / "other_model.npz")
    _hostile_traces(tmp, tmp / "int4.npz")
    weights = np.full(small.steps[0].topk_ids.shape, 0.125, dtype=np.float32)
    save_trace(RoutingTrace(small.meta, (dataclasses.replace(small.steps[0], topk_weights=weights),)),
               tmp / "negative_weight.npz")
    with np.load(tmp / "negative_weight.npz") as archive:  # a valid trace would not be saved with it
        arrays = dict(archive)
    arrays["topk_weights"][0, 0, 0] = -1.0
    np.savez(tmp / "negative_weight.npz", **arrays)
    _model_dir(tmp, "ten_million_layers", config=_demo_config(num_hidden_layers=10**7))
    _model_dir(tmp, "str_experts", config=_demo_config(num_experts="16"))
    _model_dir(tmp, "zero_layers", config=_demo_config(num_hidden_layers=0))
    _model_dir(tmp, "plain")
    _model_dir(tmp, "zero_positions", config=_demo_config(max_position_embeddings=0))
    _model_dir(tmp, "fewer_layers", config=_demo_config(num_hidden_layers=2, layer_types=None))
    _model_dir(tmp, "more_layers", config=_demo_config(num_hidden_layers=6, layer_types=None))
    _model_dir(tmp, "billion_layers", config=_demo_config(num_hidden_layers=10**9, layer_types=None))
    _model_dir(tmp, "sparse_step_two", config=_demo_config(decoder_sparse_step=2))
    config_fifo = _model_dir(tmp, "config_fifo")
    (config_fifo / "config.json").unlink()
    os.mkfifo(config_fifo / "config.json")  # reading it would block forever
    os.mkfifo(_model_dir(tmp, "generation_config_fifo") / "generation_config.json")
    deep_header = b"[" * 100_000 + b"]" * 100_000
    nested = _model_dir(tmp, "nested_header", weights=False)
    (nested / "model.safetensors").write_bytes(len(deep_header).to_bytes(8, "little") + deep_header)
    for name, change in _HEADER_CHANGES.items():
        _with_changed_header(DEMO / "model.safetensors", _model_dir(tmp, name, weights=False) / "model.safetensors",
                             change)
    listed = _model_dir(tmp, "index_list")
    (listed / "model.safetensors.index.json").write_text('{"weight_map": ["model.safetensors"]}')
    weights_dir = _model_dir(tmp, "weights_dir", weights=False)
    (weights_dir / "model.safetensors").mkdir()
    (tmp / "existing.png").write_bytes(b"keep me")
    shutil.copy(PROFILE, tmp / "own.yaml")
    for name in ("loop.yaml", "loop.png", "loop.npz"):  # each a link to the other of its pair
        os.symlink(tmp / f"back_{name}", tmp / name)
        os.symlink(tmp / name, tmp / f"back_{name}")
    (tmp / "earlier_report").mkdir()
    (tmp / "earlier_report" / "index.md").write_text("keep me")
    os.symlink("/dev/null", tmp / "device_link.yaml")
    bad_tokenizer = _model_dir(tmp, "bad_tokenizer")
    (bad_tokenizer / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    (tmp / "huge_layers.json").write_text(json.dumps(_demo_config(num_hidden_layers=10**12)))
    (tmp / "repeated_key.json").write_text(json.dumps(_demo_config())[:-1] + ', "hidden_size": 4096}')
    (tmp / "huge_experts.json").write_text(json.dumps(_demo_config(hidden_size=65536, moe_intermediate_size=65536,
                                                                          num_attention_heads=512, head_dim=128)))
    shutil.copy(TRACE, tmp / "trace_copy.npz")
    _model_dir(tmp, "bert", config={"model_type": "bert"})
    _model_dir(tmp, "narrower_config", config=_demo_config(moe_intermediate_size=64))
    _model_dir(tmp, "zero_heads", config=_demo_config(num_attention_heads=0))
    _model_dir(tmp, "unknown_rope", config=_demo_config(rope_scaling={"type": "bogus", "factor": -1}))
    broken_template = _model_dir(tmp, "broken_template") / "tokenizer_config.json"
    broken_template.write_text(json.dumps({**json.loads(broken_template.read_text()), "chat_template": "{% if %}"}))
    config_text = json.dumps(_demo_config())
    (_model_dir(tmp, "repeated_key") / "config.json").write_text(config_text[:-1] + ', "num_experts": 999}')
    _model_dir(tmp, "zero_experts", config=_demo_config(num_experts=0))
    _model_dir(tmp, "small_vocabulary", config=_demo_config(vocab_size=10))
    _model_dir(tmp, "nan_epsilon", config=_demo_config(rms_norm_eps=float("nan")))
    (_model_dir(tmp, "text_eos") / "generation_config.json").write_text('{"eos_token_id": [99999, "x"]}')
    (_model_dir(tmp, "broken_generation_config") / "generation_config.json").write_text('{"temperature": "hot"')
    (_model_dir(tmp, "text_max_new_tokens") / "generation_config.json").write_text('{"max_new_tokens": "x"}')
    (_model_dir(tmp, "text_top_p") / "generation_config.json").write_text('{"top_p": "x"}')
    (_model_dir(tmp, "eos_past_vocabulary") / "generation_config.json").write_text('{"eos_token_id": 1000000000}')
    _model_dir(tmp, "two_expert_counts", config=_demo_config(num_local_experts=8))
    int8_weights = _model_dir(tmp, "int8_unmarked", weights=False)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(DEMO / "model.safetensors")
    name = "model.layers.0.mlp.experts.0.gate_proj.weight"
    tensors[name] = np.clip(np.round(tensors[name] * 100), -127, 127).astype(np.int8)
    save_file(tensors, int8_weights / "model.safetensors")
    tensors = load_file(DEMO / "model.safetensors")
    tensors["model.norm.weight"][0] = np.nan
    save_file(tensors, _model_dir(tmp, "nan_weights", weights=False) / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] > 0
    save_file(tensors, _model_dir(tmp, "bool_weights", weights=False) / "model.safetensors")
    _model_dir(tmp, "config_only", config=_demo_config(shared_expert_intermediate_size=0), weights=False, tokenizer=False)
    tensors = load_file(DEMO / "model.safetensors")
    del tensors["model.layers.0.mlp.experts.5.up_proj.weight"]
    save_file(tensors, _model_dir(tmp, "missing_expert", weights=False) / "model.safetensors")
    (tmp / "huge_prompt.txt").write_text("hello world " * 2_000_000)
    (tmp / "deep.yaml").write_text("[" * 100_000 + "]" * 100_000)
    import torch

    torch.save({"logical_count": torch.zeros(1, 48, 128, dtype=torch.int32)}, tmp / "sglang_stat.pt")
    torch.save({"records": [{"forward_pass_id": 0, "topk_ids_of_layer": torch.zeros(48, 1, 8, dtype=torch.int32,
                                                                                    device="meta")}]},
               tmp / "sglang_meta.pt")


def _patch_zip(path: Path, local_offset: int, central_offset: int, value: int) -> None:
    """Sets a 2-byte field of every member's local and central header (flags: 6 and 8; compression
    method: 8 and 10), as a tool that wrote such an archive would have."""
    import zipfile

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        offsets = [info.header_offset for info in archive.infolist()]
    for offset in offsets:
        data[offset + local_offset : offset + local_offset + 2] = value.to_bytes(2, "little")
    at = data.find(b"PK\x01\x02")
    while at != -1:
        data[at + central_offset : at + central_offset + 2] = value.to_bytes(2, "little")
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(data)


def _hostile_traces(tmp: Path, valid: Path) -> None:
    """Traces that are valid archives but would cost a reader memory, time or a crash."""
    import io
    import zipfile

    with np.load(valid) as archive:
        arrays = {name: archive[name] for name in archive.files}
    header = io.BytesIO()  # topk_ids declaring 384 G values it does not hold
    np.lib.format.write_array_header_1_0(header, {"descr": "<i2", "fortran_order": False, "shape": (48, 10**9, 8)})
    with zipfile.ZipFile(tmp / "huge_shape.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("topk_ids.npy", header.getvalue() + b"\0" * 64)
    for name in ("encrypted", "unknown_method"):
        np.savez_compressed(tmp / f"{name}.npz", **arrays)
    _patch_zip(tmp / "encrypted.npz", 6, 8, 0x1)
    _patch_zip(tmp / "unknown_method.npz", 8, 10, 99)  # 99: AES, which zipfile cannot read
    with zipfile.ZipFile(tmp / "repeated_member.npz", "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name": the point of this file
        for name in ("meta", "step_lengths", "topk_ids", "topk_ids"):
            member = io.BytesIO()
            np.save(member, arrays[name])
            archive.writestr(f"{name}.npy", member.getvalue())
    np.savez_compressed(tmp / "deep_meta.npz", **{**arrays, "meta": np.array("[" * 100_000 + "]" * 100_000)})
    n_steps = 5_000_000  # one token each: 68 KB compressed
    np.savez_compressed(tmp / "many_steps.npz", meta=arrays["meta"], step_lengths=np.ones(n_steps, dtype=np.int8),
                        topk_ids=np.zeros((1, n_steps, 1), dtype=np.int8))


T, P = str(TRACE), str(PROFILE)
SIM = ["simulate", "--trace", T, "--max-tokens", "16", "--mode", "decode", "--cache-ratio", "0.25"]
RUN = ["run", "--prompt", "ROMEO:", "--max-new-tokens", "2", "--profile", str(DEMO_PROFILE), "--device", "cpu"]
IMPORT = ["trace", "import", "--layers", "48", "--experts", "128", "--top-k", "8", "--hidden-size", "2048",
          "--intermediate-size", "768", "--model-name", "m", "--dtype", "bfloat16"]
LOG = str(REPO.parent / "shared" / "traces" / "qwen3-30b-a3b" / "token_distri_16.jsonl")

CASES = [
    # -- profiles: physics ---------------------------------------------------------------------
    ("profile nan load", [*SIM, "--profile", "{tmp}/nan_load.yaml"], "expert_load_ms"),
    ("profile zero load", [*SIM, "--profile", "{tmp}/zero_load.yaml"], "expert_load_ms"),
    ("profile inf load", [*SIM, "--profile", "{tmp}/inf_load.yaml"], "expert_load_ms"),
    ("profile negative bandwidth", [*SIM, "--profile", "{tmp}/neg_bandwidth.yaml"], "h2d_pinned_gbps"),
    ("profile nan curve point", [*SIM, "--profile", "{tmp}/nan_point.yaml"], "cpu_expert"),
    ("profile zero-token point", [*SIM, "--profile", "{tmp}/zero_tokens.yaml"], "cpu_expert"),
    ("profile point at 10**30 tokens", [*SIM, "--profile", "{tmp}/huge_tokens.yaml"], "n_tokens must be a whole number"),
    ("tune trials past a million", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml", "--trials",
                                    str(10**20)], "--trials must be in [1, 1000000]"),
    ("trace import shared experts past any model's", [*IMPORT, "{tmp}/deep.jsonl", "--out", "{tmp}/t.npz",
                                                      "--shared-experts", "99999999999"], "n_shared_experts"),
    ("profile nan slope", [*SIM, "--profile", "{tmp}/nan_slope.yaml"], "per_token_ms"),
    ("profile all-zero cpu latency", [*SIM, "--profile", "{tmp}/zero_cpu.yaml"], "cpu_expert"),
    ("simulate cache ratio with an empty item", ["simulate", "--trace", T, "--profile", str(PROFILE),
                                                 "--cache-ratio", "0.25,,0.5"], "empty item"),
    ("profile number of 5000 digits", [*SIM, "--profile", "{tmp}/long_number.yaml"], "cannot be read"),
    ("profile key given twice", [*SIM, "--profile", "{tmp}/key_twice.yaml"], "appears twice"),
    ("profile absurd interference", [*SIM, "--profile", "{tmp}/absurd_interference.yaml"], "copy_slowdown"),
    ("profile host bandwidth of 1e30 GB/s", [*SIM, "--profile", "{tmp}/huge_host_bandwidth.yaml"], "host_memory_gbps"),
    ("profile copy bandwidth of 1e30 GB/s", [*SIM, "--profile", "{tmp}/huge_copy_bandwidth.yaml"],
     "h2d_pinned_gbps 1e+30 is no machine's"),
    ("profile zero host bandwidth", [*SIM, "--profile", "{tmp}/zero_host_bandwidth.yaml"], "host_memory_gbps"),
    ("profile latency of 1e308 ms", [*SIM, "--profile", "{tmp}/huge_latency.yaml"], "past any machine"),
    ("profile layer overhead of 1e40 ms", [*SIM, "--profile", "{tmp}/huge_overhead.yaml"],
     "layer_overhead_ms: a latency of 1e+40 ms is past any machine"),
    ("profile first-expert extra of 1e30 ms", [*SIM, "--profile", "{tmp}/huge_first_expert.yaml"],
     "cpu_first_expert_extra_ms"),
    ("profile step outside the layers of 1e40 ms", [*RUN[:5], "--profile", "{tmp}/huge_outside_step.yaml"],
     "model_costs.outside_step"),
    ("profile negative cores", [*SIM, "--profile", "{tmp}/negative_cores.yaml"], "machine.cores"),
    ("profile card of 0 GB", [*SIM, "--profile", "{tmp}/zero_card.yaml"], "machine.gpu_memory_gb"),
    ("simulate split with a profiling trace", [*SIM, "--profile", P, "--profiling-trace", T, "--profile-split", "0.5"],
     "--profile-split"),
    ("profile fit of 1e300 ms a token", [*SIM, "--profile", "{tmp}/huge_slope.yaml"], "past any machine"),
    ("simulate prefill of 10**14 tokens", [*SIM[:5], "--profile", P, "--prefill-tokens", str(10**14)],
     "less than or equal to 16777216"),
    ("simulate llamacpp-lru CPU layers below 0", ["simulate", "--trace", T, "--profile", P, "--baseline",
                                                  "lru_cpu_layers=-3"], "CPU layers must be in [0, 48], got -3"),
    ("simulate a one-value option twice", [*SIM, "--max-tokens", "8"], "--max-tokens is given twice"),
    ("trace import its output twice", [*IMPORT, "{tmp}/deep.jsonl", "-o", "{tmp}/a.npz", "-o", "{tmp}/b.npz"],
     "--out is given twice"),
    ("profile a preset twice", ["profile", "--estimate", "rtx4090-desktop", "--preset", "demo", "--preset",
                                "qwen3-30b-a3b", "--out", "{tmp}/p.yaml"], "--preset is given twice"),
    ("run a flag twice", [*RUN, "--force", "--force"], "--force is given twice"),
    ("run the token count twice, short and long", [*RUN, "-n3"], "--max-new-tokens is given twice"),
    ("simulate one profile twice", [*SIM, "--profile", P, "--profile", P], "given twice"),
    ("profile estimate with --threads", ["profile", "--estimate", "rtx4090-desktop", "--out", "{tmp}/e.yaml",
                                        "--threads", "4"], "--estimate measures nothing"),
    ("profile plot that is not PNG", ["profile", "--preset", "demo", "--quick", "--out", "{tmp}/e.yaml", "--plot",
                                      "{tmp}/p.jpg"], "give a .png file"),
    ("profile dtype float8", ["profile", "--estimate", "rtx4090-desktop", "--preset", "demo", "--dtype", "float8",
                              "--out", "{tmp}/e.yaml"], "--dtype must be one of"),
    ("run seed without temperature", [*RUN, "--seed", "5"], "--seed seeds sampling"),
    ("run cache past the demo model's experts", ["run", "--prompt", "x", "--cache-experts", "100000"],
     "--cache-experts must be in [0, 64]"),
    ("serve cache past the demo model's experts", ["serve", "--cache-experts", "100000", "--port", "0"],
     "--cache-experts must be in [0, 64]"),
    ("run a prompt of bytes that are not UTF-8", ["run", "--prompt", "\udcff\udcfe"], "--prompt is not UTF-8 text"),
    ("run a budget below the kernels' margin", [*RUN, "--gpu-memory-gb", "1e-9"], "margin for kernel workspaces"),
    ("run an odd group size", ["run", "--prompt", "x", "--quantize", "int4", "--group-size", "7"],
     "--group-size 7 is not an even number"),
    ("run a group size that does not split the rows", ["run", "--prompt", "x", "--quantize", "int8", "--group-size",
                                                       "48"], "does not divide the experts' input sizes"),
    ("run cache size under cpu-only", [*RUN, "--strategy", "cpu-only", "--cache-experts", "8"], "cpu-only"),
    ("run foreign auto_map with remote code", ["run", "--prompt", "x", "--model", "{tmp}/foreign_auto_map",
                                                "--trust-remote-code"], "another repository"),
    ("run invalid OMP_NUM_THREADS", [*RUN], "OMP_NUM_THREADS"),
    ("tune decode tokens with the decode objective", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml",
                                                      "--objective", "decode", "--decode-tokens", "10"],
     "--decode-tokens is used only with --objective weighted"),
    ("tune measure tokens without measuring", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml",
                                               "--measure-tokens", "50"], "--measure-tokens is used only"),
    ("trace import a number of 5000 digits", [*IMPORT, "{tmp}/long_number.jsonl", "--out", "{tmp}/t.npz"],
     "cannot be read"),
    ("tune out that is not YAML", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.npz"], "is YAML"),
    ("tune context without a budget", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml", "--context", "8192"],
     "--context is used only with --gpu-memory-gb"),
    ("tune group size without formats", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml",
                                         "--group-size", "64"], "--group-size is used only with --allow-quantize"),
    ("tune prompts without measuring", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml", "--prompts",
                                        str(REPO / "README.md")], "--prompts is used only with --measure-top"),
    ("tune another model than the traces'", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml", "--model",
                                             str(DEMO), "--gpu-memory-gb", "24"], "is not the traces' model"),
    ("run top-p without temperature", [*RUN, "--top-p", "0.5"], "needs a --temperature"),
    ("run pad token outside the vocabulary", ["run", "--prompt", "x", "--model", "{tmp}/small_vocabulary"],
     "pad_token_id 256 is outside the vocabulary"),
    ("run NaN in the config", ["run", "--prompt", "x", "--model", "{tmp}/nan_epsilon"], "rms_norm_eps is nan"),
    ("run EOS ids that are text", ["run", "--prompt", "x", "--model", "{tmp}/text_eos"], "eos_token_id must be"),
    ("run generation config with a text length", [*RUN, "--model", "{tmp}/text_max_new_tokens"],
     "max_new_tokens must be a whole number"),
    ("run generation config with a text top_p", [*RUN, "--model", "{tmp}/text_top_p"], "top_p must be a finite number"),
    ("run generation config's EOS past the vocabulary", [*RUN, "--model", "{tmp}/eos_past_vocabulary"],
     "outside the vocabulary"),
    ("run config giving two expert counts", [*RUN, "--model", "{tmp}/two_expert_counts"],
     "num_experts 16 and num_local_experts 8"),
    ("profile config giving two expert counts", ["profile", "--estimate", "rtx4090-desktop", "--model",
                                                 "{tmp}/two_expert_counts", "--out", "{tmp}/p.yaml"],
     "config.json: config gives num_experts 16"),
    ("run broken generation config", ["run", "--prompt", "x", "--model", "{tmp}/broken_generation_config"],
     "not readable JSON"),
    ("profile inf overhead", [*SIM, "--profile", "{tmp}/inf_overhead.yaml"], "layer_overhead_ms"),
    ("profile nan interference", [*SIM, "--profile", "{tmp}/nan_interference.yaml"], "cpu_slowdown"),
    ("run with a zero-load profile", ["run", "--prompt", "x", "--profile", "{tmp}/demo_zero_load.yaml"],
     "expert_load_ms"),
    # -- profiles: files -------------------------------------------------------------------------
    ("profile missing", [*SIM, "--profile", "{tmp}/missing.yaml"], "missing.yaml"),
    ("profile is a directory", [*SIM, "--profile", "{tmp}/a_dir"], "a_dir"),
    ("profile malformed yaml", [*SIM, "--profile", "{tmp}/bad.yaml"], "bad.yaml"),
    ("profile a yaml list", [*SIM, "--profile", "{tmp}/list.yaml"], "list.yaml"),
    ("profile not utf-8", [*SIM, "--profile", "{tmp}/latin1.yaml"], "UTF-8"),
    ("profile empty", [*SIM, "--profile", "{tmp}/empty.txt"], "empty.txt"),
    ("profile for other experts", [*SIM, "--profile", str(DEMO_PROFILE)], "made for experts"),
    ("profile of another dtype", [*SIM, "--profile", "{tmp}/int4_profile.yaml"], "float16"),
    ("int4 trace, bfloat16 profile", [*SIM[:2], "{tmp}/int4.npz", *SIM[3:], "--profile", P], "int4"),
    ("accelerator-from missing", [*SIM, "--profile", P, "--accelerator-from", "{tmp}/missing.yaml"], "missing.yaml"),
    ("accelerator-from the profile itself", [*SIM, "--profile", P, "--accelerator-from", P], "would change nothing"),
    # -- simulate flags ------------------------------------------------------------------------
    ("simulate empty cache ratios", [*SIM[:-2], "--profile", P, "--cache-ratio", ""], "--cache-ratio"),
    ("simulate empty strategies", [*SIM, "--profile", P, "--strategies", ""], "--strategies"),
    ("simulate empty mode", [*SIM[:-4], "--cache-ratio", "0.25", "--profile", P, "--mode", ""], "--mode"),
    ("simulate bad cache ratio", [*SIM[:-2], "--profile", P, "--cache-ratio", "half"], "--cache-ratio"),
    ("simulate cache ratio above 1", [*SIM[:-2], "--profile", P, "--cache-ratio", "1.5"], "cache ratio"),
    ("simulate unknown strategy", [*SIM, "--profile", P, "--strategies", "magic"], "magic"),
    ("simulate unknown mode", [*SIM[:-4], "--cache-ratio", "0.25", "--profile", P, "--mode", "train"], "train"),
    ("simulate unknown predictor", [*SIM, "--profile", P, "--predictor", "psychic"], "psychic"),
    ("simulate profile split 0", [*SIM, "--profile", P, "--profile-split", "0"], "--profile-split"),
    ("simulate profile split nan", [*SIM, "--profile", P, "--profile-split", "nan"], "--profile-split"),
    ("simulate max tokens 0", [*SIM[:-6], "--profile", P, "--max-tokens", "0"], "--max-tokens"),
    ("simulate profiling trace of another model",
     [*SIM, "--profile", P, "--profiling-trace", "{tmp}/other_model.npz"], "does not route like"),
    ("simulate bad baseline setting", [*SIM, "--profile", P, "--baseline", "speed=11"], "--baseline"),
    # -- traces ----------------------------------------------------------------------------------
    ("trace missing", ["simulate", "--trace", "{tmp}/missing.npz", "--profile", P], "missing.npz"),
    ("trace is text", ["simulate", "--trace", "{tmp}/not.npz", "--profile", P], "not.npz"),
    ("trace with pickled arrays", ["simulate", "--trace", "{tmp}/pickled.npz", "--profile", P], "pickled.npz"),
    ("trace is a directory", ["trace", "info", "{tmp}/a_dir"], "a_dir"),
    ("trace info markup in the name", ["trace", "info", "{tmp}/[/red].npz"], "[/red].npz"),
    ("trace info bracketed name", ["trace", "info", "{tmp}/[bold]x[/bold].npz"], "[bold]x[/bold].npz"),
    ("trace import missing log", [*IMPORT, "{tmp}/missing.jsonl", "--out", "{tmp}/t.npz"], "missing.jsonl"),
    ("trace import a provenance of two lines", [*IMPORT, "{tmp}/deep.jsonl", "--out", "{tmp}/t.npz", "--provenance",
                                                "a\nb"], "--provenance must be one line"),
    ("trace info a member given twice", ["trace", "info", "{tmp}/repeated_member.npz"], "appears twice"),
    ("simulate 2000 cache sizes", [*SIM[:5], "--profile", P, "--cache-ratio",
                                   ",".join(f"{i / 2000:.4f}" for i in range(1, 2001))], "at most 64 cache sizes"),
    ("trace import a weight past float32", [*IMPORT, "{tmp}/weight_past_float32.jsonl", "--out", "{tmp}/t.npz"],
     "past float32's range"),
    ("trace import not utf-8", [*IMPORT, "{tmp}/latin1.jsonl", "--out", "{tmp}/t.npz"], "UTF-8"),
    ("trace import deeply nested", [*IMPORT, "{tmp}/deep.jsonl", "--out", "{tmp}/t.npz"], "deep.jsonl"),
    ("trace import out under a file", [*IMPORT, "{tmp}/deep.jsonl", "--out", "{tmp}/a_file/t.npz"], "a_file"),
    ("trace info a name holding an escape sequence", ["trace", "info", "{tmp}/\x1b[2Jx.npz"], "\\x1b[2Jx.npz"),
    ("trace import out is a directory", [*IMPORT, "{tmp}/deep.jsonl", "--out", "{tmp}/a_dir", "--force"], "a_dir"),
    ("trace import out exists", [*IMPORT, "{tmp}/deep.jsonl", "--out", "{tmp}/existing.npz"], "--force"),
    ("trace import unknown format", [*IMPORT, "{tmp}/deep.jsonl", "--out", "{tmp}/t.npz", "--format", "csv"], "csv"),
    # -- run ---------------------------------------------------------------------------------------
    ("run model missing", [*RUN, "--model", "{tmp}/missing"], "missing"),
    ("run model is a file", [*RUN, "--model", "{tmp}/a_file"], "a_file"),
    ("run model without config", [*RUN, "--model", "{tmp}/a_dir"], "config.json"),
    ("run config is a list", [*RUN, "--model", "{tmp}/config_list"], "config.json"),
    ("run config malformed", [*RUN, "--model", "{tmp}/config_bad"], "config.json"),
    ("run dense model", [*RUN, "--model", "{tmp}/dense"], "llama"),
    ("run model without weights", [*RUN, "--model", "{tmp}/no_weights"], "no_weights"),
    ("run model without tokenizer", [*RUN, "--model", "{tmp}/no_tokenizer"], "tokenizer"),
    ("run remote code refused", [*RUN, "--model", "{tmp}/remote_code"], "auto_map"),
    ("run remote code in another repository", [*RUN, "--model", "{tmp}/remote_code", "--trust-remote-code"],
     "someone/elsewhere"),
    ("run tokenizer code in another repository", [*RUN, "--model", "{tmp}/remote_tokenizer", "--trust-remote-code"],
     "someone/elsewhere"),
    ("run tokenizer code refused", [*RUN, "--model", "{tmp}/remote_tokenizer"], "--trust-remote-code"),
    ("run pickle refused", [*RUN, "--model", "{tmp}/pickled_weights"], "--allow-pickle"),
    ("run pickle torch refuses", [*RUN, "--model", "{tmp}/pickled_weights", "--allow-pickle"], "never unpickles"),
    ("run empty prompt", ["run", "--prompt", "  ", "--profile", str(DEMO_PROFILE)], "prompt"),
    ("run prompt file missing", ["run", "--prompt-file", "{tmp}/missing.txt"], "missing.txt"),
    ("run prompt file not utf-8", ["run", "--prompt-file", "{tmp}/prompt_latin1.txt"], "UTF-8"),
    ("run prompt file a directory", ["run", "--prompt-file", "{tmp}/a_dir"], "a_dir"),
    ("run zero new tokens", [*RUN[:3], "--max-new-tokens", "0"], "--max-new-tokens"),
    ("run negative temperature", [*RUN, "--temperature", "-1"], "--temperature"),
    ("run nan temperature", [*RUN, "--temperature", "nan"], "--temperature"),
    ("run top-p 0", [*RUN, "--top-p", "0"], "--top-p"),
    ("run top-p nan", [*RUN, "--top-p", "nan"], "--top-p"),
    ("run new tokens past the model's positions", ["run", "--prompt", "x", "--max-new-tokens", "10000000000"],
     "leaves no room for a prompt in the model's 256 positions"),
    ("profile empty device", ["profile", "--quick", "--device", "", "--out", "{tmp}/p.yaml"], "unknown device ''"),
    ("run device of another kind", [*RUN[:-2], "--device", "tpu"], "unknown device 'tpu'"),
    ("trace name longer than the file system takes", ["trace", "info", "{tmp}/" + "a" * 300 + ".npz"],
     "File name too long"),
    ("run model name longer than the file system takes", [*RUN, "--model", "{tmp}/" + "a" * 300], "File name too long"),
    ("tune out name longer than the file system takes", ["tune", "--trace", T, "--profile", P,
                                                         "--out", "{tmp}/" + "a" * 300 + ".yaml"], "File name too long"),
    ("run zero gpu memory", [*RUN, "--gpu-memory-gb", "0"], "--gpu-memory-gb"),
    ("run gpu memory of 1e300 GB", [*RUN, "--gpu-memory-gb", "1e300"], "at most 65536"),
    ("tune gpu memory of 1e300 GB", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml",
                                     "--gpu-memory-gb", "1e300"], "at most 65536"),
    ("run unknown strategy", [*RUN, "--strategy", "magic"], "magic"),
    ("run frequency strategy", [*RUN, "--strategy", "ktransformers"], "simulate"),
    ("run cache ratio above 1", [*RUN, "--cache-ratio", "2"], "--cache-ratio"),
    ("run record trace not npz", [*RUN, "--record-trace", "{tmp}/t.txt"], ".npz"),
    ("run record trace exists", [*RUN, "--record-trace", "{tmp}/existing.npz"], "--force"),
    ("run record trace under a file", [*RUN, "--record-trace", "{tmp}/a_file/t.npz"], "a_file"),
    ("run record trace is a directory", [*RUN, "--record-trace", "{tmp}/a_dir.npz", "--force"], "a_dir.npz"),
    ("run replay trace missing", [*RUN, "--replay-trace", "{tmp}/missing.npz"], "missing.npz"),
    ("run replay trace pickled", [*RUN, "--replay-trace", "{tmp}/pickled.npz"], "pickled.npz"),
    ("run hostile profile", ["run", "--prompt", "x", "--profile", "{tmp}/hostile.yaml"], "hostile.yaml"),
    # -- profile -----------------------------------------------------------------------------------
    ("profile out under a file", ["profile", "--preset", "qwen3-30b-a3b", "--quick", "--out", "{tmp}/a_file/p.yaml"],
     "a_file"),
    ("profile out is a directory", ["profile", "--preset", "qwen3-30b-a3b", "--quick", "--out", "{tmp}/a_dir",
                                    "--force"], "a_dir"),
    ("profile out exists", ["profile", "--preset", "qwen3-30b-a3b", "--out", "{tmp}/existing.yaml"], "--force"),
    ("profile unknown preset", ["profile", "--preset", "gpt-5", "--out", "{tmp}/p.yaml"], "gpt-5"),
    ("profile model config a list", ["profile", "--model", "{tmp}/config_list", "--out", "{tmp}/p.yaml"], "config.json"),
    ("profile absurd estimate", ["profile", "--estimate", "rtx4090-desktop", "--hidden-size", "1000000000",
                                 "--intermediate-size", "1000000000", "--out", "{tmp}/p.yaml"], "hidden"),
    # -- tune ------------------------------------------------------------------------------------------
    ("tune out under a file", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/a_file/t.yaml"], "a_file"),
    ("tune report under a file", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml", "--report",
                                  "{tmp}/a_file/r"], "a_file"),
    ("tune hostile profile", ["tune", "--trace", T, "--profile", "{tmp}/hostile.yaml", "--out", "{tmp}/t.yaml"],
     "hostile.yaml"),
    ("tune nan profile", ["tune", "--trace", T, "--profile", "{tmp}/nan_load.yaml", "--out", "{tmp}/t.yaml"],
     "expert_load_ms"),
    ("tune zero timeout", ["tune", "--trace", T, "--out", "{tmp}/t.yaml", "--timeout", "0"], "--timeout"),
    ("tune negative timeout", ["tune", "--trace", T, "--out", "{tmp}/t.yaml", "--timeout", "-1"], "--timeout"),
    ("tune nan timeout", ["tune", "--trace", T, "--out", "{tmp}/t.yaml", "--timeout", "nan"], "--timeout"),
    ("tune out is its own profile", ["tune", "--trace", T, "--profile", "{tmp}/own.yaml", "--out", "{tmp}/own.yaml",
                                     "--force", "--trials", "2"], "is a profile the study reads"),
    ("profile empty preset", ["profile", "--preset", "", "--out", "{tmp}/p.yaml"], "unknown model preset ''"),
    ("simulate profile is a symlink loop", [*SIM, "--profile", "{tmp}/loop.yaml"], "not found"),
    ("simulate accelerator-from is a symlink loop", [*SIM, "--profile", P, "--accelerator-from", "{tmp}/loop.yaml"],
     "not found"),
    ("tune out is a symlink loop", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/loop.yaml"],
     "exists; pass --force"),
    ("tune report is a symlink loop", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml", "--report",
                                       "{tmp}/loop.yaml"], "--report"),
    ("profile plot is a symlink loop", ["profile", "--quick", "--out", "{tmp}/p.yaml", "--plot", "{tmp}/loop.png"],
     "exists; pass --force"),
    ("run record trace is a symlink loop", [*RUN, "--record-trace", "{tmp}/loop.npz"], "exists; pass --force"),
    ("run config without tokenizer, with an empty shared expert", [*RUN, "--model", "{tmp}/config_only"],
     "no tokenizer files"),
    ("run checkpoint lacking one expert's matrix", [*RUN, "--model", "{tmp}/missing_expert"],
     "the weights lack model.layers.0.mlp.experts.5.up_proj.weight"),
    ("tune profiling trace that is the trace", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml",
                                                "--profiling-trace", T], "--profiling-trace is a --trace"),
    ("tune holdout given twice", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml", "--holdout",
                                  "{tmp}/trace_copy.npz", "--holdout", "{tmp}/trace_copy.npz"], "--holdout"),
    ("tune timeout shorter than a trial", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml", "--storage",
                                           "memory", "--timeout", "1e-9"], "no trial finished within --timeout 1e-09 s"),
    ("tune negative seed", ["tune", "--trace", T, "--out", "{tmp}/t.yaml", "--seed", "-1"], "--seed"),
    ("tune seed past 32 bits", ["tune", "--trace", T, "--out", "{tmp}/t.yaml", "--seed", str(2**32)], "--seed"),
    ("tune in-memory sqlite", ["tune", "--trace", T, "--profile", str(PROFILE), "--out", "{tmp}/t.yaml",
                               "--storage", "sqlite://"], "in-memory SQLite"),
    ("run huge threads", [*RUN, "--threads", str(10**6)], "--threads"),
    ("run threads past int64", [*RUN, "--threads", str(2**70)], "--threads"),
    ("run prompt past the positions", [*RUN[:2], "x" * 5000, *RUN[3:]], "max_position_embeddings"),
    ("profile group size without quantize", ["profile", "--estimate", "x", "--group-size", "64"], "--group-size"),
    ("profile inf llc", ["profile", "--llc-mb", "inf"], "--llc-mb"),
    ("run a prompt on stdin past 64 MiB", ["run", "--prompt", "-"], "past 64 MiB"),
    ("profile past 4 MiB", [*SIM, "--profile", "{tmp}/huge_comment.yaml"], "at most 4 MiB"),
    ("run non-UTF-8 prompt on stdin", ["run", "--prompt", "-", *RUN[3:]], "not UTF-8"),
    ("trace declaring a huge shape", ["simulate", "--trace", "{tmp}/huge_shape.npz", "--profile", P], "declares shape"),
    ("trace encrypted", ["simulate", "--trace", "{tmp}/encrypted.npz", "--profile", P], "encrypted"),
    ("trace unknown compression", ["simulate", "--trace", "{tmp}/unknown_method.npz", "--profile", P], "method 99"),
    ("trace meta nested deep", ["simulate", "--trace", "{tmp}/deep_meta.npz", "--profile", P], "nested too deeply"),
    ("run replay trace meta nested deep", [*RUN, "--replay-trace", "{tmp}/deep_meta.npz"], "nested too deeply"),
    ("trace of 5,000,000 steps", ["tune", "--trace", "{tmp}/many_steps.npz", "--profile", P, "--out", "{tmp}/t.yaml"],
     "5000000 steps"),
    ("profile yaml nested deep", [*SIM, "--profile", "{tmp}/deep.yaml"], "nested too deeply"),
    ("profile a model of 10**7 layers", ["profile", "--model", "{tmp}/ten_million_layers", "--out", "{tmp}/p.yaml"],
     "n_layers 10000000"),
    ("estimate 10**6-wide experts", ["profile", "--estimate", "rtx4090-desktop", "--hidden-size", "2048",
                                     "--intermediate-size", str(10**6), "--out", "{tmp}/p.yaml"], "intermediate_size"),
    ("simulate json and markdown", [*SIM, "--profile", P, "--json", "--markdown"], "not both"),
    ("run stdin twice", ["run", "--prompt", "-", "--prompt", "-", *RUN[3:]], "once"),
    ("run model config with a string expert count", [*RUN, "--model", "{tmp}/str_experts"], "num_experts"),
    ("run model config with zero layers", [*RUN, "--model", "{tmp}/zero_layers"], "num_hidden_layers"),
    ("run config of another model than its weights", ["run", "--prompt", "x", "--model", "{tmp}/narrower_config"],
     "the config and the weights are of different models"),
    ("run config with MoE layers its weights do not have", [*RUN, "--model", "{tmp}/sparse_step_two"],
     "routed experts in decoder layers 0-3 but config.json places them in 1, 3"),
    ("run model whose config.json is a FIFO", [*RUN, "--model", "{tmp}/config_fifo"], "config.json: not a regular file"),
    ("run model whose generation_config.json is a FIFO", [*RUN, "--model", "{tmp}/generation_config_fifo"],
     "generation_config.json: not a regular file"),
    ("run weights of an unknown dtype", [*RUN, "--model", "{tmp}/unknown_dtype"], "unknown variant `XX`"),
    ("run weights whose data overlap", [*RUN, "--model", "{tmp}/overlapping_offsets"], "invalid offset"),
    ("run weights metadata not strings", [*RUN, "--model", "{tmp}/nested_metadata"], "expected a string"),
    ("run weights header nested 100,000 deep", [*RUN, "--model", "{tmp}/nested_header"], "corrupt (unreadable header)"),
    ("run weights index whose weight_map is a list", [*RUN, "--model", "{tmp}/index_list"],
     "malformed safetensors index"),
    ("profile force without an output", ["profile", "--force", "--quick"], "leave --force out"),
    ("run config with zero attention heads", ["run", "--prompt", "x", "--model", "{tmp}/zero_heads"],
     "num_attention_heads must be a whole number above 0"),
    ("run config with zero experts", ["run", "--prompt", "x", "--model", "{tmp}/zero_experts"],
     "num_experts must be a whole number above 0"),
    ("run profile directory is a file", ["run", "--prompt", "x", "-n", "2", "--device", "cpu"], "not a directory"),
    ("serve empty model name", ["serve", "--model-name", " "], "--model-name"),
    ("run int8 weights the config does not declare", [*RUN, "--model", "{tmp}/int8_unmarked"],
     "declares no quantization"),
    ("run weights holding NaN", [*RUN, "--model", "{tmp}/nan_weights"], "outputs on a warm-up step are not finite"),
    ("run config of an unknown rope scaling", [*RUN, "--model", "{tmp}/unknown_rope"],
     "'bogus' is not a value transformers knows"),
    ("run config with a key twice", [*RUN, "--model", "{tmp}/repeated_key"], "'num_experts' is given twice"),
    ("run boolean weights", [*RUN, "--model", "{tmp}/bool_weights"], "model.norm.weight is stored as BOOL"),
    ("run malformed tokenizer", [*RUN, "--model", "{tmp}/bad_tokenizer"], "no usable tokenizer"),
    ("profile a config giving a key twice", ["profile", "--estimate", "rtx4090-desktop", "--model",
                                             "{tmp}/repeated_key.json", "--out", "{tmp}/p.yaml"],
     "'hidden_size' is given twice"),
    ("profile estimate of a config's 24 GiB experts", ["profile", "--estimate", "rtx4090-desktop", "--model",
                                                         "{tmp}/huge_experts.json", "--out", "{tmp}/p.yaml"],
     "profiles experts of at most 16 GiB"),
    ("profile config of 10**12 layers", ["profile", "--model", "{tmp}/huge_layers.json", "--out", "{tmp}/p.yaml"],
     "num_hidden_layers"),
    ("run record trace in /proc", [*RUN, "--record-trace", "/proc/hybrimoe.npz"], "cannot write"),
    ("tune report in /proc", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml", "--report",
                              "/proc/hybrimoe-report"], "cannot write"),
    ("profile plot in /proc", ["profile", "--out", "{tmp}/p.yaml", "--plot", "/proc/hybrimoe.png"], "cannot write"),
    ("tune out is the input trace", ["tune", "--trace", "{tmp}/trace_copy.npz", "--profile", P, "--out",
                                     "{tmp}/trace_copy.npz", "--force"], "input traces"),
    ("tune pareto with a fixed cache", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml", "--pareto",
                                        "--cache-experts", "100"], "--pareto"),
    ("profile estimate with a plot", ["profile", "--estimate", "rtx4090-desktop", "--preset", "demo", "--out",
                                      "{tmp}/p.yaml", "--plot", "{tmp}/p.png"], "--plot"),
    ("run unknown HYBRIMOE_NATIVE", [*RUN], "HYBRIMOE_NATIVE"),
    ("run prompt file of 24 MB", ["run", "--prompt-file", "{tmp}/huge_prompt.txt", *RUN[3:]], "characters"),
    ("tune 1000 workers", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml", "--workers", "1000"],
     "--workers"),
    ("tune holdout is a training trace", ["tune", "--trace", T, "--holdout", T, "--profile", P, "--out", "{tmp}/t.yaml"],
     "held out"),
    ("run a bert checkpoint", [*RUN, "--model", "{tmp}/bert"], "dense model"),
    ("trace is a FIFO", ["simulate", "--trace", "{tmp}/fifo.npz", "--profile", str(PROFILE)], "not a regular file"),
    ("profile is a symlink to /dev/zero", [*SIM, "--profile", "{tmp}/zero.yaml"], "not a regular file"),
    ("tune infinite GPU memory", ["tune", "--trace", T, "--profile", str(PROFILE), "--out", "{tmp}/t.yaml",
                                  "--gpu-memory-gb", "inf", "--export", "llamacpp"], "--gpu-memory-gb"),
    # -- serve -----------------------------------------------------------------------------------
    ("serve port out of range", ["serve", "--port", "70000"], "--port"),
    ("serve zero batch", ["serve", "--max-batch", "0"], "--max-batch"),
    ("serve huge batch", ["serve", "--max-batch", "100000"], "--max-batch"),
    ("serve negative queue", ["serve", "--max-queue", "-1"], "--max-queue"),
    ("serve a queue of 10**13", ["serve", "--max-queue", str(10**13)], "--max-queue must be in 0-100000"),
    ("tune decode tokens of 10**23", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml",
                                      "--decode-tokens", str(10**23)], "--decode-tokens must be in [0, 16777216]"),
    ("profile a note that is not UTF-8", ["profile", "--estimate", "rtx4090-desktop", "--preset", "demo", "--out",
                                          "{tmp}/p.yaml", "--note", "n\udcff"], "--note is not UTF-8 text"),
    ("serve zero max tokens", ["serve", "--max-tokens", "0"], "--max-tokens"),
    ("serve max tokens past the model's positions", ["serve", "--max-tokens", "100000", "--port", "0"],
     "leaves no room for a prompt in the model's 256 positions"),
    ("serve nan shutdown timeout", ["serve", "--shutdown-timeout", "nan"], "--shutdown-timeout"),
    ("serve a chat template that does not render", ["serve", "--model", "{tmp}/broken_template", "--port", "0"],
     "the model's chat template failed"),
    ("serve model missing", ["serve", "--model", "{tmp}/missing"], "missing"),
    ("serve trace not npz", ["serve", "--record-trace", "{tmp}/t.txt"], ".npz"),
    ("serve unknown strategy", ["serve", "--strategy", "banana"], "banana"),
    ("trace import sglang dump on the meta device", [*IMPORT, "--format", "sglang-dump", "{tmp}/sglang_meta.pt",
                                                      "--out", "{tmp}/t.npz"], "dense integer tensor"),
    ("trace import sglang stat-mode dump", [*IMPORT, "--format", "sglang-dump", "{tmp}/sglang_stat.pt", "--out",
                                            "{tmp}/t.npz"], "'stat' mode dump"),
    ("trace import sglang pickle payload", [*IMPORT, "--format", "sglang-dump", "{tmp}/pwn.bin", "--out",
                                            "{tmp}/t.npz"], "Python objects besides tensors, lists, dicts and numbers"),
    ("tune report is the profile", ["tune", "--trace", T, "--profile", str(PROFILE), "--out", "{tmp}/t.yaml",
                                    "--report", "{tmp}/t.yaml"], "own path"),
    # -- sweep 4 ---------------------------------------------------------------------------------
    ("profile negative MRS top-p", [*SIM, "--profile", "{tmp}/negative_top_p.yaml"], "mrs_top_p"),
    ("tune profile with negative MRS top-p", ["tune", "--trace", T, "--profile", "{tmp}/negative_top_p.yaml", "--out",
                                              "{tmp}/t.yaml"], "mrs_top_p"),
    ("profile zero expert bandwidth", [*SIM, "--profile", "{tmp}/zero_expert_bandwidth.yaml"], "h2d_pinned_expert_gbps"),
    ("profile card of a nanobyte", [*SIM, "--profile", "{tmp}/tiny_card.yaml"], "gpu_memory_gb"),
    ("profile planner of an unknown strategy", [*RUN[:5], "--profile", "{tmp}/typo_planner.yaml"], "'hybrid'"),
    ("profile name with escapes", [*SIM, "--profile", "{tmp}/unprintable_name.yaml"], "printable"),
    ("profile policy format not its experts'", [*SIM, "--profile", "{tmp}/int8_policy.yaml"], "policy.quantize"),
    ("profile group size without a format", [*SIM, "--profile", "{tmp}/group_size_alone.yaml"], "policy.group_size"),
    ("simulate second profile bad, named", [*SIM, "--profile", P, "--profile", "{tmp}/ratio_over_one.yaml"],
     "ratio_over_one.yaml: policy.cache_ratio"),
    ("simulate trace given twice", [*SIM, "--trace", T, "--profile", P], "more than once"),
    ("simulate baseline key twice", [*SIM, "--profile", P, "--baseline", "lru_inserts=4", "--baseline", "lru_inserts=8"],
     "given twice"),
    ("simulate baseline no strategy reads", [*SIM, "--profile", P, "--strategies", "hybrimoe", "--baseline",
                                             "refresh_steps=4"], "ktransformers-dynamic"),
    ("simulate prompt length without prefill", [*SIM, "--profile", P, "--prefill-tokens", "64"], "--prefill-tokens"),
    ("simulate recorded look-ahead the trace lacks", [*SIM, "--profile", P, "--predictor", "recorded"], "look-ahead"),
    ("tune trace given twice", ["tune", "--trace", T, "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml"],
     "given twice"),
    ("tune export given twice", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml", "--export", "llamacpp",
                                 "--export", "llamacpp"], "given twice"),
    ("tune model that nothing uses", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml", "--model",
                                      str(DEMO)], "--model"),
    ("tune measures a GGUF", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml", "--model", "{tmp}/x.gguf",
                              "--measure-top", "1"], ".gguf"),
    ("tune report holds an earlier report", ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml", "--report",
                                             "{tmp}/earlier_report"], "--force"),
    ("profile out that is not YAML", ["profile", "--estimate", "rtx4090-desktop", "--preset", "demo", "--out",
                                      "{tmp}/p.png"], ".yaml"),
    ("profile plot that exists", ["profile", "--preset", "demo", "--quick", "--out", "{tmp}/p.yaml", "--plot",
                                  "{tmp}/existing.png"], "--force"),
    ("profile out a link to a device, forced", ["profile", "--estimate", "rtx4090-desktop", "--preset", "demo", "--out",
                                              "{tmp}/device_link.yaml", "--force"], "not a regular file"),
    ("run model of a billion layers", [*RUN, "--model", "{tmp}/billion_layers"], "n_layers 1000000000"),
    ("run weights file a directory", [*RUN, "--model", "{tmp}/weights_dir"], "not a regular file"),
    ("run force without a recording", [*RUN, "--force"], "--record-trace"),
    ("run allow pickle for the demo", [*RUN, "--allow-pickle"], "demo model"),
    ("run records over its replay", [*RUN, "--replay-trace", "{tmp}/trace_copy.npz", "--record-trace",
                                     "{tmp}/trace_copy.npz", "--force"], "--replay-trace"),
    ("run gpu-offload without a cache", [*RUN, "--strategy", "gpu-offload", "--cache-ratio", "0"], "gpu-offload"),
    ("run a GGUF as the model", [*RUN, "--model", "{tmp}/x.gguf"], "GGUF"),
    ("run cpu-only profile with a cache", [*RUN[:5], "--profile", "{tmp}/demo_cpu_only.yaml", "--device", "cpu",
                                           "--cache-ratio", "0.5"], "cache"),
    ("serve force without a recording", ["serve", "--force"], "--record-trace"),
    ("run temperature of 5", [*RUN, "--temperature", "5"], "--temperature"),
    ("estimate a config with a NaN", ["profile", "--estimate", "rtx4090-desktop", "--model", "{tmp}/nan_epsilon",
                                      "--out", "{tmp}/p.yaml"], "rms_norm_eps"),
    ("trace of a negative routing weight", ["trace", "info", "{tmp}/negative_weight.npz"], "negative routing weight"),
    # -- sweep 5 ---------------------------------------------------------------------------------
    ("profile fit R² of 5", [*SIM, "--profile", "{tmp}/r2_of_five.yaml"], "r2"),
    ("profile interference that speeds up", [*SIM, "--profile", "{tmp}/speedup_interference.yaml"], "cpu_slowdown"),
    ("simulate a cache size twice", ["simulate", "--trace", T, "--profile", P, "--cache-ratio", "0.5,0.5"], "twice"),
    ("simulate placement learned on the replay", [*SIM, "--profile", P, "--profiling-trace", T], "static-oracle"),
    ("run config of zero positions", [*RUN, "--model", "{tmp}/zero_positions"], "max_position_embeddings"),
    ("run config of fewer layers than its weights", [*RUN, "--model", "{tmp}/fewer_layers"], "declares 2"),
    ("run config of more layers than its weights", [*RUN, "--model", "{tmp}/more_layers"], "declares 6"),
    ("run pickle allowed for safetensors", [*RUN, "--model", "{tmp}/plain", "--allow-pickle"], "no pickle-based"),
    ("run remote code trusted where there is none", [*RUN, "--model", "{tmp}/plain", "--trust-remote-code"],
     "no code of its own"),
    ("profile name of two lines", ["profile", "--estimate", "rtx4090-desktop", "--preset", "demo", "--name", "a\nb",
                                   "--out", "{tmp}/p.yaml"], "--name"),
    ("profile card of 24 GB in bytes", [*SIM, "--profile", "{tmp}/card_in_bytes.yaml"], "gpu_memory_gb"),
    ("serve model name of two lines", ["serve", "--model-name", "a\nb"], "--model-name"),
    ("serve shutdown timeout of 1e12 s", ["serve", "--shutdown-timeout", "1e12"], "--shutdown-timeout"),
    ("tune context of 0 tokens", ["tune", "--trace", T, "--profile", str(PROFILE), "--out", "{tmp}/t.yaml",
                                  "--gpu-memory-gb", "24", "--context", "0"], "--context"),
]


STDIN = {  # what a case reads on stdin
    "run non-UTF-8 prompt on stdin": b"\xff\xfeROMEO",
    "run a prompt on stdin past 64 MiB": bytes(64 * 2**20 + 1),  # what `< /dev/zero` would give, and more
}
ENV = {  # what a case sets
    "run unknown HYBRIMOE_NATIVE": {"HYBRIMOE_NATIVE": "banana"},
    "run profile directory is a file": {"HYBRIMOE_PROFILE_DIR": str(REPO / "README.md")},
    "run invalid OMP_NUM_THREADS": {"OMP_NUM_THREADS": "abc"},
}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad")
    make_files(tmp)
    return tmp


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(directory.rglob("*")) if not p.is_symlink()}


@pytest.fixture
def no_sockets(monkeypatch):
    """Fails the test on any network connection."""
    opened = []

    def refuse(self, *args, **kwargs):
        opened.append(args)
        raise OSError("hybrimoe tests: no network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield opened
    assert not opened, f"a connection was attempted: {opened}"


TUNE_GGUF = ["tune", "--trace", T, "--profile", P, "--out", "{tmp}/t.yaml", "--gpu-memory-gb", "24", "--export", "llamacpp"]
GGUF_CASES = [  # need the gguf package to write them
    ("gguf not a GGUF", [*TUNE_GGUF, "--model", "{tmp}/not.gguf"], "not a GGUF file"),
    ("gguf truncated", ["profile", "--model", "{tmp}/truncated.gguf", "--out", "{tmp}/p.yaml"], "truncated"),
    ("gguf unsupported architecture", [*TUNE_GGUF, "--model", "{tmp}/falcon.gguf"], "unsupported architecture"),
    ("gguf not a MoE model", ["profile", "--model", "{tmp}/dense.gguf", "--out", "{tmp}/p.yaml"], "not a MoE model"),
    ("gguf of another model than the trace", [*TUNE_GGUF, "--model", "{tmp}/small.gguf"], "not the traces' model"),
    ("gguf missing", [*TUNE_GGUF, "--model", "{tmp}/missing.gguf"], "missing.gguf"),
    ("gguf header of no experts", ["profile", "--estimate", "rtx4090-desktop", "--model", "{tmp}/no_experts.gguf",
                                   "--out", "{tmp}/p.yaml"], "expert_count is 0"),
    ("gguf array of 2**62 entries", ["profile", "--estimate", "rtx4090-desktop", "--model", "{tmp}/huge_array.gguf",
                                     "--out", "{tmp}/p.yaml"], "declares 4611686018427387904 entries"),
    ("gguf arrays nested", [*TUNE_GGUF, "--model", "{tmp}/nested.gguf"], "an array of GGUF value type 9"),
]


@pytest.fixture(scope="module")
def gguf_scratch(scratch) -> Path:
    """Small GGUFs (sizes in KB) in the scratch directory: one valid, four bad."""
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'hybrimoe[gguf]')")
    from gguf_files import write_gguf

    (scratch / "not.gguf").write_bytes(b"GGUF" + bytes(3))
    write_gguf(scratch / "truncated.gguf", truncate_bytes=4096)
    write_gguf(scratch / "falcon.gguf", arch="falcon")
    write_gguf(scratch / "dense.gguf", arch="llama", n_dense_blocks=4)
    write_gguf(scratch / "small.gguf")
    write_gguf(scratch / "no_experts.gguf", declared_experts=0)
    one_field = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 5) + b"x.arr"  # its type and value follow
    (scratch / "huge_array.gguf").write_bytes(one_field + struct.pack("<IIQ", 9, 0, 1 << 62))  # of bytes
    (scratch / "nested.gguf").write_bytes(one_field + struct.pack("<IIQ", 9, 9, 1) * 10_000)  # of arrays of arrays...
    return scratch


@pytest.mark.parametrize("case_id, argv, message", GGUF_CASES, ids=[c[0] for c in GGUF_CASES])
def test_bad_gguf_is_one_line_and_exit_2(case_id, argv, message, gguf_scratch, no_sockets, monkeypatch):
    test_bad_input_is_one_line_and_exit_2(case_id, argv, message, gguf_scratch, no_sockets, monkeypatch)


@pytest.mark.parametrize("case_id, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case_id, argv, message, scratch, no_sockets, monkeypatch):
    monkeypatch.setenv("HYBRIMOE_PROFILE_DIR", str(scratch / "profiles"))
    argv = [a.replace("{tmp}", str(scratch)) for a in argv]
    message = message.replace("{tmp}", str(scratch))
    before = _snapshot(scratch)
    for name, value in ENV.get(case_id, {}).items():
        monkeypatch.setenv(name, value)
        native._library.cache_clear()  # read the variable again (a refusal is not cached)
    result = runner.invoke(app, argv, input=STDIN.get(case_id))
    stderr = result.stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.stdout[-2000:], stderr[-2000:], result.exception)
    assert "Traceback" not in stderr + result.stdout
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:"), stderr
    assert message in lines[0], stderr
    assert _snapshot(scratch) == before, "a file changed or a partial file remains"
    assert not (scratch / "pwned").exists()


def test_case_count():
    assert len(CASES) >= 60
