"""Reading inputs and writing results, with every problem a user can cause as one line.

- `read_text` / `read_json`: a missing, unreadable, oversized or non-UTF-8 file, a directory, JSON
  nested too deeply to parse or giving a key twice becomes a UserError naming the file.
- `check_output`: before the work starts, an output path must be writable: not a directory, its
  nearest existing ancestor a writable directory, and not an existing file unless `force`.
- `write_atomically`: a temp file beside the target, then a rename, so a profile or trace is either
  complete or absent, never half-written, whatever interrupts the write; an OS error is one line.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from hybrimoe.errors import UserError, first_repeated

MAX_TEXT_BYTES = 64 << 20  # a prompt, a config, a list of prompts: far past any real one


def input_file(path: str | os.PathLike, what: str, error: type[UserError] = UserError) -> Path:
    """`path`, refused with one `error` line when it is missing or not a regular file (`what` names
    it: "profile", "trace", "prompt file", ...): a directory, or a FIFO or device, which could block
    a read forever or never end (/dev/zero), even behind a symlink."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} not found: {path}")
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise error(f"{what} {path} is not a regular file (a pipe, socket or device)")
    return path


def real_path(path: str | os.PathLike) -> Path:
    """`path` with its symbolic links followed, to tell whether two paths are one file; a link that
    loops stays as it is (`Path.resolve` raises on one)."""
    return Path(os.path.realpath(path))


def local_checkpoint(path: str | os.PathLike) -> Path:
    """A model directory given by the user, refused in one line when it is not a local directory."""
    from hybrimoe.errors import ModelError

    path = Path(path).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf" and path.is_file():
        raise ModelError(f"{path}: a GGUF file gives shapes to `profile` and `tune`; running needs the transformers "
                         "checkpoint (a directory with config.json and safetensors)")
    if path.exists():
        raise ModelError(f"{path}: not a directory; give the checkpoint's directory (config.json and safetensors)")
    raise ModelError(f"{path}: no such directory (hybrimoe loads local checkpoints only; download a hub model first)")


def read_text(path: str | os.PathLike, what: str, error: type[UserError] = UserError,
              max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of `path` (see `input_file`), without the byte order mark some editors write;
    a file past `max_bytes` is refused before it is read."""
    path = input_file(path, what, error)
    size_bytes = path.stat().st_size
    if size_bytes > max_bytes:
        raise error(f"{what} {path} is {size_bytes / 2**20:,.1f} MiB; hybrimoe reads at most "
                    f"{max_bytes / 2**20:,.0f} MiB of it")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise error(f"{what} {path}: cannot read ({exc.strerror or exc})") from None


def object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A `json.loads` object hook: a key given twice in one object is refused (JSON would keep the
    last silently, so a config's second `num_experts` would win unseen)."""
    repeated = first_repeated(key for key, _ in pairs)
    if repeated is not None:
        raise UserError(f"the key {repeated!r} is given twice (JSON keeps the last silently): keep one")
    return dict(pairs)


def parse_json(text: str, where: str) -> Any:
    """JSON from `text`; malformed or too deeply nested JSON, or an object giving a key twice, is
    one line naming `where`."""
    try:
        return json.loads(text, object_pairs_hook=object_without_repeats)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: malformed JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply to read") from None


def read_json(path: str | os.PathLike, what: str, error: type[UserError] = UserError) -> Any:
    return parse_json(read_text(path, what, error), str(path))


def check_output(path: str | os.PathLike, force: bool, flag: str) -> Path:
    """Refuses, before any work, an output path that cannot be written (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file path")
    if path.exists() and not path.is_file():  # a device, a pipe, a terminal: never replaced by a file
        raise UserError(f"{flag} {path} is not a regular file; give a file path")
    if os.path.lexists(path) and not force:  # a symbolic link that leads nowhere (a loop, a missing file) too
        raise UserError(f"{path} exists; pass --force to overwrite it")
    check_writable_dir(path.parent, f"{flag} {path}")
    return path


def check_writable_dir(directory: str | os.PathLike, what: str) -> None:
    """Refuses, before any work, a directory that cannot be written or created: its nearest existing
    ancestor (missing ones are created when written) must be a directory where a file can really be
    made: access bits pass for root even where writing fails (/proc, a read-only mount)."""
    directory = Path(directory) if str(directory) else Path(".")
    ancestor = next(p for p in (directory, *directory.parents) if p.exists())
    if not ancestor.is_dir():
        raise UserError(f"{what}: {ancestor} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        raise UserError(f"{what}: cannot write in {ancestor} ({exc.strerror or exc})") from None


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
