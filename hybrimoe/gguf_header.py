"""A GGUF file's header: the model's shape and the bytes llama.cpp places for each of its tensors.

Design choices:
- Only the header is read, by `gguf_reader` (bounded: what the file declares is checked against
  its size before it is read); no page of weights is touched. The GGML types' sizes come from the
  `gguf` package (llama.cpp's own), which is optional (`pip install 'hybrimoe[gguf]'`); without it
  a `.gguf` model is one line.
- The sizes come from the tensors themselves (`blk.N.ffn_gate_exps.weight` is [n_embd, n_ff_exp,
  n_expert] in GGUF's order, innermost first), the bytes from each tensor's own type, so a Q4_K_M
  file, whose down projections are Q6_K in some layers and Q4_K in others, is counted tensor by
  tensor and layer by layer.
- A layer's expert bytes are those of every tensor that llama.cpp's expert override moves to the
  CPU (`blk\\.N\\.ffn_.*_exps\\.`: the weights and, for GPT-OSS, the biases). The dense part on
  the GPU under `-ngl 99` is every other tensor but the token embedding, which llama.cpp always
  keeps on the CPU (src/llama-model.cpp, load_tensors: "there is very little benefit to offloading
  the input layer"), unless the model has no `output.weight` and reads its head from it.
- MoE layers are the blocks that hold routed-expert tensors, numbered as the file numbers them
  (`blk.N`, decoder layers): DeepSeek's leading dense blocks simply have none.
- Not a GGUF, a truncated file (tensor data past its end), an architecture hybrimoe does not
  simulate, or a model without routed experts: a `ModelError` in one line.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from hybrimoe.config import SIZE_LIMITS
from hybrimoe.errors import ModelError, UserError
from hybrimoe.files import input_file
from hybrimoe.gguf_reader import GgufHeader, read_header
from hybrimoe.shapes import ModelShape

# llama.cpp's names for the MoE families hybrimoe simulates (src/llama-arch.cpp: LLM_ARCH_NAMES);
# Mixtral converts as "llama" with experts
ARCHITECTURES = ("qwen3moe", "qwen2moe", "deepseek2", "llama", "olmoe", "gpt-oss")
EXPERT_TENSOR = re.compile(r"blk\.(\d+)\.ffn_(\w+?)_exps\.")  # what `-ot blk\.N\.ffn_.*_exps\.=CPU` moves
EXPERT_ROLES = ("gate", "up", "down")
FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True)
class GgufModel:
    path: Path
    architecture: str
    shape: ModelShape  # moe_layers: the `blk.N` numbers of the MoE layers
    layer_expert_bytes: tuple[int, ...]  # per MoE layer: the bytes of all its routed experts
    gpu_dense_bytes: int  # the other tensors `-ngl 99` puts on the GPU: attention, norms, routers, shared experts, head
    expert_types: str  # the experts' GGML types in words, e.g. "gate Q4_K; up Q4_K; down Q6_K x24, Q4_K x24"

    @property
    def max_expert_bytes(self) -> int:
        """One expert of the layer whose experts are largest: a slot any expert fits in."""
        return math.ceil(max(self.layer_expert_bytes) / self.shape.n_experts)

    @property
    def all_expert_bytes(self) -> int:
        return sum(self.layer_expert_bytes)


def is_gguf_path(path: Path | None) -> bool:
    return path is not None and path.suffix.lower() == ".gguf"


def read_gguf(path: str | Path, dtype: str | None = None) -> GgufModel:
    """The header of the GGUF at `path`. `dtype` is the shape's dtype (what hybrimoe's own runtime and
    profile would time the experts in): default the experts' own when they are F32/F16/BF16, else
    bfloat16 (hybrimoe does not run GGML quantizations; their bytes are `layer_expert_bytes`)."""
    path = input_file(path, "GGUF model", ModelError)
    header = read_header(path)
    tensors = {tensor.name: tensor for tensor in header.tensors}
    architecture = _field(header, "general.architecture", path)
    if architecture not in ARCHITECTURES:
        raise ModelError(f"{path}: unsupported architecture {architecture!r}; supported: {', '.join(ARCHITECTURES)}")
    per_layer: dict[int, int] = defaultdict(int)
    types: dict[str, Counter] = defaultdict(Counter)
    gpu_dense_bytes = 0
    for name, tensor in tensors.items():
        match = EXPERT_TENSOR.match(name)
        if match is None:
            on_cpu = name == "token_embd.weight" and "output.weight" in tensors
            gpu_dense_bytes += 0 if on_cpu else tensor.n_bytes
            continue
        per_layer[int(match.group(1))] += tensor.n_bytes
        if name.endswith(".weight"):
            types[match.group(2)][tensor.type_name] += 1
    if not per_layer:
        raise ModelError(f"{path}: {architecture} model without routed experts (no ffn_*_exps tensors): not a MoE model")
    moe_layers = tuple(sorted(per_layer))
    for layer in moe_layers:  # llama.cpp's MoE blocks of these architectures hold all three projections
        missing = [role for role in EXPERT_ROLES if f"blk.{layer}.ffn_{role}_exps.weight" not in tensors]
        if missing:
            raise ModelError(f"{path}: blk.{layer} holds routed experts but no blk.{layer}.ffn_{missing[0]}_exps.weight")
    shape = _shape(header, tensors, architecture, moe_layers, path, dtype)
    return GgufModel(
        path=path,
        architecture=architecture,
        shape=shape,
        layer_expert_bytes=tuple(per_layer[layer] for layer in moe_layers),
        gpu_dense_bytes=gpu_dense_bytes,
        expert_types="; ".join(
            f"{role} " + ", ".join(name if len(count) == 1 else f"{name} x{n}" for name, n in count.most_common())
            for role, count in sorted(types.items())
        ),
    )


def _shape(header, tensors: dict, architecture: str, moe_layers: tuple[int, ...], path: Path, dtype: str | None) -> ModelShape:
    first = moe_layers[0]
    gate = tensors.get(f"blk.{first}.ffn_gate_exps.weight") or tensors.get(f"blk.{first}.ffn_down_exps.weight")
    embed = tensors.get("token_embd.weight")
    if gate is None or embed is None:
        raise ModelError(f"{path}: no blk.{first}.ffn_gate_exps.weight or token_embd.weight: not a model llama.cpp runs")
    gate_dims = _dims(gate, 3, path)
    n_embd, n_ff, n_expert = gate_dims if gate.name.endswith("gate_exps.weight") else (
        gate_dims[1], gate_dims[0], gate_dims[2])
    declared = _count(header, f"{architecture}.expert_count", path, SIZE_LIMITS["n_experts"], n_expert, minimum=0)
    if declared != n_expert:  # llama.cpp checks the tensors against it, and would not load the file
        raise ModelError(f"{path}: the GGUF header's {architecture}.expert_count is {declared}, but its expert "
                         f"tensors hold {n_expert}")
    n_decoder_layers = _count(header, f"{architecture}.block_count", path, SIZE_LIMITS["n_layers"])
    if moe_layers[-1] >= n_decoder_layers:
        raise ModelError(f"{path}: blk.{moe_layers[-1]} holds experts but the header says {n_decoder_layers} blocks")
    n_heads = _count(header, f"{architecture}.attention.head_count", path, SIZE_LIMITS["n_heads"])
    n_kv_heads = _count(header, f"{architecture}.attention.head_count_kv", path, SIZE_LIMITS["n_kv_heads"], n_heads)
    shared = tensors.get(f"blk.{first}.ffn_gate_shexp.weight")
    dense = next((tensors[f"blk.{b}.ffn_gate.weight"] for b in range(n_decoder_layers)
                  if f"blk.{b}.ffn_gate.weight" in tensors), None)
    expert_type = gate.type_name
    # llama.cpp's ffn_*_shexp tensors hold every shared expert side by side; ModelShape counts one
    n_shared = _count(header, f"{architecture}.expert_shared_count", path, SIZE_LIMITS["n_experts"],
                      1 if shared is not None else 0, minimum=0)
    top_k = _count(header, f"{architecture}.expert_used_count", path, SIZE_LIMITS["n_experts"])
    head_dim = _count(header, f"{architecture}.attention.key_length", path, SIZE_LIMITS["head_dim"],
                      max(1, n_embd // n_heads))
    shared_width = 0 if shared is None else _dims(shared, 2, path)[1] // max(1, n_shared)
    dense_width = 0 if dense is None else _dims(dense, 2, path)[1]
    vocab_size = _dims(embed, 2, path)[1]
    try:
        return ModelShape(
            name=path.stem,
            n_layers=len(moe_layers),
            n_dense_layers=n_decoder_layers - len(moe_layers),
            n_experts=n_expert,
            top_k=top_k,
            n_shared_experts=n_shared,
            hidden_size=n_embd,
            intermediate_size=n_ff,
            shared_intermediate_size=shared_width,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            vocab_size=vocab_size,
            dtype=dtype or FLOAT_TYPES.get(expert_type, "bfloat16"),
            dense_intermediate_size=dense_width,
            expert_bias=f"blk.{first}.ffn_gate_exps.bias" in tensors,
            moe_layers=moe_layers,
        )
    except UserError as exc:  # ModelShape's own checks (a top-k above the experts...), with the file named
        raise ModelError(f"{path}: {exc}") from None


def _dims(tensor, n_dims: int, path: Path) -> tuple[int, ...]:
    """A tensor's dimensions (GGUF's order, innermost first), refused unless there are `n_dims`."""
    dims = tensor.dims
    if len(dims) != n_dims or min(dims) < 1:
        raise ModelError(f"{path}: tensor {tensor.name} has dimensions {list(dims)}; llama.cpp's has {n_dims}")
    return dims


def _count(header: GgufHeader, key: str, path: Path, maximum: int, default: int | None = None, minimum: int = 1) -> int:
    """A whole number from the header within [minimum, maximum] (a per-layer array, as some
    architectures vary heads by layer, read as its largest entry); `default` when absent, a
    `ModelError` when absent without one or not such a number."""
    value = header.fields.get(key)
    if value is None:
        if default is None:
            raise ModelError(f"{path}: the GGUF header has no {key}")
        return default
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ModelError(f"{path}: the GGUF header's {key} is {reprlib.repr(value)}, not a whole number")
    largest = max(values)
    if not minimum <= largest <= maximum:
        raise ModelError(f"{path}: the GGUF header's {key} is {largest}, outside {minimum}-{maximum}")
    return largest


def _field(header: GgufHeader, key: str, path: Path):
    value = header.fields.get(key)
    if value is None:
        raise ModelError(f"{path}: the GGUF header has no {key}")
    return value

