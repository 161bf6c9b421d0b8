"""How close is the simulator? Predicted against measured decode ms/token and TTFT, on this machine.

For each model, the profile is measured first on this machine (`hybrimoe profile` as a library call,
on the model's own config), then every configuration runs through `hybrimoe run` (the library call
behind it), interleaved, `--repeats` times; each run's summary carries the simulator's prediction for
the same profile, routing and planner. Printed per configuration: predicted and measured (median)
decode ms/token and TTFT and their ratios; per model: the median absolute error of each and Kendall's
tau between the predicted and measured orders of decode time.

Models:
- `demo`: the embedded demo model (its own trained routing), prompt of 64 tokens.
- `qwen3`: a random model with Qwen3-30B-A3B's experts (128 experts of 3 x 2048 x 768 bfloat16,
  top-8; its attention shapes; the demo's byte tokenizer, so a small LM head) and `--qwen3-layers`
  MoE layers, whose routing is replayed (`--replay-trace`) from the same layers of the shipped
  Qwen3-30B-A3B trace, so the cache sees real routing. Written once to `--cache-dir`.
- `qwen3-narrow`: the same with a quarter of the attention heads (8 query, 1 key/value). On the CPU
  stand-in the dense part runs on the CPU, where Qwen3's attention takes about a third of a decode
  step; on a GPU it is a small part. With it narrowed the experts dominate the step as they do
  on a GPU machine, and the configurations span a wider range.

Usage: python benchmarks/bench_fidelity.py [--models demo,qwen3,qwen3-narrow] [--repeats 3] [--new-tokens 32]
       [--quick-profile] [--qwen3-layers 3] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from hybrimoe.config import HardwareProfile, PolicyConfig, save_profile
from hybrimoe.demo import demo_model_path
from hybrimoe.profile.inputs import resolve_model
from hybrimoe.profile.run import ProfileOptions, profile_machine
from hybrimoe.runtime.generate import Sampling
from hybrimoe.run import RunOptions, run

REPO = Path(__file__).resolve().parent.parent
QWEN3_TRACE = REPO / "traces" / "qwen3-30b-a3b.npz"
QWEN3_CONFIG = dict(
    model_type="qwen3_moe", hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144,
    num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, vocab_size=257, max_position_embeddings=4096,
    tie_word_embeddings=False, eos_token_id=256, pad_token_id=256, bos_token_id=None, dtype="bfloat16",
    decoder_sparse_step=1, mlp_only_layers=[],
)


@dataclass(frozen=True)
class Config:
    label: str
    strategy: str
    cache_ratio: float
    policy: PolicyConfig = PolicyConfig()


CONFIGS = (
    Config("hybrimoe, no cache", "hybrimoe", 0.0),
    Config("hybrimoe, 25% cache, no prefetch", "hybrimoe", 0.25, PolicyConfig(prefetch_depth=0)),
    Config("hybrimoe, 25% cache", "hybrimoe", 0.25),
    Config("hybrimoe, 50% cache", "hybrimoe", 0.5),
    Config("hybrimoe, full cache", "hybrimoe", 1.0),
    Config("hybrimoe, 5% cache, prefetch depth 4", "hybrimoe", 0.05, PolicyConfig(prefetch_depth=4)),
    Config("gpu-offload, 5% cache", "gpu-offload", 0.05),
    Config("gpu-offload, 25% cache", "gpu-offload", 0.25),
    Config("gpu-offload, 50% cache", "gpu-offload", 0.5),
    Config("llamacpp, 50% cache", "llamacpp", 0.5),
    Config("cpu-only", "cpu-only", 0.0),
)


QWEN3_NARROW = dict(num_attention_heads=8, num_key_value_heads=1)


def write_qwen3_model(directory: Path, n_layers: int, **changes) -> Path:
    """The random Qwen3-shaped checkpoint (written once; reused while its config matches)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from hybrimoe.profile.measure import fill_weights

    wanted = {**QWEN3_CONFIG, "num_hidden_layers": n_layers, **changes}
    config = AutoConfig.for_model(**wanted)
    config_file = directory / "config.json"
    if config_file.is_file():
        written = json.loads(config_file.read_text())
        if all(written.get(key) == wanted[key] for key in ("num_hidden_layers", *changes)):
            return directory
    if directory.exists():
        shutil.rmtree(directory)
    print(f"writing a random Qwen3-shaped model with {n_layers} MoE layers to {directory}", flush=True)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if "norm" in name else fill_weights(param.data)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_path() / name, directory / name)
    return directory


def measure_profile(model_dir: Path, quick: bool) -> HardwareProfile:
    print(f"profiling this machine for {model_dir.name} (hybrimoe profile --model {model_dir})", flush=True)
    shape = resolve_model(model_path=model_dir)
    options = ProfileOptions(model=shape, device="cpu", quick=quick, model_config=model_dir / "config.json")
    shown = set()

    def progress(what: str, done: int, total: int) -> None:
        if what and what not in shown:
            shown.add(what)
            print(f"    [{done}/{total}] {what}", flush=True)

    return profile_machine(options, progress)


def prompt_text(n_tokens: int) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return text[:n_tokens]  # the byte tokenizer: one token per ASCII character


def run_config(model_dir: Path, profile_path: Path, config: Config, prompt: str, new_tokens: int,
               replay: Path | None) -> dict:
    options = RunOptions(
        prompts=(prompt,), model=model_dir, max_new_tokens=new_tokens, sampling=Sampling(), device="cpu",
        profile=profile_path, strategy=config.strategy, cache_ratio=config.cache_ratio, replay_trace=replay,
    )
    stats = run(options, show_progress=False).stats
    return {
        "decode_ms": 1000.0 / stats.decode_tokens_per_s,
        "ttft_ms": 1000.0 * stats.ttft_s,
        "predicted_decode_ms": 1000.0 / stats.simulated_decode_tokens_per_s,
        "predicted_ttft_ms": 1000.0 * stats.simulated_ttft_s,
    }


def kendall_tau(xs: list[float], ys: list[float]) -> float:
    """Kendall's tau-a between two orders (ties count as neither concordant nor discordant)."""
    n, score = len(xs), 0
    for i in range(n):
        for j in range(i + 1, n):
            product = (xs[i] - xs[j]) * (ys[i] - ys[j])
            score += (product > 0) - (product < 0)
    return score / (n * (n - 1) / 2)


def bench_model(name: str, model_dir: Path, replay: Path | None, prompt: str, args, workdir: Path) -> None:
    base = measure_profile(model_dir, args.quick_profile)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"  profile kept as {save_profile(base, args.cache_dir / f'{name}.profile.yaml', overwrite=True)}")
    profiles = {}
    for config in CONFIGS:
        path = workdir / f"{name}.{config.policy.prefetch_depth}.yaml"
        if path not in profiles.values():
            save_profile(dataclasses.replace(base, policy=config.policy), path, overwrite=True)
        profiles[config.label] = path
    results: dict[str, list[dict]] = {config.label: [] for config in CONFIGS}
    for repeat in range(args.repeats):
        for config in CONFIGS:
            print(f"  {name} repeat {repeat + 1}/{args.repeats}: {config.label}", flush=True)
            results[config.label].append(
                run_config(model_dir, profiles[config.label], config, prompt, args.new_tokens, replay))
    rows = []
    for config in CONFIGS:
        runs = results[config.label]
        rows.append({
            "config": config.label,
            **{key: statistics.median(r[key] for r in runs) for key in runs[0]},
        })
    print()
    print(f"## {name}: {len(prompt)}-token prompt, {args.new_tokens} new tokens, median of {args.repeats} runs")
    print()
    print("| configuration | decode ms/token predicted | measured | measured/predicted "
          "| TTFT ms predicted | measured | measured/predicted |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['config']} | {row['predicted_decode_ms']:.2f} | {row['decode_ms']:.2f} "
              f"| {row['decode_ms'] / row['predicted_decode_ms']:.2f} | {row['predicted_ttft_ms']:.1f} "
              f"| {row['ttft_ms']:.1f} | {row['ttft_ms'] / row['predicted_ttft_ms']:.2f} |")
    decode_error = statistics.median(abs(r["predicted_decode_ms"] / r["decode_ms"] - 1) for r in rows)
    ttft_error = statistics.median(abs(r["predicted_ttft_ms"] / r["ttft_ms"] - 1) for r in rows)
    tau = kendall_tau([r["predicted_decode_ms"] for r in rows], [r["decode_ms"] for r in rows])
    spread = max(r["predicted_decode_ms"] for r in rows) / min(r["predicted_decode_ms"] for r in rows)
    print()
    print(f"{name}: median absolute error decode {decode_error:.1%}, TTFT {ttft_error:.1%}; "
          f"Kendall tau (decode) {tau:.2f}; predicted decode times span {spread:.2f}x")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,qwen3,qwen3-narrow")  # the demo first: see the README
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--quick-profile", action="store_true", help="hybrimoe profile --quick")
    parser.add_argument("--qwen3-layers", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "hybrimoe-bench")
    args = parser.parse_args()
    prompt = prompt_text(args.prompt_tokens)
    with tempfile.TemporaryDirectory() as work:
        for name in args.models.split(","):
            if name == "demo":
                bench_model("demo", demo_model_path(), None, prompt, args, Path(work))
            elif name in ("qwen3", "qwen3-narrow"):
                changes = QWEN3_NARROW if name == "qwen3-narrow" else {}
                directory = args.cache_dir / f"{name}-shaped-{args.qwen3_layers}"
                model_dir = write_qwen3_model(directory, args.qwen3_layers, **changes)
                bench_model(name, model_dir, QWEN3_TRACE, prompt, args, Path(work))
            else:
                raise SystemExit(f"unknown model {name!r}; expected demo, qwen3 or qwen3-narrow")


if __name__ == "__main__":
    main()
