"""Routing traces: the .npz round trip, rejection of malformed files, vllm-jsonl import, summary, CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hybrimoe.cli import app
from hybrimoe.errors import TraceError
from hybrimoe.trace import (
    RoutingTrace,
    TraceMeta,
    TraceStep,
    import_vllm_jsonl,
    load_trace,
    save_trace,
    trace_meta_from_hf_config,
    trace_summary,
)

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "traces" / "qwen3-30b-a3b.npz"
SHARED_JSONL = REPO.parent / "shared" / "traces" / "qwen3-30b-a3b" / "token_distri_16.jsonl"

META = TraceMeta(
    model="tiny", n_layers=2, n_experts=4, top_k=2, n_shared_experts=0,
    hidden_size=8, intermediate_size=16, dtype="float32", provenance="hand-made",
)


def tiny_trace(with_extras: bool = True) -> RoutingTrace:
    """Two steps (3 tokens, then 1) on 2 layers, 4 experts, top-2."""
    ids = np.array([[[0, 1], [1, 2], [2, 3], [0, 3]], [[3, 2], [2, 1], [1, 0], [0, 2]]])  # [L=2, N=4, k=2]
    rng = np.random.default_rng(0)
    weights = rng.random((2, 4, 2)).astype(np.float32)
    probs = rng.dirichlet(np.ones(4), size=(2, 4)).astype(np.float32)
    lookahead = np.full((2, 1, 4, 2), -1)  # [L, D=1, N, k]
    lookahead[0, 0] = ids[1]  # layer 0 predicts layer 1; layer 1 has nothing after it
    steps = []
    for lo, hi in ((0, 3), (3, 4)):
        steps.append(TraceStep(
            topk_ids=ids[:, lo:hi],
            topk_weights=weights[:, lo:hi] if with_extras else None,
            router_probs=probs[:, lo:hi] if with_extras else None,
            lookahead=lookahead[:, :, lo:hi] if with_extras else None,
        ))
    return RoutingTrace(META, tuple(steps))


def test_round_trip(tmp_path):
    trace = tiny_trace()
    path = save_trace(trace, tmp_path / "t.npz")
    back = load_trace(path)
    assert back.meta == trace.meta
    assert back.step_lengths == (3, 1)
    assert back.lookahead_depth == 1 and back.has_weights and back.has_router_probs
    for a, b in zip(trace.steps, back.steps):
        for name in ("topk_ids", "topk_weights", "router_probs", "lookahead"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert back.steps[0].topk_ids.dtype == np.int16


def test_save_refuses_overwrite(tmp_path):
    path = save_trace(tiny_trace(), tmp_path / "t.npz")
    with pytest.raises(TraceError, match="--force"):
        save_trace(tiny_trace(), path)
    save_trace(tiny_trace(False), path, overwrite=True)
    assert not load_trace(path).has_weights


def _write_npz(path: Path, **arrays) -> Path:
    np.savez_compressed(path, **arrays)
    return path


def _good_arrays() -> dict:
    meta = {"format": "hybrimoe-routing-trace", "version": 1, "model": "tiny", "n_layers": 2, "n_experts": 4,
            "top_k": 2, "n_shared_experts": 0, "hidden_size": 8, "intermediate_size": 16, "dtype": "float32",
            "provenance": ""}
    return {
        "meta": np.array(json.dumps(meta)),
        "step_lengths": np.array([1, 1]),
        "topk_ids": np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]]], dtype=np.int16),
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ({"topk_ids": np.zeros((2, 2), dtype=np.int16)}, "topk_ids must be"),
        ({"topk_ids": np.zeros((2, 2, 3), dtype=np.int16)}, "expected \\[2, tokens >= 1, 2\\]"),
        ({"topk_ids": np.array([[[0, 4], [2, 3]], [[1, 2], [3, 0]]], dtype=np.int16)}, "outside \\[0, 4\\)"),
        ({"topk_ids": np.array([[[0, 0], [2, 3]], [[1, 2], [3, 0]]], dtype=np.int16)}, "repeats an expert"),
        ({"step_lengths": np.array([1, 2])}, "sum to 3 tokens"),
        ({"step_lengths": np.array([2, 0])}, ">= 1"),
        ({"meta": np.array("{not json")}, "not valid JSON"),
        ({"meta": np.array(json.dumps({"format": "hybrimoe-routing-trace", "version": 1}))}, "missing field"),
        ({"meta": np.array(json.dumps({"format": "hybrimoe-routing-trace", "version": 9}))}, "version 9"),
        ({"topk_weights": np.full((2, 2, 2), np.nan, dtype=np.float32)}, "non-finite"),
        ({"router_probs": np.full((2, 2, 4), 1.5, dtype=np.float32)}, "in \\[0, 1\\]"),
        ({"extra": np.zeros(1)}, "unknown array"),
    ],
)
def test_malformed_npz_rejected_with_one_line(tmp_path, change, message):
    arrays = _good_arrays()
    arrays.update(change)
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(TraceError, match=message) as info:
        load_trace(path)
    text = str(info.value)
    assert "\n" not in text and str(path) in text


def test_meta_field_out_of_range_rejected(tmp_path):
    arrays = _good_arrays()
    meta = json.loads(str(arrays["meta"]))
    meta["n_experts"] = 0
    arrays["meta"] = np.array(json.dumps(meta))
    with pytest.raises(TraceError, match="n_experts must be a positive integer"):
        load_trace(_write_npz(tmp_path / "bad.npz", **arrays))


@pytest.mark.parametrize("content", [b"not a zip file at all", b"PK\x03\x04broken"])
def test_non_npz_rejected(tmp_path, content):
    path = tmp_path / "junk.npz"
    path.write_bytes(content)
    with pytest.raises(TraceError, match="junk.npz") as info:
        load_trace(path)
    assert "\n" not in str(info.value)


def test_plain_npy_rejected(tmp_path):
    path = tmp_path / "array.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(TraceError, match="not an .npz"):
        load_trace(path)


def test_lookahead_must_be_minus_one_past_last_layer():
    ids = np.array([[[0, 1]], [[1, 2]]])
    with pytest.raises(TraceError, match="-1 for predicted layers past"):
        RoutingTrace(META, (TraceStep(ids, lookahead=np.zeros((2, 1, 1, 2), dtype=np.int16)),))


def test_as_decode_split_and_frequencies():
    trace = tiny_trace()
    decode = trace.as_decode()
    assert decode.step_lengths == (1, 1, 1, 1)
    np.testing.assert_array_equal(decode.topk_ids(), trace.topk_ids())
    np.testing.assert_array_equal(decode.steps[3].lookahead, trace.steps[1].lookahead)
    first, second = trace.split(0.75)
    assert (first.n_tokens, second.n_tokens) == (3, 1)
    np.testing.assert_array_equal(second.steps[0].topk_ids, trace.steps[1].topk_ids)
    with pytest.raises(TraceError, match="empty part"):
        trace.split(0.01)
    assert trace.tokens(2, 4).step_lengths == (1, 1)
    assert trace.prefill_steps().step_lengths == (3,)
    assert trace.decode_steps().step_lengths == (1,)
    assert first.concat(second).n_tokens == 4
    freq = trace.expert_frequencies()
    assert freq.shape == (2, 4) and freq.sum() == 2 * 4 * 2
    np.testing.assert_array_equal(freq[0], [2, 2, 2, 2])


def test_select_layers_keeps_steps_and_drops_lookahead():
    trace = tiny_trace()
    for layers in ([1], [1, 0]):
        view = trace.select_layers(layers)
        assert view.meta.n_layers == len(layers) and view.meta.n_experts == trace.meta.n_experts
        assert view.step_lengths == trace.step_lengths and view.lookahead_depth == 0
        assert view.has_weights and view.has_router_probs
        for name in ("topk_ids", "topk_weights", "router_probs"):
            for mine, theirs in zip(view.steps, trace.steps):
                np.testing.assert_array_equal(getattr(mine, name), getattr(theirs, name)[layers])
    assert not tiny_trace(False).select_layers(range(1)).has_weights
    for bad in ([], [2], [-1], [0, 0]):
        with pytest.raises(TraceError, match="distinct MoE layers"):
            trace.select_layers(bad)


def test_summary_on_hand_made_trace():
    # 1 layer, 4 experts, top-2; tokens: {0,1}, {0,1}, {0,2}, {0,1}
    meta = TraceMeta("t", 1, 4, 2, 0, 8, 8, "float32", "")
    ids = np.array([[[0, 1], [1, 0], [0, 2], [0, 1]]])
    summary = trace_summary(RoutingTrace(meta, (TraceStep(ids),)))
    # counts 4, 3, 1, 0: top 10% (1 expert) = 4/8, top 25% (1 expert) = 4/8
    assert summary.top10_share == pytest.approx(0.5) and summary.top25_share == pytest.approx(0.5)
    # Gini of (0, 1, 3, 4): 2*(1*0 + 2*1 + 3*3 + 4*4)/(4*8) - 5/4 = 54/32 - 40/32
    assert summary.gini == pytest.approx(14 / 32)
    # overlaps 2, 1, 1 of k=2
    assert summary.reuse_overlap == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert summary.reuse_overlap_random == pytest.approx(0.5)
    assert (summary.n_steps, summary.n_prefill_tokens, summary.n_decode_steps) == (1, 4, 0)


# ---------------------------------------------------------------------------------------------
# vllm-jsonl import


def _jsonl(path: Path, steps: list[np.ndarray], weights: str = "shape") -> Path:
    lines = []
    for step in steps:  # [L, T, k]
        for layer in step:
            w = list(layer.shape) if weights == "shape" else (np.ones(layer.shape) / layer.shape[1]).tolist()
            lines.append(json.dumps({"topk_weights": w, "topk_ids": layer.tolist()}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_import_vllm_jsonl_drops_repeated_steps(tmp_path):
    rng = np.random.default_rng(1)
    big = np.stack([np.stack([rng.permutation(4)[:2] for _ in range(5)]) for _ in range(2)])  # [2, 5, 2]
    idle = np.array([[[0, 1]] * 1, [[2, 3]] * 1])
    path = _jsonl(tmp_path / "log.jsonl", [idle, big, idle, idle])
    trace = import_vllm_jsonl([path], META)
    assert trace.step_lengths == (1, 5)
    assert not trace.has_weights
    np.testing.assert_array_equal(trace.steps[1].topk_ids, big)
    assert "2 repeated steps dropped" in trace.meta.provenance


def test_import_vllm_jsonl_keeps_real_weights(tmp_path):
    path = _jsonl(tmp_path / "log.jsonl", [np.array([[[0, 1]], [[2, 3]]])], weights="values")
    trace = import_vllm_jsonl([path], META)
    np.testing.assert_allclose(trace.steps[0].topk_weights, 0.5)


def test_import_vllm_jsonl_reads_a_file_that_starts_with_a_byte_order_mark(tmp_path):
    """As Windows editors save UTF-8."""
    path = _jsonl(tmp_path / "log.jsonl", [np.array([[[0, 1]], [[2, 3]]])])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert import_vllm_jsonl([path], META).step_lengths == (1,)


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"topk_ids": [[0, 1]]}'], "not a multiple of n_layers=2"),
        (['{"topk_ids": [[0, 1]]}', "{oops"], ":2: not valid JSON"),
        (['{"topk_ids": [[0, 1]]}', '{"topk_ids": [[0, 9]]}'], ":2: expert id 9 outside \\[0, 4\\)"),
        (['{"topk_ids": [[0, 1]]}', '{"topk_ids": [[0, 1, 2]]}'], "3 experts per token, but top_k is 2"),
        (['{"topk_ids": [[0, 1]]}', '{"topk_ids": [[1, 1]]}'], "repeats an expert"),
        (['{"topk_ids": [[0, 1]]}', '{"topk_ids": [[0, 1], [2, 3]]}'], "2 tokens, but layer 0"),
        (['{"topk_ids": [[0, 1]]}', '{"ids": [[0, 1]]}'], "expected an object with 'topk_ids'"),
    ],
)
def test_import_vllm_jsonl_rejects_bad_lines(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=message) as info:
        import_vllm_jsonl([path], META)
    assert "\n" not in str(info.value) and "bad.jsonl" in str(info.value)


def test_meta_from_hf_config(tmp_path):
    config = {"model_type": "qwen3_moe", "_name_or_path": "Qwen/Qwen3-30B-A3B", "num_hidden_layers": 48,
              "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "hidden_size": 2048,
              "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
              "intermediate_size": 6144, "decoder_sparse_step": 1, "mlp_only_layers": [], "torch_dtype": "bfloat16"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    meta = trace_meta_from_hf_config(path)
    assert (meta.model, meta.n_layers, meta.n_experts, meta.top_k, meta.intermediate_size, meta.dtype) == (
        "Qwen/Qwen3-30B-A3B", 48, 128, 8, 768, "bfloat16")
    assert meta.expert_bytes == 3 * 2048 * 768 * 2
    del config["num_experts"]
    path.write_text(json.dumps(config))
    with pytest.raises(TraceError, match="missing num_experts"):
        trace_meta_from_hf_config(path)


# ---------------------------------------------------------------------------------------------
# The committed Qwen3-30B-A3B trace


def test_committed_trace_facts():
    trace = load_trace(COMMITTED)
    meta = trace.meta
    assert (meta.n_layers, meta.n_experts, meta.top_k, meta.n_shared_experts) == (48, 128, 8, 0)
    assert (meta.hidden_size, meta.intermediate_size, meta.dtype) == (2048, 768, "bfloat16")
    assert meta.expert_bytes == 9_437_184
    assert trace.step_lengths == (19, 4, 2080, 4)  # the 28 repeated idle 4-token steps are dropped
    assert "568a8cb288718caa8062317324e2452a8ee44e4e" in meta.provenance
    assert not trace.has_weights
    assert trace.as_decode().n_steps == 2107


@pytest.mark.skipif(not SHARED_JSONL.is_file(), reason="the shared vLLM routing log is not on this machine")
def test_committed_trace_matches_shared_log():
    meta = load_trace(COMMITTED).meta
    imported = import_vllm_jsonl([SHARED_JSONL], meta)
    np.testing.assert_array_equal(imported.topk_ids(), load_trace(COMMITTED).topk_ids())


# ---------------------------------------------------------------------------------------------
# CLI

runner = CliRunner()


def test_cli_import_and_info(tmp_path):
    rng = np.random.default_rng(2)
    step = np.stack([np.stack([rng.permutation(4)[:2] for _ in range(3)])] * 2)  # [2 layers, 3 tokens, 2]
    log = _jsonl(tmp_path / "log.jsonl", [step, step])  # the second is an idle repeat
    out = tmp_path / "t.npz"
    args = ["trace", "import", "--format", "vllm-jsonl", str(log), "--out", str(out), "--model-name", "tiny",
            "--layers", "2", "--experts", "4", "--top-k", "2", "--hidden-size", "8",
            "--intermediate-size", "16", "--dtype", "float32"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert load_trace(out).step_lengths == (3,)
    assert "dropped 1 step(s) that repeat an earlier one exactly" in " ".join(result.output.split())
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0

    info = runner.invoke(app, ["trace", "info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["n_tokens"] == 3
    table = runner.invoke(app, ["trace", "info", str(out)])
    assert table.exit_code == 0 and "top-2" in table.output


def test_cli_errors_exit_2(tmp_path):
    missing = runner.invoke(app, ["trace", "info", str(tmp_path / "nope.npz")])
    assert missing.exit_code == 2 and "trace not found" in missing.output
    no_shape = runner.invoke(app, ["trace", "import", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o.npz")])
    assert no_shape.exit_code == 2 and "shape facts are needed" in no_shape.output
    no_file = runner.invoke(app, ["trace", "import", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o.npz"),
                                  "--model-name", "m", "--layers", "2", "--experts", "4", "--top-k", "2",
                                  "--hidden-size", "8", "--intermediate-size", "16", "--dtype", "float32"])
    assert no_file.exit_code == 2 and "not found" in no_file.output
    config = tmp_path / "config.json"
    config.write_text("{}")
    both = runner.invoke(app, ["trace", "import", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o.npz"),
                               "--config", str(config), "--layers", "2"])
    assert both.exit_code == 2 and "not both" in both.output
    bad_config = runner.invoke(app, ["trace", "import", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o.npz"),
                                     "--config", str(config)])
    assert bad_config.exit_code == 2 and "unsupported model_type None" in bad_config.output


def test_trace_info_shows_control_characters_in_metadata_escaped(tmp_path):
    """A trace's metadata comes from a file: an escape sequence in it is shown, never sent to the
    terminal; a model name that is not printable text is refused like a profile's."""
    trace = load_trace(COMMITTED)
    hostile = tmp_path / "hostile.npz"
    save_trace(dataclasses.replace(trace, meta=dataclasses.replace(trace.meta, provenance="x\x1b]0;pwned\x07\ry")),
               hostile)
    table = runner.invoke(app, ["trace", "info", str(hostile)])
    assert table.exit_code == 0, table.output
    assert "\x1b" not in table.output and "\r" not in table.output and "\\x1b]0;pwned\\x07\\ry" in table.output
    with pytest.raises(TraceError, match="printable"):
        dataclasses.replace(trace.meta, model="qwen\x1b[2J")


def test_import_with_a_config_that_names_no_model_takes_its_directorys_name(tmp_path):
    """As `run` names a checkpoint: a config.json saved without _name_or_path needs no --model-name."""
    from hybrimoe.demo import demo_model_path

    config = json.loads((demo_model_path() / "config.json").read_text())
    config.pop("_name_or_path", None)
    checkpoint = tmp_path / "my-moe"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(3)
    step = np.stack([np.stack([rng.permutation(config["num_experts"])[:config["num_experts_per_tok"]]
                               for _ in range(2)]) for _ in range(config["num_hidden_layers"])])  # [L, 2, k]
    out = tmp_path / "t.npz"
    result = runner.invoke(app, ["trace", "import", str(_jsonl(tmp_path / "log.jsonl", [step])), "--out", str(out),
                                 "--config", str(checkpoint)])
    assert result.exit_code == 0, result.output
    assert load_trace(out).meta.model == "my-moe"
