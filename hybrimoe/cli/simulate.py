"""`hybrimoe simulate`: every strategy side by side on a routing trace and a hardware profile."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path

import typer
from rich import box
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from hybrimoe.cli import app, console, err_console, user_errors
from hybrimoe.errors import UserError, first_repeated
from hybrimoe.files import real_path
from hybrimoe.policy.names import BELADY_ORACLE, LOWER_BOUND, STRATEGIES


DEFAULT_PROFILE_SPLIT = 0.25  # the trace's first quarter is the profiling workload
DEFAULT_PREFILL_TOKENS = 512  # the prompt length of each simulated prefill
MAX_PREFILL_TOKENS = 1 << 24  # past any model's positions
MAX_CACHE_SIZES = 64  # --cache-ratio values: each is a simulation of every strategy
COLUMNS_PER_TABLE = 3  # cache sizes side by side in one text table: three fit 80 columns

def _cache_ratios(texts: list[str], flag: str) -> tuple[float, ...]:
    text = ",".join(texts)
    try:
        values = tuple(float(part) for part in _names(texts, flag))
    except ValueError:
        raise UserError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(value) for value in values):
        raise UserError(f"{flag} takes finite numbers, got {text!r}")
    if len(values) > MAX_CACHE_SIZES:
        raise UserError(f"{flag} takes at most {MAX_CACHE_SIZES} cache sizes (each is a simulation of every "
                        f"strategy), got {len(values)}")
    return values


def _names(texts: list[str], flag: str) -> tuple[str, ...]:
    """The comma-separated names of every use of `flag`, in order; an empty item (a stray comma) or
    one given twice is refused rather than dropped."""
    parts = [part.strip() for text in texts for part in text.split(",")]
    if not parts:
        raise UserError(f"{flag} needs at least one value")
    if not all(parts):
        raise UserError(f"{flag} has an empty item in {','.join(texts)!r}")
    repeated = first_repeated(parts)
    if repeated is not None:
        raise UserError(f"{flag} names {repeated} twice")
    return tuple(parts)


def _baseline_params(settings: list[str], strategies: tuple[str, ...]):
    """`--baseline KEY=VALUE` settings as BaselineParams (values typed like the defaults); each key
    once, and only for a compared strategy that reads it."""
    from hybrimoe.policy.baselines import BaselineParams

    defaults = BaselineParams()
    fields = {field.name: field for field in dataclasses.fields(BaselineParams)}
    values = {}
    for setting in settings:
        key, _, text = setting.partition("=")
        key = key.strip().replace("-", "_")
        if key not in fields or not text.strip():
            raise UserError(f"--baseline takes KEY=VALUE with KEY one of {', '.join(fields)}, got {setting!r}")
        if key in values:
            raise UserError(f"--baseline {key} is given twice")
        users = BaselineParams.USED_BY[key]
        if not set(users) & set(strategies):
            raise UserError(f"--baseline {key} is read only by {' and '.join(users)}, which --strategies leaves out")
        default = getattr(defaults, key)
        try:
            if isinstance(default, str):
                values[key] = text.strip()
            elif isinstance(default, float):
                values[key] = float(text)
            else:
                values[key] = int(text)
        except ValueError:
            kind = "a number" if isinstance(default, float) else "a whole number"
            raise UserError(f"--baseline {key} takes {kind}, got {text!r}") from None
    try:
        return BaselineParams(**values)
    except ValueError as exc:
        raise UserError(f"--baseline: {exc}") from None


@app.command()
def simulate(
    traces: list[Path] = typer.Option(..., "--trace", help="Routing trace (.npz) from `hybrimoe trace import` or `run --record-trace`."),
    profiles: list[Path] = typer.Option(
        [], "--profile",
        help="Hardware profile (YAML): measured, estimated or tuned (default: this machine's, from "
        "`hybrimoe profile`, for the trace's experts). Repeat it to compare profiles, e.g. the same "
        "machine's bfloat16, int8 and int4 profiles: the experts are simulated in each profile's format.",
    ),
    cache_ratio: list[str] = typer.Option(
        ["0.25,0.5,0.75"], "--cache-ratio", help="Comma-separated cache sizes, as fractions of all routed experts; repeat to add. "
        "Sizes whose experts do not fit the profile's GPU memory (after dense weights and a reserve) are marked †."
    ),
    strategies: list[str] = typer.Option(
        [",".join(STRATEGIES)], "--strategies", help="Comma-separated strategies to compare; repeat to add more."
    ),
    modes: list[str] = typer.Option(["decode,prefill"], "--mode", help="decode or prefill, or both as decode,prefill (the default); repeat to add."),
    accelerator_from: Path | None = typer.Option(None, "--accelerator-from", help="Take the accelerator section from this profile (what-if planning on a CPU-only profile)."),
    predictor: str = typer.Option("recent", "--predictor", help="Routing prediction for prefetch: recorded, recent or oracle."),
    profiling_trace: Path | None = typer.Option(
        None, "--profiling-trace",
        help="Count expert frequencies (frequency placement, warm start) on this other trace of the same model, "
        "and replay all of --trace.",
    ),
    profile_split: float | None = typer.Option(None, "--profile-split", help=f"Without --profiling-trace: the fraction of the trace's tokens used as the profiling workload (default {DEFAULT_PROFILE_SPLIT})."),
    baseline: list[str] = typer.Option(
        [], "--baseline",
        help="A baseline setting KEY=VALUE, repeatable: refresh_steps, refresh_prefill_tokens, refresh_decay "
        "(ktransformers-dynamic), lru_inserts, lru_cpu_layers (llamacpp-lru), eviction (gpu-offload, llamacpp-lru).",
    ),
    prefill_tokens: int | None = typer.Option(
        None, "--prefill-tokens", min=1, max=MAX_PREFILL_TOKENS, help=f"Prompt length of each simulated prefill (default {DEFAULT_PREFILL_TOKENS})."
    ),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="Replay at most this many tokens."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the tables as Markdown (as in the README)."),
) -> None:
    """Replay a routing trace through every strategy and compare simulated latency."""
    from hybrimoe.policy.comparison import simulate_files

    with user_errors():
        if profile_split is not None and profiling_trace is not None:
            raise UserError("--profile-split splits the trace only without --profiling-trace: give one of them")
        profile_split = DEFAULT_PROFILE_SPLIT if profile_split is None else profile_split
        if not 0.0 < profile_split < 1.0:
            raise UserError(f"--profile-split must be in (0, 1), got {profile_split}")
        if json_out and markdown:
            raise UserError("give --json or --markdown, not both")
        if len(traces) > 1:
            raise UserError("--trace is given more than once: simulate replays one trace (tune takes several)")
        trace = traces[0]
        if profiling_trace is not None and real_path(profiling_trace) == real_path(trace):
            raise UserError("--profiling-trace is the --trace: the placement would be learned on the very tokens "
                            "replayed (that is static-oracle); give another trace, or leave it out to split --trace")
        chosen_modes, chosen_strategies = _names(modes, "--mode"), _names(strategies, "--strategies")
        if prefill_tokens is not None and "prefill" not in chosen_modes:
            raise UserError("--prefill-tokens sets the prompts of --mode prefill, which is not simulated")
        prefill_tokens = DEFAULT_PREFILL_TOKENS if prefill_tokens is None else prefill_tokens
        baseline_params = _baseline_params(baseline, chosen_strategies)
        repeated = first_repeated(profiles, key=real_path)
        if repeated is not None:
            raise UserError(f"--profile {repeated} is given twice")
        if accelerator_from is not None and real_path(accelerator_from) in {real_path(path) for path in profiles}:
            raise UserError(f"--accelerator-from {accelerator_from} is a --profile itself: it would change nothing")
    with user_errors(), _cells_progress() as on_cell:
        if not profiles:
            from hybrimoe.profile.directory import this_machines_profile_for
            from hybrimoe.trace import load_trace

            profiles = [this_machines_profile_for(load_trace(trace).meta.expert_shape())]
            console.print(f"profile: this machine's, {profiles[0]}", markup=False, highlight=False)
        comparisons = [
            comparison
            for profile in profiles
            for comparison in simulate_files(
                trace,
                profile,
                ratios=_cache_ratios(cache_ratio, "--cache-ratio"),
                strategies=chosen_strategies,
                modes=chosen_modes,
                accelerator_from=accelerator_from,
                predictor=predictor,
                profile_fraction=profile_split,
                profiling_trace=profiling_trace,
                baseline=baseline_params,
                prefill_tokens=prefill_tokens,
                max_tokens=max_tokens,
                progress=on_cell,
            )
        ]
    if json_out:
        console.print_json(json.dumps([_to_json(c) for c in comparisons]))
        return
    if markdown:
        print("\n\n".join(_markdown(c) for c in comparisons))
        return
    for comparison in comparisons:
        for part in _tables(comparison):
            console.print(part)


@contextlib.contextmanager
def _cells_progress():
    """A progress bar over each comparison's cells (strategy x cache ratio, and the bound): counts,
    elapsed time and the time left, on stderr; yields the `progress(done, total, cell)` callback."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    bar = Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal)
    task = bar.add_task("simulating", total=None)

    def on_cell(done: int, total: int, cell: str) -> None:
        bar.start()  # at the first cell, so that a refusal before any work is its one line alone
        bar.update(task, completed=done, total=total, description=f"simulating {cell}")

    try:
        yield on_cell
    finally:
        if bar.live.is_started:  # stopping a bar never started still prints an empty line
            bar.stop()


def _to_json(comparison) -> dict:
    data = dataclasses.asdict(comparison)
    data["results"] = [
        {
            **dataclasses.asdict(r),
            "speedup": comparison.speedup(r.strategy, r.cache_ratio),
            "vs_best_baseline": comparison.vs_best_baseline(r.strategy, r.cache_ratio),
            "ready_hit_rate": r.ready_hit_rate,
            "fits": comparison.fits(r.cache_ratio),
        }
        for r in comparison.results.values()
    ]
    data["best_baseline"] = {str(ratio): comparison.best_baseline(ratio) for ratio in comparison.ratios}
    data["max_slots"] = None if comparison.budget is None else comparison.budget.max_slots
    data["hybrimoe_vs_best_baseline"] = comparison.vs_best_baseline_range("hybrimoe")  # [lowest, highest], fitting
    return data


_NOT_DEPLOYABLE = ("static-oracle", BELADY_ORACLE, LOWER_BOUND)  # rows drawn dim: references, not choices
_NO_FIT = "†"  # marks a cache size whose experts do not fit the profile's accelerator


def _header(comparison, ratio: float) -> str:
    return f"{ratio:.0%} cache" + ("" if comparison.fits(ratio) else _NO_FIT)


def _fit_note(comparison) -> str:
    """One line: which cache sizes do not fit the accelerator, and by what arithmetic."""
    budget = comparison.budget
    if budget is None:
        return "cache sizes not checked against accelerator memory (no card size in the profile, or no model preset)"
    share = f"{budget.max_slots / comparison.n_experts_total:.0%}" if comparison.n_experts_total else "-"
    over = [ratio for ratio in comparison.ratios if not comparison.fits(ratio)]
    if not over:
        return f"every cache size fits: {budget.describe()} ({share})"
    gib = ", ".join(f"{comparison.cache_bytes(ratio) / 2**30:.1f}" for ratio in over)
    return (
        f"{_NO_FIT}: does not fit ({gib} GiB of experts): {budget.describe()} ({share}); "
        "left out of the summary"
    )


def _waited_note(comparison) -> str:
    """One line: the hits left out of the hit rates because they waited for a copy in flight."""
    most = max(comparison.results.values(), key=lambda result: result.waited_hit_rate)
    if most.waited_hit_rate == 0:
        return "hit rate: experts resident and ready when their layer started (none waited for a copy)"
    return (
        f"hit rate: experts resident and ready when their layer started; hits that waited for a prefetch "
        f"still copying are apart, at most {most.waited_hit_rate:.1%} ({most.strategy} at {most.cache_ratio:.0%})"
    )


def _summary(comparison) -> str | None:
    """One line: hybrimoe against the best deployable baseline over the cache sizes that fit."""
    span = comparison.vs_best_baseline_range("hybrimoe")
    if span is None:
        return None
    low, high = (f"{ratio:.2f}x" for ratio in span)
    return f"hybrimoe vs the best baseline, cache sizes that fit: {low}" + ("" if high == low else f"-{high}")


def _memory(comparison) -> str:
    """What the experts take in the profile's format, whole and at each cache size."""
    gib = 2**30
    at_ratios = ", ".join(f"{comparison.cache_bytes(ratio) / gib:.2f} GiB at {ratio:.0%}" for ratio in comparison.ratios)
    return (
        f"experts kept as {comparison.expert_format}: {comparison.expert_bytes / 2**20:.2f} MiB each, "
        f"{comparison.n_experts_total * comparison.expert_bytes / gib:.2f} GiB for all {comparison.n_experts_total}; "
        f"the accelerator's expert cache takes {at_ratios}"
    )


def _replayed(comparison) -> str:
    capped = " as one prompt, fewer than --prefill-tokens asked" if comparison.prompt_capped else ""
    return f"{comparison.replay_tokens} tokens replayed{capped}"


def _profiled(comparison) -> str:
    if comparison.profiling_trace:
        return f"placement learned on {comparison.profiling_trace} ({comparison.profiling_tokens} tokens)"
    return f"placement learned on the first {comparison.profiling_tokens} tokens"


def _rows(comparison):
    """Per strategy, in the comparison's order: per cache size, (its result, "*" when it is the best
    deployable baseline there, its ratio to that baseline)."""
    best = {ratio: comparison.best_baseline(ratio) for ratio in comparison.ratios}
    for strategy in dict.fromkeys(strategy for strategy, _ in comparison.results):
        yield strategy, [
            (comparison.results[(strategy, ratio)], "*" if strategy == best[ratio] else "",
             comparison.vs_best_baseline(strategy, ratio))
            for ratio in comparison.ratios
        ]


def _markdown(comparison) -> str:
    """One Markdown table: each cell ms, ratio to the best deployable baseline (marked *), hit rate."""
    unit = "ms/token" if comparison.mode == "decode" else "TTFT ms"
    lines = [
        f"**{comparison.mode}, {comparison.profile_name}** ({_replayed(comparison)}, "
        f"{_profiled(comparison)}); each cell: {unit} (ratio to the best baseline, ready hit rate, and hits "
        "that waited for a prefetch still copying); *: the best baseline",
        "",
        _memory(comparison) + ".",
        "",
        "| strategy | " + " | ".join(_header(comparison, ratio) for ratio in comparison.ratios) + " |",
        "|---|" + "---|" * len(comparison.ratios),
    ]
    for strategy, row in _rows(comparison):
        cells = []
        for result, star, to_best in row:
            to_best_text = "" if to_best is None else f"{to_best:.2f}x, "
            waited = f" + {result.waited_hit_rate:.0%} waited" if result.waited_hit_rate >= 0.005 else ""
            cells.append(f"{result.step_ms:.2f}{star} ({to_best_text}{result.ready_hit_rate:.0%}{waited})")
        if strategy == "hybrimoe":
            cells, strategy = [f"**{cell}**" for cell in cells], f"**{strategy}**"
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    lines += ["", _fit_note(comparison) + "."]
    summary = _summary(comparison)
    if summary is not None:
        lines += ["", summary + "."]
    return "\n".join(lines)


def _tables(comparison) -> list[Table | Text]:
    """One column per cache size, each cell "time ratio-to-best hit", at most `COLUMNS_PER_TABLE`
    cache sizes a table so that each reads at 80 columns; then the notes."""
    unit = "ms/token" if comparison.mode == "decode" else "TTFT ms"
    rows = list(_rows(comparison))
    tables = []
    for first in range(0, len(comparison.ratios), COLUMNS_PER_TABLE):
        shown = range(first, min(first + COLUMNS_PER_TABLE, len(comparison.ratios)))
        table = Table(title=escape(_title(comparison)) if first == 0 else None, title_justify="left",
                      box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True, pad_edge=False)
        table.add_column("strategy", no_wrap=True)
        for i in shown:
            table.add_column(_header(comparison, comparison.ratios[i]), justify="right", no_wrap=True)
        for strategy, row in rows:
            cells = []
            for result, star, to_best in (row[i] for i in shown):
                to_best_text = "" if to_best is None else f" {to_best:.2f}x"  # fixed widths: the parts line up
                text = f"{_time(result.step_ms):>5}{star or ' '}{to_best_text} {result.ready_hit_rate:>4.0%}"
                cells.append(text if comparison.fits(result.cache_ratio) else Text(text, style="dim"))
            style = "bold green" if strategy == "hybrimoe" else ("dim" if strategy in _NOT_DEPLOYABLE else None)
            table.add_row(strategy, *cells, style=style)
        tables.append(table)
    caption = [f"each cell: {unit}, its ratio to the best baseline a user can deploy (*), hit rate",
               _waited_note(comparison), _memory(comparison), _fit_note(comparison)]
    summary = _summary(comparison)
    if summary is not None:
        caption.append(summary)
    if comparison.greedy_vs_exact is not None:
        mean, worst = comparison.greedy_vs_exact
        caption.append(f"greedy schedule vs exact optimum on sampled layers: mean {mean:.3f}x, worst {worst:.3f}x")
    return [*tables, Text("\n".join(caption))]


def _title(comparison) -> str:
    return (f"{comparison.mode}: {comparison.trace_model} on {comparison.profile_name} "
            f"({_replayed(comparison)}, {_profiled(comparison)}; {comparison.seconds:.1f} s)")


def _time(ms: float) -> str:
    """Four significant digits at most, so the cells stay narrow."""
    return f"{ms:.0f}" if ms >= 1000 else f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}"
