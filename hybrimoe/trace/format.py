"""The routing-trace format: which experts every token chose in every MoE layer, step by step.

Shapes: L = MoE layers, T = tokens in one step, N = tokens over all steps, k = top-k,
E = routed experts per layer, D = look-ahead depth (later layers predicted from one layer).

Design choices:
- A trace is plain numpy in frozen dataclasses: `RoutingTrace(meta, steps)`; a step is one forward
  pass (a prefill of T tokens, or a decode step of 1 token). Every `RoutingTrace` is validated when
  it is built, so a trace that exists is consistent with its metadata.
- The file format is one compressed `.npz` (loaded with `allow_pickle=False`): arrays concatenated
  over steps along the token axis plus `step_lengths`, and the metadata as a JSON string in the
  0-d unicode array `meta` (with `format` and `version` keys). No sidecar file.
- Because attention is causal, a token routes the same way whether it is computed inside a prefill
  or as its own decode step, so `as_decode()` turns any trace into a decode-order trace.
- Metadata comes from a `ModelShape` or a transformers `config.json` (`trace_meta_from_shape`,
  `trace_meta_from_hf_config`), never guessed from routing data.
- Every problem in a file is one `TraceError` line naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hybrimoe.config import DTYPE_BYTES, ExpertShape, over_limit
from hybrimoe.errors import TraceError, UserError, first_repeated
from hybrimoe.files import input_file, read_json, write_atomically
from hybrimoe.shapes import ModelShape, shape_from_hf_config

FORMAT_NAME = "hybrimoe-routing-trace"
FORMAT_VERSION = 1
# A trace's steps become Python objects: a million one-token steps is already more decode than any
# workload we replay, and each costs memory and time before any check could refuse the trace.
MAX_STEPS = 1_000_000
READABLE_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
# what numpy and zipfile raise on an archive they cannot read
_UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, NotImplementedError, RuntimeError)
ID_DTYPE = np.int16


@dataclass(frozen=True)
class TraceMeta:
    """The model a trace was recorded on; shape facts needed to size experts and caches."""

    model: str
    n_layers: int  # MoE layers only
    n_experts: int  # routed experts per layer
    top_k: int
    n_shared_experts: int
    hidden_size: int
    intermediate_size: int  # of one routed expert
    dtype: str  # of the expert weights
    provenance: str

    def __post_init__(self) -> None:
        for name in ("n_layers", "n_experts", "top_k", "hidden_size", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise TraceError(f"trace metadata: {name} must be a positive integer, got {value!r}")
        shared = self.n_shared_experts
        if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
            raise TraceError(f"trace metadata: n_shared_experts must be an integer >= 0, got {self.n_shared_experts!r}")
        too_big = over_limit({name: getattr(self, name) for name in (
            "n_layers", "n_experts", "n_shared_experts", "hidden_size", "intermediate_size")})
        if too_big:
            raise TraceError(f"trace metadata: {too_big}")
        if self.top_k > self.n_experts:
            raise TraceError(f"trace metadata: top_k {self.top_k} exceeds n_experts {self.n_experts}")
        if self.n_experts > np.iinfo(ID_DTYPE).max:
            raise TraceError(f"trace metadata: n_experts {self.n_experts} exceeds {np.iinfo(ID_DTYPE).max}")
        if self.dtype not in DTYPE_BYTES:
            raise TraceError(f"trace metadata: unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPE_BYTES)}")
        for name in ("model", "provenance"):
            if not isinstance(getattr(self, name), str):
                raise TraceError(f"trace metadata: {name} must be a string")
        if not self.model.strip() or not self.model.isprintable():
            raise TraceError(f"trace metadata: model must be one line of printable text, got {self.model!r}")

    def expert_shape(self) -> ExpertShape:
        return ExpertShape(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size, dtype=self.dtype)

    @property
    def expert_bytes(self) -> int:
        return self.expert_shape().expert_bytes

    @property
    def routing_shape(self) -> tuple[int, int, int, int, int]:
        """What must agree for routing and costs to transfer: layers, experts, top-k, expert sizes."""
        return (self.n_layers, self.n_experts, self.top_k, self.hidden_size, self.intermediate_size)


def _ids(array: Any, name: str) -> np.ndarray:
    """Integer expert ids as int16, refusing values the cast would wrap."""
    array = np.asarray(array)
    if array.dtype == ID_DTYPE:
        return array
    if not np.issubdtype(array.dtype, np.integer):
        raise TraceError(f"{name} must hold integers, got {array.dtype}")
    info = np.iinfo(ID_DTYPE)
    if array.size and (array.min() < -1 or array.max() > info.max):
        raise TraceError(f"{name} holds ids outside [-1, {info.max}]")
    return array.astype(ID_DTYPE)


def _floats(array: Any, name: str, allowed: tuple[type, ...]) -> np.ndarray | None:
    if array is None:
        return None
    array = np.asarray(array)
    if array.dtype.type not in allowed:
        if not np.issubdtype(array.dtype, np.floating):
            raise TraceError(f"{name} must hold floats, got {array.dtype}")
        array = array.astype(allowed[-1])
    return array


@dataclass(frozen=True, eq=False)
class TraceStep:
    """One forward step of T tokens."""

    topk_ids: np.ndarray  # [L, T, k] int16
    topk_weights: np.ndarray | None = None  # [L, T, k] float32: routing weights, when recorded
    router_probs: np.ndarray | None = None  # [L, T, E] float16 or float32: full router probabilities
    lookahead: np.ndarray | None = None  # [L, D, T, k] int16: ids for layer l+1+d predicted at l; -1 past L

    def __post_init__(self) -> None:
        ids = _ids(self.topk_ids, "topk_ids")
        if ids.ndim != 3:
            raise TraceError(f"topk_ids must be [layers, tokens, k], got shape {ids.shape}")
        object.__setattr__(self, "topk_ids", ids)
        object.__setattr__(self, "topk_weights", _floats(self.topk_weights, "topk_weights", (np.float32,)))
        object.__setattr__(
            self, "router_probs", _floats(self.router_probs, "router_probs", (np.float16, np.float32))
        )
        if self.lookahead is not None:
            object.__setattr__(self, "lookahead", _ids(self.lookahead, "lookahead"))

    @property
    def n_tokens(self) -> int:
        return self.topk_ids.shape[1]

    def tokens(self, start: int, stop: int) -> TraceStep:
        """Tokens [start, stop) of this step, as views."""
        cut = slice(start, stop)
        return TraceStep(
            topk_ids=self.topk_ids[:, cut],
            topk_weights=None if self.topk_weights is None else self.topk_weights[:, cut],
            router_probs=None if self.router_probs is None else self.router_probs[:, cut],
            lookahead=None if self.lookahead is None else self.lookahead[:, :, cut],
        )


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """A sequence of forward steps recorded on one model; validated against `meta` when built."""

    meta: TraceMeta
    steps: tuple[TraceStep, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        _validate(self)

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def n_tokens(self) -> int:
        return sum(step.n_tokens for step in self.steps)

    @property
    def step_lengths(self) -> tuple[int, ...]:
        return tuple(step.n_tokens for step in self.steps)

    @property
    def has_weights(self) -> bool:
        return self.steps[0].topk_weights is not None

    @property
    def has_router_probs(self) -> bool:
        return self.steps[0].router_probs is not None

    @property
    def lookahead_depth(self) -> int:
        lookahead = self.steps[0].lookahead
        return 0 if lookahead is None else lookahead.shape[1]

    def topk_ids(self) -> np.ndarray:
        """[L, N, k] int16: every token's experts, steps concatenated in order."""
        return np.concatenate([step.topk_ids for step in self.steps], axis=1)

    def as_decode(self) -> RoutingTrace:
        """Each token of each step as its own 1-token step, in order (valid by causal attention)."""
        steps = tuple(step.tokens(t, t + 1) for step in self.steps for t in range(step.n_tokens))
        return RoutingTrace(self.meta, steps)

    def prefill_steps(self) -> RoutingTrace:
        """Only the steps of more than one token."""
        return self._where(lambda step: step.n_tokens > 1, "prefill (multi-token)")

    def decode_steps(self) -> RoutingTrace:
        """Only the 1-token steps."""
        return self._where(lambda step: step.n_tokens == 1, "decode (1-token)")

    def tokens(self, start: int, stop: int) -> RoutingTrace:
        """Tokens [start, stop) of the token stream, keeping step boundaries (edge steps are cut)."""
        if not 0 <= start < stop <= self.n_tokens:
            raise TraceError(f"token range [{start}, {stop}) is empty or outside the trace's {self.n_tokens} tokens")
        steps, offset = [], 0
        for step in self.steps:
            lo, hi = max(start - offset, 0), min(stop - offset, step.n_tokens)
            if lo < hi:
                steps.append(step if (lo, hi) == (0, step.n_tokens) else step.tokens(lo, hi))
            offset += step.n_tokens
        return RoutingTrace(self.meta, tuple(steps))

    def select_layers(self, layers: Sequence[int]) -> RoutingTrace:
        """The same steps restricted to these MoE layers, in this order (e.g. `range(3)`: the first
        three). Lookahead is dropped: its predictions are numbered by layers this view may lack."""
        layers = [int(layer) for layer in layers]
        n_layers = self.meta.n_layers
        if not layers or len(set(layers)) != len(layers) or not all(0 <= layer < n_layers for layer in layers):
            raise TraceError(f"layer selection {layers} must be distinct MoE layers of [0, {n_layers})")
        steps = tuple(
            TraceStep(
                topk_ids=step.topk_ids[layers],
                topk_weights=None if step.topk_weights is None else step.topk_weights[layers],
                router_probs=None if step.router_probs is None else step.router_probs[layers],
            )
            for step in self.steps
        )
        return RoutingTrace(dataclasses.replace(self.meta, n_layers=len(layers)), steps)

    def split(self, fraction: float) -> tuple[RoutingTrace, RoutingTrace]:
        """The decode view cut at round(fraction * N) tokens: e.g. a profiling part and a replay part."""
        n_first = round(fraction * self.n_tokens)
        if not 0 < n_first < self.n_tokens:
            raise TraceError(
                f"split fraction {fraction} leaves an empty part of a trace of {self.n_tokens} tokens"
            )
        decode = self.as_decode()
        return RoutingTrace(self.meta, decode.steps[:n_first]), RoutingTrace(self.meta, decode.steps[n_first:])

    def concat(self, other: RoutingTrace) -> RoutingTrace:
        """This trace's steps followed by `other`'s; both must be for the same model shape."""
        mine = dataclasses.replace(self.meta, provenance="")
        theirs = dataclasses.replace(other.meta, provenance="")
        if mine != theirs:
            raise TraceError(f"cannot concatenate traces of different models: {mine} vs {theirs}")
        return RoutingTrace(self.meta, self.steps + other.steps)

    def expert_frequencies(self) -> np.ndarray:
        """[L, E] int64: how many tokens activated each expert."""
        ids = self.topk_ids()
        n_layers, n_experts = self.meta.n_layers, self.meta.n_experts
        flat = (ids.astype(np.int64) + np.arange(n_layers)[:, None, None] * n_experts).ravel()
        return np.bincount(flat, minlength=n_layers * n_experts).reshape(n_layers, n_experts)

    def _where(self, keep, what: str) -> RoutingTrace:
        steps = tuple(step for step in self.steps if keep(step))
        if not steps:
            raise TraceError(f"the trace has no {what} steps")
        return RoutingTrace(self.meta, steps)


def _validate(trace: RoutingTrace) -> None:
    """Shapes per step, then the contents of all steps at once (one pass over the concatenation)."""
    meta, steps = trace.meta, trace.steps
    if not isinstance(meta, TraceMeta):
        raise TraceError("trace metadata must be a TraceMeta")
    if not steps:
        raise TraceError("a trace needs at least one step")
    L, E, k = meta.n_layers, meta.n_experts, meta.top_k
    first = steps[0]
    depth = None if first.lookahead is None else first.lookahead.shape[1:2]
    for i, step in enumerate(steps):
        ids = step.topk_ids
        if ids.shape[0] != L or ids.shape[2] != k or ids.shape[1] < 1:
            raise TraceError(f"step {i}: topk_ids has shape {ids.shape}, expected [{L}, tokens >= 1, {k}]")
        T = ids.shape[1]
        for name, expected in (
            ("topk_weights", (L, T, k)),
            ("router_probs", (L, T, E)),
            ("lookahead", None if depth is None else (L, *depth, T, k)),
        ):
            array = getattr(step, name)
            if (array is None) != (getattr(first, name) is None):
                raise TraceError(f"step {i}: {name} is present in some steps but not in others")
            if array is not None and array.shape != expected:
                raise TraceError(f"step {i}: {name} has shape {array.shape}, expected {list(expected)}")
    ids = trace.topk_ids()
    if ids.min() < 0 or ids.max() >= E:
        raise TraceError(f"topk_ids holds expert ids outside [0, {E}): min {ids.min()}, max {ids.max()}")
    if k > 1:
        ordered = np.sort(ids, axis=2)
        repeats = np.nonzero((ordered[:, :, 1:] == ordered[:, :, :-1]).any(axis=2))
        if repeats[0].size:
            layer, token = int(repeats[0][0]), int(repeats[1][0])
            raise TraceError(f"topk_ids repeats an expert within one token's top-k (layer {layer}, token {token})")
    if first.topk_weights is not None:
        weights = np.concatenate([step.topk_weights for step in steps], axis=1)
        if not np.isfinite(weights).all():
            raise TraceError("topk_weights holds non-finite values")
        if weights.size and weights.min() < 0:
            raise TraceError(f"topk_weights holds a negative routing weight ({weights.min():g})")
    if first.router_probs is not None:
        probs = np.concatenate([step.router_probs for step in steps], axis=1)
        if not (np.isfinite(probs).all() and probs.min() >= 0 and probs.max() <= 1):
            raise TraceError("router_probs must be finite probabilities in [0, 1]")
    if first.lookahead is not None:
        lookahead = np.concatenate([step.lookahead for step in steps], axis=2)
        # target[l, d] = l + 1 + d: predictions exist only for layers inside the model.
        target = np.arange(L)[:, None] + 1 + np.arange(lookahead.shape[1])[None, :]
        inside = (target < L)[:, :, None, None]
        predicted = np.where(inside, lookahead, 0)
        if predicted.min() < 0 or predicted.max() >= E:
            raise TraceError(f"lookahead holds expert ids outside [0, {E}) for layers inside the model")
        if (np.where(inside, -1, lookahead) != -1).any():
            raise TraceError("lookahead must be -1 for predicted layers past the last layer")


# ---------------------------------------------------------------------------------------------
# .npz files


def save_trace(trace: RoutingTrace, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Writes one compressed .npz atomically; refuses to replace a file unless `overwrite`."""
    path = Path(path)
    if path.suffix != ".npz":
        raise TraceError(f"{path}: a trace file must end in .npz")
    if path.exists() and not overwrite:
        raise TraceError(f"{path} exists; pass --force to overwrite it")
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **dataclasses.asdict(trace.meta)}
    arrays: dict[str, np.ndarray] = {
        "meta": np.array(json.dumps(meta)),
        "step_lengths": np.array(trace.step_lengths, dtype=np.int64),
        "topk_ids": trace.topk_ids(),
    }
    if trace.has_weights:
        arrays["topk_weights"] = np.concatenate([s.topk_weights for s in trace.steps], axis=1)
    if trace.has_router_probs:
        arrays["router_probs"] = np.concatenate([s.router_probs for s in trace.steps], axis=1)
    if trace.lookahead_depth:
        arrays["lookahead"] = np.concatenate([s.lookahead for s in trace.steps], axis=2)
    return write_atomically(path, lambda fh: np.savez_compressed(fh, **arrays))


_ARRAY_NAMES = ("meta", "step_lengths", "topk_ids", "topk_weights", "router_probs", "lookahead")


def load_trace(path: str | os.PathLike) -> RoutingTrace:
    """Reads and validates a trace; every problem is one TraceError line naming the file."""
    path, arrays = _read_arrays(path, _ARRAY_NAMES)
    try:
        return _trace_from_arrays(arrays)
    except TraceError as exc:
        raise TraceError(f"{path}: {exc}") from None


def load_trace_meta(path: str | os.PathLike) -> TraceMeta:
    """A trace's metadata alone (its model and routing shape), to check a trace against a model
    before the trace is read whole; a problem is one TraceError line naming the file."""
    path, arrays = _read_arrays(path, ("meta",))
    if "meta" not in arrays:
        raise TraceError(f"{path}: no meta array")
    try:
        return _meta_from_json(arrays["meta"])
    except TraceError as exc:
        raise TraceError(f"{path}: {exc}") from None


def _read_arrays(path: str | os.PathLike, names: tuple[str, ...]) -> tuple[Path, dict[str, np.ndarray]]:
    """The trace archive's path and those of its arrays named in `names` (bounded first by
    `_check_archive`); an array no trace has is refused."""
    path = input_file(path, "trace", TraceError)
    _check_archive(path)
    try:
        with np.load(path, allow_pickle=False) as archive:  # a zip (`_check_archive`): an NpzFile
            unknown = set(archive.files) - set(_ARRAY_NAMES)
            if unknown:
                raise TraceError(f"{path}: unknown array(s) {', '.join(sorted(unknown))}")
            return path, {name: archive[name] for name in archive.files if name in names}
    except _UNREADABLE as exc:
        raise TraceError(f"{path}: not a readable .npz trace archive ({_one_line(exc)})") from None


def _check_archive(path: Path) -> None:
    """Bounds what reading the archive costs before numpy reads it: every member compressed in a way
    zipfile reads and not encrypted, each array's declared shape exactly the bytes
    its member holds (a forged header would allocate its shape), and the arrays together within
    half the free RAM."""
    from hybrimoe.host import available_ram_bytes

    if not zipfile.is_zipfile(path):
        with path.open("rb") as fh:
            single_array = fh.read(6) == b"\x93NUMPY"
        what = "a single .npy array" if single_array else "not a zip of numpy arrays"
        raise TraceError(f"{path}: not an .npz trace archive ({what}); `hybrimoe trace import` converts routing logs")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            repeated = first_repeated(info.filename for info in infos)
            if repeated is not None:  # which copy numpy reads is the zip's order, not the writer's intent
                raise TraceError(f"{path}: member {repeated} appears twice")
            for info in infos:
                if info.flag_bits & 0x1:
                    raise TraceError(f"{path}: member {info.filename} is encrypted")
                if info.compress_type not in READABLE_COMPRESSION:
                    raise TraceError(f"{path}: member {info.filename} uses compression method "
                                     f"{info.compress_type}, which cannot be read (np.savez_compressed deflates)")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(member)
                    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
                    if declared != info.file_size - member.tell():
                        raise TraceError(f"{path}: member {info.filename} declares shape {shape} "
                                         f"({declared} bytes) but holds {info.file_size - member.tell()}")
    except _UNREADABLE as exc:
        raise TraceError(f"{path}: not a readable .npz trace archive ({_one_line(exc)})") from None
    total_bytes, free_bytes = sum(info.file_size for info in infos), available_ram_bytes()
    if free_bytes is not None and total_bytes > free_bytes // 2:
        raise TraceError(f"{path}: its arrays hold {total_bytes / 1e9:.1f} GB, over half the "
                         f"{free_bytes / 1e9:.1f} GB of free RAM")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _trace_from_arrays(arrays: dict[str, np.ndarray]) -> RoutingTrace:
    for name in ("meta", "step_lengths", "topk_ids"):
        if name not in arrays:
            raise TraceError(f"missing array {name!r}")
    meta = _meta_from_json(arrays["meta"])
    lengths = arrays["step_lengths"]
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer) or lengths.size == 0:
        raise TraceError("step_lengths must be a non-empty 1-d integer array")
    if (lengths < 1).any():
        raise TraceError("step_lengths must all be >= 1")
    if lengths.size > MAX_STEPS:
        raise TraceError(f"{lengths.size} steps, more than the {MAX_STEPS} a trace may hold")
    ids = arrays["topk_ids"]
    if ids.ndim != 3:
        raise TraceError(f"topk_ids must be [layers, tokens, k], got shape {ids.shape}")
    n_tokens = int(lengths.sum())
    if ids.shape[1] != n_tokens:
        raise TraceError(f"step_lengths sum to {n_tokens} tokens but topk_ids holds {ids.shape[1]}")
    # The token axis is 1 for [L, N, ...] arrays and 2 for lookahead [L, D, N, k].
    token_axis = {"topk_ids": 1, "topk_weights": 1, "router_probs": 1, "lookahead": 2}
    for name, axis in token_axis.items():
        if name in arrays and (arrays[name].ndim <= axis or arrays[name].shape[axis] != n_tokens):
            raise TraceError(f"{name} has shape {arrays[name].shape}, expected {n_tokens} tokens on axis {axis}")
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    steps = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        parts = {
            name: arrays[name][(slice(None),) * axis + (slice(lo, hi),)]
            for name, axis in token_axis.items()
            if name in arrays
        }
        steps.append(TraceStep(**parts))
    return RoutingTrace(meta, tuple(steps))


def _meta_from_json(array: np.ndarray) -> TraceMeta:
    if array.ndim != 0 or array.dtype.kind != "U":
        raise TraceError("meta must be a JSON string")
    try:
        data = json.loads(str(array))
    except json.JSONDecodeError as exc:
        raise TraceError(f"meta is not valid JSON ({exc.msg} at char {exc.pos})") from None
    except RecursionError:
        raise TraceError("meta is JSON nested too deeply to read") from None
    if not isinstance(data, dict):
        raise TraceError("meta must be a JSON object")
    if data.pop("format", None) != FORMAT_NAME:
        raise TraceError(f"meta.format is not {FORMAT_NAME!r}")
    version = data.pop("version", None)
    if version != FORMAT_VERSION:
        raise TraceError(f"trace format version {version!r} is not supported (expected {FORMAT_VERSION})")
    names = {f.name for f in dataclasses.fields(TraceMeta)}
    missing, unknown = names - set(data), set(data) - names
    if missing:
        raise TraceError(f"meta is missing field(s) {', '.join(sorted(missing))}")
    if unknown:
        raise TraceError(f"meta has unknown field(s) {', '.join(sorted(unknown))}")
    return TraceMeta(**data)


# ---------------------------------------------------------------------------------------------
# Metadata from a model's shape


def trace_meta_from_shape(shape: ModelShape, provenance: str) -> TraceMeta:
    """The trace metadata of a model described by a `ModelShape` (MoE layers only)."""
    return TraceMeta(
        model=shape.name,
        n_layers=shape.n_layers,
        n_experts=shape.n_experts,
        top_k=shape.top_k,
        n_shared_experts=shape.n_shared_experts,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        dtype=shape.dtype,
        provenance=provenance,
    )


def trace_meta_from_hf_config(
    config_path: str | os.PathLike, model: str | None = None, dtype: str | None = None, provenance: str = ""
) -> TraceMeta:
    """Shape facts from a transformers config.json; `model`/`dtype` fill in what the file lacks."""
    config_path = Path(config_path)
    if config_path.is_dir():  # a checkpoint directory, as --model takes it
        config_path = config_path / "config.json"
    config = read_json(config_path, "config", TraceError)
    if not isinstance(config, dict):
        raise TraceError(f"{config_path}: a config must be a JSON object")
    if model is None and not config.get("_name_or_path"):
        model = config_path.resolve().parent.name or None  # the checkpoint directory's name, as `run` names it
    overrides = {k: v for k, v in (("name", model), ("dtype", dtype)) if v is not None}
    try:
        shape = shape_from_hf_config(config, **overrides)
    except UserError as exc:
        raise TraceError(f"{config_path}: {exc}") from None
    return trace_meta_from_shape(shape, provenance)
