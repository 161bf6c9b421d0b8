"""`hybrimoe profile` as a library call: measure this machine for one model's shapes, fit, build a profile.

Design choices:
- `profile_machine` runs every measurement in the runtime's conditions (`torch.inference_mode`, the
  expert dtype, the thread count) and returns a `HardwareProfile`; writing it is the caller's job.
- Without an accelerator the profile holds the CPU and memory sections only (`gpu_expert` and
  `transfer` None), measures the dense stand-in on the CPU, and says so in its notes: `simulate
  --accelerator-from` combines it with a shipped accelerator profile.
- The notes also record what each stand-in is, the load average before and after (other processes
  make CPU timings pessimistic), and any slowdown below 1 that was floored as noise.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hybrimoe import __version__
from hybrimoe.config import CurvePoint, HardwareProfile, Interference, LatencyCurve, Provenance, Transfer
from hybrimoe.errors import UserError
from hybrimoe.profile.fit import fit_curve, is_erratic
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
    torch_dtype,
    torch_threads,
    transfers,
)
from hybrimoe.profile.presets import ModelShape
from hybrimoe.profile.standins import CONTEXT_TOKENS, DenseLayer, LayerOverhead
from hybrimoe.profile.timing import FULL, QUICK, Budget, Sample, device_timer, host_ms, settle

FIRST_EXPERT_GAP_S = 0.002  # idle time before each layer's first CPU expert, as while the GPU runs attention
ERRATIC_NOTE = (
    "Warning: CPU expert latency falls as tokens grow, so other processes held the cores the kernel's "
    "threads wait for: profile again on an idle machine, or with fewer --threads."
)

# (what is being measured now, steps done, steps in all)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ProfileOptions:
    model: ModelShape
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    threads: int | None = None  # torch intra-op threads; None: torch's default, as the runtime uses
    quick: bool = False  # about 30 s in all: fewer repeats and token counts
    max_repeats: int | None = None  # caps the timed runs per measurement (tests)
    cache_bytes: int | None = None  # last-level cache to rotate past; None: read from the system
    name: str | None = None
    note: str = ""
    command: str = "hybrimoe profile"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device must be cpu or cuda, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available to torch {torch.__version__}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def profile_name(model: ModelShape, machine_gpu: str | None, cores: int | None) -> str:
    where = re.sub(r"[^a-z0-9]+", "-", machine_gpu.lower()).strip("-") if machine_gpu else f"{cores}core-cpu"
    return f"measured-{where}.{re.sub(r'[^A-Za-z0-9._-]+', '-', model.name)}"


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


def profile_machine(options: ProfileOptions, progress: Progress | None = None) -> HardwareProfile:
    """Measures this machine for `options.model` and returns the fitted profile (not yet written)."""
    cores = os.cpu_count() or 1
    if options.threads is not None and not 1 <= options.threads <= 4 * cores:
        raise UserError(f"--threads must be between 1 and {4 * cores}, got {options.threads}")
    model = options.model
    device = _device(options.device)
    accelerated = device.type == "cuda"
    threads = options.threads or torch.get_num_threads()
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
    steps = _Steps(progress, total=8 if accelerated else 6)
    load_before = load_average()
    with torch.inference_mode(), torch_threads(threads):
        cpu_points, first, memory_gbps, clash = _measure_cpu(setup, steps)
        gpu_curve, transfer = _measure_accelerator(setup, steps) if accelerated else (None, None)
        overhead, dense_points = _measure_layer(setup, steps)

    machine = describe_machine(str(device), threads)
    cpu_expert = fit_curve(cpu_points)
    notes = _notes(options, setup, first, clash, threads, cores, load_before, load_average())
    if is_erratic(cpu_expert):
        notes += f" {ERRATIC_NOTE}"
    return HardwareProfile(
        name=options.name or profile_name(model, machine.gpu, cores),
        expert_shape=model.expert_shape(),
        cpu_expert=cpu_expert,
        dense_layer=fit_curve(dense_points),
        gpu_expert=gpu_curve,
        transfer=transfer,
        host_memory_gbps=memory_gbps,
        layer_overhead_ms=overhead.median_ms,
        cpu_first_expert_extra_ms=first.extra_ms,
        interference=Interference(
            cpu_slowdown=max(1.0, clash.cpu_slowdown), copy_slowdown=max(1.0, clash.copy_slowdown)
        ),
        machine=machine,
        estimated=False,
        notes=notes,
        provenance=Provenance(
            created_by=options.command,
            created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            tool_version=__version__,
        ),
    )


def _measure_cpu(setup: _Setup, steps: _Steps) -> tuple[list[CurvePoint], FirstExpert, float, InterferenceResult]:
    """The CPU expert curve, the first expert of a layer, host memory bandwidth, interference."""
    budget, accelerated = setup.budget, setup.device.type == "cuda"
    steps.show("CPU expert")
    pool = ExpertPool(setup.model.expert_shape(), setup.dtype, torch.device("cpu"), setup.cache_bytes)
    points = latency_curve(expert_timer(pool), budget, on_point=lambda n: steps.show(f"CPU expert, {n} token(s)"))
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
    return points, first, memory_gbps, clash


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
            "No accelerator: gpu_expert and transfer are absent; combine with an accelerator profile "
            "(`hybrimoe simulate --accelerator-from`)."
        )
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
        f"later ones {first.later.median_ms:.3f} ms (each layer after a {FIRST_EXPERT_GAP_S * 1e3:g} ms idle gap "
        "and a pass over 8 MiB of other memory)."
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
