"""Stand-ins, built from a model's shape, for the work of a layer that is not a routed expert.

Shapes: L = stand-in layers in a pool, T = new tokens, D = hidden size, H = query heads,
KV = key/value heads, Hd = head width, C = cached context tokens, E = routed experts,
S = width of all shared experts together.

Design choices:
- `DenseLayer` is what `dense_layer` in a profile means: RMSNorm, the QKV and output projections,
  scaled-dot-product attention of T new tokens over a KV cache of C + T tokens, the second RMSNorm,
  the router, and the shared experts (run as one expert of width S: same bytes and FLOPs). Rotary
  embeddings are left out (elementwise, small), attention is plain GQA even for DeepSeek's latent
  attention, and dense-MLP layers (DeepSeek's first) are not a MoE layer's cost.
- Like the expert pool, the stand-in rotates over enough layers' weights to exceed twice the cache.
- `LayerOverhead` is the runtime's fixed per-layer cost outside kernels it times separately: softmax
  and top-k over the router output, renormalising, expert ids to the host, one tiny expert dispatched
  the way the runtime dispatches (gather its tokens, run it, weighted scatter-add), and the
  end-of-layer synchronisation on an accelerator. It is timed with the wall clock, as the host pays it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybrimoe.profile.measure import check_fits_in_ram, fill_weights, pool_size
from hybrimoe.runtime.kernels import expert_mlp
from hybrimoe.shapes import ModelShape

CONTEXT_TOKENS = 512  # C: the KV cache the new tokens attend over, besides themselves


class DenseLayer:
    def __init__(
        self,
        model: ModelShape,
        dtype: torch.dtype,
        device: torch.device,
        cache_bytes: int,
        max_tokens: int,
        context_tokens: int = CONTEXT_TOKENS,
    ):
        d, h, kv, hd, e = model.hidden_size, model.n_heads, model.n_kv_heads, model.head_dim, model.n_experts
        s = model.n_shared_experts * model.shared_intermediate_size
        self.model, self.dtype, self.device = model, dtype, device
        self.context_tokens = context_tokens
        kv_len = context_tokens + max_tokens
        elements = (h + 2 * kv) * hd * d + d * h * hd + e * d + 2 * d + 3 * s * d + 2 * kv * kv_len * hd
        n = pool_size(elements * dtype.itemsize, cache_bytes)
        if device.type == "cpu":
            check_fits_in_ram(n * elements * dtype.itemsize, f"{n} dense stand-in layers")

        def weights(*shape: int) -> torch.Tensor:
            return fill_weights(torch.empty(n, *shape, dtype=dtype, device=device))

        self.qkv = weights((h + 2 * kv) * hd, d)  # [L, (H + 2KV) Hd, D]
        self.o = weights(d, h * hd)  # [L, D, H Hd]
        self.router = weights(e, d)  # [L, E, D]
        self.norms = torch.ones(n, 2, d, dtype=dtype, device=device)  # [L, 2, D]
        self.shared_gate_up = weights(2 * s, d) if s else None  # [L, 2S, D]
        self.shared_down = weights(d, s) if s else None  # [L, D, S]
        self.k_cache = weights(kv, kv_len, hd)  # [L, KV, C + T, Hd]
        self.v_cache = weights(kv, kv_len, hd)
        self.n_layers = n
        self._next = 0

    def tokens(self, n_tokens: int) -> torch.Tensor:  # [T, D]
        return fill_weights(torch.empty(n_tokens, self.model.hidden_size, dtype=self.dtype, device=self.device))

    def causal_mask(self, n_tokens: int) -> torch.Tensor | None:  # [T, C + T], True = may attend
        if n_tokens == 1:
            return None
        keys = torch.arange(self.context_tokens + n_tokens, device=self.device)
        queries = torch.arange(n_tokens, device=self.device) + self.context_tokens
        return keys[None, :] <= queries[:, None]

    def run(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # x: [T, D] -> [T, D]
        layer = self._next
        self._next = (layer + 1) % self.n_layers
        m = self.model
        t, h, kv, hd = x.shape[0], m.n_heads, m.n_kv_heads, m.head_dim
        end = self.context_tokens + t

        hidden = F.rms_norm(x, (m.hidden_size,), self.norms[layer, 0])
        q, k, v = F.linear(hidden, self.qkv[layer]).split([h * hd, kv * hd, kv * hd], dim=-1)
        self.k_cache[layer, :, self.context_tokens: end] = k.view(t, kv, hd).transpose(0, 1)
        self.v_cache[layer, :, self.context_tokens: end] = v.view(t, kv, hd).transpose(0, 1)
        attn = F.scaled_dot_product_attention(
            q.view(t, h, hd).transpose(0, 1)[None],  # [1, H, T, Hd]
            self.k_cache[layer, :, :end][None],  # [1, KV, C + T, Hd]
            self.v_cache[layer, :, :end][None],
            attn_mask=mask,
            enable_gqa=kv != h,
        )  # [1, H, T, Hd]
        x = x + F.linear(attn[0].transpose(0, 1).reshape(t, h * hd), self.o[layer])

        hidden = F.rms_norm(x, (m.hidden_size,), self.norms[layer, 1])
        F.linear(hidden, self.router[layer])  # [T, E] router logits, consumed by LayerOverhead's top-k
        if self.shared_gate_up is not None:
            x = x + expert_mlp(hidden, self.shared_gate_up[layer], self.shared_down[layer])
        return x


class LayerOverhead:
    TINY = 16  # hidden and intermediate size of the dispatched expert: its kernel time is negligible

    def __init__(self, model: ModelShape, dtype: torch.dtype, device: torch.device):
        self.top_k, self.device = model.top_k, device
        self.logits = torch.randn(1, model.n_experts, device=device).to(dtype)  # [T=1, E]
        self.x = torch.randn(1, self.TINY, device=device).to(dtype)  # [T=1, TINY]
        self.gate_up = torch.randn(2 * self.TINY, self.TINY, device=device).to(dtype)
        self.down = torch.randn(self.TINY, self.TINY, device=device).to(dtype)

    def run(self) -> torch.Tensor:
        probs = self.logits.float().softmax(dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)  # [T, K]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        chosen = ids.tolist()  # sync point: the planner reads the routed expert ids on the host
        expert = chosen[0][0]
        rows = [t for t, row in enumerate(chosen) if expert in row]
        index = torch.tensor(rows, device=self.device)
        out = torch.zeros_like(self.x)
        y = expert_mlp(self.x.index_select(0, index), self.gate_up, self.down)
        out.index_add_(0, index, y * weights[index, :1].to(y.dtype))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # sync point: the end of the layer
        return out
