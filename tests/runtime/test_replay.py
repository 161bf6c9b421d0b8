"""Routing replay (`hybrimoe run --replay-trace`): every MoE layer routes as a recorded trace says.

The runs record their own routing, so each check compares the trace a replaying run recorded with
the trace it replayed, token for token. Tiny random models on the CPU stand-in; a few seconds.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from tiny_models import save_checkpoint
from typer.testing import CliRunner

from hybrimoe.cli import app
from hybrimoe.errors import UserError
from hybrimoe.runtime.replay import RoutingReplay
from hybrimoe.run import RunOptions, run
from hybrimoe.trace import RoutingTrace, TraceMeta, TraceStep, load_trace, save_trace

PROMPT = "ROMEO: good night"  # the byte tokenizer: one token per byte
N_NEW = 8


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> tuple[Path, Path]:
    """Two Qwen3-MoE checkpoints of the same shapes (weights normalised per token), other weights."""
    made = (save_checkpoint("qwen3_moe", tmp_path_factory.mktemp(f"qwen3_seed{seed}"), seed=seed) for seed in (0, 1))
    return tuple(made)


@pytest.fixture(scope="module")
def recorded(qwen3, tmp_path_factory) -> tuple[Path, RoutingTrace, list[str]]:
    """The first model's own greedy run: its trace file, the trace and the text."""
    path = tmp_path_factory.mktemp("recorded") / "a.npz"
    report = _run(qwen3[0], path)
    return path, load_trace(path), report.texts


def _run(model: Path, record: Path, replay: Path | None = None, prompt: str = PROMPT, n_new: int = N_NEW):
    options = RunOptions(
        prompts=(prompt,), model=model, max_new_tokens=n_new, device="cpu", record_trace=record, replay_trace=replay
    )
    return run(options, show_progress=False)


def synthetic_trace(n_layers: int, n_tokens: int, n_experts: int = 8, top_k: int = 2, seed: int = 0) -> RoutingTrace:
    """Uniformly random routing (ids only) in steps of 5, then 1 token each."""
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((n_layers, n_tokens, n_experts)), axis=2)[:, :, :top_k]  # [L, N, k]
    meta = TraceMeta(
        model="synthetic", n_layers=n_layers, n_experts=n_experts, top_k=top_k, n_shared_experts=0,
        hidden_size=32, intermediate_size=48, dtype="float32", provenance="test",
    )
    bounds = [0, *range(min(5, n_tokens), n_tokens + 1)]
    return RoutingTrace(meta, tuple(TraceStep(ids[:, lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])))


# ---------------------------------------------------------------------------------------------
# the replay object


def test_replay_consumes_the_token_stream_in_any_step_shapes():
    trace = synthetic_trace(3, 9)  # steps of 5, 1, 1, 1, 1 tokens
    replay = RoutingReplay(trace, source="t.npz")
    got = [replay.next_step(n) for n in (3, 4, 1)]
    assert [step.n_tokens for step in got] == [3, 4, 1] and replay.remaining == 1
    np.testing.assert_array_equal(np.concatenate([s.topk_ids for s in got], axis=1), trace.topk_ids()[:, :8])
    assert got[0].topk_weights is None and got[0].router_probs is None
    with pytest.raises(UserError, match="t.npz: the trace has 9 tokens of routing; the run needs more"):
        replay.next_step(2)


def test_replay_for_model_takes_the_first_layers_and_refuses_other_shapes():
    trace = synthetic_trace(5, 6)
    replay = RoutingReplay.for_model(trace, n_layers=3, n_experts=8, top_k=2, source="t.npz")
    np.testing.assert_array_equal(replay.next_step(6).topk_ids, trace.topk_ids()[:3])
    for shapes, message in (
        ((6, 8, 2), "the trace has 5 MoE layers, the model 6"),
        ((3, 16, 2), "top-2 of 8 experts, the model top-2 of 16"),
        ((3, 8, 3), "top-2 of 8 experts, the model top-3 of 8"),
    ):
        with pytest.raises(UserError, match=message):
            RoutingReplay.for_model(trace, *shapes, source="t.npz")


# ---------------------------------------------------------------------------------------------
# runs


def _assert_same_routing(replayed: RoutingTrace, source: RoutingTrace) -> None:
    """The replaying run recorded the source's routing, token for token (its steps may differ)."""
    n_tokens = replayed.n_tokens
    np.testing.assert_array_equal(replayed.topk_ids(), source.topk_ids()[:, :n_tokens])
    for name in ("topk_weights", "router_probs"):
        if getattr(source.steps[0], name) is not None:
            mine = np.concatenate([getattr(s, name) for s in replayed.steps], axis=1)
            theirs = np.concatenate([getattr(s, name) for s in source.steps], axis=1)[:, :n_tokens]
            np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-7)


def test_other_weights_route_as_the_trace_says(qwen3, recorded, tmp_path):
    path, source, _ = recorded
    own = load_trace(_run(qwen3[1], tmp_path / "own.npz").stats.trace_path)
    assert not np.array_equal(own.topk_ids(), source.topk_ids()), "the two models must route differently"

    report = _run(qwen3[1], tmp_path / "b.npz", replay=path)
    replayed = load_trace(tmp_path / "b.npz")
    assert replayed.step_lengths == source.step_lengths
    _assert_same_routing(replayed, source)
    assert report.stats.replay_trace == str(path) and "replayed from a.npz" in replayed.meta.provenance


def test_other_step_shapes_consume_the_same_token_stream(qwen3, recorded, tmp_path):
    path, source, _ = recorded
    prompt = "ROMEO:"  # 6 tokens instead of 17: more decode steps read the rest of the trace's prefill
    _run(qwen3[1], tmp_path / "b.npz", replay=path, prompt=prompt, n_new=source.n_tokens - len(prompt) + 1)
    replayed = load_trace(tmp_path / "b.npz")
    assert replayed.n_tokens == source.n_tokens and replayed.steps[0].n_tokens == len(prompt)
    _assert_same_routing(replayed, source)


def test_replaying_its_own_routing_changes_nothing(qwen3, recorded, tmp_path):
    path, source, texts = recorded
    report = _run(qwen3[0], tmp_path / "again.npz", replay=path)
    assert report.texts == texts


def test_unrecorded_weights_come_from_the_router_normalised_like_the_model(qwen3, recorded, tmp_path):
    path, source, _ = recorded
    ids_only = RoutingTrace(source.meta, tuple(TraceStep(step.topk_ids) for step in source.steps))
    _run(qwen3[1], tmp_path / "b.npz", replay=save_trace(ids_only, tmp_path / "ids.npz"))
    replayed = load_trace(tmp_path / "b.npz")
    _assert_same_routing(replayed, ids_only)
    for step in replayed.steps:  # Qwen3-MoE normalises its top-k weights: so do the replayed ones
        gathered = np.take_along_axis(step.router_probs, step.topk_ids.astype(np.int64), axis=2)  # [L, T, k]
        np.testing.assert_allclose(step.topk_weights, gathered / gathered.sum(axis=2, keepdims=True), rtol=1e-5)


def test_a_longer_trace_routes_the_first_layers_with_unnormalised_weights(checkpoint, tmp_path):
    source = synthetic_trace(5, 40)  # 5 MoE layers on a 3-layer model, no weights recorded
    path = save_trace(source, tmp_path / "long.npz")
    _run(checkpoint("qwen2_moe"), tmp_path / "b.npz", replay=path, prompt="ROMEO:", n_new=10)
    replayed = load_trace(tmp_path / "b.npz")
    assert replayed.meta.n_layers == 3
    _assert_same_routing(replayed, source.select_layers(range(3)))
    for step in replayed.steps:  # Qwen2-MoE here keeps the router's probabilities as weights
        gathered = np.take_along_axis(step.router_probs, step.topk_ids.astype(np.int64), axis=2)  # [L, T, k]
        np.testing.assert_allclose(step.topk_weights, gathered, rtol=1e-6)
        assert (step.topk_weights.sum(axis=2) < 0.999).all()


@pytest.mark.parametrize(
    "trace, message",
    [
        (synthetic_trace(3, 10), "has 10 tokens of routing; this run needs up to 13 (1 x 6 prompt + 1 x 7 decode tokens)"),
        (synthetic_trace(3, 40, n_experts=16), "top-2 of 16 experts, the model top-2 of 8"),
        (synthetic_trace(3, 40, top_k=3), "top-3 of 8 experts, the model top-2 of 8"),
        (synthetic_trace(2, 40), "the trace has 2 MoE layers, the model 3"),
    ],
)
def test_traces_that_cannot_route_the_run_are_refused(checkpoint, tmp_path, trace, message):
    path = save_trace(trace, tmp_path / "t.npz")
    with pytest.raises(UserError, match=re.escape(message)):
        _run(checkpoint("qwen2_moe"), None, replay=path, prompt="ROMEO:", n_new=8)


# ---------------------------------------------------------------------------------------------
# CLI

cli = CliRunner()


def test_cli_replays_and_reports_it(checkpoint, tmp_path):
    path = save_trace(synthetic_trace(3, 40), tmp_path / "t.npz")
    args = ["run", "--device", "cpu", "--model", str(checkpoint("qwen2_moe")), "--prompt", "ROMEO:", "-n", "4"]
    shown = cli.invoke(app, [*args, "--replay-trace", str(path)])
    assert shown.exit_code == 0, shown.output
    assert "Routing" in shown.stdout and "replayed from" in shown.stdout
    as_json = cli.invoke(app, [*args, "--replay-trace", str(path), "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert f'"replay_trace": "{path}"' in as_json.stdout


def test_cli_missing_replay_trace_is_one_line(checkpoint, tmp_path):
    missing = tmp_path / "nope.npz"
    args = ["run", "--device", "cpu", "--model", str(checkpoint("qwen2_moe")), "--prompt", "x"]
    result = cli.invoke(app, [*args, "--replay-trace", str(missing)])
    assert result.exit_code == 2, result.output
    assert "trace not found" in result.stderr and str(missing) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
