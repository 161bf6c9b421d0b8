"""How fast the policy core plans: simulated layer-steps per second, and microseconds per layer plan.

Prints, in one run:
- the Qwen3-30B-A3B trace (2,080 tokens x 48 layers as decode steps) through `hybrimoe`: seconds
  and layer-steps per second (target: well under 10 s);
- the median time to plan one decode layer for 128 experts, top-8 (score update, schedule, prefetch
  choice), against the same planner with the scheduler's memo disabled (target: <= 20 us);
- the greedy schedule's time relative to the exact optimum on random small layers.

Times are CPU time of this process (thread), so other work on the machine inflates them less.

Usage: python benchmarks/bench_policy.py [--trace traces/qwen3-30b-a3b.npz] [--profile PROFILE]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from hybrimoe.config import PolicyConfig, load_profile
from hybrimoe.policy import scheduler as sched
from hybrimoe.policy.costs import CostModel
from hybrimoe.policy.simulator import simulate
from hybrimoe.policy.strategies import ModelDims, cache_capacity, make_planner
from hybrimoe.trace import load_trace

ROOT = Path(__file__).resolve().parents[1]


def bench_replay(trace, costs, policy) -> float:
    decode = trace.as_decode()
    dims = ModelDims(trace.meta.n_layers, trace.meta.n_experts, trace.meta.top_k)
    planner = make_planner("hybrimoe", dims, costs, policy, cache_capacity(dims, 0.25), trace.expert_frequencies())
    started = time.process_time()
    simulate(decode, planner, strategy="hybrimoe")
    seconds = time.process_time() - started
    layer_steps = decode.n_steps * trace.meta.n_layers
    print(f"replay: {decode.n_steps} decode steps x {trace.meta.n_layers} layers = {layer_steps} layer-steps "
          f"in {seconds:.2f} s ({layer_steps / seconds:,.0f} layer-steps/s)")

    planner = make_planner("hybrimoe", dims, costs, policy, cache_capacity(dims, 0.25), trace.expert_frequencies())
    plan_layer, times = planner.plan_layer, []

    def timed_plan_layer(*args):
        started_ns = time.thread_time_ns()
        plan = plan_layer(*args)
        times.append(time.thread_time_ns() - started_ns)
        return plan

    planner.plan_layer = timed_plan_layer
    simulate(decode.tokens(0, 500), planner, strategy="hybrimoe")
    print(f"plan one decode layer of the trace (real routing, no router probs): "
          f"median {statistics.median(times) / 1000:.1f} us")
    return seconds


def bench_plan_layer(costs, policy, n_experts=128, top_k=8, n_layers=48, repeats=20000) -> float:
    dims = ModelDims(n_layers, n_experts, top_k)
    rng = np.random.default_rng(0)
    freqs = rng.zipf(1.5, size=(n_layers, n_experts)).astype(float)
    planner = make_planner("hybrimoe", dims, costs, policy, cache_capacity(dims, 0.25), freqs)
    ids = [rng.choice(n_experts, size=(1, top_k), replace=False) for _ in range(256)]
    probs = [rng.dirichlet(np.ones(n_experts)).astype(np.float32)[None, :] for _ in range(256)]
    times = []
    for i in range(repeats):
        layer = i % n_layers
        predicted = {(layer + 1) % n_layers: ids[(i + 1) % 256], (layer + 2) % n_layers: ids[(i + 2) % 256]}
        started = time.thread_time_ns()
        planner.plan_layer(layer, ids[i % 256], probs[i % 256], predicted)
        times.append(time.thread_time_ns() - started)
    median_us = statistics.median(times[repeats // 10:]) / 1000
    print(f"plan one decode layer ({n_experts} experts, top-{top_k}, router probs, prefetch depth "
          f"{policy.prefetch_depth}): median {median_us:.1f} us (target <= 20 us)")
    return median_us


def bench_greedy_vs_exact(costs, samples=300) -> None:
    rng = np.random.default_rng(1)
    ratios = []
    for _ in range(samples):
        n = int(rng.integers(2, 9))
        counts = {int(e): int(rng.integers(1, 64)) for e in rng.choice(64, size=n, replace=False)}
        resident = {e for e in counts if rng.random() < 0.4}
        exact = sched.schedule_exact(counts, resident, costs).finish_ms
        greedy = sched.schedule_hybrid(counts, resident, costs).finish_ms
        ratios.append(greedy / exact)
    print(f"greedy / exact schedule time on {samples} random layers (2-8 experts, 1-63 tokens): "
          f"mean {np.mean(ratios):.3f}, worst {np.max(ratios):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=ROOT / "traces" / "qwen3-30b-a3b.npz")
    parser.add_argument("--profile", default=ROOT / "profiles" / "rtx4090-desktop.qwen3-30b-a3b.yaml")
    args = parser.parse_args()
    costs = CostModel(load_profile(args.profile))
    policy = PolicyConfig()
    trace = load_trace(args.trace)
    bench_replay(trace, costs, policy)
    bench_plan_layer(costs, policy)
    bench_greedy_vs_exact(costs)


if __name__ == "__main__":
    main()
