"""`hybrimoe trace import|info`: bring foreign routing logs into the .npz trace format, and describe one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from hybrimoe.cli import OneLineErrors, app, console, user_errors

trace_app = typer.Typer(
    cls=OneLineErrors,
    rich_markup_mode="rich",
    no_args_is_help=True,
    help="Routing traces: import foreign routing logs, describe a trace.",
)
app.add_typer(trace_app, name="trace")

_SHAPE = "Model shape (or --config)"


@trace_app.command("import")
def import_cmd(
    files: list[Path] = typer.Argument(..., help="Routing log files, read in this order."),
    out: Path = typer.Option(..., "--out", "-o", help="The .npz trace to write."),
    fmt: str = typer.Option(
        "vllm-jsonl", "--format",
        help="Input format: vllm-jsonl (one JSON line per MoE layer call) or sglang-dump (the .pt files of SGLang's "
        "--expert-distribution-recorder-mode per_token; with one file per rank, a step identical to an earlier one is "
        "dropped).",
    ),
    config: Path | None = typer.Option(
        None, "--config", help="A transformers config.json (or its checkpoint directory) giving the model shape.", rich_help_panel=_SHAPE
    ),
    model_name: str | None = typer.Option(
        None, "--model-name", help="Model name (overrides the config's _name_or_path).", rich_help_panel=_SHAPE
    ),
    layers: int | None = typer.Option(None, "--layers", help="MoE layers (vllm-jsonl: lines per step).", rich_help_panel=_SHAPE),
    experts: int | None = typer.Option(None, "--experts", help="Routed experts per layer.", rich_help_panel=_SHAPE),
    top_k: int | None = typer.Option(None, "--top-k", help="Experts activated per token.", rich_help_panel=_SHAPE),
    shared_experts: int | None = typer.Option(
        None, "--shared-experts", help="Shared experts per layer (default 0).", rich_help_panel=_SHAPE
    ),
    hidden_size: int | None = typer.Option(None, "--hidden-size", help="Model hidden size.", rich_help_panel=_SHAPE),
    intermediate_size: int | None = typer.Option(
        None, "--intermediate-size", help="Intermediate size of one routed expert.", rich_help_panel=_SHAPE
    ),
    dtype: str | None = typer.Option(
        None, "--dtype", help="Expert weight dtype (overrides the config's).", rich_help_panel=_SHAPE
    ),
    provenance: str = typer.Option("", "--provenance", help="Where the log came from (source, commit, licence)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
) -> None:
    """Import a routing log into a validated .npz trace."""
    from hybrimoe.trace import import_trace_files

    with user_errors():
        trace, n_dropped = import_trace_files(
            files, out, fmt=fmt, config_path=config, model=model_name, n_layers=layers, n_experts=experts,
            top_k=top_k, n_shared_experts=shared_experts, hidden_size=hidden_size,
            intermediate_size=intermediate_size, dtype=dtype, provenance=provenance, overwrite=force,
        )
    dropped = (f"; dropped {n_dropped} step(s) that repeat an earlier one exactly (a serving engine's idle "
               "batches)" if n_dropped else "")
    console.print(
        f"wrote {out}: {trace.n_steps} steps, {trace.n_tokens} tokens, step lengths "
        f"{_lengths(trace.step_lengths)}{dropped}",
        highlight=False, markup=False,
    )


@trace_app.command("info")
def info_cmd(
    file: Path = typer.Argument(..., help="A .npz routing trace."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Describe a trace: size, model shape, expert popularity skew and token-to-token reuse."""
    from hybrimoe.errors import printable
    from hybrimoe.trace import load_trace, trace_summary

    with user_errors():
        summary = trace_summary(load_trace(file))
    if as_json:
        console.print_json(json.dumps(dataclasses.asdict(summary)))
        return
    table = Table(title=escape(str(file)), show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("model", summary.model),
        ("steps", f"{summary.n_steps} ({summary.n_prefill_steps} multi-token, {summary.n_decode_steps} one-token)"),
        ("tokens", f"{summary.n_tokens} ({summary.n_prefill_tokens} in multi-token steps)"),
        ("layers x experts, top-k", f"{summary.n_layers} x {summary.n_experts}, top-{summary.top_k}"),
        ("shared experts", str(summary.n_shared_experts)),
        ("expert size", f"{summary.expert_bytes / 2**20:.2f} MiB"),
        ("recorded", ", ".join(name for name, present in (
            ("ids", True), ("weights", summary.has_weights), ("router probs", summary.has_router_probs),
            (f"look-ahead x{summary.lookahead_depth}", summary.lookahead_depth > 0)) if present)),
        ("top 10% / 25% experts' share", f"{summary.top10_share:.1%} / {summary.top25_share:.1%}"),
        ("Gini of expert counts", f"{summary.gini:.3f}"),
        ("top-k overlap with previous token", "n/a (one token)" if summary.reuse_overlap is None else
         f"{summary.reuse_overlap:.1%} (random routing: {summary.reuse_overlap_random:.1%})"),
        ("provenance", summary.provenance),
    ]
    for name, value in rows:
        table.add_row(name, escape(printable(value)))
    console.print(table)


def _lengths(lengths: tuple[int, ...]) -> str:
    shown = ", ".join(map(str, lengths[:8]))
    return f"[{shown}{', ...' if len(lengths) > 8 else ''}]"
