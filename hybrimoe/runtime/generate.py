"""The generation loop: one prefill, then one token per step, over a batch, with a KV cache.

Shapes: B = sequences, S = prompt length (left-padded), V = vocabulary, N = new tokens.

Design choices:
- A plain loop over `model(...)` with a `DynamicCache` rather than `model.generate`: the step
  boundaries (for statistics, traces and streaming) are ours, and the model sees exactly the
  inputs `generate` would give it (positions from the attention mask, so left padding is exact).
- Greedy unless a temperature is given; sampling is seeded through one generator on the logits'
  device. A sequence that produced EOS is fed padding until every sequence has finished.
- Timing syncs the accelerator at each timed point (`sync`), so TTFT and tokens/s are honest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hybrimoe.run_options import Sampling


@dataclass
class Generated:
    tokens: torch.Tensor  # [B, N] new tokens
    ttft_s: float  # prefill and first token, per batch
    decode_s: float  # the remaining N - 1 steps
    prefill_logits: torch.Tensor | None = None  # [B, S, V], when kept
    step_logits: list[torch.Tensor] = field(default_factory=list)  # N x [B, V], when kept


def sampler(sampling: Sampling, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits [B, V] -> next tokens [B]: greedy, or seeded sampling with temperature and top_p."""
    if sampling.temperature <= 0.0:
        return lambda logits: logits.argmax(dim=-1)
    generator = torch.Generator(device=device)
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    else:
        generator.seed()

    def sample(logits: torch.Tensor) -> torch.Tensor:  # [B, V] -> [B]
        # in float64 from the largest logit down: a temperature near 0 (below float32's smallest
        # number, even) divides the others into -inf, never into nan
        logits = logits.double()
        probs = ((logits - logits.amax(dim=-1, keepdim=True)) / sampling.temperature).softmax(dim=-1)
        if sampling.top_p < 1.0:
            sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p, and always the top token (a top_p
            # below float32's smallest number would otherwise drop it too)
            drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= sampling.top_p
            drop[..., 0] = False
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, sorted_ids, sorted_probs)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return sample


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # [B, S]
    attention_mask: torch.Tensor,  # [B, S], 0 on left padding
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    *,
    eos_token_ids: tuple[int, ...] = (),
    pad_token_id: int = 0,
    on_tokens: Callable[[torch.Tensor], None] | None = None,  # called with [B] after each step
    before_step: Callable[[int, int], None] | None = None,  # (new tokens, cached tokens per sequence)
    on_step: Callable[[], None] | None = None,  # called after each forward step
    sync: Callable[[], None] = lambda: None,
    keep_logits: bool = False,
) -> Generated:
    from transformers import DynamicCache

    device = input_ids.device
    sample = sampler(sampling, device)
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
    tokens: list[torch.Tensor] = []
    step_logits: list[torch.Tensor] = []
    prefill_logits = None
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        mask = attention_mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, S]
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=device)  # [B]
        inputs = input_ids
        start = time.perf_counter()
        ttft_s = 0.0
        for step in range(max_new_tokens):
            if before_step is not None:
                cached = 0 if step == 0 else input_ids.shape[1] + step - 1
                before_step(inputs.numel(), cached)
            out = model(
                input_ids=inputs,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=0 if keep_logits and step == 0 else 1,
            )
            if on_step is not None:
                on_step()
            logits = out.logits[:, -1, :]  # [B, V]
            if keep_logits:
                if step == 0:
                    prefill_logits = out.logits
                step_logits.append(logits)
            next_tokens = sample(logits)  # [B]
            if eos_token_ids:
                next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
                unfinished &= ~torch.isin(next_tokens, eos)
            tokens.append(next_tokens)
            if step == 0:
                sync()
                ttft_s = time.perf_counter() - start
            if on_tokens is not None:
                on_tokens(next_tokens)
            # Sync point (CUDA): deciding to stop reads the finished flags.
            if eos_token_ids and not bool(unfinished.any()):
                break
            inputs = next_tokens[:, None]  # [B, 1]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            positions = positions[:, -1:] + 1
        sync()
        total_s = time.perf_counter() - start
    return Generated(
        tokens=torch.stack(tokens, dim=1),
        ttft_s=ttft_s,
        decode_s=total_s - ttft_s,
        prefill_logits=prefill_logits,
        step_logits=step_logits,
    )


class TextStream:
    """Turns one sequence's new tokens into text pieces as they come (whole characters only)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return ""
        piece, self._emitted = text[self._emitted :], len(text)
        return piece
