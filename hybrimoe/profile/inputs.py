"""Which model shapes to profile: a preset, a model's `config.json`, or explicit sizes.

Design choices:
- Only `config.json` is read, never weights, so a model can be profiled before it is downloaded.
  A `.gguf` file gives its shape from its header (`gguf_header.py`); its layers are not built and
  timed (there is no transformers config), as for a preset.
- At most one source is accepted (none means the embedded demo model); partial or ambiguous input
  is a `UserError` naming the flags.
- A model is named by its directory (the demo model: `demo`), as `hybrimoe run` names it, so a
  profile saved for this machine is found again by the run.
- Explicit sizes make a one-layer shape with 8 experts, top-2 and 128-wide heads: enough for the
  expert curves, and a plausible dense stand-in.
- No torch here, so `hybrimoe profile --estimate` stays light.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hybrimoe.config import DEFAULT_GROUP_SIZE
from hybrimoe.demo import demo_model_path
from hybrimoe.errors import UserError
from hybrimoe.files import read_json
from hybrimoe.gguf_header import is_gguf_path, read_gguf
from hybrimoe.shapes import ModelShape, get_preset, shape_from_hf_config


MAX_EXPERT_BYTES = 16 << 30  # far beyond any MoE expert today (Mixtral's: 336 MiB in bfloat16)


def resolve_model(
    model_path: Path | None = None,
    preset: str | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> ModelShape:
    """The shapes to profile, from at most one of: a model's config.json, a preset, explicit sizes;
    none given means the demo model. `quantize`: its experts kept as int8 or int4 (groups of
    `group_size` weights), as `hybrimoe run --quantize` keeps them."""
    shape = _unquantized(model_path, preset, hidden_size, intermediate_size, dtype)
    expert_bytes = shape.expert_shape().expert_bytes
    if expert_bytes > MAX_EXPERT_BYTES:
        raise UserError(
            f"an expert of hidden size {shape.hidden_size} x intermediate size {shape.intermediate_size} takes "
            f"{expert_bytes / 2**30:,.0f} GiB; hybrimoe profiles experts of at most {MAX_EXPERT_BYTES >> 30} GiB"
        )
    if quantize is None:
        return shape
    shape = shape.quantized(quantize, group_size)
    shape.expert_shape()  # refuses a format or group size these experts cannot have
    return shape


def _unquantized(
    model_path: Path | None, preset: str | None, hidden_size: int | None, intermediate_size: int | None,
    dtype: str | None,
) -> ModelShape:
    explicit = hidden_size is not None or intermediate_size is not None
    given = [name for name, on in (("--model", model_path is not None), ("--preset", preset is not None),
                                   ("--hidden-size", explicit)) if on]
    if len(given) > 1:
        raise UserError(
            "give one of --model PATH, --preset NAME or --hidden-size with --intermediate-size "
            f"(got {' and '.join(given)})"
        )
    if not given:
        return _shape_from_config(demo_model_path() / "config.json", "demo", dtype)
    if is_gguf_path(model_path):
        return read_gguf(model_path, dtype).shape
    if model_path is not None:
        config_path = model_config_path(model_path)
        return _shape_from_config(config_path, config_path.parent.name or "model", dtype)
    if preset is not None:
        shape = get_preset(preset)
        return shape if dtype is None else dataclasses.replace(shape, dtype=dtype)
    if hidden_size is None or intermediate_size is None:
        raise UserError("--hidden-size and --intermediate-size go together")
    n_heads = max(1, hidden_size // 128)
    return ModelShape(
        name=f"custom-{hidden_size}x{intermediate_size}",
        n_layers=1, n_dense_layers=0, n_experts=8, top_k=2, n_shared_experts=0,
        hidden_size=hidden_size, intermediate_size=intermediate_size, shared_intermediate_size=0,
        n_heads=n_heads, n_kv_heads=n_heads, head_dim=max(1, hidden_size // n_heads), vocab_size=32000,
        dtype=dtype or "bfloat16",
    )


def config_to_measure(
    model_path: Path | None, preset: str | None, hidden_size: int | None, intermediate_size: int | None
) -> Path | None:
    """The config.json whose model `hybrimoe profile` also measures: `--model`'s, or the demo
    model's when no source is given; None for shapes alone (a preset or explicit sizes)."""
    if preset is not None or hidden_size is not None or intermediate_size is not None or is_gguf_path(model_path):
        return None
    return model_config_path(model_path)


def model_config_path(model_path: Path | None) -> Path:
    """The config.json of `--model PATH` (a directory or the file itself); the demo model's for None."""
    if model_path is None:
        return demo_model_path() / "config.json"
    config_path = model_path / "config.json" if model_path.is_dir() else model_path
    if not config_path.is_file():
        raise UserError(f"no config.json at {model_path}")
    return config_path


def _shape_from_config(config_path: Path, name: str, dtype: str | None) -> ModelShape:
    config = read_json(config_path, "config")
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: expected a JSON object")
    try:
        return shape_from_hf_config(config, name=name, dtype=dtype)
    except UserError as exc:
        raise UserError(f"{config_path}: {exc}") from None
