"""Train the embedded demo model: a small Qwen2-MoE byte-level language model on Tiny Shakespeare.

    python scripts/train_demo_model.py            # trains and writes hybrimoe/demo_model/
    python scripts/train_demo_model.py --card     # rewrites only the model card from the checkpoint

Notable design choices:
- Architecture: transformers' own Qwen2-MoE (`model_type="qwen2_moe"`), so loading needs no custom
  code: every layer is an MoE layer with 16 routed experts, top-2 routing and one gated shared expert.
- Tokenizer: byte level with token id == byte value (0-255) plus `<|endoftext|>` (256) as eos/pad.
  It is a `tokenizers` ByteLevel BPE with no merges wrapped for `AutoTokenizer`, so training reads
  raw bytes directly and the loss per token is the loss in nats per byte.
- Data: the first 95% of the bytes train, the last 5% are held out; training windows are drawn at
  random offsets by a seeded generator. Nothing reads the text at run time.
- A fixed number of steps (not a time budget), so the default command reproduces the checkpoint
  on the same torch build and thread count.
- AdamW, linear warm-up then cosine decay, gradient clipping, and a Switch-style load-balancing
  loss computed per layer, weight 0.002. Trial runs: transformers' own Qwen2-MoE auxiliary loss
  (weight 0.01) balances expert indices summed over all layers and let 3-5 experts of a layer
  die; the per-layer loss at 0.01 made routing nearly uniform (busiest expert <= 1.6x the mean);
  at 0.002 every expert stays in use and popularity stays uneven, as in real MoE models.
- One torch thread by default: on a 2-core machine shared with other jobs, two OpenMP threads
  spin against each other and a step took up to 14x longer than with one (measured).
- Training uses transformers' "grouped_mm" experts implementation (fastest on CPU); it is not
  saved in the config, so loaders choose their own. Weights are saved in float32.
- The model card's numbers (held-out loss, samples, routing statistics) are computed here, from
  the saved checkpoint, by `write_card`.

Shapes: B = windows in a batch, T = bytes per window (context), E = routed experts, K = top-k.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hybrimoe.demo import DEMO_MODEL_DIR, DEMO_PROMPT

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT / "../shared/data/tinyshakespeare/input.txt"
EOS_TOKEN = "<|endoftext|>"
N_BYTES = 256
HELD_OUT_FRACTION = 0.05
LOG_NAME = "training_log.json"


@dataclass(frozen=True)
class TrainArgs:
    data: str
    out: str
    seed: int
    max_steps: int
    batch_size: int
    context_bytes: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    eval_every: int
    eval_windows: int
    threads: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_experts: int
    top_k: int
    expert_intermediate: int
    shared_intermediate: int
    aux_loss_coef: float


def parse_args(argv: list[str] | None = None) -> tuple[TrainArgs, bool]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Tiny Shakespeare input.txt")
    p.add_argument("--out", default=str(DEMO_MODEL_DIR), help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=16, help="windows per step")
    p.add_argument("--context-bytes", type=int, default=256, help="bytes per window")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=250, help="steps between held-out checks")
    p.add_argument("--eval-windows", type=int, default=32, help="windows per held-out check")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-intermediate", type=int, default=128)
    p.add_argument("--shared-intermediate", type=int, default=256)
    p.add_argument("--aux-loss-coef", type=float, default=0.002)
    p.add_argument("--card", action="store_true", help="only rewrite README.md from --out's checkpoint")
    ns = vars(p.parse_args(argv))
    card_only = ns.pop("card")
    return TrainArgs(**ns), card_only


# ---------------------------------------------------------------------------------------------
# Tokenizer and data


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which ByteLevel (de)coding expects."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = printable[:]
    n_extra = 0
    for b in range(N_BYTES):
        if b not in printable:
            printable.append(b)
            chars.append(N_BYTES + n_extra)
            n_extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def build_tokenizer():
    """A byte-level tokenizer whose token id is the byte value; `<|endoftext|>` is id 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, model_max_length=None
    )


def load_bytes(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held_out) byte ids as int64 tensors; held-out is the last 5% of the file."""
    data = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.int64)
    n_train = int(len(data) * (1 - HELD_OUT_FRACTION))
    return torch.from_numpy(data[:n_train].copy()), torch.from_numpy(data[n_train:].copy())


def random_batch(data: torch.Tensor, batch_size: int, context_bytes: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - context_bytes, (batch_size,), generator=gen)
    return torch.stack([data[s : s + context_bytes] for s in starts.tolist()])  # [B, T]


def held_out_windows(data: torch.Tensor, context_bytes: int) -> torch.Tensor:
    """Windows overlapping by one byte, so every held-out byte but the first is predicted once."""
    stride = context_bytes - 1
    n = (len(data) - 1) // stride
    return torch.stack([data[i * stride : i * stride + context_bytes] for i in range(n)])  # [N, T]


# ---------------------------------------------------------------------------------------------
# Model and training


def build_config(a: TrainArgs):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        vocab_size=N_BYTES + 1,
        hidden_size=a.hidden_size,
        num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads,
        num_key_value_heads=a.n_heads,
        intermediate_size=a.shared_intermediate,
        moe_intermediate_size=a.expert_intermediate,
        shared_expert_intermediate_size=a.shared_intermediate,
        num_experts=a.n_experts,
        num_experts_per_tok=a.top_k,
        norm_topk_prob=False,
        max_position_embeddings=a.context_bytes,
        tie_word_embeddings=True,
        router_aux_loss_coef=a.aux_loss_coef,
        bos_token_id=None,
        eos_token_id=N_BYTES,
        pad_token_id=N_BYTES,
    )


def lr_at(step: int, a: TrainArgs) -> float:
    if step < a.warmup_steps:
        return a.lr * (step + 1) / a.warmup_steps
    progress = (step - a.warmup_steps) / max(1, a.max_steps - a.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * cosine)


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch load balance, E * sum_e(token share_e * mean router prob_e), averaged over layers."""
    losses = []
    for logits in router_logits:  # each [B*T, E]
        probs = logits.float().softmax(dim=-1)
        chosen = probs.topk(top_k, dim=-1).indices  # [B*T, K]
        token_share = torch.zeros(probs.size(-1)).scatter_add_(0, chosen.reshape(-1), torch.ones(chosen.numel()))
        token_share = token_share / chosen.numel()  # [E]
        losses.append(probs.size(-1) * (token_share * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


@torch.no_grad()
def held_out_loss(model, windows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-byte cross-entropy over all predicted bytes of `windows`, in nats per byte."""
    model.eval()
    total_nats, n_predicted = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x = windows[i : i + batch_size]  # [B, T]
        logits = model(input_ids=x).logits[:, :-1].float()  # [B, T-1, V]
        nats = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum")
        total_nats += nats.item()
        n_predicted += x[:, 1:].numel()
    model.train()
    return total_nats / n_predicted


def train(a: TrainArgs) -> dict:
    from transformers import Qwen2MoeForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    train_ids, held_ids = load_bytes(Path(a.data))
    eval_windows = held_out_windows(held_ids, a.context_bytes)
    eval_probe = eval_windows[torch.randperm(len(eval_windows), generator=torch.Generator().manual_seed(a.seed))[: a.eval_windows]]
    model = Qwen2MoeForCausalLM._from_config(build_config(a), experts_implementation="grouped_mm")
    model.train()

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(a.seed)
    curve: list[dict] = []
    t0 = time.perf_counter()
    for step in range(a.max_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, a)
        x = random_batch(train_ids, a.batch_size, a.context_bytes, gen)  # [B, T]
        out = model(input_ids=x, output_router_logits=True)
        logits = out.logits[:, :-1]  # [B, T-1, V]
        lm_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        balance_loss = per_layer_balance_loss(out.router_logits, a.top_k)
        opt.zero_grad(set_to_none=True)
        (lm_loss + a.aux_loss_coef * balance_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        lm_loss = lm_loss.item()
        last = step == a.max_steps - 1
        if step % 50 == 0 or last:
            point = {"step": step, "train_loss": round(lm_loss, 4), "elapsed_s": round(time.perf_counter() - t0, 1)}
            if (step % a.eval_every == 0 and step > 0) or last:
                point["held_out_probe_loss"] = round(held_out_loss(model, eval_probe), 4)
            curve.append(point)
            print(json.dumps(point), flush=True)
    train_s = time.perf_counter() - t0

    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    build_tokenizer().save_pretrained(out_dir)
    log = {
        "args": asdict(a) | {"data": Path(a.data).name, "out": out_dir.name},
        "train_seconds": round(train_s, 1),
        "train_bytes": len(train_ids),
        "held_out_bytes": len(held_ids),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "curve": curve,
        "held_out_loss": round(held_out_loss(model, eval_windows), 4),
    }
    (out_dir / LOG_NAME).write_text(json.dumps(log, indent=1) + "\n")
    return log


# ---------------------------------------------------------------------------------------------
# Model card


@torch.no_grad()
def routing_stats(model, windows: torch.Tensor) -> dict:
    """Expert popularity per layer and how often consecutive tokens share experts, on `windows`."""
    cfg = model.config
    n_experts, top_k = cfg.num_experts, cfg.num_experts_per_tok
    counts = torch.zeros(cfg.num_hidden_layers, n_experts)  # [L, E]
    overlap_sum = torch.zeros(cfg.num_hidden_layers)
    any_shared = torch.zeros(cfg.num_hidden_layers)
    n_pairs = 0
    for i in range(0, len(windows), 32):
        x = windows[i : i + 32]  # [B, T]
        B, T = x.shape
        router_logits = model(input_ids=x, output_router_logits=True).router_logits
        for layer, logits in enumerate(router_logits):
            chosen = logits.float().topk(top_k, dim=-1).indices.view(B, T, top_k)  # [B, T, K]
            mask = torch.zeros(B, T, n_experts).scatter_(-1, chosen, 1.0)  # [B, T, E]
            counts[layer] += mask.sum(dim=(0, 1))
            shared = (mask[:, 1:] * mask[:, :-1]).sum(-1)  # [B, T-1] experts shared by neighbours
            overlap_sum[layer] += shared.sum()
            any_shared[layer] += (shared > 0).float().sum()
        n_pairs += B * (T - 1)
    share = counts / counts.sum(dim=1, keepdim=True)  # [L, E]
    entropy = -(share * share.clamp_min(1e-12).log()).sum(dim=1)
    return {
        "share": share.tolist(),
        "max_over_mean": (share.max(dim=1).values * n_experts).tolist(),
        "min_over_mean": (share.min(dim=1).values * n_experts).tolist(),
        "effective_experts": entropy.exp().tolist(),
        "mean_shared_experts": (overlap_sum / n_pairs).tolist(),
        "any_shared_fraction": (any_shared / n_pairs).tolist(),
        "random_mean_shared": top_k * top_k / n_experts,
        "random_any_shared": 1 - math.comb(n_experts - top_k, top_k) / math.comb(n_experts, top_k),
        "n_tokens": int(counts[0].sum().item()) // top_k,
    }


def generate_samples(model, tokenizer, seed: int, n_new: int = 200) -> tuple[str, str]:
    ids = tokenizer(DEMO_PROMPT, return_tensors="pt").input_ids
    greedy = model.generate(ids, max_new_tokens=n_new, do_sample=False)
    torch.manual_seed(seed)
    sampled = model.generate(ids, max_new_tokens=n_new, do_sample=True, temperature=0.8, top_k=0, top_p=1.0)
    return tokenizer.decode(greedy[0]), tokenizer.decode(sampled[0])


def _expert_bytes(cfg, quantize: str | None, group_size: int | None) -> int:
    from hybrimoe.config import ExpertShape

    shape = ExpertShape(cfg.hidden_size, cfg.moe_intermediate_size, "float32", quantize=quantize, group_size=group_size)
    return shape.expert_bytes


def _checkpoint_bytes(out_dir: Path) -> int:
    return sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file() and f.name != "README.md")


QUANTIZED = (("int8", 128), ("int8", 32), ("int4", 128), ("int4", 32))  # (format, group size) for the card


def quantized_losses(model, windows: torch.Tensor) -> dict[tuple[str, int], float]:
    """Held-out loss with the routed experts as `hybrimoe run --quantize` keeps them: quantized and
    dequantized with the runtime's own functions (the runtime computes exactly this model, as
    tests/runtime/test_quantized_exactness.py checks); the dense part stays float32."""
    from hybrimoe.runtime.quantized import dequantize, quantize_stack

    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "is_transposed")]
    originals = [(m.gate_up_proj.data.clone(), m.down_proj.data.clone()) for m in experts]
    losses = {}
    for quantize, group_size in QUANTIZED:
        if any(size % group_size for size in (model.config.hidden_size, model.config.moe_intermediate_size)):
            continue  # a group must split each row (a smaller model's rows may be shorter)
        for module, weights in zip(experts, originals):
            for param, weight in zip((module.gate_up_proj, module.down_proj), weights):
                qdata, scale = quantize_stack(weight, quantize, group_size, transposed=False)
                param.data = dequantize(qdata, scale, weight.dtype, transposed=False)
        losses[(quantize, group_size)] = held_out_loss(model, windows)
    for module, (gate_up, down) in zip(experts, originals):
        module.gate_up_proj.data, module.down_proj.data = gate_up, down
    return losses


def write_card(out_dir: Path, data_path: Path, threads: int) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    log = json.loads((out_dir / LOG_NAME).read_text())
    a = log["args"]
    model = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    model.eval()
    cfg = model.config
    _, held_ids = load_bytes(data_path)
    windows = held_out_windows(held_ids, cfg.max_position_embeddings)
    held_loss = held_out_loss(model, windows)
    quantized = quantized_losses(model, windows)
    stats = routing_stats(model, windows)
    greedy, sampled = generate_samples(model, tokenizer, a["seed"])

    quantized_rows = "\n".join(
        f"| {quantize} | {group} | {_expert_bytes(cfg, quantize, group):,} | {loss:.4f} | {loss / held_loss - 1:+.2%} |"
        for (quantize, group), loss in quantized.items()
    )
    n_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = n_params - expert_params + expert_params * cfg.num_experts_per_tok // cfg.num_experts
    defaults = vars(argparse.Namespace(**asdict(parse_args([])[0])))
    changed = [f"--{k.replace('_', '-')} {v}" for k, v in a.items() if k not in ("data", "out") and defaults[k] != v]
    command = " ".join(["python scripts/train_demo_model.py", *changed])
    routing_rows = "\n".join(
        f"| {layer} | {stats['max_over_mean'][layer]:.2f} | {stats['min_over_mean'][layer]:.2f} "
        f"| {stats['effective_experts'][layer]:.1f} of {cfg.num_experts} "
        f"| {stats['mean_shared_experts'][layer]:.2f} | {stats['any_shared_fraction'][layer]:.0%} |"
        for layer in range(cfg.num_hidden_layers)
    )
    popularity_rows = "\n".join(
        f"| {layer} | " + " ".join(f"{100 * s:.0f}" for s in stats["share"][layer]) + " |"
        for layer in range(cfg.num_hidden_layers)
    )
    curve_rows = "\n".join(
        f"| {p['step']} | {p['train_loss']:.3f} | {p['held_out_probe_loss']:.3f} | {p['elapsed_s']:.0f} |"
        for p in log["curve"] if "held_out_probe_loss" in p
    )
    card = f"""# hybrimoe demo model

A small Mixture-of-Experts language model trained on Tiny Shakespeare (public domain, about 1.1 MB
of text), shipped with hybrimoe so `hybrimoe run` works on a fresh machine with nothing downloaded.
It is a plain transformers checkpoint: load it with `AutoModelForCausalLM.from_pretrained(path,
local_files_only=True)` and `AutoTokenizer.from_pretrained(path, local_files_only=True)`; the path is
`hybrimoe.demo.demo_model_path()`. It writes Shakespeare-shaped text, not sense; it exists to exercise
expert scheduling, caching and prefetching on real, unevenly routed experts.

## Architecture

| | |
|---|---|
| model_type | `{cfg.model_type}` (transformers' Qwen2-MoE; no custom code) |
| layers | {cfg.num_hidden_layers}, every one an MoE layer |
| routed experts per layer | {cfg.num_experts}, top-{cfg.num_experts_per_tok} (softmax router, weights not renormalised) |
| shared experts per layer | 1, intermediate {cfg.shared_expert_intermediate_size}, with a sigmoid `shared_expert_gate` |
| hidden size | {cfg.hidden_size}; {cfg.num_attention_heads} attention heads |
| routed expert intermediate size | {cfg.moe_intermediate_size} (SwiGLU; stacked `gate_up_proj` [E, 2I, D], `down_proj` [E, D, I]) |
| vocabulary | {cfg.vocab_size}: the 256 byte values (token id = byte value) and `{EOS_TOKEN}` = {N_BYTES} |
| context | {cfg.max_position_embeddings} tokens (bytes) |
| parameters | {n_params:,} total, of which {expert_params:,} in routed experts; {active:,} active per token |
| dtype | {str(cfg.dtype).replace("torch.", "")} |
| checkpoint size | {_checkpoint_bytes(out_dir) / 1e6:.2f} MB (all files but this card) |

## Training

    {command}

One run of this command with its defaults produced this checkpoint. It reads `{a["data"]}` (default
`../shared/data/tinyshakespeare/input.txt` relative to the repository root); nothing reads it at
run time.

- Data: first 95% of the bytes ({log["train_bytes"]:,}) for training, last 5% ({log["held_out_bytes"]:,}) held out.
- Seed {a["seed"]}; {a["max_steps"]} steps of {a["batch_size"]} windows x {a["context_bytes"]} bytes
  ({a["max_steps"] * a["batch_size"] * a["context_bytes"] / 1e6:.1f} M bytes, about
  {a["max_steps"] * a["batch_size"] * a["context_bytes"] / log["train_bytes"]:.1f} passes over the training text).
- AdamW (betas 0.9, 0.95, weight decay {a["weight_decay"]} on matrices), peak lr {a["lr"]}, {a["warmup_steps"]} warm-up
  steps then cosine decay to {a["min_lr_ratio"]} x peak, gradient clipping at {a["grad_clip"]},
  per-layer Switch load-balancing loss weight {a["aux_loss_coef"]} (small, so routing stays
  uneven; transformers' built-in Qwen2-MoE loss balances only across layers); float32 throughout.
- Time: {log["train_seconds"] / 60:.1f} minutes on {log["machine"]} (torch {log["torch"]}),
  measured while other jobs shared the machine's 2 cores.

| step | train loss | held-out loss ({a["eval_windows"]} windows) | elapsed s |
|---|---|---|---|
{curve_rows}

## Held-out loss

**{held_loss:.3f} nats per byte** ({held_loss / math.log(2):.2f} bits per byte) on the last 5% of the
text, every byte predicted once from up to {cfg.max_position_embeddings - 1} preceding bytes.

### With quantized experts (`hybrimoe run --quantize`)

The routed experts quantized at load as the runtime does (weight-only, symmetric, one float32
scale per group of weights along each row; int4 packed two per byte); the dense part float32.

| experts | group size | bytes per expert | held-out loss (nats/byte) | vs float32 |
|---|---|---|---|---|
| float32 | | {_expert_bytes(cfg, None, None):,} | {held_loss:.4f} | |
{quantized_rows}

## Samples

Prompt `{DEMO_PROMPT}`, 200 new tokens. Greedy:

```text
{greedy}
```

Sampled (temperature 0.8, seed {a["seed"]}):

```text
{sampled}
```

## Routing

Measured on the held-out text ({stats["n_tokens"]:,} tokens). "Popularity" is an expert's share of the
layer's top-{cfg.num_experts_per_tok} selections relative to the uniform share 1/{cfg.num_experts};
"effective experts" is exp(entropy) of the shares ({cfg.num_experts} would be perfectly even). For
consecutive tokens, "shared" counts the experts that both select; random top-{cfg.num_experts_per_tok}
choices would share {stats["random_mean_shared"]:.2f} experts on average and at least one
{stats["random_any_shared"]:.0%} of the time.

| layer | most popular / mean | least popular / mean | effective experts | shared with previous token | previous token shares at least one |
|---|---|---|---|---|---|
{routing_rows}

Share of selections per expert, in percent (experts 0-{cfg.num_experts - 1}):

| layer | shares |
|---|---|
{popularity_rows}

Regenerate this card with `python scripts/train_demo_model.py --card`.
"""
    path = out_dir / "README.md"
    path.write_text(card)
    return path


def main(argv: list[str] | None = None) -> None:
    a, card_only = parse_args(argv)
    if not card_only:
        log = train(a)
        print(f"trained in {log['train_seconds']:.0f} s; held-out loss {log['held_out_loss']:.4f} nats/byte", flush=True)
    print(f"wrote {write_card(Path(a.out), Path(a.data), a.threads)}", flush=True)


if __name__ == "__main__":
    main()
