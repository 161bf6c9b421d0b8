"""Errors a user can cause: the CLI prints their message on one line and exits with code 2.

Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

_Item = TypeVar("_Item")


class UserError(Exception):
    """A problem with the user's input (path, flag, file contents, model, budget)."""

    exit_code = 2


class ProfileError(UserError):
    """A hardware profile is malformed, of another schema, or made for other expert shapes."""


class TraceError(UserError):
    """A routing trace is malformed or inconsistent with its metadata."""


class ModelError(UserError):
    """A model cannot be loaded: bad path, unsupported architecture, missing or truncated weights."""


class PolicyError(UserError, ValueError):
    """The policy core was asked for what it does not do: an unknown name, a size or setting out of
    range. The message names the setting, never a command-line flag: the CLI words flags itself."""


def first_line(exc: BaseException) -> str:
    """An exception's first line, for a one-line error. torch's refusal to unpickle other objects
    is said without its advice to allow them: a hostile file would run its code."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("Weights only load failed"):
        return "it holds Python objects besides tensors, lists, dicts and numbers, which hybrimoe never unpickles"
    return lines[0]


def printable(text: str) -> str:
    """`text` with every character a terminal would act on (escape sequences, carriage returns...)
    written as its Python escape: names and metadata from files are shown, never obeyed."""
    return "".join(char if char.isprintable() or char == " " else ascii(char)[1:-1] for char in text)


def first_repeated(items: Iterable[_Item], key: Callable[[_Item], Hashable] = lambda item: item) -> _Item | None:
    """The first of `items` whose `key` an earlier one had (a flag's value, a file's member, a JSON
    key given twice), or None."""
    seen: set[Hashable] = set()
    for item in items:
        if key(item) in seen:
            return item
        seen.add(key(item))
    return None
