"""Where this machine's measured profiles live: one directory, one file per machine kind and model.

`hybrimoe profile` without `--out` writes `profile_dir() / "{machine}.{model}.yaml"`; `hybrimoe run`
and `simulate` can then find this machine's profile for a model with `find_profile`.

Design choices:
- The directory is `$HYBRIMOE_PROFILE_DIR`, else `$XDG_DATA_HOME/hybrimoe/profiles`, else
  `~/.local/share/hybrimoe/profiles`: measurements are user data that outlive an install, and
  the variable lets tests, containers and shared clusters point elsewhere.
- A file is named by the machine kind, not the host: `nvidia-h200` (the GPU's name, slugged, as
  `profile_name` in `hybrimoe.profile.run` does) or `cpu-standin-{cores}core` (the runtime's CPU
  stand-in accelerator on a machine without a GPU), so a profile carries over to identical machines
  and a different GPU on the same host never picks up the wrong one.
- Slugs are lower case, `[a-z0-9._-]` only, so every key is a safe file name on any file system.
- No torch at module level: `this_machine_key` imports it only to ask for the CUDA device's name,
  so finding a profile costs nothing where no GPU is involved.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PROFILE_DIR_ENV = "HYBRIMOE_PROFILE_DIR"


def profile_dir() -> Path:
    """`$HYBRIMOE_PROFILE_DIR`, else `$XDG_DATA_HOME/hybrimoe/profiles`, else `~/.local/share/hybrimoe/profiles`."""
    explicit = os.environ.get(PROFILE_DIR_ENV)
    if explicit:
        directory = Path(explicit).expanduser()
        if directory.exists() and not directory.is_dir():
            from hybrimoe.errors import UserError

            raise UserError(f"${PROFILE_DIR_ENV} is {directory}, which is not a directory")
        return directory
    data_home = os.environ.get("XDG_DATA_HOME")
    base = Path(data_home).expanduser() if data_home else Path.home() / ".local" / "share"
    return base / "hybrimoe" / "profiles"


def _slug(text: str, fallback: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.")
    return slug or fallback


def model_slug(model: str) -> str:
    """A model name as a file-name part: 'Qwen/Qwen3-30B-A3B' -> 'qwen-qwen3-30b-a3b'."""
    return _slug(model, "model")


def machine_key(gpu_name: str | None, cores: int | None) -> str:
    """The machine kind: the GPU's name slugged ('NVIDIA H200' -> 'nvidia-h200'), or without a GPU
    the CPU stand-in accelerator on this many cores ('cpu-standin-2core')."""
    if gpu_name:
        return _slug(gpu_name, "gpu")
    return f"cpu-standin-{max(1, cores or 1)}core"


def this_machine_key(device: str) -> str:
    """The machine kind that `device` ('cpu', 'cuda' or 'cuda:N') runs on here."""
    import torch

    from hybrimoe.errors import UserError
    from hybrimoe.run_options import check_device

    check_device(device)
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r}: no CUDA device is available to torch {torch.__version__}")
        return machine_key(torch.cuda.get_device_name(dev), os.cpu_count())
    return machine_key(None, os.cpu_count())


def profile_model_name(model: str, quantize: str | None, group_size: int | None) -> str:
    """The name a model's profile is filed under: quantized experts have profiles of their own
    ('qwen3-30b-a3b.int4g128')."""
    return model if quantize is None else f"{model}.{quantize}g{group_size}"


def default_profile_path(machine: str, model: str) -> Path:
    """Where `hybrimoe profile` saves, and `find_profile` looks for, `machine`'s profile of `model`."""
    return profile_dir() / f"{machine}.{model_slug(model)}.yaml"


def find_profile(machine: str, model: str) -> Path | None:
    """`machine`'s saved profile of `model`, or None when it has not been profiled."""
    path = default_profile_path(machine, model)
    return path if path.is_file() else None


def find_profile_for_experts(machine: str, expert_shape) -> tuple[Path | None, list[str]]:
    """`machine`'s saved profile for experts of `expert_shape` (any model), the newest first, for a
    trace, whose model may be named otherwise than the directory `hybrimoe profile` measured; and
    why each of `machine`'s saved profiles that could not be read was refused."""
    from hybrimoe.config import load_profile
    from hybrimoe.errors import ProfileError

    candidates = sorted(profile_dir().glob(f"{machine}.*.yaml"), key=lambda p: p.stat().st_mtime, reverse=True)
    unreadable = []
    for path in candidates:
        try:
            profile = load_profile(path)
        except ProfileError as exc:
            unreadable.append(str(exc))
            continue
        try:
            profile.check_expert_shape(expert_shape)
        except ProfileError:
            continue
        return path, unreadable
    return None, unreadable


def this_machines_profile_for(expert_shape) -> Path:
    """The profile `hybrimoe profile` saved on this machine for experts of `expert_shape`
    (`hybrimoe simulate` without --profile); a UserError saying how to make one when there is none,
    and which saved profile could not be read. With no profile saved at all, that is said before
    torch is imported to name this machine's kind (seconds)."""
    from hybrimoe.errors import UserError

    how = "" if expert_shape.quantize is None else f" --quantize {expert_shape.quantize} --group-size {expert_shape.group_size}"
    make_one = f"run `hybrimoe profile --model DIR{how}` (or `--preset NAME`) for the trace's model, or pass --profile"
    directory = profile_dir()
    if not any(directory.glob("*.yaml")):
        raise UserError(f"no profile saved in {directory}: {make_one}")
    import torch

    machine = this_machine_key("cuda" if torch.cuda.is_available() else "cpu")
    path, unreadable = find_profile_for_experts(machine, expert_shape)
    if path is None:
        broken = f" (of the saved ones, {len(unreadable)} could not be read: {unreadable[0]})" if unreadable else ""
        raise UserError(f"no profile of this machine ({machine}) for experts {expert_shape.describe()}{broken}: "
                        f"{make_one}")
    return path
