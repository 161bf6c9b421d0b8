"""Typed configuration: hardware profiles and policy knobs, and the only place YAML is read or written.

Design choices:
- Every config is a frozen dataclass; files are validated once, here, into those dataclasses, and a
  bad file raises `ProfileError` with one line naming the field.
- One schema serves measured profiles (`hybrimoe profile`), estimated ones (datasheet roofline,
  `estimated: true` with their sources) and tuned ones (a `policy` section added by `hybrimoe tune`).
- A latency curve keeps its raw measured points (with spread) and a linear fit; lookups interpolate
  the points and extrapolate with the fit, so a profile with only a fit (estimated) works too.
- YAML is loaded with the safe loader only (refusing a key given twice), and written atomically
  (temp file + rename).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hybrimoe.errors import ProfileError
from hybrimoe.files import read_text, write_atomically
from hybrimoe.policy.names import CONFIGURABLE_POLICIES, LAYOUTS, PREFETCHES, STRATEGIES

SCHEMA_VERSION = 1

# Bounds on a model's sizes, well past any released MoE model (DeepSeek-V3: 61 layers, 256
# experts, hidden 7168; the widest dense FFNs near 53,248): a shape beyond them is a mistake, and
# building or simulating it would take hours or all the memory before anything else refused it.
SIZE_LIMITS = {
    "n_layers": 1024, "n_experts": 65_536, "hidden_size": 65_536, "intermediate_size": 262_144,
    "shared_intermediate_size": 262_144, "dense_intermediate_size": 262_144, "n_heads": 4096,
    "n_kv_heads": 4096, "head_dim": 4096, "vocab_size": 4_194_304, "n_shared_experts": 65_536,
}
MAX_PROFILE_BYTES = 4 << 20  # a measured profile is tens of KB; YAML reads 3 MB a second
MAX_CURVE_TOKENS = 1 << 24  # a latency point's tokens for one expert: past a whole prefill batch's


def over_limit(sizes: dict[str, int]) -> str | None:
    """The first of `sizes` above SIZE_LIMITS, said in words, or None."""
    for name, value in sizes.items():
        if value > SIZE_LIMITS[name]:
            return f"{name} {value} is above {SIZE_LIMITS[name]}, past any released model's: is the shape right?"
    return None


MAX_LATENCY_MS = 1e6  # a measured latency beyond this (17 minutes) is not a measurement
MIN_GBPS = 0.01  # a bandwidth below this (10 MB/s) is not a machine's
MAX_GBPS = 100_000.0  # nor one above this (100 TB/s; HBM3e reads about 5)
MIN_MEMORY_GB = 0.25  # less memory than this (256 MB) is not a machine's RAM or a card's
MAX_MEMORY_GB = 65_536.0  # more than this (64 TB) is no machine's either: most likely bytes in a GB field
MAX_SLOWDOWN = 100.0  # interference beyond this is a measurement gone wrong, not a machine
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "float8": 1, "int4": 0.5}
QUANTIZE_FORMATS = ("int8", "int4")  # weight-only, group-wise (runtime/quantized.py)
DEFAULT_GROUP_SIZE = 128
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")  # what quantized experts are dequantized to


def memory_budget_error(flag: str, value: float) -> str | None:
    """Why a memory budget flag's GB (`--gpu-memory-gb`) is no card's, or None. Above 0, not below
    `MIN_MEMORY_GB`: a budget may be a part of a card."""
    if not 0 < value <= MAX_MEMORY_GB:
        return f"{flag} must be a number of GB above 0 and at most {MAX_MEMORY_GB:g}, got {value:g}"
    return None


@dataclass(frozen=True)
class CurvePoint:
    """One measured latency: the median over repeats, and the spread (max - min) of those repeats."""

    n_tokens: int
    ms: float
    spread_ms: float = 0.0


@dataclass(frozen=True)
class LinearFit:
    """ms = intercept_ms + per_token_ms * n_tokens, with its quality on the points it was fit to."""

    intercept_ms: float
    per_token_ms: float
    r2: float | None = None
    max_rel_error: float | None = None

    def __post_init__(self) -> None:
        if self.r2 is not None and not self.r2 <= 1.0:
            raise ProfileError(f"fit.r2 is a coefficient of determination, at most 1, got {self.r2}")

    def ms(self, n_tokens: float) -> float:
        return self.intercept_ms + self.per_token_ms * n_tokens


@dataclass(frozen=True)
class LatencyCurve:
    """Latency of one unit of work (one expert, or the dense part of one layer) against token count."""

    points: tuple[CurvePoint, ...] = ()
    fit: LinearFit | None = None

    def __post_init__(self) -> None:
        if not self.points and self.fit is None:
            raise ProfileError("a latency curve needs measured points or a linear fit")
        counts = [p.n_tokens for p in self.points]
        if counts != sorted(set(counts)):
            raise ProfileError("latency points must have strictly increasing n_tokens")

    def ms(self, n_tokens: float) -> float:
        """Interpolates the measured points; beyond them, the fit (or the last segment's slope)."""
        pts = self.points
        if not pts:
            return self.fit.ms(n_tokens)
        if len(pts) == 1:
            return pts[0].ms if self.fit is None else pts[0].ms + self.fit.per_token_ms * (n_tokens - pts[0].n_tokens)
        counts = [p.n_tokens for p in pts]
        i = bisect.bisect_left(counts, n_tokens)
        if i < len(pts) and pts[i].n_tokens == n_tokens:
            return pts[i].ms
        if 0 < i < len(pts):
            lo, hi = pts[i - 1], pts[i]
            t = (n_tokens - lo.n_tokens) / (hi.n_tokens - lo.n_tokens)
            return lo.ms + t * (hi.ms - lo.ms)
        if i == 0:
            return pts[0].ms
        lo, hi = pts[-2], pts[-1]
        slope = self.fit.per_token_ms if self.fit is not None else (hi.ms - lo.ms) / (hi.n_tokens - lo.n_tokens)
        return hi.ms + slope * (n_tokens - hi.n_tokens)


@dataclass(frozen=True)
class ExpertShape:
    """The shape of one routed expert; a profile's costs apply only to experts of this shape.

    `dtype` is the weights' (and the compute's) dtype; `quantize` names the packed format the
    weights are kept in when the runtime quantizes them (int8 or int4, one scale per `group_size`
    weights of a row), and then an expert's bytes are its packed bytes."""

    hidden_size: int
    intermediate_size: int
    dtype: str = "bfloat16"
    n_matrices: int = 3
    has_bias: bool = False
    quantize: str | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ProfileError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPE_BYTES)}")
        if self.hidden_size <= 0 or self.intermediate_size <= 0 or self.n_matrices <= 0:
            raise ProfileError("expert shape sizes must be positive")
        too_big = over_limit({"hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size})
        if too_big:
            raise ProfileError(f"expert shape: {too_big}")
        if self.quantize is not None and self.quantize not in QUANTIZE_FORMATS:
            raise ProfileError(f"unknown quantization {self.quantize!r}; expected one of {', '.join(QUANTIZE_FORMATS)}")
        if self.quantize is not None and self.dtype not in COMPUTE_DTYPES:
            raise ProfileError(f"experts of dtype {self.dtype} cannot be quantized (only {', '.join(COMPUTE_DTYPES)})")
        if (self.quantize is None) != (self.group_size is None):
            raise ProfileError("an expert shape names a quantization and its group size together, or neither")
        if self.quantize == "int4" and (self.hidden_size % 16 or 2 * self.intermediate_size % 16):
            raise ProfileError(
                f"int4 experts need a hidden size and twice the intermediate size that are multiples of 16 "
                f"(torch's int4 layout), not {self.hidden_size} and {2 * self.intermediate_size}"
            )
        if self.group_size is not None:
            if self.group_size < 2 or self.group_size % 2:
                raise ProfileError(f"group size {self.group_size} is not an even number of weights (2 at least)")
            for size in (self.hidden_size, self.intermediate_size):
                if size % self.group_size:
                    raise ProfileError(
                        f"group size {self.group_size} does not divide the experts' input sizes "
                        f"({self.hidden_size} and {self.intermediate_size}) into whole groups"
                    )

    @property
    def expert_bytes(self) -> int:
        n_weights = self.n_matrices * self.hidden_size * self.intermediate_size
        if self.quantize is None:
            return int(n_weights * DTYPE_BYTES[self.dtype])
        return int(n_weights * DTYPE_BYTES[self.quantize] + n_weights // self.group_size * self.scale_bytes)

    @property
    def scale_bytes(self) -> int:
        """Bytes of one group's scale (quantized shapes): float32 for int8, the weights' dtype for
        int4 (runtime/quantized.py)."""
        return 4 if self.quantize == "int8" else int(DTYPE_BYTES[self.dtype])

    def quantized(self, quantize: str | None, group_size: int = DEFAULT_GROUP_SIZE) -> ExpertShape:
        """This shape kept in another format (None: the dtype's own)."""
        return dataclasses.replace(self, quantize=quantize, group_size=None if quantize is None else group_size)

    @property
    def format(self) -> str:
        """The weights' format in words: "bfloat16", "int4 g128"."""
        return self.dtype if self.quantize is None else f"{self.quantize} g{self.group_size}"

    def describe(self) -> str:
        shape = f"{self.n_matrices} x {self.hidden_size} x {self.intermediate_size} {self.dtype}"
        return shape if self.quantize is None else f"{shape} as {self.format}"


@dataclass(frozen=True)
class Transfer:
    """Host-to-accelerator copy costs."""

    expert_load_ms: float
    h2d_pinned_gbps: float
    h2d_pageable_gbps: float | None = None
    d2h_gbps: float | None = None
    h2d_pinned_expert_gbps: float | None = None


@dataclass(frozen=True)
class Interference:
    """Slowdowns when CPU expert compute and host-to-device copies run at once (shared memory bus)."""

    cpu_slowdown: float = 1.0
    copy_slowdown: float = 1.0


@dataclass(frozen=True)
class PlannerCost:
    """Wall time of one strategy's planner per MoE layer call, measured in the runtime."""

    strategy: str
    plan_layer: LatencyCurve  # `plan_layer`, over the step's tokens: the layer's experts wait for it
    plan_prefetch: LatencyCurve  # `plan_prefetch`: it runs while the layer's experts run


@dataclass(frozen=True)
class ModelCosts:
    """What a forward step costs besides the routed experts, measured on one model's own modules
    by `hybrimoe profile` (random weights, the checkpoint's shapes), with the runtime's executor.

    Times are per forward step or per MoE layer; n_tokens is the step's new tokens (all sequences).
    """

    model: str  # the model these were measured on
    outside_step: LatencyCurve  # embedding, rotary, mask, final norm, LM head, sampling, the loop
    host_layer: LatencyCurve  # the executor's own host work per MoE layer, planning excluded
    dense_ms_per_context_token: float = 0.0  # dense part of a layer: extra per new and cached token pair
    planners: tuple[PlannerCost, ...] = ()

    def planner(self, strategy: str) -> PlannerCost | None:
        return next((p for p in self.planners if p.strategy == strategy), None)


@dataclass(frozen=True)
class Machine:
    cpu: str = "unknown"
    cores: int | None = None
    threads: int | None = None
    ram_gb: float | None = None
    gpu: str | None = None
    gpu_memory_gb: float | None = None
    driver: str | None = None
    cuda: str | None = None
    torch: str | None = None


@dataclass(frozen=True)
class Provenance:
    created_by: str
    created_at: str
    tool_version: str


@dataclass(frozen=True)
class PolicyConfig:
    """The knobs of the hybrid policy; `hybrimoe tune` searches over them."""

    cache_ratio: float = 0.25
    cache_layout: str = "shared"
    cache_policy: str = "mrs"
    mrs_alpha: float = 0.5
    mrs_top_p: int | None = None
    prefetch: str = "impact"
    prefetch_depth: int = 2
    warm_start: bool = True
    quantize: str | None = None  # the routed experts' format (runtime/quantized.py); None: the checkpoint's
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if not 0.0 <= self.cache_ratio <= 1.0:
            raise ProfileError(f"policy.cache_ratio must be in [0, 1], got {self.cache_ratio}")
        for key, choices in (("cache_layout", LAYOUTS), ("cache_policy", CONFIGURABLE_POLICIES),
                             ("prefetch", PREFETCHES)):
            if getattr(self, key) not in choices:
                raise ProfileError(f"policy.{key} must be one of {', '.join(choices)}, got {getattr(self, key)!r}")
        if not 0.0 < self.mrs_alpha <= 1.0:
            raise ProfileError(f"policy.mrs_alpha must be in (0, 1], got {self.mrs_alpha}")
        if self.mrs_top_p is not None and self.mrs_top_p < 1:
            raise ProfileError(f"policy.mrs_top_p must be at least 1 (or left out: twice top-k), got {self.mrs_top_p}")
        if not 0 <= self.prefetch_depth <= 8:
            raise ProfileError(f"policy.prefetch_depth must be in [0, 8], got {self.prefetch_depth}")
        if self.quantize is not None and self.quantize not in QUANTIZE_FORMATS:
            raise ProfileError(f"policy.quantize must be one of {', '.join(QUANTIZE_FORMATS)}, got {self.quantize!r}")
        if self.group_size <= 0:
            raise ProfileError(f"policy.group_size must be positive, got {self.group_size}")


@dataclass(frozen=True)
class TraceRef:
    """A routing trace a tuning run read, by path and content hash."""

    path: str
    sha256: str
    n_tokens: int


@dataclass(frozen=True)
class TunedResult:
    """One configuration's simulated values on one part of the workload (train or holdout)."""

    config: str  # "tuned", "default", a baseline strategy, or "#N" (trial N, when measured)
    part: str  # "train", "holdout" (simulated), or "measured" and "predicted" (`tune --measure-top`)
    objective_ms: float  # the study's objective (see TuningRecord.objective)
    decode_ms_per_token: float | None = None
    ttft_ms: float | None = None
    hit_rate: float | None = None


@dataclass(frozen=True)
class TuningRecord:
    """How `hybrimoe tune` chose a profile's policy section, and what it simulated."""

    study: str
    storage: str  # without any password
    objective: str  # decode (ms/token), prefill (TTFT ms) or weighted (TTFT + decode_tokens x ms/token)
    decode_tokens: int
    budget: str  # where the cache capacity came from
    cache_experts: int  # the tuned cache capacity, in experts
    trials: int  # finished trials in the study (complete and pruned)
    pruned: int
    traces: tuple[TraceRef, ...]
    holdout: str  # what was held out of the search
    results: tuple[TunedResult, ...]
    created_at: str = ""


@dataclass(frozen=True)
class HardwareProfile:
    """What the cost model needs about one machine, for one expert shape.

    `gpu_expert` and `transfer` are None on a machine without an accelerator.
    `dense_layer` is the per-layer time of everything but routed experts (attention, norms, router,
    shared experts) on the accelerator, so simulated ms/token is end to end.
    `stand_in`: the "accelerator" is the CPU stand-in, whose experts and copies run on the host
    thread one after another, beside the CPU worker's experts.
    `model_costs`: the rest of a step, measured on one model (absent: only `layer_overhead_ms`).
    """

    name: str
    expert_shape: ExpertShape
    cpu_expert: LatencyCurve
    dense_layer: LatencyCurve
    gpu_expert: LatencyCurve | None = None
    transfer: Transfer | None = None
    host_memory_gbps: float | None = None
    layer_overhead_ms: float = 0.0
    cpu_first_expert_extra_ms: float = 0.0
    interference: Interference = field(default_factory=Interference)
    stand_in: bool = False  # the accelerator is the CPU stand-in (see CostModel)
    model_costs: ModelCosts | None = None
    machine: Machine = field(default_factory=Machine)
    estimated: bool = False
    sources: tuple[str, ...] = ()
    notes: str = ""
    provenance: Provenance | None = None
    policy: PolicyConfig | None = None
    tuning: TuningRecord | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if (self.gpu_expert is None) != (self.transfer is None):
            raise ProfileError("a profile needs both gpu_expert and transfer sections, or neither")

    @property
    def has_accelerator(self) -> bool:
        return self.gpu_expert is not None

    def with_accelerator_from(self, other: HardwareProfile) -> HardwareProfile:
        """This machine's CPU and memory with another profile's accelerator, for what-if planning."""
        if other.gpu_expert is None:
            raise ProfileError(f"profile {other.name!r} has no accelerator section")
        if other.expert_shape != self.expert_shape:
            raise ProfileError(
                f"profile {other.name!r} is for experts {other.expert_shape.describe()}, "
                f"not {self.expert_shape.describe()}"
            )
        return dataclasses.replace(
            self,
            name=f"{self.name}+{other.name}",
            gpu_expert=other.gpu_expert,
            transfer=other.transfer,
            dense_layer=other.dense_layer,
            machine=dataclasses.replace(
                self.machine, gpu=other.machine.gpu, gpu_memory_gb=other.machine.gpu_memory_gb
            ),
        )

    def check_trace_experts(self, shape: ExpertShape) -> ExpertShape:
        """Refuses a profile for other expert sizes than a trace's; a trace records routing, not the
        format its experts are kept in, so they are simulated in the profile's. Returns that shape."""
        kept = shape.quantized(self.expert_shape.quantize, self.expert_shape.group_size or DEFAULT_GROUP_SIZE)
        self.check_expert_shape(kept)
        return kept

    def check_expert_shape(self, shape: ExpertShape) -> None:
        """Refuses a profile measured for other expert shapes, or another weight format, than the run's."""
        mine = self.expert_shape
        how = "" if shape.quantize is None else f" --quantize {shape.quantize} --group-size {shape.group_size}"
        sizes = (mine.hidden_size, mine.intermediate_size, mine.n_matrices, mine.dtype)
        if sizes != (shape.hidden_size, shape.intermediate_size, shape.n_matrices, shape.dtype):
            raise ProfileError(
                f"profile {self.name!r} was made for experts {mine.describe()}, "
                f"but the model's experts are {shape.describe()}: run `hybrimoe profile{how}` for this model"
            )
        if mine.format != shape.format:
            use = "" if mine.quantize is None else f" (--quantize {mine.quantize} --group-size {mine.group_size})"
            raise ProfileError(
                f"profile {self.name!r} was made for experts kept as {mine.format}{use}, but this run keeps them "
                f"as {shape.format}: run `hybrimoe profile{how}` for this format"
            )


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass, with one-line errors naming the field


def _build(cls: type, data: Any, where: str) -> Any:
    """Builds dataclass `cls` from a mapping, converting nested dataclasses by their annotations."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(hints)
    if unknown:
        raise ProfileError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    missing = [name for name, f in hints.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ProfileError(f"{where}: missing field(s) {', '.join(missing)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name].type, value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ProfileError(f"{where}: {exc}") from None


_NESTED = {
    "CurvePoint": CurvePoint,
    "LinearFit": LinearFit,
    "LatencyCurve": LatencyCurve,
    "ExpertShape": ExpertShape,
    "Transfer": Transfer,
    "Interference": Interference,
    "Machine": Machine,
    "Provenance": Provenance,
    "PolicyConfig": PolicyConfig,
    "ModelCosts": ModelCosts,
    "PlannerCost": PlannerCost,
    "TraceRef": TraceRef,
    "TunedResult": TunedResult,
    "TuningRecord": TuningRecord,
}


def _convert(annotation: str, value: Any, where: str) -> Any:
    optional = annotation.endswith("| None")
    base = annotation.removesuffix(" | None")
    if value is None:
        if optional:
            return None
        raise ProfileError(f"{where}: must not be empty")
    if base in _NESTED:
        return _build(_NESTED[base], value, where)
    if base == "tuple[CurvePoint, ...]":
        if not isinstance(value, list):
            raise ProfileError(f"{where}: expected a list of [n_tokens, ms, spread_ms]")
        points = []
        for i, item in enumerate(value):
            if not (isinstance(item, list) and len(item) in (2, 3)):
                raise ProfileError(f"{where}[{i}]: expected [n_tokens, ms] or [n_tokens, ms, spread_ms]")
            numbers = [_convert("float", v, f"{where}[{i}]") for v in item]
            if numbers[0] != int(numbers[0]) or not 1 <= numbers[0] <= MAX_CURVE_TOKENS:
                raise ProfileError(f"{where}[{i}]: n_tokens must be a whole number in [1, {MAX_CURVE_TOKENS}], "
                                   f"got {item[0]!r}")
            points.append(CurvePoint(int(numbers[0]), numbers[1], numbers[2] if len(numbers) == 3 else 0.0))
        return tuple(points)
    if base.startswith("tuple[") and base.removeprefix("tuple[").removesuffix(", ...]") in _NESTED:
        if not isinstance(value, list):
            raise ProfileError(f"{where}: expected a list")
        cls = _NESTED[base.removeprefix("tuple[").removesuffix(", ...]")]
        return tuple(_build(cls, item, f"{where}[{i}]") for i, item in enumerate(value))
    if base == "tuple[str, ...]":
        if not isinstance(value, list):
            raise ProfileError(f"{where}: expected a list of strings")
        return tuple(str(v) for v in value)
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProfileError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ProfileError(f"{where}: must be a finite number, not negative, got {value}")
        return float(value)
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProfileError(f"{where}: expected an integer, got {value!r}")
        return value
    if base == "bool":
        if not isinstance(value, bool):
            raise ProfileError(f"{where}: expected true or false, got {value!r}")
        return value
    if base == "str":
        if not isinstance(value, str):
            raise ProfileError(f"{where}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"no converter for {annotation}")


def _round(value: float) -> float:
    """Six significant digits: a per-token slope of 9e-5 ms keeps its precision, unlike 6 decimals."""
    return float(f"{value:.6g}")


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, CurvePoint):
        return [obj.n_tokens, _round(obj.ms), _round(obj.spread_ms)]
    if dataclasses.is_dataclass(obj):
        return {
            f.name: _to_plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if getattr(obj, f.name) is not None
        }
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, float):
        return _round(obj)
    return obj


def profile_from_dict(data: Any, source: str = "profile") -> HardwareProfile:
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a profile must be a YAML mapping")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ProfileError(f"{source}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
    try:
        profile = _build(HardwareProfile, data, source)
    except ProfileError as exc:  # a check inside a dataclass does not know the file
        message = str(exc)
        raise ProfileError(message if message.startswith(source) else f"{source}: {message}") from None
    return _check_physics(profile, source)


def _check_latency(source: str, name: str, ms: float) -> None:
    if ms > MAX_LATENCY_MS:
        raise ProfileError(f"{source}: {name}: a latency of {ms:g} ms is past any machine's ({MAX_LATENCY_MS:g} ms at most)")


def _check_physics(profile: HardwareProfile, source: str) -> HardwareProfile:
    """What the cost model divides by or relies on is strictly positive (finiteness is checked
    field by field as the profile is read)."""
    curves = {"cpu_expert": profile.cpu_expert, "gpu_expert": profile.gpu_expert, "dense_layer": profile.dense_layer}
    for name, curve in curves.items():
        if curve is not None and not curve.ms(1) > 0:
            raise ProfileError(f"{source}: {name}: the latency of 1 token must be positive, got {curve.ms(1)} ms")
    costs = profile.model_costs
    if costs is not None:
        curves |= {"model_costs.outside_step": costs.outside_step, "model_costs.host_layer": costs.host_layer}
        for planner in costs.planners:
            curves |= {f"model_costs.planners.{planner.strategy}.plan_layer": planner.plan_layer,
                       f"model_costs.planners.{planner.strategy}.plan_prefetch": planner.plan_prefetch}
    for name, curve in curves.items():
        if curve is not None:
            fit = () if curve.fit is None else (curve.fit.intercept_ms, curve.fit.per_token_ms)
            _check_latency(source, name, max([0.0, *fit, *(point.ms for point in curve.points)]))
    _check_latency(source, "layer_overhead_ms", profile.layer_overhead_ms)
    _check_latency(source, "cpu_first_expert_extra_ms", profile.cpu_first_expert_extra_ms)
    if costs is not None:
        _check_latency(source, "model_costs.dense_ms_per_context_token", costs.dense_ms_per_context_token)
    machine = profile.machine
    for name in ("cores", "threads"):
        value = getattr(machine, name)
        if value is not None and not value > 0:
            raise ProfileError(f"{source}: machine.{name} must be positive, got {value}")
    for name in ("gpu_memory_gb", "ram_gb"):
        value = getattr(machine, name)
        if value is not None and not MIN_MEMORY_GB <= value <= MAX_MEMORY_GB:
            raise ProfileError(f"{source}: machine.{name} {value:g} is no machine's (a number of GB, "
                               f"{MIN_MEMORY_GB:g} to {MAX_MEMORY_GB:g})")
    policy, shape = profile.policy, profile.expert_shape
    if policy is not None and policy.quantize != shape.quantize:
        kept = f"as {policy.quantize}" if policy.quantize else "unquantized"
        raise ProfileError(f"{source}: policy.quantize keeps the experts {kept}, but the profile is for experts "
                           f"{shape.describe()}: one profile describes one format")
    if policy is not None and policy.quantize is not None and policy.group_size != shape.group_size:
        raise ProfileError(f"{source}: policy.group_size {policy.group_size} is not the experts' "
                           f"(expert_shape.group_size {shape.group_size})")
    if policy is not None and policy.quantize is None and policy.group_size != DEFAULT_GROUP_SIZE:
        raise ProfileError(f"{source}: policy.group_size applies only with policy.quantize")
    if not profile.name.strip() or not profile.name.isprintable():
        raise ProfileError(f"{source}: name must be one line of printable text, got {profile.name!r}")
    if profile.model_costs is not None:
        for planner in profile.model_costs.planners:
            if planner.strategy not in STRATEGIES:
                raise ProfileError(f"{source}: model_costs.planners: unknown strategy {planner.strategy!r}; "
                                   f"expected one of {', '.join(STRATEGIES)}")
    if profile.transfer is not None:
        if not profile.transfer.expert_load_ms > 0:
            raise ProfileError(f"{source}: transfer.expert_load_ms must be positive, got {profile.transfer.expert_load_ms}")
        for name in ("h2d_pinned_gbps", "h2d_pageable_gbps", "d2h_gbps", "h2d_pinned_expert_gbps"):
            gbps = getattr(profile.transfer, name)
            if gbps is not None and not MIN_GBPS <= gbps <= MAX_GBPS:
                raise ProfileError(f"{source}: transfer.{name} {gbps:g} is no machine's ({MIN_GBPS:g} to {MAX_GBPS:g} GB/s)")
        if profile.transfer.expert_load_ms > MAX_LATENCY_MS:
            raise ProfileError(f"{source}: transfer.expert_load_ms {profile.transfer.expert_load_ms:g} is past any "
                               f"machine's ({MAX_LATENCY_MS:g} ms at most)")
    for name in ("cpu_slowdown", "copy_slowdown"):
        if not 1.0 <= getattr(profile.interference, name) <= MAX_SLOWDOWN:  # `profile` writes at least 1
            raise ProfileError(f"{source}: interference.{name} is a slowdown, in [1, {MAX_SLOWDOWN:g}], "
                               f"got {getattr(profile.interference, name)}")
    if profile.host_memory_gbps is not None and not MIN_GBPS <= profile.host_memory_gbps <= MAX_GBPS:
        raise ProfileError(f"{source}: host_memory_gbps must be in {MIN_GBPS:g} to {MAX_GBPS:g}, "
                           f"got {profile.host_memory_gbps:g}")
    return profile


def profile_to_dict(profile: HardwareProfile) -> dict[str, Any]:
    data = _to_plain(profile)
    data = {"schema_version": data.pop("schema_version"), **data}
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader, refusing a mapping that names a key twice (the last would win
    silently: a profile edited by hand could keep a stale value)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2's floats without a dot ("5e-2", "1e9"), which YAML 1.1 (PyYAML) would read as strings
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_profile(path: str | os.PathLike) -> HardwareProfile:
    """Reads and validates a profile; every problem is one line naming the file and the field."""
    path = Path(path)
    text = read_text(path, "profile", ProfileError, MAX_PROFILE_BYTES)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None)
        raise ProfileError(f"{path}: malformed YAML{at}" + (f": {problem}" if problem else "")) from None
    except RecursionError:
        raise ProfileError(f"{path}: YAML nested too deeply to read") from None
    except ValueError as exc:  # a number too long for Python to convert (over 4300 digits)
        raise ProfileError(f"{path}: a value cannot be read ({exc})") from None
    return profile_from_dict(data, str(path))


def save_profile(profile: HardwareProfile, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Writes atomically; refuses to replace an existing file unless `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ProfileError(f"{path} exists; pass --force to overwrite it")
    text = yaml.safe_dump(profile_to_dict(profile), sort_keys=False, default_flow_style=None, width=100)
    return write_atomically(path, lambda fh: fh.write(text.encode()))
