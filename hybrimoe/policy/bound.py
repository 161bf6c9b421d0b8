"""A lower bound on any strategy's simulated time: what no cache, schedule or prefetch can beat.

Why it is a bound, under the planner's timing model (`planner.py`, `timeline.py`): a step costs
its work outside the layers, then each MoE layer its part before the experts (dense part, attention
over the KV cache, host work, planning) and its expert phase. Planning time is at least 0. In the
expert phase every activated expert runs once, on the CPU worker (its `cpu_ms`, plus the first
expert's extra, possibly slowed by copies) or on the accelerator (its `gpu_ms`, after its copy if
it was not resident); each side runs its experts one after another, and copies, stalls and
interference only add time. So the phase lasts at least the best split of the layer's experts
with every expert resident and nothing copied, and that optimum is at least its fractional
relaxation (`expert_phase_bound_ms`), which has a closed form: put on the CPU the experts whose
CPU time is smallest relative to their GPU time until the two sides balance (or every expert on
the GPU, when that is shorter; a CPU that runs anything runs at least one whole expert). Every
expert must also run somewhere, so the phase is at least the largest expert's cheaper side.

The bound does not depend on the cache size: it is the time of a machine whose accelerator holds
every expert (when it does, the scheduler reaches it up to the relaxation's fraction). It assumes
interference factors of at least 1 for copies (a slowed copy cannot speed the accelerator); a CPU
factor below 1 is honoured by scaling the CPU's times.
Shapes: T = tokens in a step, k = top-k, L = MoE layers.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hybrimoe.policy.costs import CostModel
from hybrimoe.policy.names import LOWER_BOUND, is_decode
from hybrimoe.policy.prefetch import token_counts
from hybrimoe.policy.simulator import SimResult
from hybrimoe.trace import RoutingTrace

def expert_phase_bound_ms(counts: Mapping[int, int], costs: CostModel) -> float:
    """A lower bound on one layer's expert phase, `counts`: expert -> its tokens."""
    cpu_factor = min(1.0, costs.cpu_slowdown)
    cpu = [cpu_factor * costs.cpu_ms(n_tokens) for n_tokens in counts.values()]
    if not costs.has_accelerator:
        return sum(cpu) + cpu_factor * costs.cpu_first_extra_ms
    gpu = [costs.gpu_ms(n_tokens) for n_tokens in counts.values()]
    all_gpu_ms = sum(gpu)
    largest_ms = max(map(min, cpu, gpu))
    # With the CPU running at least one expert: the fractional split, CPU side starting at its extra.
    cpu_side_ms, gpu_side_ms = cpu_factor * costs.cpu_first_extra_ms, all_gpu_ms
    for cpu_ms, gpu_ms in sorted(zip(cpu, gpu), key=lambda pair: pair[0] / pair[1]):
        if cpu_side_ms + cpu_ms <= gpu_side_ms - gpu_ms:
            cpu_side_ms, gpu_side_ms = cpu_side_ms + cpu_ms, gpu_side_ms - gpu_ms
            continue
        share = max(0.0, (gpu_side_ms - cpu_side_ms) / (cpu_ms + gpu_ms))  # of this expert on the CPU
        cpu_side_ms += share * cpu_ms
        gpu_side_ms = cpu_side_ms
        break
    # A CPU that runs anything runs at least one whole expert.
    with_cpu_ms = max(cpu_side_ms, gpu_side_ms, cpu_factor * costs.cpu_first_extra_ms + min(cpu))
    return max(min(all_gpu_ms, with_cpu_ms), largest_ms)


def lower_bound(trace: RoutingTrace, costs: CostModel, mode: str = "decode") -> SimResult:
    """The bound on replaying `trace` as `simulator.simulate` does (decode: one growing KV cache
    from an empty one; prefill: every step a new prompt); every expert counts as a hit."""
    n_layers = trace.meta.n_layers
    layer_ms = np.zeros(n_layers)  # [L] expert-phase bound summed over steps
    decode_memo: dict[int, float] = {}  # experts in a decode layer -> its bound
    total_ms = 0.0
    context_tokens = 0
    for step in trace.steps:
        n_tokens = step.n_tokens
        context_ms = costs.dense_context_ms * (context_tokens if mode == "decode" else 0) * n_tokens
        before_ms = costs.dense_ms(n_tokens) + context_ms + costs.host_ms(n_tokens)
        total_ms += costs.outside_ms(n_tokens) + n_layers * before_ms
        context_tokens += n_tokens
        for layer in range(n_layers):
            counts = token_counts(step.topk_ids[layer])  # [T, k] -> expert: tokens
            if is_decode(counts):
                phase_ms = decode_memo.get(len(counts))
                if phase_ms is None:
                    phase_ms = decode_memo[len(counts)] = expert_phase_bound_ms(counts, costs)
            else:
                phase_ms = expert_phase_bound_ms(counts, costs)
            layer_ms[layer] += phase_ms
    total_ms += float(layer_ms.sum())
    n_steps = trace.n_steps
    return SimResult(
        strategy=LOWER_BOUND,
        mode=mode,
        cache_ratio=1.0,
        capacity=n_layers * trace.meta.n_experts,
        n_steps=n_steps,
        n_tokens=trace.n_tokens,
        total_ms=total_ms,
        step_ms=total_ms / n_steps if n_steps else 0.0,
        layer_ms=tuple((layer_ms / max(n_steps, 1)).tolist()),
        hit_rate=1.0,
        bytes_loaded=0,
        gpu_share=0.0,
        prefetch_precision=0.0,
        prefetch_recall=0.0,
        stall_ms=0.0,
        waited_hit_rate=0.0,
    )
