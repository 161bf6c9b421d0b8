"""How fast the policy core plans: simulated layer-steps per second, and microseconds per layer plan.

Prints, in one run:
- the Qwen3-30B-A3B trace (2,107 tokens x 48 layers as decode steps) through `hybrimoe`: seconds
  and layer-steps per second (target: well under 10 s);
- the median time to plan one decode layer (score update, schedule, prefetch choice), for the
  trace's real routing and for 128 experts, top-8, random routing with router
  probabilities and prefetch depth 2; also split into `plan_layer` (score update, schedule, demand
  loads: what the layer's experts wait for) and `plan_prefetch` (the prefetch choice, which the
  runtime runs while the layer's experts run). Each is measured in alternating chunks against the
  same planner with the scheduler's memo off, so both see the same machine state, and printed as
  a ratio; the trace case is also timed with a 32 MB memory sweep between plans, as the model's
  own work between two plans leaves the CPU caches in the runtime, and against the
  `ktransformers` planner (a static placement), chunk by chunk: hybrimoe's `plan_layer` should
  stay within 2x of its time per layer and the whole plan within 5x;
- the greedy schedule's time relative to the exact optimum on random small layers.

Times are CPU time of this thread, so other work on the machine inflates them less; this VM's
speed still drifts by tens of percent over minutes, which the interleaved ratios cancel.

Usage: python benchmarks/bench_policy.py [--trace traces/qwen3-30b-a3b.npz] [--profile PROFILE]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hybrimoe.config import PolicyConfig, load_profile
from hybrimoe.policy import scheduler as sched
from hybrimoe.policy.costs import CostModel
from hybrimoe.policy.simulator import simulate
from hybrimoe.policy.planner import ModelDims, PolicyPlanner
from hybrimoe.policy.strategies import cache_capacity, make_planner
from hybrimoe.trace import load_trace

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 500  # plans per chunk; chunks alternate between the planner and its baseline


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
    return seconds


def timed_calls(
    planner: PolicyPlanner, calls: list[tuple], between: Callable[[], object] | None = None
) -> tuple[list[int], list[int]]:
    """Plans every call in order, running `between` (untimed) before each; returns each call's CPU
    time in ns in `plan_layer` and in `plan_prefetch`."""
    plan_layer, plan_prefetch = planner.plan_layer, planner.plan_prefetch
    layer_times, prefetch_times = [], []
    clock = time.thread_time_ns
    for args in calls:
        if between is not None:
            between()
        started_ns = clock()
        plan = plan_layer(*args)
        planned_ns = clock()
        plan_prefetch(plan)
        layer_times.append(planned_ns - started_ns)
        prefetch_times.append(clock() - planned_ns)
    return layer_times, prefetch_times


def median_us(times: list[int]) -> float:
    return statistics.median(times[len(times) // 10 :]) / 1000  # skips the warm-up: memo, cache


def whole_plans(layer_times: list[int], prefetch_times: list[int]) -> list[int]:
    """Each call's plan_layer and plan_prefetch times added: the whole plan."""
    return [a + b for a, b in zip(layer_times, prefetch_times)]


def interleaved(make: Callable[[bool], PolicyPlanner], calls: list[tuple], label: str) -> float:
    """Median whole-plan time of `make(memo=True)` against `make(memo=False)`, chunk by chunk."""
    planner, baseline = make(True), make(False)
    layer_times: list[int] = []
    prefetch_times: list[int] = []
    baseline_times: list[int] = []
    for start in range(0, len(calls), CHUNK):
        chunk = calls[start : start + CHUNK]
        times = timed_calls(planner, chunk)
        layer_times += times[0]
        prefetch_times += times[1]
        baseline_times += whole_plans(*timed_calls(baseline, chunk))
    whole_us = median_us(whole_plans(layer_times, prefetch_times))
    baseline_us = median_us(baseline_times)
    print(f"plan one decode layer, {label}:")
    print(f"  whole plan: median {whole_us:.1f} us; scheduler memo off {baseline_us:.1f} us "
          f"({baseline_us / whole_us:.2f}x)")
    print(f"  before the layer's experts start (plan_layer): median {median_us(layer_times):.1f} us; "
          f"prefetch choice, which the runtime overlaps with the experts (plan_prefetch): "
          f"median {median_us(prefetch_times):.1f} us")
    return whole_us


def planner_factory(dims, costs, policy, frequencies) -> Callable[[bool], PolicyPlanner]:
    def make(memo: bool) -> PolicyPlanner:
        planner = make_planner("hybrimoe", dims, costs, policy, cache_capacity(dims, 0.25), frequencies)
        if not memo:
            planner.schedule = sched.schedule_hybrid_unmemoized
        return planner

    return make


def bench_trace_layers(trace, costs, policy, n_tokens=400) -> float:
    """Real routing: the trace's first tokens as decode steps, predicted from the previous token."""
    dims = ModelDims(trace.meta.n_layers, trace.meta.n_experts, trace.meta.top_k)
    calls, recent = [], {}
    for step in trace.as_decode().tokens(0, n_tokens).steps:
        ids_all = step.topk_ids.astype(np.intp)  # [L, 1, k]
        for layer in range(dims.n_layers):
            targets = [(layer + d) % dims.n_layers for d in range(1, policy.prefetch_depth + 1)]
            predicted = {t: recent[t] for t in targets if t in recent}
            calls.append((layer, ids_all[layer], None, predicted))
            recent[layer] = ids_all[layer]
    make = planner_factory(dims, costs, policy, trace.expert_frequencies())
    warm_us = interleaved(make, calls, "trace routing (no router probs)")
    # In the runtime the model's own work runs between two plans and evicts the planner's code and
    # data from the CPU caches; a sweep over 32 MB between plans stands in for it.
    sweep = np.ones(4 << 20)
    layer_times, prefetch_times = timed_calls(make(True), calls, between=sweep.sum)
    cold_us = median_us(whole_plans(layer_times, prefetch_times))
    print(f"plan one decode layer, trace routing, caches swept between plans: whole plan median {cold_us:.1f} us "
          f"({cold_us / warm_us:.1f}x the warm median); plan_layer {median_us(layer_times):.1f} us")
    against_ktransformers(make(True), dims, costs, policy, trace.expert_frequencies(), calls)
    return warm_us


def against_ktransformers(hybrimoe: PolicyPlanner, dims, costs, policy, frequencies, calls: list[tuple]) -> None:
    """hybrimoe's planner against a static placement's (no score update, no prefetch) on the same
    calls, chunk by chunk: the ratios the policy core keeps (plan_layer <= 2x, whole plan <= 5x)."""
    static = make_planner("ktransformers", dims, costs, policy, cache_capacity(dims, 0.25), frequencies)
    hybrid_layer: list[int] = []
    hybrid_prefetch: list[int] = []
    static_whole: list[int] = []
    for start in range(0, len(calls), CHUNK):
        chunk = calls[start : start + CHUNK]
        layer_times, prefetch_times = timed_calls(hybrimoe, chunk)
        hybrid_layer += layer_times
        hybrid_prefetch += prefetch_times
        static_whole += whole_plans(*timed_calls(static, chunk))
    static_us = median_us(static_whole)
    layer_us, whole_us = median_us(hybrid_layer), median_us(whole_plans(hybrid_layer, hybrid_prefetch))
    print(f"plan one decode layer, trace routing, against the ktransformers planner ({static_us:.1f} us per layer, "
          f"both calls): hybrimoe plan_layer {layer_us:.1f} us = {layer_us / static_us:.2f}x (target <= 2x), "
          f"whole plan {whole_us:.1f} us = {whole_us / static_us:.2f}x (target <= 5x)")


def bench_random_layers(costs, policy, n_experts=128, top_k=8, n_layers=48, n_calls=20000) -> float:
    dims = ModelDims(n_layers, n_experts, top_k)
    rng = np.random.default_rng(0)
    frequencies = rng.zipf(1.5, size=(n_layers, n_experts)).astype(float)
    ids = [rng.choice(n_experts, size=(1, top_k), replace=False) for _ in range(256)]
    probs = [rng.dirichlet(np.ones(n_experts)).astype(np.float32)[None, :] for _ in range(256)]
    calls = []
    for i in range(n_calls):
        layer = i % n_layers
        predicted = {(layer + d) % n_layers: ids[(i + d) % 256] for d in range(1, policy.prefetch_depth + 1)}
        calls.append((layer, ids[i % 256], probs[i % 256], predicted))
    make = planner_factory(dims, costs, policy, frequencies)
    return interleaved(
        make, calls, f"{n_experts} experts, top-{top_k}, random routing, router probs, prefetch depth {policy.prefetch_depth}"
    )


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
    bench_trace_layers(trace, costs, policy)
    bench_random_layers(costs, policy)
    bench_greedy_vs_exact(costs)


if __name__ == "__main__":
    main()
