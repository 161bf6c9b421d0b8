"""Importing SGLang's expert-distribution recorder dumps (`sglang-dump`) as traces.

Shapes: D = decoder layers, L = MoE layers, T = tokens of one forward pass, K = the recorder's
columns (8), k = top-k.

Design choices:
- The format is what SGLang's recorder writes in `per_token` mode (sgl-project/sglang
  python/sglang/srt/eplb/expert_distribution.py: `_DetailSinglePassGatherer.collect` and
  `_DetailAccumulator.dump`): `torch.save` of {"records": one dict per forward pass with
  "forward_pass_id", "input_ids", "forward_mode", "topk_ids_of_layer" (int32 [D, T, K]) and more,
  "last_physical_to_logical_map": [D, physical experts]}, written as
  `expert_distribution_recorder_{time}_{rank}.pt` under SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR.
  The server records with `--expert-distribution-recorder-mode per_token`, between its
  /start_expert_distribution_record and /stop_expert_distribution_record endpoints, and writes the
  file at /dump_expert_distribution_record.
- The recorder's buffer is reset to -1 and K = 8 wide (`_TOP_K_NUM`, DeepSeek-V3's top-k); only MoE
  layers write, only their first k columns. So the MoE layers are the rows that hold routing,
  checked to be exactly the model's L, and the columns past k must stay -1.
- The ids recorded are physical (after SGLang's expert-location dispatch); they are mapped to
  logical experts through the dump's `last_physical_to_logical_map` (the identity without EPLB or
  redundant experts; "last" because a rebalance during the recording would change it).
- The `stat` mode's dump ({"logical_count": [buffer, D, E]}) holds summed counts, not which token
  chose what: refused in one line (kTransformers' --init-expert-location reads that one).
- Files are read with `torch.load(weights_only=True)`: tensors, lists, dicts and numbers, never
  code. torch is imported when a dump is read, so `hybrimoe.trace` itself stays torch-free.
- One forward pass is one step (a prefill chunk or a decode batch); passes are sorted by
  forward_pass_id within a file, files read in the order given. With tensor parallelism every rank
  records the same routing: a step identical to an earlier one is dropped, as vllm-jsonl drops a
  serving engine's idle repeats.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hybrimoe.errors import TraceError, first_line
from hybrimoe.files import input_file
from hybrimoe.trace.format import ID_DTYPE, TraceMeta, TraceStep


def sglang_steps(paths: Sequence[str | os.PathLike], meta: TraceMeta) -> list[TraceStep]:
    """The steps of SGLang `per_token` recorder dumps, in order (repeats kept: the caller drops them)."""
    return [step for path in map(Path, paths) for step in _dump_steps(path, meta)]


def _load(path: Path) -> dict:
    import pickle
    import warnings
    import zipfile

    import torch

    input_file(path, "trace input", TraceError)
    try:
        with warnings.catch_warnings():  # torch's note on a foreign pickle protocol: the error says enough
            warnings.simplefilter("ignore")
            dump = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise TraceError(f"{path}: not a torch.save file of plain data ({first_line(exc)})") from None
    if isinstance(dump, dict) and "logical_count" in dump and "records" not in dump:
        raise TraceError(f"{path}: a 'stat' mode dump (summed counts only); record with "
                         "--expert-distribution-recorder-mode per_token for a routing trace")
    if not isinstance(dump, dict) or not isinstance(dump.get("records"), list):
        raise TraceError(f"{path}: not an SGLang expert-distribution dump (expected a dict with 'records')")
    return dump


def _dump_steps(path: Path, meta: TraceMeta) -> list[TraceStep]:
    dump = _load(path)
    logical = _physical_to_logical(dump.get("last_physical_to_logical_map"), path, meta)
    records = [r for r in dump["records"] if isinstance(r, dict)]
    if len(records) != len(dump["records"]) or not records:
        raise TraceError(f"{path}: 'records' must be a non-empty list of dicts, one per forward pass")
    for record in records:
        pass_id = record.get("forward_pass_id", 0)
        if not isinstance(pass_id, int) or isinstance(pass_id, bool):
            raise TraceError(f"{path}: a record's forward_pass_id is {pass_id!r}, not a whole number")
    steps = []
    for record in sorted(records, key=lambda r: r.get("forward_pass_id", 0)):
        where = f"{path}: forward pass {record.get('forward_pass_id', '?')}"
        routing = _routing(record.get("topk_ids_of_layer"), where, meta)
        if routing is None:
            continue  # a pass without tokens (an idle data-parallel rank)
        rows, ids = routing
        if logical is not None:
            ids = _to_logical(logical, rows, ids, where)
        _check_experts(ids, where, meta)
        steps.append(TraceStep(topk_ids=ids.astype(ID_DTYPE), topk_weights=None))
    return steps


def _routing(value, where: str, meta: TraceMeta) -> tuple[np.ndarray, np.ndarray] | None:
    """topk_ids_of_layer [D, T, K] -> (the MoE layers' rows [L], their physical ids [L, T, k]);
    None for a pass without tokens."""
    if not _is_integer_tensor(value, 3):
        raise TraceError(f"{where}: topk_ids_of_layer must be a dense integer tensor [layers, tokens, 8]")
    ids = value.numpy().astype(np.int64)  # [D, T, K]
    if ids.shape[1] == 0:
        return None
    routed = (ids >= 0).any(axis=(1, 2))  # [D]: the MoE layers
    if int(routed.sum()) != meta.n_layers:
        raise TraceError(f"{where}: {int(routed.sum())} of {ids.shape[0]} layers hold routing, but the model has "
                         f"{meta.n_layers} MoE layers")
    k = meta.top_k
    if ids.shape[2] < k or (ids[routed][:, :, k:] != -1).any():
        raise TraceError(f"{where}: {ids.shape[2]} recorded columns do not hold top_k = {k} experts per token")
    moe = ids[routed][:, :, :k]  # [L, T, k]
    if (moe < 0).any():
        raise TraceError(f"{where}: a token of a MoE layer has fewer than top_k = {k} experts")
    return np.flatnonzero(routed), moe


def _to_logical(logical: np.ndarray, rows: np.ndarray, ids: np.ndarray, where: str) -> np.ndarray:
    """Physical ids [L, T, k] of the decoder layers `rows` -> logical ids through `logical` [D, P]."""
    if rows[-1] >= logical.shape[0] or ids.max() >= logical.shape[1]:
        raise TraceError(f"{where}: routing outside last_physical_to_logical_map's {list(logical.shape)}")
    mapping = logical[rows]  # [L, P]
    flat = ids.reshape(ids.shape[0], -1)  # [L, T*k]
    return np.take_along_axis(mapping, flat, axis=1).reshape(ids.shape)


def _physical_to_logical(value, path: Path, meta: TraceMeta) -> np.ndarray | None:
    """[D, physical experts]: the logical id of each physical expert; None: the identity."""
    if value is None:
        return None
    if not _is_integer_tensor(value, 2):
        raise TraceError(f"{path}: last_physical_to_logical_map must be a dense integer tensor [layers, physical experts]")
    mapping = value.numpy().astype(np.int64)  # [D, P]
    if (mapping < 0).any() or (mapping >= meta.n_experts).any():
        raise TraceError(f"{path}: last_physical_to_logical_map names experts outside [0, {meta.n_experts})")
    return mapping


def _is_integer_tensor(value, n_dims: int) -> bool:
    """A dense (strided) tensor in host memory of `n_dims` dimensions holding integers (not floats,
    complex numbers or booleans); `map_location` leaves a tensor saved on the meta device there."""
    import torch

    return (isinstance(value, torch.Tensor) and value.layout == torch.strided and value.device.type == "cpu"
            and value.dim() == n_dims
            and not value.dtype.is_floating_point and not value.dtype.is_complex and value.dtype != torch.bool)


def _check_experts(ids: np.ndarray, where: str, meta: TraceMeta) -> None:
    outside = ids[(ids < 0) | (ids >= meta.n_experts)]
    if outside.size:
        raise TraceError(f"{where}: expert id {int(outside[0])} outside [0, {meta.n_experts})")
    ordered = np.sort(ids, axis=2)
    if (ordered[..., 1:] == ordered[..., :-1]).any():
        raise TraceError(f"{where}: a token's top-k repeats an expert")
