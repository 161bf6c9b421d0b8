"""`hybrimoe simulate` from the command line: with a profile, and with this machine's by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hybrimoe.cli import app
from hybrimoe.config import save_profile
from hybrimoe.profile.directory import default_profile_path, this_machine_key
from hybrimoe.profile.estimate import estimate_for_this_machine
from hybrimoe.shapes import get_preset

REPO = Path(__file__).resolve().parent.parent
TRACE = str(REPO / "traces" / "qwen3-30b-a3b.npz")
SMALL = ["--max-tokens", "8", "--mode", "decode", "--cache-ratio", "0.5", "--strategies", "hybrimoe,cpu-only"]
runner = CliRunner()


def test_simulate_with_a_profile():
    profile = str(REPO / "profiles" / "rtx4090-desktop.qwen3-30b-a3b.yaml")
    result = runner.invoke(app, ["simulate", "--trace", TRACE, "--profile", profile, *SMALL])
    assert result.exit_code == 0, result.output
    assert "hybrimoe" in result.output and "cpu-only" in result.output


def test_simulate_takes_this_machines_profile_by_default():
    missing = runner.invoke(app, ["simulate", "--trace", TRACE, *SMALL])
    assert missing.exit_code == 2 and "no profile saved in" in missing.output
    path = default_profile_path(this_machine_key("cpu"), "qwen3-30b-a3b")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_profile(estimate_for_this_machine(get_preset("qwen3-30b-a3b"), "cpu"), path)
    result = runner.invoke(app, ["simulate", "--trace", TRACE, *SMALL])
    assert result.exit_code == 0, result.output
    assert "this machine's" in result.output


PROFILE = str(REPO / "profiles" / "rtx4090-desktop.qwen3-30b-a3b.yaml")
BATCH2 = str(REPO / "traces" / "qwen3-30b-a3b-batch2.npz")


def test_placement_learned_on_another_trace_as_markdown():
    args = ["simulate", "--trace", TRACE, "--profile", PROFILE, "--profiling-trace", BATCH2, "--max-tokens", "8",
            "--mode", "decode", "--cache-ratio", "0.25", "--strategies", "hybrimoe,ktransformers,llamacpp-lru",
            "--baseline", "lru_inserts=4", "--markdown"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"placement learned on {BATCH2} (1983 tokens)" in result.output
    assert "| **hybrimoe** |" in result.output and "| llamacpp-lru |" in result.output
    assert result.output.count("*") >= 1 + 4  # the best baseline's star, hybrimoe's bold


def test_bad_baseline_settings_are_one_line_errors():
    for setting, message in [("warp=3", "KEY one of"), ("lru_inserts=two", "takes a whole number"),
                             ("eviction=static", "eviction must be one of"),
                             ("lru_cpu_layers=2", "llamacpp-lru at 50% cache: llamacpp-lru with 2 CPU layers")]:
        result = runner.invoke(app, ["simulate", "--trace", TRACE, "--profile", PROFILE, *SMALL, "--strategies",
                                     "llamacpp-lru", "--baseline", setting])
        assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize("mode, ratios", [("prefill", "0.25,0.5,0.75"), ("decode", "0.25,0.5,0.75"),
                                          ("decode", "0.1,0.25,0.35,0.5,0.75")])
def test_the_table_reads_at_80_columns(mode, ratios):
    prompts = ["--prefill-tokens", "4"] if mode == "prefill" else []
    result = runner.invoke(app, ["simulate", "--trace", TRACE, "--profile", PROFILE, "--max-tokens", "40",
                                 "--mode", mode, *prompts, "--cache-ratio", ratios],
                           env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert all(len(line) <= 80 for line in result.output.splitlines())
    assert "…" not in result.output
    for strategy in ("ktransformers-dynamic", "llamacpp-lru", "static-oracle"):
        assert f"{strategy} " in result.output


def test_formats_side_by_side_with_what_they_take():
    """One trace, the bfloat16 and int4 estimates of one machine: a table each, in its format."""
    profiles = [str(REPO / "profiles" / f"rtx4090-desktop.qwen3-30b-a3b{suffix}.yaml") for suffix in ("", ".int4g128")]
    result = runner.invoke(app, ["simulate", "--trace", TRACE, "--profile", profiles[0], "--profile", profiles[1],
                                 *SMALL, "--markdown"])
    assert result.exit_code == 0, result.output
    assert "experts kept as bfloat16: 9.00 MiB each, 54.00 GiB for all 6144" in result.output
    assert "experts kept as int4 g128: 2.32 MiB each, 13.92 GiB for all 6144" in result.output
    assert "6.96 GiB at 50%" in result.output  # the int4 cache at half the experts


def test_repeated_strategies_add_up():
    result = runner.invoke(app, ["simulate", "--trace", TRACE, "--profile", PROFILE, "--max-tokens", "16", "--mode",
                                 "decode", "--cache-ratio", "0.25", "--strategies", "hybrimoe", "--strategies",
                                 "llamacpp", "--json"])
    assert result.exit_code == 0, result.output
    assert {row["strategy"] for row in json.loads(result.stdout)[0]["results"]} >= {"hybrimoe", "llamacpp"}


def test_cache_sizes_that_do_not_fit_the_card_are_marked_in_every_format():
    """On the RTX 4090 (24 GiB) the 50% and 75% caches need 27.0 and 40.5 GiB of experts."""
    args = ["simulate", "--trace", TRACE, "--profile", PROFILE, "--max-tokens", "8", "--mode", "decode",
            "--strategies", "hybrimoe,ktransformers"]
    text = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert text.exit_code == 0, text.output
    assert "25% cache " in text.output and "50% cache†" in text.output and "75% cache†" in text.output
    markdown = runner.invoke(app, [*args, "--markdown"]).output  # the caption wraps at the table's width
    assert "| strategy | 25% cache | 50% cache† | 75% cache† |" in markdown
    assert "†: does not fit (27.0, 40.5 GiB of experts)" in markdown and "hold 2248 experts (37%)" in markdown
    assert "hybrimoe vs the best baseline, cache sizes that fit:" in markdown
    rows = json.loads(runner.invoke(app, [*args, "--json"]).stdout)[0]
    assert {(row["cache_ratio"], row["fits"]) for row in rows["results"]} == {(0.25, True), (0.5, False), (0.75, False)}
    assert rows["max_slots"] == 2248


def test_a_prompt_longer_than_the_replay_is_said():
    result = runner.invoke(app, ["simulate", "--trace", TRACE, "--profile", PROFILE, "--max-tokens", "40", "--mode",
                                 "prefill", "--prefill-tokens", "100000", "--cache-ratio", "0.25", "--strategies",
                                 "hybrimoe", "--markdown"])
    assert result.exit_code == 0, result.output
    assert "(40 tokens replayed as one prompt, fewer than --prefill-tokens asked," in result.output
