"""The `hybrimoe` command line: thin shells that parse, call one library function and render.

Each sub-command lives in its own module beside this one and registers itself on `app`.
User errors (`hybrimoe.errors.UserError`) become one line on stderr and exit code 2; a traceback is
shown only with `--verbose`.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import sys
from collections.abc import Iterator

import typer
from typer._click import exceptions as click_errors  # typer vendors click: its own exception classes
from typer.core import TyperGroup, TyperOption
from rich.console import Console
from rich.text import Text

from hybrimoe import __version__
from hybrimoe.errors import UserError, printable

class OneLineErrors(TyperGroup):
    """Typer's command group, with a bad option value or a usage mistake reported like every other
    user error: one `error:` line on stderr and exit code 2 (typer would draw a box). An option
    that takes one value is refused when given twice (typer would keep the last silently)."""

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not isinstance(command, TyperGroup):
            _refuse_repeated_options(command, command.context_class(command, info_name=name, parent=ctx,
                                                                   resilient_parsing=True), rest)
        return name, command, rest

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as exc:  # the help is already shown
            sys.exit(exc.exit_code)
        except click_errors.ClickException as exc:
            command = f" (see `{exc.ctx.command_path} -h`)" if getattr(exc, "ctx", None) is not None else ""
            print_error(exc.format_message() + command)
            sys.exit(exc.exit_code)
        except typer.Abort:
            err_console.print("Aborted.")
            sys.exit(1)
        except OSError as exc:
            if exc.errno not in _OUTPUT_LOST:
                raise
            _drop_stdout()
            if exc.errno == errno.EPIPE:  # the reader stopped reading (`| head`): what it wanted, it has
                sys.exit(0)
            print_error(f"cannot write the output: {exc.strerror}")
            sys.exit(2)
        sys.exit(code if isinstance(code, int) else 0)


def _refuse_repeated_options(command, ctx, args: list[str]) -> None:
    """Parses `args` as `command` will (without running a callback) and refuses an option given a
    second time that is not repeatable: `--layers 2 --layers 3` is a slip, not a choice."""
    _, _, seen_in_order = command.make_parser(ctx).parse_args(list(args))
    seen = set()
    for param in seen_in_order:
        if isinstance(param, TyperOption) and not param.multiple and not param.count:
            if param.name in seen:
                raise click_errors.UsageError(f"{max(param.opts, key=len)} is given twice; give it once", ctx)
            seen.add(param.name)


_OUTPUT_LOST = (errno.EPIPE, errno.ENOSPC, errno.EIO)  # writing to stdout failed: a full disk, a closed pipe


def _drop_stdout() -> None:
    """Points stdout at /dev/null, so that flushing what is left at exit does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


app = typer.Typer(
    name="hybrimoe",
    cls=OneLineErrors,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    help="Hybrid CPU-GPU inference for Mixture-of-Experts models: profile, tune, simulate, run.",
)
_columns = os.environ.get("COLUMNS")
if _columns is not None and (not _columns.strip().isdigit() or int(_columns) < 1):
    del os.environ["COLUMNS"]  # rich would take a width of 0 and print nothing at all
console = Console()
err_console = Console(stderr=True)
_state = {"verbose": False}
# Loggers of libraries that transformers imports when they are installed and that warn about what a
# user cannot act on: torchao's CUDA extensions on a machine without CUDA, torch's deprecation
# notes on torchao's enums. Quiet below errors unless --verbose.
_IMPORT_NOISE_LOGGERS = ("torchao", "torch.utils._pytree")


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
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads is not None and not all(part.strip().isdigit() and int(part) > 0 for part in threads.split(",")):
        # OpenMP would print its own complaint and go on with its default
        print_error(f"OMP_NUM_THREADS={threads!r} is not a positive thread count: unset it or set it to one")
        raise typer.Exit(2)
    if not verbose:
        for name in _IMPORT_NOISE_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turns a UserError, or the system's refusal of a path the user named (a name too long for the
    file system, say), into one red line and exit code 2 (the traceback too with --verbose)."""
    try:
        yield
    except (UserError, OSError) as exc:
        if isinstance(exc, OSError) and exc.filename is None:  # not about a path: a fault, not a mistake
            raise
        if _state["verbose"]:
            err_console.print_exception()
        print_error(str(exc) if isinstance(exc, UserError) else f"{_shortened(exc.filename)}: {exc.strerror}")
        raise typer.Exit(exc.exit_code if isinstance(exc, UserError) else 2) from None


def _shortened(path: object, most: int = 120) -> str:
    text = str(path)
    return text if len(text) <= most else f"{text[: most // 2]}…{text[-most // 2:]}"


def finite_positive(value: float | None) -> float | None:
    """An option callback: a number of seconds, megabytes... must be finite and above zero (typer's
    `min=` lets nan and inf through)."""
    if value is not None and not 0 < value < float("inf"):
        raise typer.BadParameter(f"must be a finite number above 0, got {value}")
    return value


def print_error(message: str) -> None:
    """One line on stderr: "error: " and the message as plain text (never read as markup)."""
    err_console.print(Text("error: ", style="bold red") + Text(printable(" ".join(message.split()))),
                      highlight=False, soft_wrap=True)


# Modules beside this one that register sub-commands on `app`. They import torch and other heavy
# libraries inside their command functions, so `hybrimoe --help` stays fast.
_COMMAND_MODULES: tuple[str, ...] = ("trace", "simulate", "profile", "tune", "run", "serve")
for _module in _COMMAND_MODULES:
    importlib.import_module(f"hybrimoe.cli.{_module}")


def main() -> None:
    if sys.stdout is None:  # started with stdout closed (`>&-`): every report would vanish
        print_error("stdout is closed: redirect it to a file or /dev/null")
        sys.exit(2)
    for stream in (sys.stdout, sys.stderr):  # an ASCII-only locale prints "?" for what it cannot encode
        if stream is not None and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    app()
