"""Everything `hybrimoe tune` checks before its first trial: inputs, budget, study identity, outputs.

Design choices:
- Every input a user can get wrong is checked here, before any trial runs, and raises a
  `UserError` (one line, exit 2): no trace, traces of another model than the profile, a budget too
  small for one expert slot, an unknown objective, a storage that cannot be opened, an existing
  `--out` without `--force`, an output directory that cannot be written.
- The budget follows `run`'s arithmetic (`capacity.py`): from `--gpu-memory-gb` the dense
  weights, the activation reserve and the KV cache for `--context` tokens of `--batch` sequences
  are taken first, and the cache capacity is searched up to what is left; `--cache-experts` or
  `--cache-ratio` fixes it instead; with neither, the profile's policy (or the default) fixes it,
  as `run` does. The dense size comes from `--model DIR`'s config.json, or from the preset whose
  shape matches the traces. With `--model X.gguf` the bytes are the file's own (its header's tensor
  types and sizes, `gguf_header.py`): the dense part is what llama.cpp's `-ngl 99` puts on the GPU, and a
  slot holds the file's largest expert, so any placement of that many experts fits.
- One study per question: the study name hashes the traces, the profile and every setting that
  changes a trial's value, so rerunning a command continues its study and another question never
  mixes with it.
- Workers rebuild the setup from the same options (`load_inputs`), so they replay exactly what the
  main process does.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from hybrimoe.config import (
    DEFAULT_GROUP_SIZE, ExpertShape, HardwareProfile, PolicyConfig, TraceRef, load_profile, memory_budget_error,
)
from hybrimoe.errors import UserError
from hybrimoe.files import check_output, check_writable_dir, real_path
from hybrimoe.gguf_header import GgufModel, is_gguf_path, read_gguf
from hybrimoe.capacity import DEFAULT_CONTEXT_TOKENS, GIB, Reserve, reserve_for, resolve_capacity, slots_in_budget
from hybrimoe.shapes import ModelShape, preset_for_routing
from hybrimoe.trace import TraceMeta, load_trace
from hybrimoe.tune.space import SearchSpace, policy_space
from hybrimoe.tune.workload import OBJECTIVES, Workload, build_workload

DEFAULT_HOLDOUT_SPLIT = 0.3
MEMORY_STORAGE = "memory"
EXPORT_ENGINES = ("llamacpp", "ktransformers")  # --export: placements for these engines at the tuned budget
MAX_WORKERS_PER_CORE = 4  # each worker is a process with its own workload; 1000 of them hung a 2-core machine
MAX_DECODE_TOKENS = 1 << 24  # generated tokens per request: past any model's positions
MAX_TRIALS = 1_000_000  # at a tenth of a second each, twelve days: more is a typo, never a plan


@dataclass(frozen=True)
class TuneOptions:
    traces: tuple[Path, ...]
    out: Path
    profile: Path | None = None  # default: this machine's profile for the traces' experts
    quantize: str | None = None  # the experts' format this study tunes for (the profile's must match)
    group_size: int = DEFAULT_GROUP_SIZE
    allow_quantize: tuple[str, ...] = ()  # formats `tune_formats` may choose besides the checkpoint's
    format_profiles: tuple[Path, ...] = ()  # profiles for those formats; default: this machine's
    holdout: tuple[Path, ...] = ()
    holdout_split: float | None = None  # default: DEFAULT_HOLDOUT_SPLIT unless `holdout` is given
    objective: str = "weighted"
    decode_tokens: int = 256
    gpu_memory_gb: float | None = None
    cache_ratio: float | None = None
    cache_experts: int | None = None
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    batch_size: int = 1
    model: Path | None = None  # config.json for the dense size under --gpu-memory-gb
    trials: int | None = 100  # the study's total, default and baselines included
    timeout_s: float | None = None
    seed: int = 0
    workers: int = 1
    storage: str | None = None  # an Optuna RDB URL, "memory", or None: SQLite beside `out`
    pareto: bool = False
    force: bool = False
    profile_split: float = 0.25
    profiling_traces: tuple[Path, ...] = ()  # frequencies counted here instead of on the traces' first part
    prefill_tokens: int = 512
    max_tokens: int | None = None
    report_dir: Path | None = None  # trials CSV, plots and index.md
    exports: tuple[str, ...] = ()  # placements for other engines: llamacpp, ktransformers
    measure_top: int = 0  # run this many best simulated configs and the default on the runtime
    prompts: Path | None = None  # for measure_top: one prompt per line
    measure_tokens: int = 32  # for measure_top: new tokens per prompt


@dataclass(frozen=True)
class Inputs:
    """What every worker needs: the profile, the replays, the space and the study's identity."""

    options: TuneOptions
    profile: HardwareProfile
    profile_path: Path
    workload: Workload
    traces: tuple[TraceRef, ...]
    holdout: str  # what is held out, in words
    space: SearchSpace
    max_slots: int  # the budget's capacity: the baselines' and the largest the search tries
    budget: str  # where the capacity comes from, in words
    expert_room_bytes: int  # what the experts may take on the GPU (the exports place whole layers in it)
    model: ModelShape | None  # --model's shape, or the preset matching the traces; None: neither
    gguf: GgufModel | None  # --model X.gguf's header: the bytes llama.cpp places
    storage_url: str | None  # None: in memory
    study_name: str


def load_inputs(options: TuneOptions) -> Inputs:
    """Reads and checks the traces, the profile and the budget; names the study and its storage."""
    _check_numbers(options)
    if not options.traces:
        raise UserError("give at least one --trace to tune on")
    traces = [(str(path), load_trace(path)) for path in options.traces]
    holdout = [(str(path), load_trace(path)) for path in options.holdout]
    profiling = [(str(path), load_trace(path)) for path in options.profiling_traces]
    meta = traces[0][1].meta
    experts = meta.expert_shape().quantized(options.quantize, options.group_size)  # as the run would keep them
    profile_path, profile = _profile(options, experts)
    if not profile.has_accelerator:
        raise UserError(f"profile {profile.name!r} has no accelerator section: there is nothing to place")
    profile.check_expert_shape(experts)
    split = options.holdout_split
    if split is None:
        split = 0.0 if options.holdout else DEFAULT_HOLDOUT_SPLIT
    workload = build_workload(
        traces, holdout, split, options.objective, options.decode_tokens, options.profile_split,
        options.prefill_tokens, options.max_tokens, profiling,
    )
    gguf = _gguf(options, meta)
    model = gguf.shape if gguf is not None else _model_shape(options, meta)
    expert_bytes = experts.expert_bytes if gguf is None else gguf.max_expert_bytes
    capacity = _capacity(options, meta, profile, expert_bytes, model, gguf)
    max_slots, fixed_slots = capacity.max_slots, capacity.fixed_slots
    space = policy_space(meta.n_layers * meta.n_experts, meta.top_k, max_slots, fixed_slots)
    refs = tuple(TraceRef(str(path), _sha256(path), trace.n_tokens) for path, (_, trace) in zip(options.traces, traces))
    held_refs = [f"{path} ({_sha256(path)[:12]})" for path in options.holdout]
    held = ", ".join(held_refs) if held_refs else (f"the last {split:.0%} of each trace's tokens" if split else "nothing")
    identity = {
        "traces": [ref.sha256 for ref in refs],
        "holdout": held,
        "profile": _sha256(profile_path),
        "experts": experts.format,
        "objective": options.objective,
        "decode_tokens": options.decode_tokens,
        "slots": [max_slots, fixed_slots],
        "splits": [options.profile_split, split, options.prefill_tokens, options.max_tokens],
        "profiling": [_sha256(path) for path in options.profiling_traces],
        "pareto": options.pareto,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return Inputs(
        options=options,
        profile=profile,
        profile_path=Path(profile_path),
        workload=workload,
        traces=refs,
        holdout=held,
        space=space,
        max_slots=max_slots,
        budget=capacity.budget,
        expert_room_bytes=capacity.expert_room_bytes,
        model=model,
        gguf=gguf,
        storage_url=_storage_url(options),
        study_name=f"hybrimoe-tune-{digest}",
    )


def check_outputs(options: TuneOptions) -> None:
    """Refuses, before any trial, an output that would fail or overwrite something unasked."""
    from hybrimoe.tune.ktransformers_export import ktransformers_path
    from hybrimoe.tune.report_files import CSV_NAME, IMAGE_NAMES, INDEX_NAME

    unknown = [engine for engine in options.exports if engine not in EXPORT_ENGINES]
    if unknown:
        raise UserError(f"unknown --export {unknown[0]!r}; expected one of {', '.join(EXPORT_ENGINES)}")
    replayed = {real_path(path) for path in (*options.traces, *options.holdout)}
    if any(real_path(path) in replayed for path in options.profiling_traces):
        raise UserError("--profiling-trace is a --trace or --holdout: the warm start would be learned on the very "
                        "tokens tuned and checked; give another trace, or leave it out to split each --trace")
    traces = {real_path(path) for path in (*options.traces, *options.holdout, *options.profiling_traces)}
    if real_path(options.out) in traces:
        raise UserError(f"--out {options.out} is one of the input traces: the tuned profile would overwrite it")
    if options.out.suffix.lower() not in (".yaml", ".yml"):
        raise UserError(f"--out {options.out}: the tuned profile is YAML; give a .yaml file")
    check_output(options.out, options.force, "--out")
    if real_path(options.out) in {real_path(path) for path in (options.profile, *options.format_profiles) if path}:
        raise UserError(f"--out {options.out} is a profile the study reads: write the tuned profile to a file of its own")
    if options.pareto and (options.cache_experts is not None or options.cache_ratio is not None):
        raise UserError("--pareto trades time against the cache's size: leave --cache-experts and --cache-ratio out")
    if "ktransformers" in options.exports:
        check_output(ktransformers_path(options.out), options.force, "--export ktransformers")
    if options.report_dir is not None:
        report = options.report_dir
        if os.path.lexists(report) and not report.is_dir():  # a file, or a link that leads nowhere
            raise UserError(f"--report {report} is not a directory")
        if real_path(report) in {real_path(options.out), real_path(ktransformers_path(options.out))}:
            raise UserError(f"--report {report} is the tuned profile's own path: give a directory of its own")
        check_writable_dir(report, f"--report {report}")
        earlier = [name for name in (CSV_NAME, INDEX_NAME, *IMAGE_NAMES) if (report / name).exists()]
        if earlier and not options.force:
            raise UserError(f"--report {report} holds an earlier report ({earlier[0]}); pass --force to overwrite it")
    if options.measure_top < 0 or options.measure_tokens < 2:
        raise UserError("--measure-top must be >= 0 and --measure-tokens >= 2")


def _check_numbers(options: TuneOptions) -> None:
    if options.objective not in OBJECTIVES:
        raise UserError(f"unknown objective {options.objective!r}; expected one of {', '.join(OBJECTIVES)}")
    if options.trials is None and options.timeout_s is None:
        raise UserError("give --trials N or --timeout S (or both)")
    if options.trials is not None and not 1 <= options.trials <= MAX_TRIALS:
        raise UserError(f"--trials must be in [1, {MAX_TRIALS}], got {options.trials}")
    if options.workers < 1:
        raise UserError(f"--workers must be at least 1, got {options.workers}")
    max_workers = MAX_WORKERS_PER_CORE * (os.cpu_count() or 1)
    if options.workers > max_workers:
        raise UserError(f"--workers {options.workers} is more than {max_workers} ({MAX_WORKERS_PER_CORE} per core of "
                        "this machine): each worker is a process with its own copy of the workload")
    held_out = {real_path(path) for path in options.holdout} & {real_path(path) for path in options.traces}
    if held_out:
        raise UserError(f"--holdout {held_out.pop()} is also a --trace: it would not be held out from the search")
    if options.workers > 1 and options.storage == MEMORY_STORAGE:
        raise UserError("--workers above 1 need a shared storage (the default SQLite file or --storage URL), not memory")
    if not 0 <= options.decode_tokens <= MAX_DECODE_TOKENS or options.context_tokens < 1 or options.batch_size < 1:
        raise UserError(f"--decode-tokens must be in [0, {MAX_DECODE_TOKENS}], --context and --batch >= 1")


def _profile(options: TuneOptions, experts: ExpertShape) -> tuple[Path, HardwareProfile]:
    """The profile (its path, and it loaded) for experts kept as `experts` says: `--profile` for the
    checkpoint's format, the one of `format_profiles` made for a quantized format, else this
    machine's for that format."""
    from hybrimoe.profile.directory import this_machines_profile_for

    if experts.quantize is None:
        path = options.profile or this_machines_profile_for(experts)
        return path, load_profile(path)
    for path in options.format_profiles:
        profile = load_profile(path)
        if profile.expert_shape.format == experts.format:
            return path, profile
    path = this_machines_profile_for(experts)
    return path, load_profile(path)


class _Capacity(NamedTuple):
    max_slots: int  # the largest capacity
    fixed_slots: int | None  # the capacity when it is fixed; None when it is searched
    budget: str  # in words
    expert_room_bytes: int  # what the experts may take: the budget's rest, or max_slots slots


def _capacity(
    options: TuneOptions, meta: TraceMeta, profile: HardwareProfile, expert_bytes: int,
    model: ModelShape | None, gguf: GgufModel | None,
) -> _Capacity:
    """The budget's capacity for experts of `expert_bytes` each (packed when quantized; a GGUF's largest)."""
    total = meta.n_layers * meta.n_experts
    budget_bytes = dense_bytes = None
    reserve = Reserve(0, 0)
    budget_source = ""
    if options.gpu_memory_gb is not None:
        if error := memory_budget_error("--gpu-memory-gb", options.gpu_memory_gb):
            raise UserError(error)
        if model is None:
            raise UserError(
                f"--gpu-memory-gb needs the size of {meta.model}'s dense weights: pass --model DIR (its config.json) "
                "or --model X.gguf"
            )
        budget_bytes = int(options.gpu_memory_gb * GIB)
        dense_bytes = model.dense_bytes if gguf is None else gguf.gpu_dense_bytes
        # the whole context as one prefill: the largest step a run of this context can take
        reserve = reserve_for(model, options.batch_size, options.context_tokens, 0)
        budget_source = f"--gpu-memory-gb {options.gpu_memory_gb:g}"
    fixed = options.cache_experts is not None or options.cache_ratio is not None
    if budget_bytes is not None and not fixed:
        slots = min(total, slots_in_budget(budget_bytes, budget_source, expert_bytes, dense_bytes, reserve))
        if slots < 1:
            raise UserError(f"{budget_source} leaves no room for one expert slot ({expert_bytes / 2**20:.1f} MiB)")
        of_gguf = "" if gguf is None else f" of {expert_bytes / 2**20:.2f} MiB ({gguf.path.name}'s largest expert)"
        words = (
            f"{budget_source}: {dense_bytes / GIB:.2f} GiB dense weights, a reserve of "
            f"{reserve.describe()} ({options.batch_size} x {options.context_tokens} tokens), up to {slots} expert "
            f"slots{of_gguf}"
        )
        return _Capacity(slots, None, words, budget_bytes - dense_bytes - reserve.total_bytes)
    policy = profile.policy or PolicyConfig()
    capacity = resolve_capacity(
        n_experts_total=total,
        expert_bytes=expert_bytes,
        dense_bytes=dense_bytes or 0,
        policy_ratio=policy.cache_ratio,
        policy_source=f"profile {profile.name}" if profile.policy else "the default policy",
        cache_experts=options.cache_experts,
        cache_ratio=options.cache_ratio,
        budget_bytes=budget_bytes,
        budget_source=budget_source,
        reserve=reserve,
    )
    if capacity.slots < 1:
        raise UserError(f"the budget ({capacity.source}) leaves no room for one expert slot")
    return _Capacity(capacity.slots, capacity.slots, f"{capacity.slots} expert slots ({capacity.source})",
                     capacity.slots * expert_bytes)


def _model_shape(options: TuneOptions, meta: TraceMeta) -> ModelShape | None:
    """The model whose dense weights share the budget and whose layer numbers the exports use:
    `--model`'s config, or the preset of the traces' shape; None when neither is known."""
    if options.model is not None:
        from hybrimoe.profile.inputs import resolve_model

        return _same_model(resolve_model(model_path=options.model, dtype=meta.dtype), meta, options.model)
    return preset_for_routing(meta.routing_shape)


def _same_model(shape: ModelShape, meta: TraceMeta, path: Path) -> ModelShape:
    """`shape` (read from `--model path`), refused when it is not the model the traces recorded."""
    if shape.routing_shape != meta.routing_shape:
        names = ("layers", "experts", "top-k", "hidden size", "expert intermediate size")
        differ = [f"{name} {a} vs {b}" for name, a, b in zip(names, shape.routing_shape, meta.routing_shape) if a != b]
        raise UserError(f"--model {path} is not the traces' model ({meta.model}): {', '.join(differ)}")
    return shape


def _gguf(options: TuneOptions, meta: TraceMeta) -> GgufModel | None:
    """`--model X.gguf`'s header, checked against the traces' shape; None for another --model."""
    if not is_gguf_path(options.model):
        return None
    gguf = read_gguf(options.model, dtype=meta.dtype)
    _same_model(gguf.shape, meta, options.model)
    return gguf


def _storage_url(options: TuneOptions) -> str | None:
    if options.storage == MEMORY_STORAGE:
        return None
    if options.storage is not None:
        _check_storage_url(options.storage)
        return options.storage
    return f"sqlite:///{real_path(options.out.with_suffix('.optuna.db'))}"


def _check_storage_url(url: str) -> None:
    """Refuses, before any work, a URL that cannot hold a study the workers share: an in-memory
    SQLite database is private to its connection (each worker would tune alone)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"--storage {url.split(':', 1)[0]}:...: not a database URL (e.g. sqlite:///study.db, "
                        "postgresql://user@host/db)") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise UserError(f"--storage {url}: an in-memory SQLite database is private to one connection; "
                        f"use a file (sqlite:///study.db) or --storage {MEMORY_STORAGE}")


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
