"""`hybrimoe serve`: an OpenAI-compatible HTTP server on the hybrid runtime, until Ctrl-C or SIGTERM."""

from __future__ import annotations

from pathlib import Path

import typer

from hybrimoe.cli import app, console, err_console, finite_positive, user_errors
from hybrimoe.cli.model_options import (
    OUT, AllowPickle, CacheExperts, CacheRatio, Device, Force, GpuMemoryGb, GroupSize, Model, Profile, Quantize,
    QuantizeDense, Strategy, Threads, TrustRemoteCode,
)

_SERVER = "Server"


@app.command()
def serve(
    model: Model = None,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    host: str = typer.Option("127.0.0.1", "--host", rich_help_panel=_SERVER, help="Address to listen on."),
    port: int = typer.Option(8000, "--port", rich_help_panel=_SERVER, help="Port to listen on (0: any free port)."),
    model_name: str | None = typer.Option(
        None, "--model-name", rich_help_panel=_SERVER,
        help="The model id clients ask for (default: the checkpoint directory's name, or demo).",
    ),
    max_batch: int = typer.Option(
        16, "--max-batch", rich_help_panel=_SERVER, help="Requests decoded together in one step, at most."
    ),
    max_queue: int = typer.Option(
        64, "--max-queue", rich_help_panel=_SERVER,
        help="Requests waiting for a place in the batch (beyond its free places), at most; more are answered 503.",
    ),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", rich_help_panel=_SERVER,
        help="New tokens per request at most, below the model's positions (and for a request that names none). "
        "Default: 512, within the model's positions.",
    ),
    shutdown_timeout: float = typer.Option(
        30.0, "--shutdown-timeout", callback=finite_positive, rich_help_panel=_SERVER,
        help="Seconds requests in flight get to finish after SIGINT/SIGTERM.",
    ),
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
        None, "--record-trace", rich_help_panel=OUT,
        help="Write the routing of every step served (.npz) here when the server stops, for `hybrimoe tune`.",
    ),
    force: Force = False,
) -> None:
    """Serve the model over HTTP with OpenAI's API (/v1/chat/completions, /v1/completions, streaming),
    batching concurrent requests into the runtime's steps; /health and /metrics (Prometheus) too."""
    with user_errors():
        from hybrimoe.run_options import RunOptions, check_options
        from hybrimoe.serve.server import ServeOptions, check_installed, check_serve_options

        options = RunOptions(
            model=model, device=device, profile=profile, strategy=strategy, cache_experts=cache_experts,
            cache_ratio=cache_ratio, gpu_memory_gb=gpu_memory_gb, threads=threads, quantize=quantize,
            group_size=group_size, quantize_dense=quantize_dense, trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle, record_trace=record_trace, overwrite_trace=force,
        )
        serve_options = ServeOptions(host=host, port=port, max_batch=max_batch, max_queue=max_queue,
                                     max_tokens=max_tokens, model_name=model_name, shutdown_timeout_s=shutdown_timeout)
        check_serve_options(serve_options)  # first: it names --max-tokens, which RunOptions calls max_new_tokens
        check_options(options)  # before torch and transformers are imported (seconds)
        check_installed()
        from hybrimoe.serve.server import serve as serve_model

        report = serve_model(options, serve_options, on_ready=_ready)
    console.print(f"served {report.n_requests} requests, {report.n_generated_tokens} tokens generated"
                  + (f"; routing trace: {report.trace_path}" if report.trace_path else ""))


def _ready(url: str, session) -> None:
    err_console.print(
        f"[bold]hybrimoe serve[/]: {session.shape.name} on {session.accelerator.describe()}, "
        f"{session.strategy}, {session.capacity} expert slots, {session.threads} CPU threads; "
        f"listening on {url} (OpenAI API at {url}/v1); Ctrl-C stops",
        highlight=False, soft_wrap=True,
    )
