"""The `hybrimoe` command line: thin shells that parse, call one library function and render.

Each sub-command lives in its own module beside this one and registers itself on `app`.
User errors (`hybrimoe.errors.UserError`) become one line on stderr and exit code 2; a traceback is
shown only with `--verbose`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import typer
from rich.console import Console

from hybrimoe import __version__
from hybrimoe.errors import UserError

app = typer.Typer(
    name="hybrimoe",
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    help="Hybrid CPU-GPU inference for Mixture-of-Experts models: profile, tune, simulate, run.",
)
console = Console()
err_console = Console(stderr=True)
_state = {"verbose": False}


def _version(value: bool) -> None:
    if value:
        console.print(f"hybrimoe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks for errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    _state["verbose"] = verbose


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turns a UserError into one red line and exit code 2 (the traceback too with --verbose)."""
    try:
        yield
    except UserError as exc:
        if _state["verbose"]:
            err_console.print_exception()
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


# Modules beside this one that register sub-commands on `app`. They import torch and other heavy
# libraries inside their command functions, so `hybrimoe --help` stays fast.
_COMMAND_MODULES: tuple[str, ...] = ("trace", "simulate", "profile", "tune", "run")
for _module in _COMMAND_MODULES:
    importlib.import_module(f"hybrimoe.cli.{_module}")


def main() -> None:
    app()
