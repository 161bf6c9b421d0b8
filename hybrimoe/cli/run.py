"""`hybrimoe run`: generate text with the hybrid CPU-accelerator runtime, streaming it, then a summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from hybrimoe.cli import app, console, user_errors
from hybrimoe.cli.model_options import (
    INPUT, OUT, AllowPickle, CacheExperts, CacheRatio, Device, Force, GpuMemoryGb, GroupSize, Model, Profile,
    Quantize, QuantizeDense, Strategy, Threads, TrustRemoteCode,
)

_GEN = "Generation"


def _read_prompts(prompts: list[str], prompt_file: Path | None) -> tuple[str, ...]:
    """The prompts of the batch: each --prompt (`-` reads stdin, once), or the --prompt-file."""
    from hybrimoe.errors import UserError

    if prompts and prompt_file is not None:
        raise UserError("pass --prompt or --prompt-file, not both")
    if prompts.count("-") > 1:
        raise UserError("--prompt - (stdin) can be given once")
    if prompt_file is not None:
        from hybrimoe.files import read_text

        return (_stdin_text() if prompt_file == Path("-") else read_text(prompt_file, "--prompt-file"),)
    if not prompts:
        raise UserError("give a prompt: --prompt TEXT, --prompt-file FILE, or --prompt - to read stdin")
    for prompt in prompts:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:  # bytes the locale could not decode, kept as surrogates
            raise UserError(f"--prompt is not UTF-8 text (character {exc.start})") from None
    return tuple(_stdin_text() if prompt == "-" else prompt for prompt in prompts)


def _stdin_text() -> str:
    from hybrimoe.errors import UserError
    from hybrimoe.files import MAX_TEXT_BYTES

    if sys.stdin is None:
        raise UserError("--prompt - reads the prompt from stdin, which is closed")
    data = sys.stdin.buffer.read(MAX_TEXT_BYTES + 1)
    if len(data) > MAX_TEXT_BYTES:
        raise UserError(f"the prompt on stdin is past {MAX_TEXT_BYTES >> 20} MiB; hybrimoe reads at most that")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"the prompt on stdin is not UTF-8 text (byte {exc.start})") from None


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _summary(stats) -> Panel:
    c = stats.counters
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows = [
        ("Model", f"{stats.model} ({stats.family})"),
        ("Device", stats.device),
        ("Profile", stats.profile),
        ("Strategy", stats.planner),
        ("Expert cache", f"{stats.capacity} of {stats.n_experts_total} experts ({stats.capacity_source})"),
        ("CPU threads", f"{stats.threads} for CPU experts ({stats.threads_source})"),
        ("Weights", stats.weights),
        ("Host memory", stats.host_memory),
        ("Accelerator memory", stats.accelerator_memory),
        ("Tokens", f"{stats.batch_size} x ({stats.n_prompt_tokens} prompt + {stats.n_new_tokens} new)"),
        ("Time to first token", _fmt(stats.ttft_s, ".3f", " s") + " (after a warm-up step)"),
        ("Prefill", _fmt(stats.prefill_tokens_per_s, ".1f", " tokens/s")),
        ("Decode", _fmt(stats.decode_tokens_per_s, ".2f", " tokens/s per sequence")),
        (
            "Cache hit rate",
            f"{_fmt(c.hit_rate, '.1%')} ({_fmt(c.ready_hit_rate, '.1%')} ready, "
            f"{_fmt(c.waited_hit_rate, '.1%')} waited for a copy)",
        ),
        (
            "Expert runs",
            f"{_fmt(c.cpu_share, '.1%')} CPU, {_fmt(c.accelerator_share, '.1%')} "
            + ("CPU stand-in (no accelerator)" if stats.stand_in else "accelerator"),
        ),
        (
            "Loaded",
            f"{c.bytes_loaded / 2**20:.1f} MiB ({c.demand_loads} on demand, {c.prefetch_loads} prefetched; "
            f"{c.warm_loads} before the first token)",
        ),
        ("Prefetch precision", _fmt(c.prefetch_precision, ".1%")),
        (
            "Planning",
            f"{_fmt(c.planning_us_per_layer, '.1f', ' us')} per MoE layer before its experts start, "
            f"{_fmt(c.prefetch_planning_us_per_layer, '.1f', ' us')} choosing prefetches while they run (means)",
        ),
        (
            "Simulator predicts",
            f"TTFT {_fmt(stats.simulated_ttft_s, '.3f', ' s')} (measured/predicted {_fmt(stats.ttft_ratio, '.2f')}), "
            f"decode {_fmt(stats.simulated_decode_tokens_per_s, '.2f', ' tokens/s')} "
            f"(measured/predicted time {_fmt(stats.decode_ratio, '.2f')}); same profile, routing and planner"
            + _prediction_caveat(stats),
        ),
    ]
    if stats.replay_trace:
        rows.insert(1, ("Routing", f"replayed from {stats.replay_trace}"))
    if stats.trace_path:
        rows.append(("Routing trace", stats.trace_path))
    for name, value in rows:
        table.add_row(name, value)
    return Panel(table, title="hybrimoe run", expand=False)


def _prediction_caveat(stats) -> str:
    """What the prediction is not: a measurement of this machine."""
    if stats.profile_machine:
        made = "an estimate" if stats.prediction_from_estimate else "a profile"
        return f"; from {made} for another machine ({stats.profile_machine}), so it predicts that machine, not this one"
    if stats.prediction_from_estimate:
        return "; from a built-in estimate, not this machine: `hybrimoe profile` measures it"
    return ""


@app.command()
def run(
    prompt: list[str] = typer.Option(
        [], "--prompt", "-p", rich_help_panel=INPUT,
        help="The prompt text; `-` reads it from stdin. Repeat to generate for several prompts as one batch "
        "(the first streams, the others print at the end).",
    ),
    prompt_file: Path | None = typer.Option(
        None, "--prompt-file", rich_help_panel=INPUT, help="Read the prompt from this file (`-`: stdin)."
    ),
    model: Model = None,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    replay_trace: Path | None = typer.Option(
        None, "--replay-trace", rich_help_panel=INPUT,
        help="Route every MoE layer as this recorded trace (.npz) says instead of by the model's routers "
        "(its first layers when it has more), e.g. to run random weights with a trained model's routing.",
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", rich_help_panel=_GEN, help="Tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", rich_help_panel=_GEN, help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", rich_help_panel=_GEN, help="Nucleus sampling mass (with --temperature)."),
    seed: int | None = typer.Option(None, "--seed", min=0, max=2**63 - 1, rich_help_panel=_GEN, help="Seed for sampling."),
    device: Device = None,
    profile: Profile = None,
    strategy: Strategy = "hybrimoe",
    cache_experts: CacheExperts = None,
    cache_ratio: CacheRatio = None,
    threads: Threads = None,
    gpu_memory_gb: GpuMemoryGb = None,
    quantize: Quantize = None,
    group_size: GroupSize = None,
    quantize_dense: QuantizeDense = False,
    record_trace: Path | None = typer.Option(
        None, "--record-trace", rich_help_panel=OUT, help="Write the run's routing trace (.npz) here."
    ),
    force: Force = False,
    json_out: bool = typer.Option(False, "--json", rich_help_panel=OUT, help="Print the texts and statistics as JSON only."),
) -> None:
    """Generate text with the hybrid runtime: experts on the CPU and the accelerator, planned per layer."""
    with user_errors():
        from hybrimoe.run_options import RunOptions, Sampling, check_against_config, check_options

        texts = _read_prompts(prompt, prompt_file)
        options = RunOptions(
            prompts=texts,
            model=model,
            max_new_tokens=max_new_tokens,
            sampling=Sampling(temperature=temperature, top_p=top_p, seed=seed),
            device=device,
            profile=profile,
            strategy=strategy,
            cache_experts=cache_experts,
            cache_ratio=cache_ratio,
            gpu_memory_gb=gpu_memory_gb,
            threads=threads,
            quantize=quantize,
            group_size=group_size,
            quantize_dense=quantize_dense,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            record_trace=record_trace,
            overwrite_trace=force,
            replay_trace=replay_trace,
        )
        check_options(options)  # before torch and transformers are imported (seconds)
        check_against_config(options, options.max_new_tokens, "--max-new-tokens")
        from hybrimoe.run import run as run_model

        if json_out:
            report = run_model(options, show_progress=False)
        else:
            report = run_model(
                options,
                on_start=lambda: console.print(texts[0], style="dim", end="", markup=False, highlight=False, soft_wrap=True),
                on_text=lambda piece: console.print(piece, end="", markup=False, highlight=False, soft_wrap=True),
            )
    if json_out:
        console.print_json(json.dumps({"texts": report.texts, **report.stats.to_dict()}))
        return
    console.print()
    for i, (text, generated) in enumerate(zip(texts[1:], report.texts[1:]), start=2):
        console.rule(f"sequence {i}")
        console.print(Text(text, style="dim") + Text(generated), soft_wrap=True)
    console.print(_summary(report.stats))
