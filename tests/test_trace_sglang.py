"""`trace import --format sglang-dump`: SGLang's expert-distribution recorder dumps (per_token mode),
built here exactly as its source writes them (sgl-project/sglang
python/sglang/srt/eplb/expert_distribution.py: `_DetailSinglePassGatherer` fills a [layers, tokens, 8]
int32 buffer reset to -1, MoE layers writing their first top-k columns; `_DetailAccumulator.dump`
saves {"records": [...], "last_physical_to_logical_map": ...} with torch.save), with the checks the
vllm-jsonl importer has, and a dump imported and simulated."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hybrimoe.cli import app
from hybrimoe.errors import TraceError
from hybrimoe.trace import TraceMeta, load_trace, read_sglang_dumps

REPO = Path(__file__).resolve().parent.parent
QWEN_TRACE = REPO / "traces" / "qwen3-30b-a3b.npz"
QWEN_PROFILE = REPO / "profiles" / "rtx4090-desktop.qwen3-30b-a3b.yaml"
TOP_K_NUM = 8  # the recorder's buffer width (_DetailSinglePassGatherer._TOP_K_NUM)
META = TraceMeta(model="tiny", n_layers=2, n_experts=4, top_k=2, n_shared_experts=0, hidden_size=8,
                 intermediate_size=16, dtype="float32", provenance="")
runner = CliRunner()


def record(pass_id: int, moe_ids: np.ndarray, dense_rows: tuple[int, ...] = (), forward_mode: int = 2) -> dict:
    """One forward pass as `_DetailSinglePassGatherer.collect` returns it; moe_ids [L, T, k]."""
    n_moe, n_tokens, k = moe_ids.shape
    n_layers = n_moe + len(dense_rows)
    buffer = torch.full((n_layers, n_tokens, TOP_K_NUM), -1, dtype=torch.int32)
    moe_rows = [row for row in range(n_layers) if row not in dense_rows]
    buffer[moe_rows, :, :k] = torch.from_numpy(moe_ids.astype(np.int32))
    return dict(forward_pass_id=pass_id, rank=0, gatherer_key="primary", input_ids=list(range(n_tokens)),
                positions=list(range(n_tokens)), extend_seq_lens=[n_tokens], forward_mode=forward_mode,
                topk_ids_of_layer=buffer, misc_objects=[], global_physical_count=torch.zeros(n_layers, 4))


def dump(path: Path, records: list[dict], physical_to_logical: torch.Tensor | None = None) -> Path:
    n_layers = records[0]["topk_ids_of_layer"].shape[0]
    mapping = physical_to_logical if physical_to_logical is not None else torch.arange(4).repeat(n_layers, 1)
    torch.save(dict(records=records, last_physical_to_logical_map=mapping), path)
    return path


def test_passes_become_steps_dense_rows_skipped_and_repeats_dropped(tmp_path):
    rng = np.random.default_rng(0)
    prefill = np.stack([np.stack([rng.permutation(4)[:2] for _ in range(5)]) for _ in range(2)])  # [2, 5, 2]
    decode = np.array([[[0, 1]], [[2, 3]]])
    records = [record(2, decode, dense_rows=(0,)), record(1, prefill, dense_rows=(0,))]  # out of order
    path = dump(tmp_path / "expert_distribution_recorder_1.0_0.pt", records)
    other_rank = dump(tmp_path / "expert_distribution_recorder_1.0_1.pt", records)  # tensor parallel: same routing
    trace, n_dropped = read_sglang_dumps([path, other_rank], META)
    assert trace.step_lengths == (5, 1) and n_dropped == 2 and not trace.has_weights
    np.testing.assert_array_equal(trace.steps[0].topk_ids, prefill)
    assert "sglang-dump" in trace.meta.provenance


def test_physical_ids_map_to_logical_experts(tmp_path):
    ids = np.array([[[0, 1]], [[2, 3]]])
    reversed_map = torch.tensor([[3, 2, 1, 0], [3, 2, 1, 0]])
    trace, _ = read_sglang_dumps([dump(tmp_path / "d.pt", [record(1, ids)], reversed_map)], META)
    np.testing.assert_array_equal(trace.steps[0].topk_ids, 3 - ids)


IDS = np.array([[[0, 1]], [[2, 3]]])  # [L, T, k]: one token of a two-layer model


class NotPlainData:
    def __reduce__(self):
        return (print, ("a pickle payload ran",))


@pytest.mark.parametrize("make, message", [
    (lambda p: torch.save({"logical_count": torch.zeros(1, 2, 4)}, p), "'stat' mode dump"),
    (lambda p: p.write_text("not a torch file"), "not a torch.save file"),
    (lambda p: p.write_bytes(pickle.dumps({"records": [NotPlainData()]})), "not a torch.save file"),
    (lambda p: torch.save({"records": []}, p), "non-empty list of dicts"),
    (lambda p: dump(p, [record(1, np.array([[[0, 1]], [[2, 3]], [[1, 2]]]))]), "3 of 3 layers hold routing"),
    (lambda p: dump(p, [record(1, np.array([[[0, 1, 2]], [[2, 3, 1]]]))]), "do not hold top_k = 2"),
    (lambda p: torch.save({"records": [record(1, np.array([[[0, 9]], [[2, 3]]]))]}, p),  # no map: ids are logical
     "forward pass 1: expert id 9 outside"),
    (lambda p: dump(p, [record(1, np.array([[[0, 9]], [[2, 3]]]))]), "routing outside last_physical_to_logical_map"),
    (lambda p: dump(p, [record(1, np.array([[[1, 1]], [[2, 3]]]))]), "repeats an expert"),
    (lambda p: dump(p, [record("a", IDS), record(1, IDS)]), "forward_pass_id is 'a', not a whole number"),
    (lambda p: dump(p, [record(float("nan"), IDS)]), "forward_pass_id is nan"),
    (lambda p: dump(p, [record(torch.tensor([1, 2]), IDS)]), "not a whole number"),
    (lambda p: dump(p, [{**record(1, IDS), "topk_ids_of_layer": record(1, IDS)["topk_ids_of_layer"].to_sparse()}]),
     "dense integer tensor"),
    (lambda p: dump(p, [{**record(1, IDS), "topk_ids_of_layer": record(1, IDS)["topk_ids_of_layer"].to(torch.complex64)}]),
     "dense integer tensor"),
    (lambda p: dump(p, [record(1, IDS)], torch.arange(4).repeat(2, 1).to_sparse()), "dense integer tensor"),
])
def test_bad_dumps_are_one_line(tmp_path, make, message, capsys):
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(TraceError, match=message) as info:
        read_sglang_dumps([path], META)
    assert "\n" not in str(info.value) and "bad.pt" in str(info.value)
    assert "payload ran" not in capsys.readouterr().out


def test_cli_imports_a_dump_and_simulate_replays_it(tmp_path):
    """Qwen3-30B-A3B's real routing (the shipped trace's first 40 tokens: a 24-token prefill and 16
    decode passes) dumped as SGLang records it, imported, and simulated."""
    steps = load_trace(QWEN_TRACE).tokens(0, 40).steps
    ids = np.concatenate([step.topk_ids for step in steps], axis=1)  # [48, 40, 8]
    records = [record(0, ids[:, :24])] + [record(1 + t, ids[:, 24 + t:25 + t]) for t in range(16)]
    path = dump(tmp_path / "expert_distribution_recorder_1733.5_0.pt", records, torch.arange(128).repeat(48, 1))
    out = tmp_path / "sglang.npz"
    result = runner.invoke(app, ["trace", "import", "--format", "sglang-dump", str(path), "--out", str(out),
                                 "--model-name", "Qwen3-30B-A3B", "--layers", "48", "--experts", "128", "--top-k", "8",
                                 "--hidden-size", "2048", "--intermediate-size", "768", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    trace = load_trace(out)
    assert trace.step_lengths == (24, *[1] * 16)
    np.testing.assert_array_equal(np.concatenate([s.topk_ids for s in trace.steps], axis=1), ids)
    simulated = runner.invoke(app, ["simulate", "--trace", str(out), "--profile", str(QWEN_PROFILE), "--mode", "decode",
                                    "--cache-ratio", "0.25", "--json"])
    assert simulated.exit_code == 0, simulated.output
    assert "hybrimoe" in simulated.output and "ktransformers" in simulated.output
