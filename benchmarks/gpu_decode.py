"""Decode tokens/s on CUDA of a random model with DeepSeek-V2-Lite's shapes, in one run:
the hybrid runtime (HybriMoE planner) at cache ratios 0.25, 0.5 and 1.0, against the same runtime
with every routed expert on the CPU (`cpu-only`), and, as an upper bound, plain transformers with
the whole model on the GPU.

Model: 27 decoder layers (the first dense), 26 MoE layers of 64 routed experts (hidden 2048,
intermediate 1408, bfloat16), 2 shared experts, top-6, MLA attention, vocabulary 102400; random
weights (std 0.02), so routing is close to uniform: hit rates are lower than on a trained model.

Each configuration: one warm-up generation (it also fills the cache), then the measured one (a
different prompt); decode tokens/s, TTFT, hit rate and CPU share are of the measured generation.

Usage: python benchmarks/gpu_decode.py [--profile PROFILE.yaml] [--prompt-tokens 64]
       [--new-tokens 32] [--json OUT.json]
Check the script without a GPU: python benchmarks/gpu_decode.py --device cpu --small
Without --profile, planning uses the built-in datasheet estimate (runner.DEFAULT_MACHINE).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from hybrimoe.config import PolicyConfig, load_profile
from hybrimoe.runtime.accelerator import make_accelerator
from hybrimoe.runtime.generate import generate
from hybrimoe.runtime.hybrid import HybridRuntime
from hybrimoe.runtime.loading import LoadedModel, from_model
from hybrimoe.runtime.runner import build_planner, default_profile, model_shape

RATIOS = (0.25, 0.5, 1.0)


def deepseek_v2_lite_random(small: bool = False) -> torch.nn.Module:
    """Built on the meta device in bfloat16, then materialised once on the host. Experts cycle
    through 8 random weight sets (a copy is much faster than drawing 15 billion numbers)."""
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    sizes = dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
                 vocab_size=102400, num_attention_heads=16, num_key_value_heads=16)
    if small:
        sizes = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=176, num_hidden_layers=4,
                     vocab_size=1024, num_attention_heads=4, num_key_value_heads=4)
    config = DeepseekV2Config(
        **sizes, first_k_dense_replace=1, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
        max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    pool: dict[tuple, torch.Tensor] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            elif ".experts." in name:
                if param.shape not in pool:
                    pool[param.shape] = torch.empty((8, *param.shape[1:]), dtype=param.dtype).normal_(0.0, 0.02, generator=gen)
                sets = pool[param.shape]
                for start in range(0, param.shape[0], 8):
                    param[start : start + 8].copy_(sets[: param.shape[0] - start])
            else:
                param.normal_(0.0, 0.02, generator=gen)
        for module in model.modules():  # to_empty left the rotary frequencies uninitialised
            if type(module).__name__.endswith("RotaryEmbedding"):
                fresh = type(module)(config=module.config)
                module.inv_freq = fresh.inv_freq
                module.original_inv_freq = fresh.original_inv_freq
    return model.eval()


def _measure(loaded: LoadedModel, runtime: HybridRuntime | None, prompts, n_new: int, sync) -> dict:
    on_step = runtime.end_step if runtime is not None else None
    generate(loaded.model, prompts[0], torch.ones_like(prompts[0]), n_new, on_step=on_step, sync=sync)
    before = dataclasses.replace(runtime.counters) if runtime is not None else None
    out = generate(loaded.model, prompts[1], torch.ones_like(prompts[1]), n_new, on_step=on_step, sync=sync)
    result = {"decode_tokens_per_s": (n_new - 1) / out.decode_s, "ttft_s": out.ttft_s}
    if runtime is not None:
        after = runtime.counters
        activations = after.activations - before.activations
        result["hit_rate"] = (after.hits - before.hits) / activations
        result["cpu_share"] = (after.cpu_runs - before.cpu_runs) / activations
        result["mib_loaded"] = (after.bytes_loaded - before.bytes_loaded) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda", help="cpu checks the script on the CPU stand-in")
    parser.add_argument("--small", action="store_true", help="a scaled-down model, to check the script")
    args = parser.parse_args()
    accelerator = make_accelerator(args.device)
    started = time.perf_counter()
    loaded = from_model(deepseek_v2_lite_random(args.small), device=accelerator.device)
    print(f"model built and placed in {time.perf_counter() - started:.0f} s: {loaded.n_layers} MoE layers x "
          f"{loaded.n_experts} experts ({loaded.expert_shape.describe()}), top-{loaded.top_k}; "
          f"{accelerator.describe()}, {torch.get_num_threads()} CPU threads")
    shape = model_shape(loaded, "deepseek-v2-lite-random")
    profile = load_profile(args.profile) if args.profile else default_profile(shape)
    profile.check_expert_shape(loaded.expert_shape)
    print(f"profile: {profile.name}{' (estimated)' if profile.estimated else ''}")
    gen = torch.Generator().manual_seed(0)
    vocab = loaded.model.config.vocab_size
    prompts = [torch.randint(0, vocab, (1, args.prompt_tokens), generator=gen).to(accelerator.device)
               for _ in range(2)]
    n_total = loaded.n_layers * loaded.n_experts
    configs = [("cpu-only", 0.0)] + [("hybrimoe", ratio) for ratio in RATIOS]
    results = []
    with torch.inference_mode():
        for strategy, ratio in configs:
            capacity = round(ratio * n_total)
            planner = build_planner(strategy, loaded, profile, PolicyConfig(cache_ratio=ratio), capacity)
            with HybridRuntime(loaded, planner, accelerator, capacity) as runtime:
                result = _measure(loaded, runtime, prompts, args.new_tokens, accelerator.synchronize)
            del runtime, planner  # frees the slots before the next configuration allocates its own
            results.append({"runtime": f"{strategy} cache {ratio:g}", "capacity": capacity, **result})
            print(f"  {results[-1]}", flush=True)
        for layer in loaded.layers:  # the upper bound: every expert on the GPU, plain transformers
            for param in layer.experts.parameters():
                param.data = param.data.to(accelerator.device)
        accelerator.synchronize()
        results.append({"runtime": "transformers, all on GPU", "capacity": n_total,
                        **_measure(loaded, None, prompts, args.new_tokens, accelerator.synchronize)})
    base = results[0]["decode_tokens_per_s"]
    print(f"\n{'runtime':<28}{'slots':>7}{'decode tok/s':>14}{'vs cpu-only':>13}{'TTFT s':>9}{'hit rate':>10}{'CPU share':>11}")
    for r in results:
        hit = f"{r['hit_rate']:.1%}" if "hit_rate" in r else "-"
        cpu = f"{r['cpu_share']:.1%}" if "cpu_share" in r else "-"
        print(f"{r['runtime']:<28}{r['capacity']:>7}{r['decode_tokens_per_s']:>14.2f}"
              f"{r['decode_tokens_per_s'] / base:>12.2f}x{r['ttft_s']:>9.3f}{hit:>10}{cpu:>11}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"profile": profile.name, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
