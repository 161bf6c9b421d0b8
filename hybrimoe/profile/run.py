"""`hybrimoe profile` as a library call: measure this machine for one model's shapes, fit, build a profile.

Design choices:
- `profile_machine` runs every measurement in the runtime's conditions (`torch.inference_mode`, the
  expert dtype, the thread count) and returns a `HardwareProfile`; writing it is the caller's job.
- Without a GPU the CPU stand-in is profiled as the accelerator, as the runtime uses it: its expert
  curve is the CPU's (the same kernel on the same cores) and its expert load is a copy into a slot
  on the host; the profile says `stand_in: true`, so `run` and `simulate` use it as they would a
  GPU's, with the stand-in's timing (costs.py).
- With a model's `config.json` (`--model`, or the demo model by default) the rest of a step is
  measured on the model's own modules with the runtime (model_costs.py): the dense part of a layer
  replaces the stand-in below, and the CPU worker's per-layer start-up replaces the first-expert
  micro-benchmark. Shapes alone (`--preset`, explicit sizes) keep those stand-ins.
- The thread count defaults to one less than the cores (at least one) on CUDA: the thread that
  launches the layers' work and plans needs a core of its own beside the CPU experts; without an
  accelerator to every core, as the dense part and the experts take turns (`threads.py`). The
  profile records it and `run` uses it.
- The notes also record what each stand-in is, the load average before and after (other processes
  make CPU timings pessimistic), and any slowdown below 1 that was floored as noise.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hybrimoe import __version__
from hybrimoe.config import CurvePoint, HardwareProfile, Interference, LatencyCurve, Provenance, Transfer
from hybrimoe.errors import UserError
from hybrimoe.profile.fit import curve_problems, fit_curve, quality_problem
from hybrimoe.profile.machine import accelerator_cache_bytes, describe_machine, llc_bytes, load_average
from hybrimoe.profile.measure import (
    ExpertPool,
    FirstExpert,
    InterferenceResult,
    expert_timer,
    first_expert,
    h2d_stream,
    host_read_gbps,
    interference,
    latency_curve,
    memcpy_stream,
    slot_copy,
    torch_dtype,
    transfers,
)
from hybrimoe.profile.model_costs import (
    ModelMeasurement,
    ModelTimer,
    build_random_model,
    measure_model,
    measure_planners,
)
from hybrimoe.profile.standins import CONTEXT_TOKENS, DenseLayer, LayerOverhead
from hybrimoe.profile.timing import FULL, QUICK, Budget, Sample, device_timer, host_ms, settle
from hybrimoe.runtime.loading import Quantization
from hybrimoe.runtime.threads import default_threads, torch_threads
from hybrimoe.shapes import ModelShape
from hybrimoe.run_options import check_device

FIRST_EXPERT_GAP_S = 0.002  # idle time before each layer's first CPU expert, as while the GPU runs attention
REMEASURE_ADVICE = "Other processes probably held the cores: profile again on an idle machine, or with fewer --threads."

# (what is being measured now, steps done, steps in all)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ProfileOptions:
    model: ModelShape
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    threads: int | None = None  # torch intra-op threads; None: default_threads(the device is CUDA)
    model_config: Path | None = None  # the model's config.json: also measure its step costs
    quick: bool = False  # about 30 s in all: fewer repeats and token counts
    max_repeats: int | None = None  # caps the timed runs per measurement (tests)
    cache_bytes: int | None = None  # last-level cache to rotate past; None: read from the system
    name: str | None = None
    note: str = ""
    command: str = "hybrimoe profile"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _device(name: str) -> torch.device:
    check_device(name)
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available to torch {torch.__version__}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def profile_name(model: ModelShape, machine_gpu: str | None, cores: int | None) -> str:
    where = re.sub(r"[^a-z0-9]+", "-", machine_gpu.lower()).strip("-") if machine_gpu else f"{cores}core-cpu"
    name = f"measured-{where}.{re.sub(r'[^A-Za-z0-9._-]+', '-', model.name)}"
    return name if model.quantize is None else f"{name}.{model.quantize}g{model.group_size}"


class _Steps:
    def __init__(self, progress: Progress | None, total: int):
        self._progress, self.total, self.done = progress, total, 0

    def show(self, what: str) -> None:
        if self._progress is not None:
            self._progress(what, self.done, self.total)

    def finish(self) -> None:
        self.done += 1
        self.show("done" if self.done == self.total else "")


@dataclass(frozen=True)
class _Setup:
    model: ModelShape
    dtype: torch.dtype
    device: torch.device
    budget: Budget
    cache_bytes: int  # the CPU's last-level cache
    device_cache_bytes: int  # the cache of the device running the accelerator benchmarks and stand-ins
    stream: torch.cuda.Stream | None  # where accelerator work is timed
    interference_threads: int | None

    @property
    def quantization(self) -> Quantization | None:
        """How the runtime would keep the model's experts (the profile's expert shape says)."""
        if self.model.quantize is None:
            return None
        return Quantization(self.model.quantize, self.model.group_size)


def profile_machine(options: ProfileOptions, progress: Progress | None = None) -> HardwareProfile:
    """Measures this machine for `options.model` and returns the fitted profile (not yet written)."""
    cores = os.cpu_count() or 1
    if options.threads is not None and not 1 <= options.threads <= 4 * cores:
        raise UserError(f"--threads must be between 1 and {4 * cores}, got {options.threads}")
    model = options.model
    device = _device(options.device)
    accelerated = device.type == "cuda"
    threads = options.threads or default_threads(accelerated)
    cache_bytes = options.cache_bytes or llc_bytes()
    setup = _Setup(
        model=model,
        dtype=torch_dtype(model.dtype),
        device=device,
        budget=(QUICK if options.quick else FULL).capped(options.max_repeats),
        cache_bytes=cache_bytes,
        device_cache_bytes=accelerator_cache_bytes(device) if accelerated else cache_bytes,
        stream=torch.cuda.Stream(device) if accelerated else None,
        # A host memcpy stream needs a core of its own, or the interference ratio measures core sharing.
        interference_threads=None if accelerated else max(1, min(threads, cores - 1)),
    )
    on_model = options.model_config is not None
    steps = _Steps(progress, total=8 if accelerated else 7)
    load_before = load_average()
    with torch.inference_mode(), torch_threads(threads):
        cpu_points, first, memory_gbps, clash, pool = _measure_cpu(setup, steps)
        if accelerated:
            del pool
            gpu_curve, transfer = _measure_accelerator(setup, steps)
        else:
            gpu_curve, transfer = fit_curve(cpu_points), _stand_in_transfer(pool, setup, steps)
            del pool
        if on_model:
            timer, measured = _measure_model(options.model_config, setup, steps, cpu_points, gpu_curve)
            dense_layer, overhead_ms = measured.dense_layer, measured.host_layer.ms(1)
            first_extra_ms = measured.cpu_worker_ms
        else:
            overhead, dense_points = _measure_layer(setup, steps)
            dense_layer, overhead_ms, first_extra_ms = fit_curve(dense_points), overhead.median_ms, first.extra_ms

    machine = describe_machine(str(device), threads)
    cpu_expert = fit_curve(cpu_points)
    notes = _notes(options, setup, first, clash, threads, cores, load_before, load_average())
    profile = HardwareProfile(
        name=options.name or profile_name(model, machine.gpu, cores),
        expert_shape=model.expert_shape(),
        cpu_expert=cpu_expert,
        dense_layer=dense_layer,
        gpu_expert=gpu_curve,
        transfer=transfer,
        host_memory_gbps=memory_gbps,
        layer_overhead_ms=overhead_ms,
        cpu_first_expert_extra_ms=first_extra_ms,
        interference=Interference(
            cpu_slowdown=max(1.0, clash.cpu_slowdown), copy_slowdown=max(1.0, clash.copy_slowdown)
        ),
        stand_in=not accelerated,
        machine=machine,
        estimated=False,
        notes=notes,
        provenance=Provenance(
            created_by=options.command,
            created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            tool_version=__version__,
        ),
    )
    if on_model:
        with torch.inference_mode(), torch_threads(threads):
            profile = _with_model_costs(profile, timer, measured, steps)
    problems = curve_problems(profile)
    if problems:
        warnings = " ".join(f"Warning: the {what} is not trustworthy: {problem}." for what, problem in problems)
        profile = dataclasses.replace(profile, notes=f"{profile.notes} {warnings} {REMEASURE_ADVICE}")
    return profile


def _stand_in_transfer(pool: ExpertPool, setup: _Setup, steps: _Steps) -> Transfer:
    """The stand-in's expert load: a host copy into a slot."""
    steps.show("stand-in expert load (a copy into a slot)")
    load = slot_copy(pool, setup.budget)
    steps.finish()
    gbps = setup.model.expert_shape().expert_bytes / load.median_ms / 1e6
    return Transfer(expert_load_ms=load.median_ms, h2d_pinned_gbps=gbps, h2d_pinned_expert_gbps=gbps)


def _measure_model(
    config_path: Path, setup: _Setup, steps: _Steps, cpu_points: list[CurvePoint], accelerator_expert: LatencyCurve
) -> tuple[ModelTimer, ModelMeasurement]:
    """The model built from its config with random weights, and its step costs measured with the runtime."""
    from hybrimoe.runtime.accelerator import make_accelerator

    steps.show("the model's own layers: building it with random weights")
    loaded = build_random_model(config_path, setup.device, quantization=setup.quantization)
    timer = ModelTimer(loaded, make_accelerator(str(setup.device)), setup.budget,
                       progress=lambda what: steps.show(f"the model: {what}"))
    measured = measure_model(timer, fit_curve(cpu_points), accelerator_expert)
    steps.finish()
    return timer, measured


def _with_model_costs(
    profile: HardwareProfile, timer: ModelTimer, measured: ModelMeasurement, steps: _Steps
) -> HardwareProfile:
    """The profile with the model's step costs and each strategy's planning time, measured with
    the runtime's executor (the planners plan with this profile)."""
    from hybrimoe.policy.names import STRATEGIES

    config = timer.loaded.model.config
    copy_ms = profile.transfer.expert_load_ms
    profile = dataclasses.replace(profile, model_costs=measured.model_costs(config.model_type))
    if profile.stand_in:  # its expert load as the runtime copies the model's own weights
        profile = dataclasses.replace(
            profile, transfer=dataclasses.replace(profile.transfer, expert_load_ms=measured.expert_load_ms)
        )
    planners = measure_planners(timer, profile, STRATEGIES)
    steps.finish()
    notes = profile.notes + (
        f" dense_layer and model_costs were measured on the model's own modules ({config.model_type}, "
        f"{timer.loaded.n_layers} MoE layers, random weights) with the runtime's executor; "
        "cpu_first_expert_extra_ms is the CPU worker's per-layer start-up measured there, and "
        "layer_overhead_ms the executor's host work for a 1-token step (model_costs.host_layer)."
        + (f" transfer.expert_load_ms is a copy of the model's own expert weights into a slot, measured in "
           f"decode ({measured.expert_load_ms:.3f} ms; {copy_ms:.3f} ms between two warm buffers)."
           if profile.stand_in else "")
    )
    return dataclasses.replace(
        profile, model_costs=measured.model_costs(config.model_type, planners), notes=notes
    )


def _measure_cpu(
    setup: _Setup, steps: _Steps
) -> tuple[list[CurvePoint], FirstExpert, float, InterferenceResult, ExpertPool]:
    """The CPU expert curve, the first expert of a layer, host memory bandwidth, interference
    (and the expert pool, for the stand-in's slot copy)."""
    budget, accelerated = setup.budget, setup.device.type == "cuda"
    steps.show("CPU expert")
    pool = ExpertPool(setup.model.expert_shape(), setup.dtype, torch.device("cpu"), setup.cache_bytes)
    points = latency_curve(expert_timer(pool), budget, on_point=lambda n: steps.show(f"CPU expert, {n} token(s)"))
    problem = quality_problem(fit_curve(points))
    if problem is not None:  # measured once more; the curve with fewer problems is kept
        again = latency_curve(expert_timer(pool), budget,
                              on_point=lambda n: steps.show(f"CPU expert again ({problem}), {n} token(s)"))
        if quality_problem(fit_curve(again)) is None:
            points = again
    steps.finish()
    steps.show("CPU first expert of a layer")
    first = first_expert(pool, setup.model.top_k, budget, gap_s=FIRST_EXPERT_GAP_S)
    steps.finish()
    steps.show("host memory bandwidth")
    memory_gbps = host_read_gbps(setup.cache_bytes, budget)
    steps.finish()
    steps.show("interference: CPU experts with " + ("host-to-device copies" if accelerated else "a memcpy loop"))
    background = h2d_stream(setup.device, setup.cache_bytes) if accelerated else memcpy_stream(setup.cache_bytes)
    clash = interference(pool, background, budget, setup.interference_threads)
    steps.finish()
    return points, first, memory_gbps, clash, pool


def _measure_accelerator(setup: _Setup, steps: _Steps) -> tuple[LatencyCurve, Transfer]:
    """The accelerator expert curve and the host <-> accelerator copies."""
    shape = setup.model.expert_shape()
    steps.show("accelerator expert")
    pool = ExpertPool(shape, setup.dtype, setup.device, setup.device_cache_bytes)
    points = latency_curve(
        expert_timer(pool, setup.stream), setup.budget,
        on_point=lambda n: steps.show(f"accelerator expert, {n} token(s)"),
    )
    del pool
    steps.finish()
    steps.show("host <-> accelerator copies")
    copies = transfers(shape, setup.device, setup.cache_bytes, setup.budget)
    steps.finish()
    transfer = Transfer(
        expert_load_ms=copies.expert_load.median_ms,
        h2d_pinned_gbps=copies.h2d_pinned_gbps,
        h2d_pageable_gbps=copies.h2d_pageable_gbps,
        d2h_gbps=copies.d2h_gbps,
        h2d_pinned_expert_gbps=copies.h2d_pinned_expert_gbps,
    )
    return fit_curve(points), transfer


def _measure_layer(setup: _Setup, steps: _Steps) -> tuple[Sample, list[CurvePoint]]:
    """The per-layer overhead and the dense part of a layer, on the accelerator if there is one."""
    steps.show("per-layer overhead")
    overhead = settle(host_ms(LayerOverhead(setup.model, setup.dtype, setup.device).run), setup.budget)
    steps.finish()
    steps.show("dense part of a layer")
    dense = DenseLayer(setup.model, setup.dtype, setup.device, setup.device_cache_bytes, setup.budget.max_tokens)
    timer = device_timer(setup.device, setup.stream)

    def dense_run(n_tokens: int) -> Callable[[], float]:
        x, mask = dense.tokens(n_tokens), dense.causal_mask(n_tokens)
        return timer(lambda: dense.run(x, mask))

    points = latency_curve(
        dense_run, setup.budget, on_point=lambda n: steps.show(f"dense part of a layer, {n} token(s)")
    )
    steps.finish()
    return overhead, points


def _notes(options, setup, first, clash, threads, cores, load_before, load_after) -> str:
    model, device = setup.model, setup.device
    where = "the accelerator" if device.type == "cuda" else "the CPU"
    notes = [f"Measured for {model.name} ({model.dtype}) with {threads} CPU thread(s) of {cores}."]
    if device.type != "cuda":
        notes.append(
            "No GPU: the accelerator is the runtime's CPU stand-in (stand_in: true): gpu_expert is the CPU "
            "expert curve, transfer.expert_load_ms a host copy of one expert into a slot."
        )
    if options.model_config is None:
        notes.append(
            f"dense_layer is a stand-in measured on {where}: RMSNorms, QKV/O projections, attention over a "
            f"{CONTEXT_TOKENS}-token KV cache, router and shared experts (no rotary embedding, plain GQA)."
        )
        notes.append(
            "layer_overhead_ms is a stand-in: softmax and top-k over router logits, ids to the host, "
            "one tiny expert dispatched (gather, kernel, weighted scatter-add)"
            + (" and the end-of-layer synchronisation." if device.type == "cuda" else ".")
        )
        notes.append(
            f"cpu_first_expert_extra_ms: the first 1-token expert of a layer took {first.first.median_ms:.3f} ms, "
            f"later ones {first.later.median_ms:.3f} ms (each layer after a {FIRST_EXPERT_GAP_S * 1e3:g} ms "
            "idle gap and a pass over 8 MiB of other memory)."
        )
    if device.type == "cuda":
        background = "a host-to-device copy loop"
    else:
        background = (
            "a host memcpy thread (standing in for host-to-device copies), "
            f"experts on {setup.interference_threads} thread(s)"
        )
    notes.append(
        f"Interference: 1-token CPU expert {clash.cpu_alone.median_ms:.3f} ms alone, {clash.cpu_busy.median_ms:.3f} ms "
        f"with {background}; stream {clash.stream_alone_gbps:.2f} GB/s alone, {clash.stream_busy_gbps:.2f} GB/s "
        "beside the experts (slowdowns below 1 are noise, floored at 1)."
    )
    if load_before is not None and load_after is not None:
        busy = "; other processes competed for the CPU, so CPU timings are pessimistic" if load_before >= 0.5 else ""
        notes.append(f"Load average {load_before:.2f} before, {load_after:.2f} after (ours included){busy}.")
    if options.quick:
        notes.append("Quick run: fewer repeats and token counts.")
    if options.note:
        notes.append(options.note)
    return " ".join(notes)
