"""Importing foreign routing logs as traces: vLLM-style fused-MoE dumps in JSON Lines (`vllm-jsonl`)
and SGLang's expert-distribution recorder dumps (`sglang-dump`, read in `sglang.py`).

Shapes: L = MoE layers, T = tokens in one step, k = top-k.

Design choices:
- Foreign formats are imported with shape facts given explicitly (arguments or a transformers
  `config.json`), never guessed from the data; the data is checked against them.
- Every problem in a file is one `TraceError` line naming the file and the line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hybrimoe.errors import TraceError
from hybrimoe.files import check_output, read_text
from hybrimoe.trace.format import ID_DTYPE, RoutingTrace, TraceMeta, TraceStep, save_trace, trace_meta_from_hf_config

MAX_LOG_BYTES = 4 << 30  # a routing log is read whole: a serving engine's long recording, not a disk


def import_vllm_jsonl(paths: Sequence[str | os.PathLike], meta: TraceMeta) -> RoutingTrace:
    """`read_vllm_jsonl`'s trace."""
    return read_vllm_jsonl(paths, meta)[0]


def read_vllm_jsonl(paths: Sequence[str | os.PathLike], meta: TraceMeta) -> tuple[RoutingTrace, int]:
    """Reads vLLM-style fused-MoE routing dumps: one JSON line per MoE layer call; returns the
    trace and how many repeated steps were dropped.

    Each line holds `topk_ids` [T][k] and optionally `topk_weights`, either the weights [T][k] or
    only the tensor's shape [T, k] (then no weights are kept). `meta.n_layers` consecutive lines
    form one step (layers 0..L-1, row i the same token in all of them). A step identical to an
    earlier step of the same length is dropped (a serving engine's idle batches).
    """
    if not paths:
        raise TraceError("no input files given")
    steps = [step for path in map(Path, paths) for step in _vllm_steps(path, meta)]
    if steps and any((s.topk_weights is None) != (steps[0].topk_weights is None) for s in steps):
        raise TraceError("some lines carry routing weights and others only a shape: cannot mix them")
    return _trace_of(steps, paths, "vllm-jsonl", meta)


def read_sglang_dumps(paths: Sequence[str | os.PathLike], meta: TraceMeta) -> tuple[RoutingTrace, int]:
    """Reads SGLang's `per_token` expert-distribution dumps (see `sglang.py`); returns the trace and
    how many repeated steps were dropped."""
    from hybrimoe.trace.sglang import sglang_steps

    if not paths:
        raise TraceError("no input files given")
    return _trace_of(sglang_steps(paths, meta), paths, "sglang-dump", meta)


def _trace_of(steps: list[TraceStep], paths: Sequence[str | os.PathLike], fmt: str, meta: TraceMeta
              ) -> tuple[RoutingTrace, int]:
    """The trace of `steps` less each step identical to an earlier one of the same length (a serving
    engine's idle batches, or another tensor-parallel rank's copy), and how many were dropped."""
    kept: list[TraceStep] = []
    seen: set[bytes] = set()
    for step in steps:
        key = step.topk_ids.tobytes() + (b"" if step.topk_weights is None else step.topk_weights.tobytes())
        key = step.n_tokens.to_bytes(8, "little") + key
        if key not in seen:
            seen.add(key)
            kept.append(step)
    n_dropped = len(steps) - len(kept)
    note = f"imported from {', '.join(Path(p).name for p in paths)} ({fmt}); {n_dropped} repeated steps dropped"
    provenance = f"{meta.provenance}; {note}" if meta.provenance else note
    try:
        return RoutingTrace(dataclasses.replace(meta, provenance=provenance), tuple(kept)), n_dropped
    except TraceError as exc:  # the whole trace's checks: say which files they read
        raise TraceError(f"{', '.join(str(p) for p in paths)}: {exc}") from None


def _vllm_steps(path: Path, meta: TraceMeta) -> list[TraceStep]:
    lines = [line for line in read_text(path, "trace input", TraceError, MAX_LOG_BYTES).splitlines() if line.strip()]
    L = meta.n_layers
    if not lines:
        raise TraceError(f"{path}: no lines")
    records = [_vllm_record(line, f"{path}:{lineno + 1}") for lineno, line in enumerate(lines)]
    if len(lines) % L:
        raise TraceError(f"{path}: {len(lines)} lines is not a multiple of n_layers={L} (one line per MoE layer)")
    steps = []
    for first in range(0, len(lines), L):
        ids_per_layer, weights_per_layer = [], []
        for lineno in range(first, first + L):
            where = f"{path}:{lineno + 1}"
            ids, weights = _vllm_routing(records[lineno], where, meta)
            if ids_per_layer and ids.shape[0] != ids_per_layer[0].shape[0]:
                raise TraceError(
                    f"{where}: {ids.shape[0]} tokens, but layer 0 of this step had {ids_per_layer[0].shape[0]}"
                )
            if weights_per_layer and (weights is None) != (weights_per_layer[0] is None):
                raise TraceError(f"{where}: routing weights present in some layers of this step only")
            ids_per_layer.append(ids)
            weights_per_layer.append(weights)
        weights = None if weights_per_layer[0] is None else np.stack(weights_per_layer)
        try:
            steps.append(TraceStep(topk_ids=np.stack(ids_per_layer), topk_weights=weights))
        except TraceError as exc:
            raise TraceError(f"{path}:{first + 1}: {exc}") from None
    return steps


def _vllm_record(line: str, where: str) -> object:
    """One line's JSON (every line is read before the lines are counted, so a broken line is named)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise TraceError(f"{where}: JSON nested too deeply to read") from None
    except ValueError as exc:  # a number too long for Python to convert (over 4300 digits)
        raise TraceError(f"{where}: a value cannot be read ({exc})") from None


def _vllm_routing(record: object, where: str, meta: TraceMeta) -> tuple[np.ndarray, np.ndarray | None]:
    if not isinstance(record, dict) or "topk_ids" not in record:
        raise TraceError(f"{where}: expected an object with 'topk_ids'")
    try:
        ids = np.array(record["topk_ids"])
    except ValueError:
        raise TraceError(f"{where}: topk_ids is not a rectangular [tokens][k] list") from None
    if ids.ndim != 2 or ids.shape[0] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise TraceError(f"{where}: topk_ids must be a non-empty [tokens][k] list of integers")
    if ids.shape[1] != meta.top_k:
        raise TraceError(f"{where}: {ids.shape[1]} experts per token, but top_k is {meta.top_k}")
    outside = ids[(ids < 0) | (ids >= meta.n_experts)]
    if outside.size:
        raise TraceError(f"{where}: expert id {int(outside[0])} outside [0, {meta.n_experts})")
    ordered = np.sort(ids, axis=1)
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise TraceError(f"{where}: a token's top-k repeats an expert")
    raw = record.get("topk_weights")
    if raw is None:
        return ids.astype(ID_DTYPE), None
    if raw == list(ids.shape):
        return ids.astype(ID_DTYPE), None  # only the weight tensor's shape was logged
    try:
        weights = np.array(raw, dtype=np.float64)  # checked before the float32 a trace keeps
    except (ValueError, TypeError):
        raise TraceError(
            f"{where}: topk_weights is neither a [tokens, k] shape nor a [tokens][k] list of numbers"
        ) from None
    if weights.shape != ids.shape:
        raise TraceError(f"{where}: topk_weights has shape {list(weights.shape)}, topk_ids {list(ids.shape)}")
    if not (np.abs(weights) <= np.finfo(np.float32).max).all():
        raise TraceError(f"{where}: topk_weights holds non-finite values or values past float32's range")
    return ids.astype(ID_DTYPE), weights.astype(np.float32)


IMPORT_FORMATS = ("vllm-jsonl", "sglang-dump")


def import_trace_files(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    fmt: str = "vllm-jsonl",
    config_path: str | os.PathLike | None = None,
    model: str | None = None,
    n_layers: int | None = None,
    n_experts: int | None = None,
    top_k: int | None = None,
    n_shared_experts: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    dtype: str | None = None,
    provenance: str = "",
    overwrite: bool = False,
) -> tuple[RoutingTrace, int]:
    """`hybrimoe trace import`: shape facts from `config_path` or from every explicit argument;
    returns the trace written and how many repeated steps were dropped."""
    out = Path(out)
    if fmt not in IMPORT_FORMATS:
        raise TraceError(f"unknown trace format {fmt!r}; expected one of {', '.join(IMPORT_FORMATS)}")
    if out.suffix != ".npz":
        raise TraceError(f"{out}: a trace file must end in .npz")
    if not provenance.isprintable():
        raise TraceError(f"--provenance must be one line of printable text, got {provenance!r}")
    check_output(out, overwrite, "--out")
    explicit = {
        "n_layers": n_layers,
        "n_experts": n_experts,
        "top_k": top_k,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
    }
    if config_path is not None:
        given = [name for name, value in explicit.items() if value is not None]
        if given or n_shared_experts is not None:
            named = ", ".join(given) or "n_shared_experts"
            raise TraceError(f"give shape facts either with --config or explicitly, not both (got {named})")
        meta = trace_meta_from_hf_config(config_path, model=model, dtype=dtype, provenance=provenance)
    else:
        missing = [name for name, value in {**explicit, "model": model, "dtype": dtype}.items() if value is None]
        if missing:
            raise TraceError(f"without --config, these shape facts are needed: {', '.join(missing)}")
        meta = TraceMeta(
            model=model, n_shared_experts=n_shared_experts or 0, dtype=dtype, provenance=provenance, **explicit
        )
    read = read_vllm_jsonl if fmt == "vllm-jsonl" else read_sglang_dumps
    trace, n_dropped = read(paths, meta)
    save_trace(trace, out, overwrite=overwrite)
    return trace, n_dropped
