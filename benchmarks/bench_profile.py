"""How well the measured cost model predicts, and how close experts and copies come to the hardware's peak.

Prints, in one run:
- the fitted CPU expert model's median relative error on fresh measurements at token counts it was
  not fitted on (3, 6, 12, ...; target: at most 15%), beside the same error for a second sweep at
  the fitted counts (the measurement noise floor of this run);
- the CPU expert's achieved weight bandwidth at 1 token as a fraction of the host memory read
  bandwidth measured in the same run;
- on a GPU: pinned host-to-device bandwidth for one expert as a fraction of the large-transfer peak
  (target: at least 80%).

Usage: python benchmarks/bench_profile.py [--preset qwen3-30b-a3b] [--device cpu|cuda] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from hybrimoe.profile.fit import fit_curve, relative_errors
from hybrimoe.profile.machine import llc_bytes, load_average
from hybrimoe.profile.measure import (
    ExpertPool,
    expert_timer,
    host_read_gbps,
    latency_curve,
    torch_dtype,
    torch_threads,
    transfers,
)
from hybrimoe.profile.timing import FULL, QUICK
from hybrimoe.shapes import get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen3-30b-a3b", help="model shape preset (default: qwen3-30b-a3b)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and token counts")
    args = parser.parse_args()

    model = get_preset(args.preset)
    shape = model.expert_shape()
    dtype = torch_dtype(model.dtype)
    budget = QUICK if args.quick else FULL
    cache_bytes = llc_bytes()
    threads = args.threads or torch.get_num_threads()
    print(f"{model.name}: expert {shape.describe()} ({shape.expert_bytes / 1e6:.2f} MB), {threads} CPU thread(s), "
          f"rotating past {cache_bytes / 2**20:.0f} MiB of cache; load average {load_average()}")

    with torch.inference_mode(), torch_threads(threads):
        pool = ExpertPool(shape, dtype, torch.device("cpu"), cache_bytes)
        timer = expert_timer(pool)
        # Fitted (1, 2, 4, ...) and fresh (3, 6, 12, ...) counts are measured in one ascending sweep,
        # so a change in the machine's load over the run hits neighbouring counts alike.
        powers = [2**i for i in range(12) if 2**i <= budget.max_tokens]
        sweep = sorted({*powers, *(3 * n for n in powers if 3 * n < budget.max_tokens)})
        measured = latency_curve(timer, budget, counts=iter(sweep))
        fitted = fit_curve([p for p in measured if p.n_tokens in powers])
        fitted_counts = [p.n_tokens for p in fitted.points]
        fresh = [p for p in measured if p.n_tokens not in powers and p.n_tokens < fitted_counts[-1]]
        fresh_counts = [p.n_tokens for p in fresh]
        again = latency_curve(timer, budget, counts=iter(fitted_counts))
        memory_gbps = host_read_gbps(cache_bytes, budget)

    errors = relative_errors(fitted, fresh)
    noise = relative_errors(fitted, again)
    linear = [abs(fitted.fit.ms(p.n_tokens) - p.ms) / p.ms for p in fresh]
    median_error = statistics.median(errors)
    print(f"CPU expert model, fitted at {fitted_counts[0]}..{fitted_counts[-1]} tokens "
          f"(linear fit R² {fitted.fit.r2:.3f}, max error {fitted.fit.max_rel_error:.0%} on its points):")
    print(f"  fresh counts {fresh_counts[0]}..{fresh_counts[-1]}: median error {median_error:.1%}, "
          f"max {max(errors):.1%} (target <= 15%: {'met' if median_error <= 0.15 else 'MISSED'})")
    print(f"  the linear fit alone on the fresh counts: median error {statistics.median(linear):.1%}")
    print(f"  baseline, a second sweep at the fitted counts: median error {statistics.median(noise):.1%}")
    for p in fresh:
        print(f"    {p.n_tokens:5d} tokens: measured {p.ms:9.3f} ms, model {fitted.ms(p.n_tokens):9.3f} ms")

    cpu_1_ms = fitted.ms(1)
    weight_gbps = shape.expert_bytes / cpu_1_ms / 1e6
    print(f"CPU expert at 1 token: {cpu_1_ms:.3f} ms = {weight_gbps:.2f} GB/s of weights; host memory read "
          f"{memory_gbps:.2f} GB/s; ratio {weight_gbps / memory_gbps:.2f}")

    if args.device.startswith("cuda"):
        copies = transfers(shape, torch.device(args.device), cache_bytes, budget)
        ratio = copies.h2d_pinned_expert_gbps / copies.h2d_pinned_gbps
        print(f"pinned host->device: one expert {copies.h2d_pinned_expert_gbps:.2f} GB/s "
              f"({copies.expert_load.median_ms:.3f} ms), large transfers {copies.h2d_pinned_gbps:.2f} GB/s; "
              f"ratio {ratio:.2f} (target >= 0.80: {'met' if ratio >= 0.8 else 'MISSED'}); "
              f"pageable {copies.h2d_pageable_gbps:.2f} GB/s, device->host {copies.d2h_gbps:.2f} GB/s")
    else:
        print("pinned host->device: no GPU in this run")


if __name__ == "__main__":
    main()
