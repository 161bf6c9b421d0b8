"""`hybrimoe tune`: Optuna chooses the policy for this machine and this workload; writes a tuned profile."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from hybrimoe.capacity import DEFAULT_CONTEXT_TOKENS
from hybrimoe.config import DEFAULT_GROUP_SIZE
from hybrimoe.files import real_path
from hybrimoe.cli import app, console, err_console, finite_positive, user_errors

_WORK = "Workload"
_BUDGET = "Budget"
_SEARCH = "Search"
_OUT = "Output"
_CHECK = "Check on the runtime"


@app.command()
def tune(
    traces: list[Path] = typer.Option(
        [], "--trace", rich_help_panel=_WORK, help="Routing trace (.npz) to tune on; repeat for several (one model). [required]"
    ),
    out: Path = typer.Option(..., "--out", rich_help_panel=_OUT, help="Where to write the tuned profile (YAML)."),
    profiles: list[Path] = typer.Option(
        [], "--profile", rich_help_panel=_WORK,
        help="Hardware profile to tune for (default: this machine's, for the traces' experts). With "
        "--allow-quantize, repeat it for each format's profile (default: this machine's for that format).",
    ),
    allow_quantize: str | None = typer.Option(
        None, "--allow-quantize", rich_help_panel=_WORK,
        help="Quality budget: the formats the experts may be kept in besides the checkpoint's, e.g. int8,int4 "
        "(`run --quantize`); each is a study of its own (--trials each) at the same budget, and the fastest "
        "on the holdout is written.",
    ),
    group_size: int | None = typer.Option(None, "--group-size", min=2, rich_help_panel=_WORK, help=f"Weights per scale, with --allow-quantize (default {DEFAULT_GROUP_SIZE})."),
    holdout: list[Path] = typer.Option(
        [], "--holdout", rich_help_panel=_WORK, help="Trace never seen by the search, to check the result on; repeatable.",
    ),
    holdout_split: float | None = typer.Option(
        None, "--holdout-split", rich_help_panel=_WORK,
        help="Hold out this last fraction of every trace's tokens instead (default 0.3 without --holdout; 0: none).",
    ),
    profiling_trace: list[Path] = typer.Option(
        [], "--profiling-trace", rich_help_panel=_WORK,
        help="Count the expert frequencies (warm start, frequency-placed baselines) on this trace instead of "
        "on the first quarter of each --trace, which are then replayed whole; repeatable.",
    ),
    objective: str = typer.Option(
        "weighted", "--objective", rich_help_panel=_WORK,
        help="decode (ms/token), prefill (TTFT) or weighted (a request: TTFT + --decode-tokens tokens).",
    ),
    decode_tokens: int | None = typer.Option(None, "--decode-tokens", rich_help_panel=_WORK, help="Generated tokens per prompt, for weighted (default 256)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, rich_help_panel=_WORK, help="Replay at most this many tokens of each trace."),
    gpu_memory_gb: float | None = typer.Option(
        None, "--gpu-memory-gb", rich_help_panel=_BUDGET,
        help="Accelerator memory: the dense weights, a reserve and the KV cache first, then expert slots "
        "(the capacity is searched up to what fits).",
    ),
    context: int | None = typer.Option(None, "--context", rich_help_panel=_BUDGET, help=f"KV-cache tokens per sequence, with --gpu-memory-gb (default {DEFAULT_CONTEXT_TOKENS})."),
    batch: int | None = typer.Option(None, "--batch", rich_help_panel=_BUDGET, help="Sequences, with --gpu-memory-gb (default 1)."),
    model: Path | None = typer.Option(
        None, "--model", rich_help_panel=_BUDGET,
        help="Model directory: its config.json sizes the dense weights for --gpu-memory-gb and numbers the layers "
        "for --export (default: a preset matching the trace), and --measure-top runs it (default: the demo model). "
        "Or a .gguf file: its header's tensor types and bytes size the budget and the exports (llama.cpp's bytes).",
    ),
    cache_ratio: float | None = typer.Option(
        None, "--cache-ratio", rich_help_panel=_BUDGET, help="Fix the cache at this fraction of all routed experts."
    ),
    cache_experts: int | None = typer.Option(None, "--cache-experts", rich_help_panel=_BUDGET, help="Fix the cache at this many experts."),
    trials: int | None = typer.Option(100, "--trials", rich_help_panel=_SEARCH, help="Trials in the study in all (a rerun completes it)."),
    timeout: float | None = typer.Option(None, "--timeout", callback=finite_positive, rich_help_panel=_SEARCH, help="Stop starting trials after this many seconds (whichever of --trials and --timeout comes first)."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, rich_help_panel=_SEARCH, help="Sampler seed."),
    workers: int = typer.Option(1, "--workers", rich_help_panel=_SEARCH, help="Local worker processes."),
    storage: str | None = typer.Option(
        None, "--storage", rich_help_panel=_SEARCH,
        help="Optuna storage URL (e.g. postgresql://user@host/db, shared by several machines), or `memory` "
        "(default: SQLite beside --out, so a rerun resumes).",
    ),
    pareto: bool = typer.Option(False, "--pareto", rich_help_panel=_SEARCH, help="Two objectives: time and expert-cache memory; print the Pareto front."),
    force: bool = typer.Option(False, "--force", rich_help_panel=_OUT, help="Overwrite existing output files."),
    report: Path | None = typer.Option(
        None, "--report", rich_help_panel=_OUT,
        help="Directory for the trials (CSV), plots (PNG, with the `plot` extra) and an index.md.",
    ),
    export: list[str] = typer.Option(
        [], "--export", rich_help_panel=_OUT,
        help="Placement for another engine at the same budget: llamacpp (prints a llama-server command with "
        "--n-cpu-moe, and the -ot equivalent) or ktransformers (writes the profiling counts as the .pt its "
        "--init-expert-location reads, beside --out, and prints the flags); repeatable.",
    ),
    measure_top: int = typer.Option(
        0, "--measure-top", rich_help_panel=_CHECK,
        help="Run the K best simulated configs and the default on the real runtime and keep the best measured.",
    ),
    prompts: Path | None = typer.Option(
        None, "--prompts", rich_help_panel=_CHECK, help="Prompts for --measure-top, one per line (default: two short ones)."
    ),
    measure_tokens: int | None = typer.Option(None, "--measure-tokens", rich_help_panel=_CHECK, help="New tokens per prompt for --measure-top (default 32)."),
) -> None:
    """Choose the policy (cache, prefetch, warm start) for a profile by simulating routing traces."""
    with user_errors():
        from hybrimoe.config import QUANTIZE_FORMATS, load_profile
        from hybrimoe.errors import UserError
        from hybrimoe.policy.names import check_name
        from hybrimoe.tune.setup import TuneOptions
        from hybrimoe.tune.tuner import prepare, prepare_formats

        formats = () if allow_quantize is None else tuple(
            check_name("--allow-quantize format", part.strip(), QUANTIZE_FORMATS) for part in allow_quantize.split(",")
        )
        _refuse_repeats({"--allow-quantize": formats, "--export": export, "--trace": traces, "--holdout": holdout,
                         "--profiling-trace": profiling_trace})
        _refuse_unpaired({
            ("--context", "--gpu-memory-gb"): (context, gpu_memory_gb),
            ("--batch", "--gpu-memory-gb"): (batch, gpu_memory_gb),
            ("--group-size", "--allow-quantize"): (group_size, allow_quantize),
            ("--prompts", "--measure-top"): (prompts, measure_top or None),
            ("--measure-tokens", "--measure-top"): (measure_tokens, measure_top or None),
            ("--decode-tokens", "--objective weighted"): (decode_tokens, objective if objective == "weighted" else None),
        })
        if model is not None and gpu_memory_gb is None and not export and not measure_top:
            raise UserError("--model sizes --gpu-memory-gb, numbers the layers for --export and is what --measure-top "
                            "runs: give one of them, or leave --model out")
        if model is not None and measure_top and model.suffix == ".gguf":
            raise UserError("--measure-top runs the model: give its checkpoint directory as --model, not a .gguf")
        quantized = [path for path in profiles if load_profile(path).expert_shape.quantize is not None]
        plain = [path for path in profiles if path not in quantized]
        if len(plain) > 1 or (quantized and not formats):
            raise UserError("give one --profile, and more only with --allow-quantize (one per format)")
        options = TuneOptions(
            traces=tuple(traces), out=out, profile=plain[0] if plain else None, allow_quantize=formats,
            group_size=DEFAULT_GROUP_SIZE if group_size is None else group_size, format_profiles=tuple(quantized), holdout=tuple(holdout), holdout_split=holdout_split,
            objective=objective, decode_tokens=TuneOptions.decode_tokens if decode_tokens is None else decode_tokens, gpu_memory_gb=gpu_memory_gb,
            cache_ratio=cache_ratio, cache_experts=cache_experts, context_tokens=DEFAULT_CONTEXT_TOKENS if context is None else context, batch_size=1 if batch is None else batch,
            model=model, trials=trials, timeout_s=timeout, seed=seed, workers=workers, storage=storage,
            pareto=pareto, force=force, max_tokens=max_tokens, report_dir=report, exports=tuple(export),
            measure_top=measure_top, prompts=prompts, measure_tokens=TuneOptions.measure_tokens if measure_tokens is None else measure_tokens,
            profiling_traces=tuple(profiling_trace),
        )
        studies = prepare_formats(options) if formats else [prepare(options)]
        outcome, choices = _run_studies(studies, formats, trials)
    if choices:
        _render_formats(choices, outcome, objective)
    _render(outcome.result, objective)
    if outcome.measured:
        _render_measured(outcome.measured, objective)
    if outcome.llamacpp is not None:
        _render_llamacpp(outcome.llamacpp, objective)
    if outcome.ktransformers is not None:
        _render_ktransformers(outcome.ktransformers, objective)
    for path in outcome.report_files:
        console.print(f"report: {path}", highlight=False, markup=False)
    console.print(f"tuned profile written to {outcome.profile_path}", highlight=False, markup=False)


def _refuse_repeats(values_by_flag: dict[str, list | tuple]) -> None:
    """A flag given the same value twice (paths compared as the files they are) is a slip."""
    from hybrimoe.errors import UserError, first_repeated

    for flag, values in values_by_flag.items():
        repeated = first_repeated(real_path(value) if isinstance(value, Path) else value for value in values)
        if repeated is not None:
            raise UserError(f"{flag} {repeated} is given twice")


def _refuse_unpaired(given_and_needed: dict[tuple[str, str], tuple]) -> None:
    """A flag that only means something beside another, given without it."""
    from hybrimoe.errors import UserError

    for (flag, needed), (given, present) in given_and_needed.items():
        if given is not None and present is None:
            raise UserError(f"{flag} is used only with {needed}: give both, or leave {flag} out")


def _run_studies(studies, formats: tuple[str, ...], trials: int | None):
    """(outcome, each format's choice) of the prepared studies, behind a progress bar; Ctrl-C
    says what is kept and exits 130."""
    from hybrimoe.tune.tuner import tune as run_tune, tune_formats

    for inputs in studies:
        console.print(Text("study ") + Text(inputs.study_name, style="bold")
                      + Text(f" in {_storage(inputs)}; budget: {inputs.budget}"), highlight=False)
    try:
        with _progress_bar(trials) as (bar, update):
            def phase(text: str) -> None:
                bar.console.print(text, markup=False)

            if formats:
                return tune_formats(studies, on_progress=update, on_phase=phase)
            return run_tune(studies[0], on_progress=update, on_phase=phase), []
    except KeyboardInterrupt:
        inputs = studies[-1]
        kept = ("nothing is kept (in-memory storage)" if inputs.storage_url is None else
                f"the finished trials are kept in {_storage(inputs)}; rerun the same command to continue")
        err_console.print(f"interrupted: {kept}", highlight=False, markup=False)
        raise typer.Exit(130) from None


def _render_formats(choices, outcome, objective: str) -> None:
    """Each format's memory and tuned objective; the chosen one is the profile written."""
    table = Table(title="Experts' format (--allow-quantize): each tuned at the same budget", title_justify="left")
    for column in ("format", "one expert", "all experts", "expert slots", f"tuned {objective}, holdout", ""):
        table.add_column(column, justify="left" if column in ("format", "") else "right")
    for choice in choices:
        experts, n_total = choice.inputs.profile.expert_shape, choice.inputs.space.total_experts
        chosen = choice.result is outcome.result
        table.add_row(
            experts.format, f"{experts.expert_bytes / 2**20:.2f} MiB", f"{n_total * experts.expert_bytes / 2**30:.2f} GiB",
            str(choice.inputs.max_slots), _time_cell(choice.objective_ms), "chosen" if chosen else "",
            style="bold green" if chosen else None,
        )
    console.print(table)


def _storage(inputs) -> str:
    from hybrimoe.tune.study import storage_display

    return storage_display(inputs.storage_url)


class _progress_bar:
    """A rich progress bar over the study's finished trials (every worker's), with the best so far."""

    def __init__(self, target: int | None):
        self.bar = Progress(
            TextColumn("trials"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(), console=console, transient=False,
        )
        self.task = self.bar.add_task("trials", total=target, detail="")

    def __enter__(self):
        self.bar.__enter__()
        return self.bar, self.update

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def update(self, progress) -> None:
        best = "-" if progress.best_ms is None else f"{progress.best_ms:.2f} ms"
        self.bar.update(self.task, completed=progress.finished, detail=f"pruned {progress.pruned}, best {best}")


def _cell(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else f"{value:{spec}}"


def _time_cell(value_ms: float | None) -> str:
    """A time to 4-5 significant digits: whole ms from a second up."""
    return _cell(value_ms, ".0f" if value_ms is not None and value_ms >= 1000 else ".2f")


def _render(result, objective: str) -> None:
    from hybrimoe.tune.workload import UNITS

    unit = UNITS[objective]
    default = result.row("default")
    detail = "holdout" if result.tuned.holdout is not None else "train"
    table = Table(
        title=f"{unit}: tuned vs default vs baselines ({result.trials} trials, {result.pruned} pruned, "
        f"{result.trial_seconds:.0f} s of trials, {result.seconds:.0f} s this run); ms/token, TTFT and ready hit rate "
        f"on the {detail} tokens",
        title_justify="left",
        box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1), collapse_padding=True, pad_edge=False,  # 80 columns
    )
    table.add_column("config", no_wrap=True, min_width=max(len(row.config) for row in result.rows))
    table.add_column("slots", justify="right", no_wrap=True)
    for header in ("train", "x\ndef.", "hold-\nout", "x\ndef.", "ms/\ntok", "TTFT\nms", "ready\nhit"):
        table.add_column(header, justify="right", no_wrap=True)
    for row in result.rows:
        cells = [str(row.slots)]
        for part in ("train", "holdout"):
            value = getattr(row, part)
            base = None if default is None else getattr(default, part)
            speedup = None if value is None or base is None else base.objective_ms / value.objective_ms
            cells += [_time_cell(None if value is None else value.objective_ms), _cell(speedup) + ("x" if speedup else "")]
        shown = getattr(row, detail)
        cells += [_time_cell(shown.decode_ms_per_token), _time_cell(shown.ttft_ms), f"{shown.ready_hit_rate:.0%}"]
        table.add_row(row.config, *cells, style="bold green" if row.config == "tuned" else None)
    console.print(table)
    console.print(f"tuned policy: {_describe(result.tuned)}", highlight=False)
    if result.importances:
        importances = Table(title="parameter importances (Optuna)", title_justify="left")
        importances.add_column("knob")
        importances.add_column("importance", justify="right")
        for name, value in result.importances.items():
            importances.add_row(name, f"{value:.2f}")
        console.print(importances)
    top = Table(title=f"top {len(result.top)} configurations (train)", title_justify="left")
    top.add_column("trial")
    top.add_column(unit, justify="right")
    top.add_column("policy")
    for row in result.top:
        top.add_row(row.config, _cell(row.train.objective_ms), _describe(row))
    console.print(top)
    if result.pareto_front:
        front = Table(title="Pareto front: time against expert-cache memory", title_justify="left")
        front.add_column("slots", justify="right")
        front.add_column(unit, justify="right")
        front.add_column("policy")
        for row in result.pareto_front:
            front.add_row(str(row.slots), _cell(row.train.objective_ms), _describe(row))
        console.print(front)


def _render_measured(measured, objective: str) -> None:
    from hybrimoe.tune.workload import UNITS

    unit = UNITS[objective]
    table = Table(title="measured on the runtime (medians); the best measured is the tuned policy", title_justify="left")
    for name in ("trial", f"simulated {unit}", f"predicted {unit}", f"measured {unit}", "measured/predicted", "policy"):
        table.add_column(name, justify="left" if name in ("trial", "policy") else "right")
    best = min(measured, key=lambda m: m.measured_ms)
    for m in measured:
        ratio = None if not m.predicted_ms else m.measured_ms / m.predicted_ms
        table.add_row(m.row.config, _cell(m.row.train.objective_ms), _cell(m.predicted_ms), _cell(m.measured_ms),
                      _cell(ratio), _describe(m.row), style="bold green" if m is best else None)
    console.print(table)


def _render_llamacpp(placement, objective: str) -> None:
    from hybrimoe.tune.workload import UNITS

    def say(text: str) -> None:
        console.print(text, highlight=False, markup=False, soft_wrap=True)

    simulated = "-" if placement.baseline is None else f"{placement.baseline.train.objective_ms:.2f}"
    layers = (f"the experts of the first {placement.n_cpu_moe_layers} MoE layers (blocks "
              f"{_blocks(placement.cpu_blocks)}) on the CPU" if placement.cpu_blocks else "every expert on the GPU")
    say(f"llama.cpp at this budget: {layers}; {placement.gpu_expert_bytes / 2**30:.2f} GiB of experts on the GPU, "
        f"in {placement.expert_room_bytes / 2**30:.2f} GiB left for them")
    say(f"  {placement.command}")
    if placement.override:
        say(f"  or, instead of --n-cpu-moe: -ot '{placement.override}'")
    say(f"  simulated {simulated} {UNITS[objective]}, against {placement.tuned.train.objective_ms:.2f} for the tuned "
        "hybrimoe policy")
    say("  --fit leaves this placement as it is: with -ngl or tensor overrides set, llama.cpp's fitting gives up "
        "(common/fit.cpp: 'already set by user') and warns")


def _render_ktransformers(placement, objective: str) -> None:
    from hybrimoe.tune.workload import UNITS

    def say(text: str) -> None:
        console.print(text, highlight=False, markup=False, soft_wrap=True)

    simulated = "-" if placement.baseline is None else f"{placement.baseline.train.objective_ms:.2f}"
    say(f"kTransformers at this budget: the {len(placement.resident)} most frequent experts on the GPU; counts "
        f"written to {placement.path}")
    say(f"  {placement.command()}")
    say(f"  simulated {simulated} {UNITS[objective]} (ktransformers), against "
        f"{placement.tuned.train.objective_ms:.2f} for the tuned hybrimoe policy; `kt run` adds "
        "--kt-enable-dynamic-expert-update when configured interactively, which redistributes the GPU "
        "experts while serving (simulated as ktransformers-dynamic): the file then only sets the start")


def _blocks(blocks: tuple[int, ...]) -> str:
    """Block numbers in words: "0-35", or "1-26" for DeepSeek's, or a list when they are not contiguous."""
    if list(blocks) == list(range(blocks[0], blocks[-1] + 1)):
        return f"{blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else str(blocks[0])
    return ",".join(map(str, blocks))


def _describe(row) -> str:
    p = row.policy
    cache = f"{p.cache_policy}" + (f" (decay {p.mrs_alpha:g}, top-p {p.mrs_top_p})" if p.cache_policy == "mrs" else "")
    if p.prefetch == "none" or not p.prefetch_depth:
        prefetch = "no prefetch"
    elif p.prefetch == "top-score":
        prefetch = "top-score prefetch (next layer)"
    else:
        prefetch = f"{p.prefetch} prefetch depth {p.prefetch_depth}"
    return f"{row.slots} slots, {p.cache_layout} {cache}, {prefetch}, warm start {'on' if p.warm_start else 'off'}"
