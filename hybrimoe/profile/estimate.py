"""Estimated hardware profiles: a datasheet roofline, for machines nobody has measured yet.

Units: GB/s = 1e9 bytes/s, TFLOPS = 1e12 FLOP/s, ms = milliseconds. n = tokens given to one expert
(or to one layer's dense part); H = hidden size, I = expert intermediate size, b = bytes per weight,
a = bytes per activation (2, or 4 for float32 models).

The roofline (also in profiles/README.md):

    expert_bytes(n)   = 3*H*I*b + 2*n*H*a                   weights once, input and output rows
    expert_flops(n)   = 2 * 3*H*I * n                       three matmuls, 2 FLOP per multiply-add
    expert_ms(n)      = max(bytes / (eff_bw * BW), flops / (eff_c * C)) + fixed_ms

    CPU: BW = min(cpu_mem_eff * peak DRAM GB/s, cores * per-core GB/s)   cpu_mem_eff = 0.65
         C  = cores * all-core AVX GHz * FLOP/cycle/core (for the weight dtype), cpu_compute_eff = 0.5
         fixed_ms = 0.02 (hand the expert to the thread pool and join)
         cpu_first_expert_extra_ms = 0.05 (waking the pool's threads and warming their caches)
    GPU: BW = gpu_mem_eff * HBM/GDDR GB/s                               gpu_mem_eff = 0.8
         C  = gpu_compute_eff * dense tensor TFLOPS (FP32 TFLOPS for float32 weights), eff = 0.6
         fixed_ms = 0.01 (kernel launches of one expert, queued asynchronously)
    PCIe: link = the slower of the GPU's and the CPU's PCIe generation, x16
          pinned H2D = 0.8 * link GB/s, pageable H2D = 0.4 * link, D2H = 0.8 * link
          expert_load_ms = 3*H*I*b / pinned + 0.01 (copy launch)
    Dense part of one MoE layer on the GPU (attention with a KV cache of `context_tokens` = 512
    earlier tokens, router, shared experts; norms are negligible):
          weights = H*(heads*hd) + 2*H*(kv_heads*hd) + (heads*hd)*H + H*E + 3*H*I_shared*n_shared
          bytes   = weights*b + (context + n) * 2*kv_heads*hd * a + 4*n*H*a
          flops   = 2*n*weights + 4*n*(context + n/2)*heads*hd
          dense_ms(n) = max(bytes / (gpu_mem_eff * BW), flops / (gpu_compute_eff * C)) + 0.06
          (0.06 ms: about a dozen kernel launches per layer)
    layer_overhead_ms = 0.05 (planning, one synchronisation, the combine of CPU and GPU outputs)
    Interference: copies and CPU experts share DRAM; together they reach 0.85 * peak, so
          cpu_slowdown = max(1, cpu_BW / (0.85 * peak - pinned H2D)); copies are PCIe-bound: 1.0
    CPU stand-in (a machine without a GPU; the runtime's stand-in accelerator is the same CPU):
          gpu_expert = cpu_expert; dense part on the CPU (the formula above with the CPU's BW and C)
          copy = a host memcpy, which reads and writes every byte: copy GB/s = cpu_BW / 2 (pinned,
          pageable and D2H alike); expert_load_ms = 3*H*I*b / copy GB/s + 0.01
          Interference: both are DRAM-bound and share 0.85 * peak in proportion to what they ask, so
          cpu_slowdown = copy_slowdown = max(1, (cpu_BW + 2 * copy GB/s) / (0.85 * peak))

Design choices:
- Datasheets are plain frozen dataclasses with their source named; efficiencies are module
  constants, stated once here, so an estimate can be traced to numbers anyone can check.
- Curves are points at n = 1, 2, 4, ..., 2048 (interpolated by `LatencyCurve`) plus a least-squares
  line used beyond 2048; every profile is marked `estimated: true` with its sources.
- A machine's PCIe link is the slower end: an RTX A6000 (PCIe 4.0) in a Cascade Lake Xeon server
  (PCIe 3.0) copies at PCIe 3.0 speed.
- Quantized weights (int8, int4, `runtime/quantized.py`) shrink what a load copies, not FLOPs.
  What an expert's kernel streams follows the runtime's kernels: on the CPU the packed weights
  (torch's int8 and int4 matmuls); on a GPU they are dequantized first, so the kernel reads the
  packed weights and writes and reads back the dequantized ones (3*H*I*(q + 2*b) bytes).
- A machine without a GPU (`MachineSpec.gpu` None; in STAND_IN_MACHINES, not MACHINES, as no
  profile of it is shipped and its "GPU" is no faster than its CPU) is estimated as the runtime runs
  it, with the CPU stand-in as accelerator, and marked `stand_in: true`. The stand-in and the CPU worker are each given the
  whole CPU's rates; that they share its cores when both run is left to the cost model.
- `estimate_for_this_machine` is what a run without a measured profile plans with: the stand-in
  machine on a CPU-only run, the RTX 4090 desktop on any GPU.

Regenerate the shipped profiles from the repository root: `python -m hybrimoe.profile.estimate --all`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybrimoe import __version__
from hybrimoe.config import (
    DTYPE_BYTES,
    CurvePoint,
    HardwareProfile,
    Interference,
    LatencyCurve,
    LinearFit,
    Machine,
    Provenance,
    Transfer,
    save_profile,
)
from hybrimoe.errors import UserError
from hybrimoe.profile.directory import profile_model_name
from hybrimoe.shapes import PRESETS, ModelShape, get_preset

CPU_MEM_EFF = 0.65
CPU_COMPUTE_EFF = 0.5
CPU_EXPERT_FIXED_MS = 0.02
CPU_FIRST_EXPERT_EXTRA_MS = 0.05
GPU_MEM_EFF = 0.8
GPU_COMPUTE_EFF = 0.6
GPU_EXPERT_FIXED_MS = 0.01
PCIE_PINNED_EFF = 0.8
PCIE_PAGEABLE_EFF = 0.4
COPY_LAUNCH_MS = 0.01
DENSE_FIXED_MS = 0.06
LAYER_OVERHEAD_MS = 0.05
CONTEXT_TOKENS = 512
COMBINED_DRAM_EFF = 0.85
MEMCPY_DRAM_PASSES = 2  # a host memcpy reads and writes every byte it copies
N_TOKENS_POINTS = tuple(2**i for i in range(12))  # 1, 2, 4, ..., 2048

PCIE_X16_GBPS = {"3.0": 15.75, "4.0": 31.5, "5.0": 63.0}  # per direction, after 128b/130b encoding


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gbps: float  # peak device memory bandwidth
    bf16_tflops: float  # dense BF16 tensor-core throughput (FP32 accumulate), no sparsity
    fp32_tflops: float  # non-tensor FP32
    memory_gb: float
    pcie: str  # generation of its x16 link
    source: str


@dataclass(frozen=True)
class CpuSpec:
    name: str
    cores: int  # cores used for experts
    threads: int
    memory: str  # channels x module speed
    memory_gbps: float  # peak DRAM bandwidth of the memory the cores use
    per_core_gbps: float  # what one core can stream on its own (limits a few cores)
    avx_ghz: float  # sustained all-core clock under vector load
    fp32_flops_per_cycle: int  # per core: FMA units x lanes x 2
    bf16_flops_per_cycle: int  # per core; equals the FP32 rate without native BF16 dot products
    pcie: str
    source: str


@dataclass(frozen=True)
class MachineSpec:
    name: str
    cpu: CpuSpec
    gpu: GpuSpec | None  # None: no GPU, the CPU stand-in plays the accelerator
    notes: str = ""


GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec("RTX 4090", 1008.0, 165.2, 82.6, 24.0, "4.0",
                "NVIDIA Ada GPU Architecture whitepaper v2.1, appendix A (GeForce RTX 4090)"),
        GpuSpec("RTX A6000", 768.0, 154.8, 38.7, 48.0, "4.0", "NVIDIA RTX A6000 datasheet"),
        GpuSpec("RTX 3090", 936.0, 71.0, 35.6, 24.0, "4.0",
                "NVIDIA Ampere GA102 GPU Architecture whitepaper v2.0, appendix A (GeForce RTX 3090)"),
        GpuSpec("L40S", 864.0, 362.05, 91.6, 48.0, "4.0", "NVIDIA L40S datasheet"),
        GpuSpec("A100 80GB PCIe", 1935.0, 312.0, 19.5, 80.0, "4.0", "NVIDIA A100 Tensor Core GPU datasheet"),
        GpuSpec("H100 PCIe", 2000.0, 756.0, 51.0, 80.0, "5.0", "NVIDIA H100 Tensor Core GPU datasheet"),
    )
}

CPUS: dict[str, CpuSpec] = {
    c.name: c
    for c in (
        CpuSpec(
            "AMD Ryzen 9 7950X", cores=16, threads=32, memory="2 x DDR5-5600", memory_gbps=89.6,
            per_core_gbps=40.0, avx_ghz=4.5, fp32_flops_per_cycle=32, bf16_flops_per_cycle=64, pcie="5.0",
            source="AMD Ryzen 9 7950X product page; Zen 4: two 256-bit FMA pipes, AVX-512 BF16 (vdpbf16ps)",
        ),
        CpuSpec(
            "Intel Xeon Gold 5220R (10 cores)", cores=10, threads=20, memory="6 x DDR4-2666",
            memory_gbps=128.0, per_core_gbps=11.0, avx_ghz=2.0, fp32_flops_per_cycle=64,
            bf16_flops_per_cycle=64, pcie="3.0",
            source="Intel ARK: Xeon Gold 5220R (24 cores, 6 channels DDR4-2666, 2 AVX-512 FMA units, PCIe 3.0); "
            "HybriMoE (arXiv 2504.05897) limits it to 10 cores",
        ),
    )
}

MACHINES: dict[str, MachineSpec] = {
    m.name: m
    for m in (
        MachineSpec("rtx4090-desktop", CPUS["AMD Ryzen 9 7950X"], GPUS["RTX 4090"],
                    "16-core desktop with dual-channel DDR5-5600 and an RTX 4090 on PCIe 4.0 x16"),
        MachineSpec("a6000-xeon5220r", CPUS["Intel Xeon Gold 5220R (10 cores)"], GPUS["RTX A6000"],
                    "the HybriMoE paper's machine: RTX A6000 with a Xeon Gold 5220R limited to 10 cores; "
                    "the Xeon's PCIe 3.0 limits the A6000's link"),
    )
}

STAND_IN_MACHINES: dict[str, MachineSpec] = {
    m.name: m
    for m in (
        MachineSpec("cpu-standin-desktop", CPUS["AMD Ryzen 9 7950X"], None,
                    "the rtx4090-desktop's CPU without a GPU: the runtime's CPU stand-in is the accelerator, "
                    "its copies host memcpys"),
    )
}

DEFAULT_MACHINE = "rtx4090-desktop"  # the estimate for a run on a GPU nobody has measured
STAND_IN_MACHINE = "cpu-standin-desktop"  # the estimate for a run on a machine without a GPU

SHIPPED_MODELS = ("qwen3-30b-a3b", "deepseek-v2-lite", "demo")
SHIPPED_QUANTIZED = (("qwen3-30b-a3b", "int8"), ("qwen3-30b-a3b", "int4"))  # (model, format), groups of 128


def _ms(n_bytes: float, gbps: float) -> float:
    return n_bytes / (gbps * 1e6)


def _tflops_ms(flops: float, tflops: float) -> float:
    return flops / (tflops * 1e9)


@dataclass(frozen=True)
class Roofline:
    """The effective rates of one machine for one model's weight dtype."""

    cpu_gbps: float
    cpu_tflops: float
    gpu_gbps: float
    gpu_tflops: float
    pinned_gbps: float
    pageable_gbps: float
    d2h_gbps: float

    @classmethod
    def of(cls, machine: MachineSpec, dtype: str) -> Roofline:
        """Without a GPU, the "GPU" rates are the CPU's and the copies host memcpys (the stand-in)."""
        cpu, gpu = machine.cpu, machine.gpu
        fp32 = dtype == "float32"
        flops_per_cycle = cpu.fp32_flops_per_cycle if fp32 else cpu.bf16_flops_per_cycle
        cpu_gbps = min(CPU_MEM_EFF * cpu.memory_gbps, cpu.cores * cpu.per_core_gbps)
        cpu_tflops = CPU_COMPUTE_EFF * cpu.cores * cpu.avx_ghz * flops_per_cycle / 1e3
        if gpu is None:
            memcpy_gbps = cpu_gbps / MEMCPY_DRAM_PASSES
            return cls(
                cpu_gbps=cpu_gbps, cpu_tflops=cpu_tflops, gpu_gbps=cpu_gbps, gpu_tflops=cpu_tflops,
                pinned_gbps=memcpy_gbps, pageable_gbps=memcpy_gbps, d2h_gbps=memcpy_gbps,
            )
        link_gbps = min(PCIE_X16_GBPS[cpu.pcie], PCIE_X16_GBPS[gpu.pcie])
        return cls(
            cpu_gbps=cpu_gbps,
            cpu_tflops=cpu_tflops,
            gpu_gbps=GPU_MEM_EFF * gpu.memory_gbps,
            gpu_tflops=GPU_COMPUTE_EFF * (gpu.fp32_tflops if fp32 else gpu.bf16_tflops),
            pinned_gbps=PCIE_PINNED_EFF * link_gbps,
            pageable_gbps=PCIE_PAGEABLE_EFF * link_gbps,
            d2h_gbps=PCIE_PINNED_EFF * link_gbps,
        )


def _activation_bytes(shape: ModelShape) -> int:
    return 4 if shape.dtype == "float32" else 2


def expert_weight_bytes(shape: ModelShape) -> float:
    """One expert's weights as the runtime keeps them (packed when quantized): what a load copies."""
    return shape.expert_shape().expert_bytes


def expert_read_bytes(shape: ModelShape, on_cpu: bool) -> float:
    """The weight bytes one expert's kernel streams: its weights, plus, where the runtime dequantizes
    before the matmul (quantized experts on a GPU), the dequantized weights written and read back."""
    packed = expert_weight_bytes(shape)
    if shape.quantize is None or on_cpu:
        return packed
    return packed + 2 * 3 * shape.hidden_size * shape.intermediate_size * DTYPE_BYTES[shape.dtype]


def expert_ms(
    shape: ModelShape, n_tokens: int, gbps: float, tflops: float, fixed_ms: float, on_cpu: bool = True
) -> float:
    """One routed expert on `n_tokens` tokens on a device with these effective rates."""
    n_bytes = expert_read_bytes(shape, on_cpu) + 2 * n_tokens * shape.hidden_size * _activation_bytes(shape)
    flops = 2 * 3 * shape.hidden_size * shape.intermediate_size * n_tokens
    return max(_ms(n_bytes, gbps), _tflops_ms(flops, tflops)) + fixed_ms


def dense_layer_ms(shape: ModelShape, n_tokens: int, gbps: float, tflops: float) -> float:
    """Attention (KV cache of CONTEXT_TOKENS earlier tokens), router and shared experts of one layer."""
    H, a = shape.hidden_size, _activation_bytes(shape)
    q_width, kv_width = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    weights = (
        H * q_width + 2 * H * kv_width + q_width * H
        + H * shape.n_experts
        + 3 * H * shape.shared_intermediate_size * shape.n_shared_experts
    )
    weight_bytes = weights * (a if DTYPE_BYTES[shape.dtype] < 2 else DTYPE_BYTES[shape.dtype])
    n_bytes = weight_bytes + (CONTEXT_TOKENS + n_tokens) * 2 * kv_width * a + 4 * n_tokens * H * a
    flops = 2 * n_tokens * weights + 4 * n_tokens * (CONTEXT_TOKENS + n_tokens / 2) * q_width
    return max(_ms(n_bytes, gbps), _tflops_ms(flops, tflops)) + DENSE_FIXED_MS


def _curve(ms_of) -> LatencyCurve:
    counts = np.array(N_TOKENS_POINTS, dtype=np.float64)
    values = np.array([ms_of(int(n)) for n in N_TOKENS_POINTS])
    slope, intercept = np.polyfit(counts, values, 1)
    intercept = max(float(intercept), 0.0)  # profiles hold no negative times
    fitted = intercept + slope * counts
    r2 = 1.0 - float(((values - fitted) ** 2).sum() / ((values - values.mean()) ** 2).sum())
    return LatencyCurve(
        points=tuple(CurvePoint(int(n), float(v)) for n, v in zip(N_TOKENS_POINTS, values)),
        fit=LinearFit(
            intercept_ms=intercept,
            per_token_ms=float(slope),
            r2=r2,
            max_rel_error=float((np.abs(fitted - values) / values).max()),
        ),
    )


def get_machine(name: str) -> MachineSpec:
    known = {**MACHINES, **STAND_IN_MACHINES}
    try:
        return known[name]
    except KeyError:
        raise UserError(f"unknown machine {name!r}; known: {', '.join(known)}") from None


def _interference(machine: MachineSpec, rates: Roofline) -> Interference:
    combined_gbps = COMBINED_DRAM_EFF * machine.cpu.memory_gbps
    if machine.gpu is None:
        # Stand-in copies are host memcpys: both streams are DRAM-bound and share it by demand.
        slowdown = max(1.0, (rates.cpu_gbps + MEMCPY_DRAM_PASSES * rates.pinned_gbps) / combined_gbps)
        return Interference(cpu_slowdown=slowdown, copy_slowdown=slowdown)
    return Interference(
        cpu_slowdown=max(1.0, rates.cpu_gbps / (combined_gbps - rates.pinned_gbps)),
        copy_slowdown=1.0,
    )


def estimate_profile(machine_name: str, shape: ModelShape, gpu: str | None = None) -> HardwareProfile:
    """The roofline estimate of `machine_name` (optionally with another GPU from GPUS) for `shape`.

    A machine without a GPU (STAND_IN_MACHINES) gets the CPU stand-in as its accelerator: the same
    expert curve on both sides, host-memcpy copies, the dense part on the CPU, `stand_in` True.
    """
    machine = get_machine(machine_name)
    if gpu is not None:
        if gpu not in GPUS:
            raise UserError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
        machine = dataclasses.replace(machine, name=f"{machine.name}+{gpu}", gpu=GPUS[gpu])
    stand_in = machine.gpu is None
    rates = Roofline.of(machine, shape.dtype)
    weight_bytes = expert_weight_bytes(shape)
    load_ms = _ms(weight_bytes, rates.pinned_gbps) + COPY_LAUNCH_MS
    cpu_expert = _curve(lambda n: expert_ms(shape, n, rates.cpu_gbps, rates.cpu_tflops, CPU_EXPERT_FIXED_MS))
    gpu_expert = cpu_expert if stand_in else _curve(
        lambda n: expert_ms(shape, n, rates.gpu_gbps, rates.gpu_tflops, GPU_EXPERT_FIXED_MS, on_cpu=False)
    )
    dense_where = " on the CPU" if stand_in else ""  # on the GPU unless said
    return HardwareProfile(
        name=f"{machine.name}.{profile_model_name(shape.name, shape.quantize, shape.group_size)}",
        expert_shape=shape.expert_shape(),
        cpu_expert=cpu_expert,
        dense_layer=_curve(lambda n: dense_layer_ms(shape, n, rates.gpu_gbps, rates.gpu_tflops)),
        gpu_expert=gpu_expert,
        transfer=Transfer(
            expert_load_ms=load_ms,
            h2d_pinned_gbps=rates.pinned_gbps,
            h2d_pageable_gbps=rates.pageable_gbps,
            d2h_gbps=rates.d2h_gbps,
            h2d_pinned_expert_gbps=weight_bytes / (load_ms * 1e6),
        ),
        host_memory_gbps=rates.cpu_gbps,
        layer_overhead_ms=LAYER_OVERHEAD_MS,
        cpu_first_expert_extra_ms=CPU_FIRST_EXPERT_EXTRA_MS,
        interference=_interference(machine, rates),
        stand_in=stand_in,
        machine=Machine(
            cpu=machine.cpu.name,
            cores=machine.cpu.cores,
            threads=machine.cpu.threads,
            gpu=None if stand_in else machine.gpu.name,
            gpu_memory_gb=None if stand_in else machine.gpu.memory_gb,
        ),
        estimated=True,
        sources=(
            machine.cpu.source,
            *(() if stand_in else (machine.gpu.source,)),
            "roofline: hybrimoe/profile/estimate.py, profiles/README.md",
        ),
        notes=(
            f"{machine.notes}; {machine.cpu.memory}; dense part{dense_where} with a KV cache of "
            f"{CONTEXT_TOKENS} tokens; model {shape.name}"
        ),
        provenance=Provenance(
            created_by="python -m hybrimoe.profile.estimate",
            created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            tool_version=__version__,
        ),
    )


def estimate_for_this_machine(shape: ModelShape, device: str) -> HardwareProfile:
    """The estimate to plan with on a machine without a measured profile, for `device` 'cpu' or 'cuda[:N]'.

    'cpu' (no GPU: the runtime's CPU stand-in is the accelerator): STAND_IN_MACHINE, marked `stand_in`.
    'cuda': DEFAULT_MACHINE, an RTX 4090 desktop, whatever the GPU is; a datasheet of the actual
    GPU (found by its name in GPUS) would be better, and measuring with `hybrimoe profile` better still.
    """
    kind = device.split(":", 1)[0]
    if kind == "cpu":
        return estimate_profile(STAND_IN_MACHINE, shape)
    if kind == "cuda":
        return estimate_profile(DEFAULT_MACHINE, shape)
    raise UserError(f"unknown device {device!r}; expected cpu or cuda[:N]")


def datasheet_rows() -> list[dict[str, str]]:
    """The datasheet table, one row per GPU and CPU, for listing."""
    rows = [
        {
            "kind": "GPU", "name": g.name, "memory": f"{g.memory_gb:g} GB, {g.memory_gbps:g} GB/s",
            "compute": f"{g.bf16_tflops:g} TFLOPS bf16 tensor, {g.fp32_tflops:g} fp32", "pcie": f"{g.pcie} x16",
            "source": g.source,
        }
        for g in GPUS.values()
    ]
    rows += [
        {
            "kind": "CPU", "name": c.name, "memory": f"{c.memory}, {c.memory_gbps:g} GB/s",
            "compute": f"{c.cores} cores x {c.avx_ghz:g} GHz x {c.bf16_flops_per_cycle} bf16 FLOP/cycle = "
            f"{c.cores * c.avx_ghz * c.bf16_flops_per_cycle / 1e3:.2f} TFLOPS",
            "pcie": f"{c.pcie}", "source": c.source,
        }
        for c in CPUS.values()
    ]
    return rows


def shipped_profile_path(out_dir: str | Path, machine_name: str, shape: ModelShape) -> Path:
    return Path(out_dir) / f"{machine_name}.{profile_model_name(shape.name, shape.quantize, shape.group_size)}.yaml"


def write_shipped_profiles(out_dir: str | Path = "profiles") -> list[Path]:
    """Every machine in MACHINES for every model in SHIPPED_MODELS, and the SHIPPED_QUANTIZED
    formats, overwriting."""
    shapes = [PRESETS[model] for model in SHIPPED_MODELS]
    shapes += [PRESETS[model].quantized(quantize) for model, quantize in SHIPPED_QUANTIZED]
    return [
        save_profile(estimate_profile(machine, shape), shipped_profile_path(out_dir, machine, shape), overwrite=True)
        for machine in MACHINES
        for shape in shapes
    ]


def _main() -> None:
    parser = argparse.ArgumentParser(prog="python -m hybrimoe.profile.estimate", description=__doc__.split("\n")[0])
    parser.add_argument("--all", action="store_true", help="write every shipped profile into --out-dir")
    parser.add_argument("--out-dir", default="profiles", help="where --all writes (default: profiles)")
    parser.add_argument(
        "--machine", choices=sorted({**MACHINES, **STAND_IN_MACHINES}), help="one machine (with --model and --out)"
    )
    parser.add_argument("--model", choices=sorted(PRESETS), help="a model preset")
    parser.add_argument("--out", help="the profile YAML to write for --machine and --model")
    args = parser.parse_args()
    if args.all:
        for path in write_shipped_profiles(args.out_dir):
            print(path)
    elif args.machine and args.model and args.out:
        print(save_profile(estimate_profile(args.machine, get_preset(args.model)), args.out, overwrite=True))
    else:
        parser.error("give --all, or --machine, --model and --out")


if __name__ == "__main__":
    _main()
