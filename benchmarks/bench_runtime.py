"""Decode speed of the hybrid runtime against plain transformers on the same weights, in one run.

Prints decode tokens/s (batch 1, greedy) of
- plain transformers (its default experts implementation), the baseline;
- the hybrid runtime on the CPU stand-in with a full expert cache, every expert resident and run
  from its slot (`resident` planner: the runtime's own overhead);
- the same with the policy core's HybriMoE planner (`hybrimoe`: planning cost included; it may also
  put resident experts on the CPU worker, which on the stand-in is the same CPU);
for the demo model (when this installation has it) and a random Mixtral-shaped model large enough
that expert math dominates (hidden 1024, 32 experts of intermediate 512, top-4, 8 layers, float32).
Target: the `resident` overhead on the large model is at most 10%.

Runs alternate between baseline and hybrid and report the median of `--repeats`, because other
processes on a shared machine move single runs by more than the effect measured.

Usage: python benchmarks/bench_runtime.py [--new-tokens 32] [--repeats 5] [--skip-demo] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from hybrimoe.config import PolicyConfig
from hybrimoe.errors import ModelError
from hybrimoe.profile.model_costs import SideOnlyPlanner
from hybrimoe.runtime.accelerator import CpuStandIn
from hybrimoe.runtime.generate import generate
from hybrimoe.runtime.hybrid import HybridRuntime
from hybrimoe.runtime.loading import LoadedModel, from_model, load_model
from hybrimoe.runtime.planning import build_planner, model_shape
from hybrimoe.run import default_profile

PROMPT_TOKENS = 16


def _decode_tokens_per_s(loaded: LoadedModel, ids: torch.Tensor, n_new: int, runtime: HybridRuntime | None) -> float:
    out = generate(loaded.model, ids, torch.ones_like(ids), n_new,
                   on_step=runtime.end_step if runtime is not None else None)
    return (n_new - 1) / out.decode_s


def _planner(kind: str, loaded: LoadedModel, name: str):
    n_total = loaded.n_layers * loaded.n_experts
    if kind == "resident":
        return SideOnlyPlanner("accelerator", loaded.n_layers, loaded.n_experts)
    profile = default_profile(model_shape(loaded, name))
    uniform = np.ones((loaded.n_layers, loaded.n_experts))  # warm start: every expert resident
    return build_planner("hybrimoe", loaded, profile, PolicyConfig(cache_ratio=1.0), n_total, uniform)


def bench(loaded: LoadedModel, name: str, n_new: int, repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    vocab = loaded.model.config.vocab_size
    ids = torch.randint(0, min(vocab, 256), (1, PROMPT_TOKENS), generator=gen)
    n_total = loaded.n_layers * loaded.n_experts
    _decode_tokens_per_s(loaded, ids, 4, None)  # warm-up: allocator, kernels
    results: dict[str, list[float]] = {"transformers": [], "resident": [], "hybrimoe": []}
    for _ in range(repeats):
        results["transformers"].append(_decode_tokens_per_s(loaded, ids, n_new, None))
        for kind in ("resident", "hybrimoe"):
            with HybridRuntime(loaded, _planner(kind, loaded, name), CpuStandIn(), n_total) as runtime:
                _decode_tokens_per_s(loaded, ids, 4, runtime)  # warm-up: fills the hybrimoe planner's cache
                results[kind].append(_decode_tokens_per_s(loaded, ids, n_new, runtime))
    base = statistics.median(results["transformers"])
    shape = loaded.expert_shape
    print(f"\n{name}: {loaded.n_layers} MoE layers x {loaded.n_experts} experts ({shape.describe()}), "
          f"top-{loaded.top_k}, {n_new} new tokens, median of {repeats}, {torch.get_num_threads()} threads")
    print(f"  {'runtime':<28}{'decode tok/s':>14}{'vs transformers':>18}")
    for kind, label in (("transformers", "plain transformers"), ("resident", "hybrid, full cache, resident"),
                        ("hybrimoe", "hybrid, full cache, hybrimoe")):
        value = statistics.median(results[kind])
        print(f"  {label:<28}{value:>14.2f}{value / base:>17.3f}x")
    overhead = base / statistics.median(results["resident"]) - 1.0
    print(f"  runtime overhead (resident planner): {overhead:+.1%} time per token (target <= +10%)")


def large_model() -> LoadedModel:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        hidden_size=1024, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, num_local_experts=32, num_experts_per_tok=4, vocab_size=1024,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return from_model(MixtralForCausalLM(config).eval())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.inference_mode():
        if not args.skip_demo:
            from hybrimoe.demo import demo_model_path

            try:
                demo = load_model(demo_model_path(), show_progress=False)
            except ModelError as exc:
                print(f"demo model: skipped ({exc})")
            else:
                bench(demo, "demo", args.new_tokens, args.repeats)
        bench(large_model(), "random-mixtral-1024x32", args.new_tokens, args.repeats)


if __name__ == "__main__":
    main()
