"""Quantized experts on this machine: decode speed and memory of bfloat16, int8 and int4, in one run.

Part 1, measured on the CPU stand-in: a random-weight model with Qwen3-30B-A3B's experts and
attention (`--layers` MoE layers of 128 experts, 3 x 2048 x 768, top-8; a 4096-token vocabulary so
the LM head does not hide the experts), its routing replayed from the shipped Qwen3-30B-A3B trace,
built once per format with `run --quantize`'s loading. For each format it prints the routed
experts' host memory (the pooled store, packed when quantized) and decode tokens/s (batch 1, the median of
`--repeats`, each a fresh planner and replay from the trace's first token) with the hybrid runtime
at `--cache-ratio` (hybrimoe, planned with the stand-in estimate for that format) and with every
expert on the CPU (cpu-only), with each format's ratio to bfloat16 measured in the same run.

Part 2, simulated: the same trace on the shipped RTX 4090 desktop estimates (bfloat16, int8,
int4), decode ms/token of hybrimoe and the best baseline, at the same 24 GB of GPU memory (the
cache holds what fits after the dense weights and run's reserve) and at a fixed 25% cache.

Usage: python benchmarks/bench_quantize.py [--layers 4] [--new-tokens 16] [--repeats 3] [--small]
(`--small`: 256-wide experts, 2 layers, a few seconds; for the test that keeps the script working)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import TRACE, qwen3_config, qwen3_random  # noqa: E402  (the Qwen3-shaped random model)

from hybrimoe.config import PolicyConfig, load_profile  # noqa: E402
from hybrimoe.policy.comparison import compare_strategies  # noqa: E402
from hybrimoe.policy.names import BASELINES  # noqa: E402
from hybrimoe.run import default_profile  # noqa: E402
from hybrimoe.runtime.accelerator import CpuStandIn  # noqa: E402
from hybrimoe.capacity import GIB, reserve_for, slots_in_budget  # noqa: E402
from hybrimoe.runtime.generate import generate  # noqa: E402
from hybrimoe.runtime.hybrid import HybridRuntime  # noqa: E402
from hybrimoe.runtime.loading import LoadedModel, Quantization, from_model  # noqa: E402
from hybrimoe.runtime.planning import build_planner, model_shape  # noqa: E402
from hybrimoe.runtime.replay import RoutingReplay  # noqa: E402
from hybrimoe.runtime.threads import default_threads  # noqa: E402
from hybrimoe.shapes import get_preset  # noqa: E402
from hybrimoe.trace import load_trace  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FORMATS = (None, "int8", "int4")  # None: the checkpoint's bfloat16
VOCAB = 4096
PROMPT_TOKENS = 8
GPU_MEMORY_GB = 24


def _decode_tokens_per_s(loaded: LoadedModel, strategy: str, cache_ratio: float, n_new: int, threads: int) -> float:
    """One generation with a fresh planner and replay: decode tokens/s."""
    trace = load_trace(TRACE)
    name = "qwen3-experts-random"
    profile = default_profile(model_shape(loaded, name), "cpu")
    slots = 0 if strategy == "cpu-only" else round(cache_ratio * loaded.n_layers * loaded.n_experts)
    planner = build_planner(strategy, loaded, profile, PolicyConfig(cache_ratio=cache_ratio), slots)
    replay = RoutingReplay.for_model(trace, loaded.n_layers, loaded.n_experts, loaded.top_k, str(TRACE))
    ids = torch.randint(0, VOCAB, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    with HybridRuntime(loaded, planner, CpuStandIn(), slots, replay=replay, cpu_threads=threads) as runtime:
        out = generate(loaded.model, ids, torch.ones_like(ids), n_new, before_step=runtime.begin_step,
                       on_step=runtime.end_step)
    return (n_new - 1) / out.decode_s


def measure_formats(args: argparse.Namespace) -> list[dict]:
    config = qwen3_config(args.layers, args.small)
    config.vocab_size = VOCAB
    threads = args.threads or default_threads(is_cuda=False)
    rows = []
    for quantize in FORMATS:
        started = time.perf_counter()
        quantization = None if quantize is None else Quantization(quantize, args.group_size)
        loaded = from_model(qwen3_random(config), "cpu", quantization=quantization)
        built_s = time.perf_counter() - started
        _decode_tokens_per_s(loaded, "hybrimoe", args.cache_ratio, 3, threads)  # warm-up: first calls
        speeds = {
            strategy: statistics.median(
                _decode_tokens_per_s(loaded, strategy, args.cache_ratio, args.new_tokens, threads)
                for _ in range(args.repeats)
            )
            for strategy in ("hybrimoe", "cpu-only")
        }
        rows.append({
            "format": loaded.expert_shape.format,
            "expert_mib": loaded.expert_shape.expert_bytes / 2**20,
            "experts_gib": loaded.host_experts.n_bytes / GIB,
            "built_s": built_s,
            **speeds,
        })
        print(f"  {rows[-1]['format']}: built in {built_s:.0f} s; decode {speeds['hybrimoe']:.2f} tokens/s "
              f"(hybrimoe), {speeds['cpu-only']:.2f} (cpu-only)", flush=True)
        del loaded
        gc.collect()
    return rows


def print_measured(rows: list[dict], args: argparse.Namespace) -> None:
    base = rows[0]
    print(f"\nMeasured on the CPU stand-in ({args.layers} MoE layers x 128 experts, top-8, routing replayed "
          f"from {TRACE.name}; {args.threads or default_threads(is_cuda=False)} expert threads; median of {args.repeats}):\n")
    print(f"| experts | one expert | routed experts in host memory | "
          f"decode tokens/s, hybrimoe at {args.cache_ratio:.0%} cache | vs bfloat16 | cpu-only | vs bfloat16 |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['format']} | {row['expert_mib']:.2f} MiB | {row['experts_gib']:.2f} GiB | "
              f"{row['hybrimoe']:.2f} | {row['hybrimoe'] / base['hybrimoe']:.2f}x | "
              f"{row['cpu-only']:.2f} | {row['cpu-only'] / base['cpu-only']:.2f}x |")


def print_simulated(max_tokens: int) -> None:
    trace = load_trace(TRACE)
    shape = get_preset("qwen3-30b-a3b")
    n_total = shape.n_layers * shape.n_experts
    reserve = reserve_for(shape, 1, 4096, 0)
    print(f"\nSimulated: {TRACE.name} ({max_tokens} tokens) on the RTX 4090 desktop estimates, decode "
          f"ms/token (hybrimoe, the best deployable baseline, and their ratio):\n")
    print(f"| experts | one expert | all experts | cache at {GPU_MEMORY_GB} GB | hybrimoe | best baseline | ratio "
          "| hybrimoe at 25% cache | best baseline at 25% |")
    print("|---|---|---|---|---|---|---|---|---|")
    for quantize in FORMATS:
        name = "rtx4090-desktop.qwen3-30b-a3b" + ("" if quantize is None else f".{quantize}g128")
        profile = load_profile(REPO / "profiles" / f"{name}.yaml")
        expert_bytes = profile.expert_shape.expert_bytes
        slots = min(n_total, slots_in_budget(GPU_MEMORY_GB * GIB, f"{GPU_MEMORY_GB} GB", expert_bytes,
                                             shape.dense_bytes, reserve))
        at_budget = slots / n_total
        comparison = compare_strategies(trace, profile, ratios=(at_budget, 0.25), strategies=("hybrimoe", *BASELINES),
                                        mode="decode", max_tokens=max_tokens, references=False)
        cells = []
        for ratio in (at_budget, 0.25):
            best = comparison.best_baseline(ratio)
            mine, theirs = comparison.results[("hybrimoe", ratio)], comparison.results[(best, ratio)]
            cells.append((mine.step_ms, theirs.step_ms, best))
        (mine_b, theirs_b, best_b), (mine_q, theirs_q, best_q) = cells
        print(f"| {profile.expert_shape.format} | {expert_bytes / 2**20:.2f} MiB | {n_total * expert_bytes / GIB:.1f} GiB "
              f"| {at_budget:.0%} ({slots} experts) | {mine_b:.2f} | {theirs_b:.2f} ({best_b}) | "
              f"{theirs_b / mine_b:.2f}x | {mine_q:.2f} | {theirs_q:.2f} ({best_q}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="MoE layers of the random model")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-ratio", type=float, default=0.25)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="CPU expert threads (default: cores - 1)")
    parser.add_argument("--small", action="store_true", help="256-wide experts, 2 layers: a check in seconds")
    parser.add_argument("--sim-tokens", type=int, default=600, help="trace tokens the simulation replays")
    args = parser.parse_args()
    if args.small:
        args.layers, args.new_tokens, args.repeats, args.group_size, args.sim_tokens = 2, 4, 1, 64, 60
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available", flush=True)
    print_measured(measure_formats(args), args)
    print_simulated(args.sim_tokens)


if __name__ == "__main__":
    main()
