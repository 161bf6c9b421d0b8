"""Model shapes: the sizes that decide expert bytes, expert FLOPs and the dense part of a layer.

Design choices:
- A top-level module that imports only `hybrimoe.config` and `hybrimoe.errors`: the runtime, the
  trace importers, the tuner and the profiler all read model shapes, and none of them needs another
  for it.
- A `ModelShape` holds only numbers read from a model's `config.json`; presets are those numbers
  for well-known models, copied from their published configs, so estimates need no download.
- `n_layers` counts MoE layers only; layers with a dense MLP instead (DeepSeek's first layer,
  Qwen's `mlp_only_layers`) are `n_dense_layers`. `moe_layers` names the MoE layers' decoder-layer
  numbers where a config or a GGUF says them; without it the dense layers lead (DeepSeek's
  `first_k_dense_replace`), which is what engines that number layers by decoder layer need.
- `shared_intermediate_size` is the width of ONE shared expert; a layer runs `n_shared_experts` of
  them (DeepSeek-V2-Lite: 2 x 1408; Qwen2-57B-A14B: 1 x 20480).
- `head_dim` for DeepSeek's multi-head latent attention is the query/key head width
  (qk_nope_head_dim + qk_rope_head_dim); the estimate treats attention as standard MHA/GQA.
- `shape_from_hf_config` never guesses: a missing key or an unknown family is a `UserError`
  naming it; quantized checkpoints need the expert dtype passed explicitly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from hybrimoe.config import DEFAULT_GROUP_SIZE, DTYPE_BYTES, SIZE_LIMITS, ExpertShape, over_limit
from hybrimoe.errors import UserError


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_layers: int  # MoE layers
    n_dense_layers: int  # decoder layers with a dense MLP instead of experts
    n_experts: int  # routed experts per MoE layer
    top_k: int
    n_shared_experts: int
    hidden_size: int
    intermediate_size: int  # of one routed expert
    shared_intermediate_size: int  # of one shared expert (0 without shared experts)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str  # of the weights (experts included)
    dense_intermediate_size: int = 0  # of the dense MLP in the n_dense_layers layers
    expert_bias: bool = False  # experts carry biases (GPT-OSS)
    quantize: str | None = None  # the routed experts kept as int8 or int4 by the runtime (ExpertShape)
    group_size: int | None = None
    moe_layers: tuple[int, ...] = ()  # decoder-layer numbers of the MoE layers; () = the dense layers lead

    def __post_init__(self) -> None:
        positive = ("n_layers", "n_experts", "top_k", "hidden_size", "intermediate_size", "n_heads",
                    "n_kv_heads", "head_dim", "vocab_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"model shape {self.name!r}: {name} must be a positive integer, got {value!r}")
        for name in ("n_dense_layers", "n_shared_experts", "shared_intermediate_size", "dense_intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"model shape {self.name!r}: {name} must be an integer >= 0, got {value!r}")
        too_big = over_limit({name: getattr(self, name) for name in SIZE_LIMITS})
        if too_big:
            raise UserError(f"model shape {self.name!r}: {too_big}")
        if self.top_k > self.n_experts:
            raise UserError(f"model shape {self.name!r}: top_k {self.top_k} exceeds n_experts {self.n_experts}")
        if self.n_shared_experts and not self.shared_intermediate_size:
            raise UserError(f"model shape {self.name!r}: shared experts need shared_intermediate_size")
        if self.dtype not in DTYPE_BYTES:
            raise UserError(f"model shape {self.name!r}: unknown dtype {self.dtype!r}")
        increasing = list(self.moe_layers) == sorted(set(self.moe_layers))
        if self.moe_layers and (len(self.moe_layers) != self.n_layers or not increasing
                                or self.moe_layers[-1] >= self.n_decoder_layers):
            raise UserError(f"model shape {self.name!r}: moe_layers must be {self.n_layers} increasing decoder layers")

    def expert_shape(self) -> ExpertShape:
        return ExpertShape(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            dtype=self.dtype,
            has_bias=self.expert_bias,
            quantize=self.quantize,
            group_size=self.group_size,
        )

    def quantized(self, quantize: str | None, group_size: int | None = None) -> ModelShape:
        """This model with its routed experts kept in another format (None: the dtype's own)."""
        group = None if quantize is None else group_size or DEFAULT_GROUP_SIZE
        return dataclasses.replace(self, quantize=quantize, group_size=group)

    @property
    def n_decoder_layers(self) -> int:
        return self.n_layers + self.n_dense_layers

    @property
    def moe_decoder_layers(self) -> tuple[int, ...]:
        """The decoder-layer number of each MoE layer, in order (the number engines and GGUF files use)."""
        return self.moe_layers or tuple(range(self.n_dense_layers, self.n_decoder_layers))

    @property
    def routing_shape(self) -> tuple[int, int, int, int, int]:
        """What must agree for routing and costs to transfer: layers, experts, top-k, expert sizes."""
        return (self.n_layers, self.n_experts, self.top_k, self.hidden_size, self.intermediate_size)

    @property
    def _dense_dtype_bytes(self) -> float:
        return max(DTYPE_BYTES[self.dtype], 2)  # quantized checkpoints keep their dense part in 16 bits

    @property
    def dense_bytes(self) -> int:
        """Every weight but the routed experts: embeddings and LM head (untied), attention, routers,
        shared experts and dense MLPs (norms are negligible)."""
        H = self.hidden_size
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attention = H * q_width + 2 * H * kv_width + q_width * H
        moe_layer = attention + H * self.n_experts + 3 * H * self.shared_intermediate_size * self.n_shared_experts
        dense_layer = attention + 3 * H * self.dense_intermediate_size
        weights = 2 * self.vocab_size * H + self.n_layers * moe_layer + self.n_dense_layers * dense_layer
        return int(weights * self._dense_dtype_bytes)

    def kv_cache_bytes(self, n_tokens: int) -> int:
        """Keys and values of `n_tokens` tokens (all sequences) in every decoder layer."""
        return int(2 * self.n_decoder_layers * self.n_kv_heads * self.head_dim * self._dense_dtype_bytes * n_tokens)


PRESETS: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        ModelShape(
            name="mixtral-8x7b", n_layers=32, n_dense_layers=0, n_experts=8, top_k=2, n_shared_experts=0,
            hidden_size=4096, intermediate_size=14336, shared_intermediate_size=0,
            n_heads=32, n_kv_heads=8, head_dim=128, vocab_size=32000, dtype="bfloat16",
        ),
        ModelShape(
            name="qwen3-30b-a3b", n_layers=48, n_dense_layers=0, n_experts=128, top_k=8, n_shared_experts=0,
            hidden_size=2048, intermediate_size=768, shared_intermediate_size=0,
            n_heads=32, n_kv_heads=4, head_dim=128, vocab_size=151936, dtype="bfloat16",
        ),
        ModelShape(
            name="qwen2-57b-a14b", n_layers=28, n_dense_layers=0, n_experts=64, top_k=8, n_shared_experts=1,
            hidden_size=3584, intermediate_size=2560, shared_intermediate_size=20480,
            n_heads=28, n_kv_heads=4, head_dim=128, vocab_size=151936, dtype="bfloat16",
        ),
        ModelShape(
            name="deepseek-v2-lite", n_layers=26, n_dense_layers=1, n_experts=64, top_k=6, n_shared_experts=2,
            hidden_size=2048, intermediate_size=1408, shared_intermediate_size=1408,
            n_heads=16, n_kv_heads=16, head_dim=192, vocab_size=102400, dtype="bfloat16",
            dense_intermediate_size=10944,
        ),
        ModelShape(
            name="olmoe-1b-7b", n_layers=16, n_dense_layers=0, n_experts=64, top_k=8, n_shared_experts=0,
            hidden_size=2048, intermediate_size=1024, shared_intermediate_size=0,
            n_heads=16, n_kv_heads=16, head_dim=128, vocab_size=50304, dtype="bfloat16",
        ),
        ModelShape(
            name="demo", n_layers=4, n_dense_layers=0, n_experts=16, top_k=2, n_shared_experts=1,
            hidden_size=128, intermediate_size=128, shared_intermediate_size=256,
            n_heads=4, n_kv_heads=4, head_dim=32, vocab_size=257, dtype="float32",
        ),
    )
}


def get_preset(name: str) -> ModelShape:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None


def preset_for_routing(routing_shape: tuple[int, int, int, int, int]) -> ModelShape | None:
    """The preset that routes like `routing_shape` (a trace's), or None when none does."""
    return next((shape for shape in PRESETS.values() if shape.routing_shape == routing_shape), None)


# ---------------------------------------------------------------------------------------------
# transformers config.json

_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss")


# names transformers' families give one setting (a config class maps the others onto its own)
_ALIASES = (("num_experts", "num_local_experts", "n_routed_experts"),)


def check_aliases(config: dict[str, Any]) -> None:
    """Refuses a config giving one setting two values under its different names: which one a
    family reads is its config class's choice (Qwen3-MoE's reads num_local_experts over num_experts),
    so the model built and the shape read could disagree."""
    for names in _ALIASES:
        given = {name: config[name] for name in names if config.get(name) is not None}
        if len({json.dumps(value) for value in given.values()}) > 1:
            raise UserError("config gives " + " and ".join(f"{name} {value!r}" for name, value in given.items())
                            + ": one setting, keep one of them")


def shape_from_hf_config(config: dict[str, Any], name: str | None = None, dtype: str | None = None) -> ModelShape:
    """Reads a transformers `config.json` (as a dict) of a supported MoE family.

    `name` and `dtype` override the config's `_name_or_path` and `dtype`/`torch_dtype`.
    """
    family = config.get("model_type")
    if family not in _FAMILIES:
        raise UserError(f"unsupported model_type {family!r}; supported: {', '.join(_FAMILIES)}")
    check_aliases(config)
    odd = next((key for key, value in config.items() if isinstance(value, float) and not math.isfinite(value)), None)
    if odd is not None:  # JSON lets NaN through; the model could not be built from it
        raise UserError(f"{family} config: {odd} is {config[odd]}, not a finite number")

    def need(*keys: str) -> Any:
        for key in keys:
            if config.get(key) is not None:
                return config[key]
        raise UserError(f"{family} config is missing {' or '.join(keys)}")

    name = name or config.get("_name_or_path")
    if not name:
        raise UserError(f"{family} config has no _name_or_path: give the model name explicitly")
    quant = config.get("quantization_config")
    if dtype is None:
        if quant:
            method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
            raise UserError(f"{family} config is quantized ({method}): give the expert dtype explicitly")
        dtype = need("dtype", "torch_dtype")
    if dtype not in DTYPE_BYTES:
        raise UserError(f"unsupported dtype {dtype!r}; expected one of {', '.join(DTYPE_BYTES)}")

    def need_size(key: str, limit: str) -> int:
        """An integer size the shape is computed from, checked before it is used (a range over
        10**12 layers would never end)."""
        value = need(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"{family} config: {key} must be a positive integer, got {value!r}")
        too_big = over_limit({limit: value})
        if too_big:
            raise UserError(f"{family} config: {key}: {too_big}")
        return value

    n_decoder_layers = need_size("num_hidden_layers", "n_layers")
    n_heads = need_size("num_attention_heads", "n_heads")
    hidden = need_size("hidden_size", "hidden_size")
    common = dict(
        name=name,
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=need("vocab_size"),
        dtype=dtype,
    )
    head_dim = config.get("head_dim") or hidden // n_heads

    if family in ("mixtral", "gpt_oss", "olmoe"):
        moe_layers = list(range(n_decoder_layers))
        shape = dict(
            n_experts=need("num_local_experts", "num_experts"),
            top_k=need("num_experts_per_tok", "experts_per_token"),
            intermediate_size=need("intermediate_size"),
            n_shared_experts=0,
            shared_intermediate_size=0,
            head_dim=head_dim,
            expert_bias=family == "gpt_oss",
        )
    elif family in ("qwen2_moe", "qwen3_moe"):
        step = config.get("decoder_sparse_step") or 1
        mlp_only = set(config.get("mlp_only_layers") or [])
        moe_layers = [i for i in range(n_decoder_layers) if i not in mlp_only and (i + 1) % step == 0]
        shared = (config.get("shared_expert_intermediate_size") or 0) if family == "qwen2_moe" else 0
        shape = dict(
            n_experts=need("num_experts", "num_local_experts"),
            top_k=need("num_experts_per_tok"),
            intermediate_size=need("moe_intermediate_size"),
            n_shared_experts=1 if shared else 0,
            shared_intermediate_size=shared,
            head_dim=head_dim,
            dense_intermediate_size=config.get("intermediate_size") or 0,
        )
    else:  # deepseek_v2, deepseek_v3
        first_dense = config.get("first_k_dense_replace") or 0
        freq = config.get("moe_layer_freq") or 1
        moe_layers = [i for i in range(n_decoder_layers) if i >= first_dense and i % freq == 0]
        moe_width = need("moe_intermediate_size")
        n_shared = config.get("n_shared_experts") or 0
        shape = dict(
            n_experts=need("n_routed_experts"),
            top_k=need("num_experts_per_tok"),
            intermediate_size=moe_width,
            n_shared_experts=n_shared,
            shared_intermediate_size=moe_width if n_shared else 0,
            head_dim=need("qk_nope_head_dim") + need("qk_rope_head_dim"),
            dense_intermediate_size=config.get("intermediate_size") or 0,
        )
    if not moe_layers:
        raise UserError(f"{family} config has no MoE layers")
    n_dense = n_decoder_layers - len(moe_layers)
    if not n_dense:
        shape["dense_intermediate_size"] = 0
    leading_dense = moe_layers == list(range(n_dense, n_decoder_layers))  # the default: (), as presets say it
    return ModelShape(n_layers=len(moe_layers), n_dense_layers=n_dense,
                      moe_layers=() if leading_dense else tuple(moe_layers), **common, **shape)
