"""`hybrimoe profile`: measure this machine's expert costs and bandwidths, fit them, write a profile.

Without `--out` the profile is saved as this machine's, in the profile directory
(`hybrimoe.profile.directory`), replacing an earlier measurement of the same machine and model.
`--estimate` lists the datasheets behind the estimated profiles; `--estimate MACHINE` builds one.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from hybrimoe.cli import app, console, err_console, finite_positive, user_errors
from hybrimoe.shapes import PRESETS

_MODEL = "Model shapes (one of)"
_RUN = "Measurement"
_OUTPUT = "Output"


@app.command()
def profile(
    machine: str | None = typer.Argument(
        None, metavar="[MACHINE]", show_default=False,
        help="With --estimate: the datasheet machine to estimate a profile for (omit it to list them).",
    ),
    model: Path | None = typer.Option(
        None, "--model", rich_help_panel=_MODEL,
        help="Model directory or its config.json (default: the demo model). Its config is read, never its "
        "weights: the model is built with random weights to time its own layers with the runtime. Or a .gguf "
        "file: its header gives the shapes (experts only, as a preset; quantized experts are timed as bfloat16 "
        "unless --dtype).",
    ),
    preset: str | None = typer.Option(
        None, "--preset", rich_help_panel=_MODEL,
        help=f"A built-in model shape, experts only: {', '.join(PRESETS)}."
    ),
    hidden_size: int | None = typer.Option(
        None, "--hidden-size", min=1, rich_help_panel=_MODEL, help="Expert hidden size (with --intermediate-size)."
    ),
    intermediate_size: int | None = typer.Option(
        None, "--intermediate-size", min=1, rich_help_panel=_MODEL, help="Expert intermediate size."
    ),
    dtype: str | None = typer.Option(
        None, "--dtype", rich_help_panel=_MODEL,
        help="Expert dtype to time: float32, float16 or bfloat16 (default: the model's).",
    ),
    quantize: str | None = typer.Option(
        None, "--quantize", rich_help_panel=_MODEL,
        help="Profile experts kept as int8 or int4, as `hybrimoe run --quantize` keeps them: the quantized "
        "kernel on the CPU and the accelerator, and the load of a packed expert.",
    ),
    group_size: int | None = typer.Option(
        None, "--group-size", min=2, rich_help_panel=_MODEL,
        help="Weights per quantization scale, with --quantize [default: 128]."
    ),
    device: str | None = typer.Option(
        None, "--device", rich_help_panel=_RUN, help="cpu or cuda (default: cuda when present)."
    ),
    threads: int | None = typer.Option(
        None, "--threads", min=1, rich_help_panel=_RUN,
        help="CPU threads for expert kernels (default: every core but one with CUDA, every core without).",
    ),
    quick: bool = typer.Option(
        False, "--quick", rich_help_panel=_RUN, help="Fewer repeats and token counts: about 30 s on an idle machine, several times less than the default."
    ),
    note: str = typer.Option("", "--note", rich_help_panel=_RUN, help="Text added to the profile's notes."),
    estimate: bool = typer.Option(
        False, "--estimate", rich_help_panel=_RUN,
        help="Do not measure: list the datasheets, or with MACHINE build an estimated profile.",
    ),
    out: Path | None = typer.Option(
        None, "--out", rich_help_panel=_OUTPUT,
        help="Write the profile here (YAML). Default: as this machine's profile for the model, in "
        "$HYBRIMOE_PROFILE_DIR, else $XDG_DATA_HOME/hybrimoe/profiles, else ~/.local/share/hybrimoe/profiles, "
        "replacing the one there.",
    ),
    force: bool = typer.Option(
        False, "--force", rich_help_panel=_OUTPUT,
        help="Overwrite an existing --out file (this machine's default profile is always replaced).",
    ),
    name: str | None = typer.Option(
        None, "--name", rich_help_panel=_OUTPUT, help="Profile name (default: from the machine and model)."
    ),
    plot: Path | None = typer.Option(
        None, "--plot", rich_help_panel=_OUTPUT, help="Also save the latency plot as a PNG image (needs matplotlib)."
    ),
    max_repeats: int | None = typer.Option(
        None, "--max-repeats", min=1, hidden=True, help="Cap timed runs per measurement (tests)."
    ),
    llc_mb: float | None = typer.Option(
        None, "--llc-mb", callback=finite_positive, rich_help_panel=_RUN,
        help="Last-level cache (MiB) that benchmarks rotate weights past (default: read from the system).",
    ),
) -> None:
    """Measure this machine for one model: expert costs, bandwidths and, with a model's config (the demo
    model by default), the rest of a step on its own layers; write the profile."""
    from hybrimoe.config import COMPUTE_DTYPES, DEFAULT_GROUP_SIZE, save_profile
    from hybrimoe.errors import UserError
    from hybrimoe.files import check_output
    from hybrimoe.profile import report
    from hybrimoe.profile.inputs import config_to_measure, resolve_model
    from hybrimoe.run_options import check_device

    with user_errors():
        if dtype is not None and dtype not in COMPUTE_DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
        if group_size is not None and quantize is None:
            raise UserError("--group-size goes with --quantize int8|int4")
        group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
        if name is not None and (not name.strip() or not name.isprintable()):
            raise UserError(f"--name must be one line of printable text, got {name!r}")
        try:
            note.encode("utf-8")
        except UnicodeEncodeError:  # bytes the locale could not decode, kept as surrogates
            raise UserError(f"--note is not UTF-8 text, got {note!r}") from None
        _check_outputs(out, plot, force, estimate)
        check_device(device)
        if estimate:
            ignored = [flag for flag, given in (("--threads", threads is not None), ("--quick", quick),
                                                ("--device", device is not None), ("--max-repeats", max_repeats is not None),
                                                ("--llc-mb", llc_mb is not None)) if given]
            if ignored:
                raise UserError(f"{ignored[0]} tunes a measurement; --estimate measures nothing: leave it out")
            _estimate(machine, out, force, name, note,
                      lambda: resolve_model(model, preset, hidden_size, intermediate_size, dtype, quantize, group_size))
            return
        if machine is not None:
            raise UserError(f"unexpected argument {machine!r}: a MACHINE goes with --estimate")

        shape = resolve_model(model, preset, hidden_size, intermediate_size, dtype, quantize, group_size)
        from hybrimoe.profile.run import ProfileOptions, default_device  # torch: seconds

        measured_on = default_device() if device is None else device
        to_default = out is None
        if to_default:
            out = check_output(_this_machines_path(measured_on, shape), True, "profile")
        if plot is not None and not report.png_available():
            err_console.print("matplotlib is not installed: --plot is skipped (pip install matplotlib)", style="yellow",
                              markup=False)
            plot = None
        options = ProfileOptions(
            model=shape,
            model_config=config_to_measure(model, preset, hidden_size, intermediate_size),
            device=measured_on,
            threads=threads,
            quick=quick,
            max_repeats=max_repeats,
            cache_bytes=None if llc_mb is None else int(llc_mb * (1 << 20)),
            name=name,
            note=note,
            command=_command_line(model, preset, hidden_size, intermediate_size, dtype, quantize,
                                  group_size if quantize else None, device, threads, quick),
        )
        result = _measure(options)
        # This machine's current measurement replaces its previous one; an explicit --out needs --force.
        replaced = to_default and out.exists()
        save_profile(result, out, overwrite=force or to_default)

    console.print(report.summary_table(result))
    console.print(report.curves_table(result))
    console.print(report.terminal_plot(result, color=console.is_terminal))
    replacing = ", replacing this machine's previous profile" if replaced else ""
    console.print(Text("profile written to ") + Text(str(out), style="bold") + Text(replacing))
    if plot is not None:
        console.print(Text("plot written to ") + Text(str(report.save_png(result, plot)), style="bold"))


def _check_outputs(out: Path | None, plot: Path | None, force: bool, estimate: bool) -> None:
    """Refuses, before any work, a profile or plot path that would fail or overwrite unasked."""
    from hybrimoe.errors import UserError
    from hybrimoe.files import check_output, real_path

    if force and out is None and plot is None:
        raise UserError("--force overwrites an existing --out or --plot file, and neither is given (this machine's "
                        "default profile is replaced without it): leave --force out")
    if out is not None:
        if out.suffix.lower() not in (".yaml", ".yml"):
            raise UserError(f"--out {out}: a profile is YAML; give a .yaml file")
        check_output(out, force, "--out")
    if plot is None:
        return
    if plot.suffix.lower() != ".png":
        raise UserError(f"--plot {plot}: the plot is a PNG image; give a .png file")
    check_output(plot, force, "--plot")
    if estimate:
        raise UserError("--plot draws a measured profile; --estimate measures nothing: leave --plot out")
    if out is not None and real_path(plot) == real_path(out):
        raise UserError(f"--plot {plot} is --out's own path: give the image a file of its own")


def _estimate(machine: str | None, out: Path | None, force: bool, name: str | None, note: str, shape_of) -> None:
    """`--estimate`: the datasheets without a MACHINE, else MACHINE's estimated profile for the
    model `shape_of()` reads, written to `out` (named `name`, `note` added to its notes)."""
    from hybrimoe.config import save_profile
    from hybrimoe.errors import UserError
    from hybrimoe.profile import report

    if machine is None:
        if out is not None or name is not None or note:
            raise UserError("--estimate with --out, --name or --note needs a MACHINE: `hybrimoe profile --estimate` "
                            "lists them")
        _print_datasheets()
        return
    from hybrimoe.profile.estimate import estimate_profile

    if out is None:
        raise UserError("--estimate MACHINE needs --out FILE")
    result = estimate_profile(machine, shape_of())
    result = dataclasses.replace(result, name=name or result.name, notes=" ".join(filter(None, (result.notes, note))))
    save_profile(result, out, overwrite=force)
    console.print(report.summary_table(result))
    console.print(Text("estimated profile written to ") + Text(str(out), style="bold"))


def _measure(options):
    """`profile_machine(options)` behind a progress bar of its measurements."""
    from hybrimoe.profile.run import profile_machine

    columns = (
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("starting", total=None)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what or "measuring", completed=done, total=total)

        return profile_machine(options, progress)


def _this_machines_path(device: str, shape) -> Path:
    """Where this machine's profile of the model (in its experts' format) goes, its directory made
    now: an unwritable one fails in a second, not after minutes of measuring."""
    from hybrimoe.errors import UserError
    from hybrimoe.profile.directory import default_profile_path, profile_model_name, this_machine_key

    out = default_profile_path(this_machine_key(device), profile_model_name(shape.name, shape.quantize, shape.group_size))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create the profile directory {out.parent} ({exc.strerror}): "
            "set HYBRIMOE_PROFILE_DIR or pass --out FILE"
        ) from None
    return out


def _command_line(model, preset, hidden_size, intermediate_size, dtype, quantize, group_size, device, threads,
                  quick) -> str:
    """The effective command, for the profile's provenance."""
    words = ["hybrimoe", "profile"]
    for flag, value in (
        ("--model", model), ("--preset", preset), ("--hidden-size", hidden_size),
        ("--intermediate-size", intermediate_size), ("--dtype", dtype), ("--quantize", quantize),
        ("--group-size", group_size), ("--device", device), ("--threads", threads),
    ):
        if value is not None:
            words += [flag, str(value)]
    if quick:
        words.append("--quick")
    return shlex.join(words)


def _print_datasheets() -> None:
    from hybrimoe.profile.estimate import MACHINES, datasheet_rows

    table = Table(title="Datasheets behind the estimated profiles", title_justify="left")
    for column in ("kind", "name", "memory", "compute", "pcie", "source"):
        table.add_column(column, overflow="fold")
    for row in datasheet_rows():
        table.add_row(*(row[c] for c in ("kind", "name", "memory", "compute", "pcie", "source")))
    console.print(table)
    machines = Table(
        title="Machines (hybrimoe profile --estimate MACHINE --preset NAME --out FILE)", title_justify="left"
    )
    machines.add_column("machine")
    machines.add_column("CPU")
    machines.add_column("GPU")
    for spec in MACHINES.values():
        machines.add_row(spec.name, spec.cpu.name, spec.gpu.name)
    console.print(machines)
