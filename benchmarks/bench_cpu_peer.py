"""hybrimoe against llama.cpp on this CPU: same models, same formats, same threads, interleaved.

Models: the random Qwen3-30B-A3B-shaped checkpoint of bench_fidelity (`--layers` MoE layers of 128
experts, 3 x 2048 x 768, top-8, Qwen3's attention, the demo's byte tokenizer so the LM head is
small) in bfloat16, and the embedded demo model (float32, an untied copy, as llama.cpp's qwen2moe
loader wants). Each is converted once with llama.cpp's own converter (`llamacpp_convert.py`) and,
for the quantized rows, quantized with `llama-quantize` (experts only: attention, embeddings and
output stay bfloat16, as `hybrimoe run --quantize` keeps them).

Rows (`--rows`): `bf16` (hybrimoe bfloat16 vs llama.cpp BF16), `int8` (hybrimoe `--quantize int8`
vs Q8_0 experts), `int4` (`--quantize int4` vs Q4_0 experts), `demo` (float32 vs F32). For each
row and thread count (`--threads`), `--rounds` rounds alternate the two engines; each round runs
`hybrimoe run --strategy cpu-only` (library call, a fresh load) on a `--prompt-tokens` prompt for
`--new-tokens`, and `llama-bench -p PROMPT -n NEW -r 1`. The table gives medians of decode and
prefill tokens/s, the medians of the rounds' paired ratios (hybrimoe / llama.cpp), and each side's
decode weight read rate (the weights a decode step reads, times tokens/s) as a share of the host's
read bandwidth measured in the same run (torch.mv over 1 GiB of float32 with the same threads).
llama.cpp's prompt tokens are random; hybrimoe's are text: the routing differs, the bytes do not.

llama.cpp: `--llama-cpp DIR` or $LLAMA_CPP_DIR, the folder `../shared/peers/llama.cpp/build.sh DIR`
builds (DIR/build/bin/llama-bench, DIR/src/convert_hf_to_gguf.py). Without it the script says
how to build it and stops.

Usage: python benchmarks/bench_cpu_peer.py [--llama-cpp DIR] [--rows bf16,int8,int4,demo]
    [--threads 1,2] [--rounds 3] [--layers 4] [--workdir DIR] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_kernels import read_gbps  # noqa: E402
from bench_fidelity import prompt_text, write_qwen3_model  # noqa: E402

from hybrimoe.demo import demo_model_path  # noqa: E402
from hybrimoe.run import RunOptions, run  # noqa: E402
from hybrimoe.runtime.generate import Sampling  # noqa: E402

HERE = Path(__file__).resolve().parent
BUILD_HINT = ("llama.cpp not found: build it with ../shared/peers/llama.cpp/build.sh DIR (about 25 minutes on "
              "2 cores), then pass --llama-cpp DIR or set LLAMA_CPP_DIR=DIR")
EXPERTS_ONLY = ["--tensor-type", "attn_.*=bf16", "--output-tensor-type", "bf16", "--token-embedding-type", "bf16"]


@dataclass(frozen=True)
class Row:
    key: str
    model: str  # "qwen3" or "demo"
    what: str  # the comparison, as the table says it
    quantize: str | None  # hybrimoe's --quantize
    gguf_type: str | None  # llama-quantize's type (experts only); None: the converted file as it is


ROWS = {
    "bf16": Row("bf16", "qwen3", "bfloat16 vs BF16", None, None),
    "int8": Row("int8", "qwen3", "int8 experts vs Q8_0 experts", "int8", "Q8_0"),
    "int4": Row("int4", "qwen3", "int4 experts vs Q4_0 experts", "int4", "Q4_0"),
    "demo": Row("demo", "demo", "demo model, float32 vs F32", None, None),
}


def llama_dir(option: str | None) -> Path:
    folder = option or os.environ.get("LLAMA_CPP_DIR")
    if not folder or not (Path(folder) / "build" / "bin" / "llama-bench").is_file():
        sys.exit(BUILD_HINT)
    return Path(folder)


def untied_demo(workdir: Path) -> Path:
    """The demo model with its own output layer (llama.cpp's qwen2moe loader wants one)."""
    from transformers import AutoModelForCausalLM

    out = workdir / "demo-untied"
    if (out / "config.json").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(demo_model_path())
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((demo_model_path() / name).read_bytes())
    return out


def gguf_for(row: Row, checkpoint: Path, llama: Path, workdir: Path) -> Path:
    """The row's GGUF: converted once, quantized once."""
    outtype = "bf16" if row.model == "qwen3" else "f32"
    converted = workdir / f"{checkpoint.name}-{outtype}.gguf"
    if not converted.is_file():
        subprocess.run([sys.executable, str(HERE / "llamacpp_convert.py"), str(llama / "src"), str(checkpoint),
                        "--outfile", str(converted), "--outtype", outtype], check=True, capture_output=True)
    if row.gguf_type is None:
        return converted
    quantized = workdir / f"{checkpoint.name}-{row.gguf_type}-experts.gguf"
    if not quantized.is_file():
        subprocess.run([str(llama / "build" / "bin" / "llama-quantize"), *EXPERTS_ONLY, str(converted),
                        str(quantized), row.gguf_type], check=True, capture_output=True)
    return quantized


def llama_bench(llama: Path, gguf: Path, threads: int, prompt_tokens: int, new_tokens: int) -> tuple[float, float]:
    """(decode, prefill) tokens/s of one llama-bench round."""
    out = subprocess.run(
        [str(llama / "build" / "bin" / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt_tokens),
         "-n", str(new_tokens), "-r", "1", "-o", "json"],
        check=True, capture_output=True, text=True,
    ).stdout
    tests = json.loads(out)
    decode = next(t["avg_ts"] for t in tests if t["n_gen"] > 0)
    prefill = next(t["avg_ts"] for t in tests if t["n_prompt"] > 0)
    return decode, prefill


def hybrimoe_run(checkpoint: Path, row: Row, threads: int, prompt_tokens: int, new_tokens: int) -> tuple[float, float]:
    """(decode, prefill) tokens/s of one `hybrimoe run --strategy cpu-only`."""
    options = RunOptions(
        prompts=(prompt_text(prompt_tokens),), model=checkpoint, max_new_tokens=new_tokens, sampling=Sampling(),
        device="cpu", strategy="cpu-only", cache_ratio=0.0, threads=threads, quantize=row.quantize,
    )
    stats = run(options, show_progress=False).stats
    return stats.decode_tokens_per_s, prompt_tokens / stats.ttft_s


def decode_bytes(checkpoint: Path, row: Row) -> int:
    """Weight bytes one decode step reads: the routed experts a token picks (in the row's format)
    and every other weight but the embedding table, of which one row is read."""
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    d, i = config.hidden_size, config.moe_intermediate_size
    element = 2 if row.model == "qwen3" else 4
    # int8: one byte a weight and a float32 scale per group of 128; int4: half a byte and a scale in the weights' dtype
    per_weight = {None: element, "int8": 1 + 4 / 128, "int4": 0.5 + element / 128}[row.quantize]
    other = 0
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        for name in f.keys():
            if ".experts." not in name and "embed_tokens" not in name:
                other += math.prod(f.get_slice(name).get_shape()) * element
    return int(config.num_hidden_layers * config.num_experts_per_tok * 3 * d * i * per_weight + other)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", help="the folder build.sh built llama.cpp in (else $LLAMA_CPP_DIR)")
    parser.add_argument("--rows", default="bf16,int8,int4,demo")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "hybrimoe-bench")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args()
    llama = llama_dir(args.llama_cpp)
    args.workdir.mkdir(parents=True, exist_ok=True)
    checkpoints = {"qwen3": write_qwen3_model(args.workdir / f"qwen3-{args.layers}l", args.layers),
                   "demo": untied_demo(args.workdir)}
    lines = []
    for key in args.rows.split(","):
        row = ROWS[key]
        checkpoint = checkpoints[row.model]
        gguf = gguf_for(row, checkpoint, llama, args.workdir)
        n_bytes = decode_bytes(checkpoint, row)
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            gbps = read_gbps(1 << 30)
            ours, theirs = [], []
            for round_ in range(args.rounds):
                ours.append(hybrimoe_run(checkpoint, row, threads, args.prompt_tokens, args.new_tokens))
                theirs.append(llama_bench(llama, gguf, threads, args.prompt_tokens, args.new_tokens))
                print(f"  {row.key} t={threads} round {round_ + 1}: hybrimoe {ours[-1][0]:.1f}/{ours[-1][1]:.1f}, "
                      f"llama.cpp {theirs[-1][0]:.1f}/{theirs[-1][1]:.1f} tok/s (decode/prefill)", flush=True)
            med = [statistics.median(v) for v in (
                [o[0] for o in ours], [t[0] for t in theirs], [o[1] for o in ours], [t[1] for t in theirs],
                [o[0] / t[0] for o, t in zip(ours, theirs)], [o[1] / t[1] for o, t in zip(ours, theirs)],
            )]
            share = [n_bytes * tps / 1e9 / gbps for tps in med[:2]]
            lines.append((row.what, threads, *med, *share, gbps))
    header = ("| row | threads | decode tok/s hybrimoe | llama.cpp | ratio | prefill tok/s hybrimoe | llama.cpp | ratio "
              "| weights read, hybrimoe | llama.cpp | read bandwidth |")
    print("\n" + header)
    print("|" + "---|" * 11)
    for what, threads, d_o, d_t, p_o, p_t, d_r, p_r, s_o, s_t, gbps in lines:
        print(f"| {what} | {threads} | {d_o:.1f} | {d_t:.1f} | {d_r:.2f}x | {p_o:.1f} | {p_t:.1f} | {p_r:.2f}x "
              f"| {s_o:.0%} | {s_t:.0%} | {gbps:.1f} GB/s |")


if __name__ == "__main__":
    main()
