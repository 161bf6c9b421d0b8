"""CPU expert kernels: torch's path against the native kernels, at the memory's bandwidth.

One MoE layer of Qwen3-30B-A3B's experts (128 x 3 x 2048 x 768, about 1.2 GB in bfloat16, more than
the last-level cache), 8 experts drawn at random per call (as decode routes), each with 1, 2, 4, 8
or 16 tokens. Formats: bfloat16 and float32 (torch's grouped matmuls), int8 and int4 (bfloat16
activations, group size 128, `hybrimoe run --quantize`'s packed stacks and torch's packed matmuls
expert by expert). For each format and thread count it prints each path's time per call, the
expert bytes it read per second (packed bytes and scales for int8/int4), that as a share of the
host's read bandwidth measured in the same run (torch.mv over 1 GiB of float32, as `hybrimoe
profile` measures it), and native/torch as a speed ratio.

Usage: python benchmarks/bench_cpu_kernels.py [--threads 1,2] [--formats bfloat16,float32,int8,int4] [--calls 40] [--small]
(`--small`: 256-wide experts and few calls, a few seconds; for the test that keeps the script working)
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch

from hybrimoe.profile.measure import host_read_gbps
from hybrimoe.profile.timing import Budget
from hybrimoe.runtime import native
from hybrimoe.runtime.kernels import group_pairs, grouped_experts_mlp, split_indices
from hybrimoe.runtime.quantized import PROJECTIONS, quantize_stack

GROUP_SIZE = 128  # the run's default


def read_gbps(n_bytes: int) -> float:
    """Host read bandwidth over `n_bytes` with the current threads: the profile's measurement
    (the faster of torch.mv and a sum; some BLAS builds run mv on one thread)."""
    return host_read_gbps(n_bytes // 2, Budget(min_repeats=5, max_repeats=10))


def routed_calls(n_experts: int, top_k: int, n_tokens: int, n_calls: int, seed: int):
    """n_calls routings: `top_k` random experts, each chosen by every one of `n_tokens` tokens."""
    rng = random.Random(seed)
    for _ in range(n_calls):
        chosen = rng.sample(range(n_experts), top_k)
        yield np.array([chosen] * n_tokens, dtype=np.int64)  # [T, k]


def torch_path(x, weights, ids, topk_weights):
    """The executor's CPU side before the native kernels: grouped_mm over the experts' window."""
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=next(iter(weights.values())).shape[0])
    activated = np.flatnonzero(counts)
    stops = np.cumsum(counts)[activated]
    span = dict(zip(activated.tolist(), zip((stops - counts[activated]).tolist(), stops.tolist())))
    groups = group_pairs(order, span, {e: e for e in activated.tolist()})
    pairs, index = split_indices(torch.from_numpy(groups.index_arrays()), groups)
    tokens = pairs // ids.shape[1]
    y = grouped_experts_mlp(x[tokens], weights, groups, index)
    out = torch.zeros(x.shape, dtype=torch.float32)
    out.index_add_(0, tokens, (y * topk_weights.reshape(-1)[pairs, None]).float())
    return out


def native_path(x, weights, ids, topk_weights):
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat)
    activated = np.flatnonzero(counts)
    out = torch.zeros(x.shape, dtype=torch.float32)
    native.add_experts(out, x, order // ids.shape[1], topk_weights.reshape(-1)[torch.from_numpy(order)],
                       activated, np.cumsum(counts[activated]), weights)
    return out


def time_ms(path, x, weights, calls, topk_weights) -> float:
    times = []
    for ids in calls:
        started = time.perf_counter()
        path(x, weights, ids, topk_weights)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--formats", default="bfloat16,float32,int8,int4")
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--tokens", default="1,2,4,8,16", help="tokens per expert, comma-separated")
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    d, i, n_experts, top_k = (256, 128, 16, 4) if args.small else (2048, 768, 128, 8)
    calls = 6 if args.small else args.calls
    print(f"experts: {n_experts} x (gate_up {2 * i}x{d}, down {d}x{i}), {top_k} drawn per call; native kernels "
          f"{'available' if native.available(torch.bfloat16) else 'NOT available (torch path only)'}")
    for format_name in args.formats.split(","):
        quantize = format_name if format_name in ("int8", "int4") else None
        dtype = torch.bfloat16 if quantize else getattr(torch, format_name)
        gen = torch.Generator().manual_seed(0)
        weights = {
            "gate_up_proj": torch.randn(n_experts, 2 * i, d, generator=gen).div_(d**0.5).to(dtype),
            "down_proj": torch.randn(n_experts, d, i, generator=gen).div_(i**0.5).to(dtype),
        }
        if quantize:
            for name in PROJECTIONS:
                weights[f"{name}_qdata"], weights[f"{name}_scale"] = quantize_stack(
                    weights.pop(name), quantize, GROUP_SIZE, transposed=False)
        expert_bytes = sum(w[0].nbytes for w in weights.values())
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            gbps = read_gbps(256 << 20 if args.small else 1 << 30)
            print(f"\n{format_name}, {threads} thread(s): host read bandwidth {gbps:.1f} GB/s")
            print(f"{'tokens/expert':>13} {'torch ms':>9} {'GB/s':>6} {'share':>6} {'native ms':>10} {'GB/s':>6} {'share':>6} {'native/torch':>13}")
            for n_tokens in (int(n) for n in args.tokens.split(",")):
                x = torch.randn(n_tokens, d, generator=gen).to(dtype)
                topk_weights = torch.rand(n_tokens, top_k, generator=gen).to(dtype)
                row = [f"{n_tokens:>13}"]
                ms = {}
                for name, path in (("torch", torch_path), ("native", native_path)):
                    if name == "native" and not native.runs(weights, x, 1, standard_gate=True):
                        continue
                    ms[name] = time_ms(path, x, weights, list(routed_calls(n_experts, top_k, n_tokens, calls, 1)), topk_weights)
                    read = top_k * expert_bytes / ms[name] / 1e6
                    row.append(f"{ms[name]:>9.2f} {read:>6.1f} {read / gbps:>6.0%}" if name == "torch" else
                               f"{ms[name]:>10.2f} {read:>6.1f} {read / gbps:>6.0%}")
                if "native" in ms:
                    row.append(f"{ms['torch'] / ms['native']:>12.2f}x")
                print(" ".join(row))


if __name__ == "__main__":
    main()
