"""`hybrimoe simulate`: every strategy side by side on a routing trace and a hardware profile."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer
from rich.table import Table

from hybrimoe.cli import app, console, user_errors
from hybrimoe.errors import UserError
from hybrimoe.policy.strategies import STRATEGIES


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@app.command()
def simulate(
    trace: Path = typer.Option(..., "--trace", help="Routing trace (.npz) from `hybrimoe trace import` or `run --record-trace`."),
    profile: Path | None = typer.Option(
        None, "--profile",
        help="Hardware profile (YAML): measured, estimated or tuned (default: this machine's, from "
        "`hybrimoe profile`, for the trace's experts).",
    ),
    cache_ratio: str = typer.Option("0.25,0.5,0.75", "--cache-ratio", help="Comma-separated cache sizes, as fractions of all routed experts."),
    strategies: str = typer.Option(",".join(STRATEGIES), "--strategies", help="Comma-separated strategies to compare."),
    modes: str = typer.Option("decode,prefill", "--mode", help="decode, prefill, or both."),
    accelerator_from: Path | None = typer.Option(None, "--accelerator-from", help="Take the accelerator section from this profile (what-if planning on a CPU-only profile)."),
    predictor: str = typer.Option("recent", "--predictor", help="Routing prediction for prefetch: recorded, recent or oracle."),
    profile_split: float = typer.Option(0.25, "--profile-split", help="Fraction of the trace's tokens used as the profiling workload for frequency placement."),
    prefill_tokens: int = typer.Option(512, "--prefill-tokens", min=1, help="Prompt length of each simulated prefill."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="Replay at most this many tokens."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Replay a routing trace through every strategy and compare simulated latency."""
    from hybrimoe.policy.simulator import simulate_files

    with user_errors(), console.status("simulating", spinner="dots") as status:
        if profile is None:
            from hybrimoe.profile.directory import this_machines_profile_for
            from hybrimoe.trace import load_trace

            profile = this_machines_profile_for(load_trace(trace).meta.expert_shape())
            console.print(f"profile: this machine's, {profile}")
        comparisons = simulate_files(
            trace,
            profile,
            ratios=_floats(cache_ratio, "--cache-ratio"),
            strategies=_names(strategies),
            modes=_names(modes),
            accelerator_from=accelerator_from,
            predictor=predictor,
            profile_fraction=profile_split,
            prefill_tokens=prefill_tokens,
            max_tokens=max_tokens,
            progress=lambda text: status.update(f"simulating {text}"),
        )
    if json_out:
        console.print_json(json.dumps([_to_json(c) for c in comparisons]))
        return
    for comparison in comparisons:
        console.print(_table(comparison))


def _to_json(comparison) -> dict:
    data = dataclasses.asdict(comparison)
    data["results"] = [
        {**dataclasses.asdict(r), "speedup": comparison.speedup(r.strategy, r.cache_ratio)}
        for r in comparison.results.values()
    ]
    return data


def _table(comparison) -> Table:
    decode = comparison.mode == "decode"
    unit = "ms/token" if decode else "TTFT ms"
    title = (
        f"{comparison.mode}: {comparison.trace_model} on {comparison.profile_name} "
        f"({comparison.replay_tokens} tokens replayed, {comparison.profiling_tokens} profiled; "
        f"{comparison.seconds:.1f} s)"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("strategy")
    for ratio in comparison.ratios:
        table.add_column(f"{ratio:.0%} {unit}", justify="right")
        table.add_column(f"vs {comparison.baseline}", justify="right")
        table.add_column("hit", justify="right")
    strategies = dict.fromkeys(strategy for strategy, _ in comparison.results)
    for strategy in strategies:
        cells = []
        for ratio in comparison.ratios:
            result = comparison.results[(strategy, ratio)]
            speedup = comparison.speedup(strategy, ratio)
            cells += [
                f"{result.step_ms:.2f}",
                "" if speedup is None else f"{speedup:.2f}x",
                f"{result.hit_rate:.0%}",
            ]
        style = "bold green" if strategy == "hybrimoe" else ("dim" if strategy == "oracle" else None)
        table.add_row(strategy, *cells, style=style)
    if comparison.greedy_vs_exact is not None:
        mean, worst = comparison.greedy_vs_exact
        table.caption = f"HybriMoE greedy schedule vs exact optimum on sampled layers: mean {mean:.3f}x, worst {worst:.3f}x"
    return table
