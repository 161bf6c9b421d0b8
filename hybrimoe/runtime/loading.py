"""Loading a local transformers MoE checkpoint for the hybrid runtime.

Design choices:
- Transformers does the loading (`from_pretrained`: meta-device init, safetensors mmap, its own
  per-expert -> stacked weight conversions), so every family whose experts use the standard
  experts interface (stacked 3-D `gate_up_proj` / `down_proj`, `@use_experts_implementation`)
  loads the same way, and no model code is copied here.
- Everything that can be refused is refused before any weight is read: not a local directory,
  an unknown or dense architecture, code shipped with the checkpoint for a model transformers
  does not implement (without `trust_remote_code`), pickle-only weights (without `allow_pickle`),
  missing shards, and truncated safetensors files (their header says how long they must be).
- A model type transformers implements loads with transformers' code even when its config names
  the checkpoint's own (`auto_map`, as DeepSeek-V2-Lite's does): that code is ignored, with one
  line saying so (the same for a tokenizer class transformers has).
- The model is first built on the meta device to find its MoE layers and refuse unsupported
  families cheaply; then loaded once on the host. Placement moves the dense parameters to the
  accelerator tensor by tensor and pools the routed experts into one host buffer per layer
  (`host_experts.py`: page-locked on CUDA), so at most one layer's weights exist twice.
- Quantized experts (`quantization`, `quantized.py`): each layer's experts are quantized in
  `place`, just before pooling, so the checkpoint's weights and the packed ones exist together for
  one layer at a time; the loaded expert shape then names the format (its bytes are packed bytes).
- MoE layers are numbered 0..L-1 over the layers that have routed experts (DeepSeek's first dense
  layers are skipped); `ExpertId = (moe_layer, expert)` uses this numbering.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pickle
import re
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text
from torch import nn

from hybrimoe.config import ExpertShape, over_limit
from hybrimoe.errors import ModelError, first_line
from hybrimoe.files import local_checkpoint
from hybrimoe.runtime.host_experts import HostExperts, pool_layer
from hybrimoe.runtime.quantized import quantize_dense_layers, quantize_experts

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_POSITIVE_CONFIG_KEYS = (
    "num_hidden_layers", "max_position_embeddings", "num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim", "vocab_size",
    "num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok",
)
# config.json keys -> the SIZE_LIMITS they are held to, before transformers builds anything from them
_CONFIG_SIZE_LIMITS = {
    "num_hidden_layers": "n_layers", "num_experts": "n_experts", "num_local_experts": "n_experts",
    "n_routed_experts": "n_experts", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "moe_intermediate_size": "intermediate_size", "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim", "vocab_size": "vocab_size",
}
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")
_ROUTED_EXPERTS_LAYER = re.compile(r"^model\.layers\.(\d+)\..*\.experts\.")  # not Qwen's shared_expert(s)
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_PROJECTIONS = ({"gate_proj", "up_proj", "down_proj"}, {"w1", "w2", "w3"})  # hub checkpoints' names, and Mixtral's
# generation_config.json's fields that transformers compares as numbers while loading
_GENERATION_COUNTS = ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "top_k", "num_beams",
                      "num_return_sequences", "no_repeat_ngram_size")
_GENERATION_NUMBERS = ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty")
_NOT_FLOAT_DTYPES = ("BOOL", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64")  # safetensors names


@dataclass(frozen=True)
class MoeLayer:
    """One decoder layer's routed experts and the router that feeds them."""

    index: int  # MoE layer number, 0..L-1
    decoder_layer: int  # the decoder layer it belongs to (first integer in its module path), for messages
    experts: nn.Module
    router: nn.Module


@dataclass(frozen=True)
class ModelFacts:
    """What is known from the config alone, before any weight is read."""

    family: str
    expert_shape: ExpertShape  # with the checkpoint's dtype
    n_layers: int  # MoE layers
    n_experts: int
    top_k: int
    dense_bytes: int  # every weight but the routed experts
    config: dict  # the model's config, as transformers reads it
    moe_decoder_layers: tuple[int, ...]  # the decoder layers that have routed experts


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object | None
    layers: tuple[MoeLayer, ...]
    expert_shape: ExpertShape
    n_experts: int
    top_k: int
    family: str
    path: Path | None
    host_experts: HostExperts | None = None  # set by `place`
    n_dense_quantized: int = 0  # linear layers of the dense part quantized by `place`

    @property
    def n_layers(self) -> int:
        return len(self.layers)


# ---------------------------------------------------------------------------------------------
# Finding the MoE layers of a built model


def _is_standard_experts(module: nn.Module) -> bool:
    """Modules decorated with transformers' `use_experts_implementation` get these attributes."""
    return hasattr(module, "is_transposed") and hasattr(module, "has_gate") and hasattr(module, "down_proj")


def _find_router(parent: nn.Module, experts: nn.Module, n_experts: int, hidden_size: int) -> nn.Module | None:
    candidates = [
        child
        for child in parent.children()
        if child is not experts
        and isinstance(getattr(child, "weight", None), torch.Tensor)
        and tuple(child.weight.shape) == (n_experts, hidden_size)
    ]
    return candidates[0] if len(candidates) == 1 else None


def _iter_experts(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """(name, parent, experts) for every experts module, in model order."""
    for name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if _is_standard_experts(child):
                yield f"{name}.{child_name}", parent, child


def find_moe_layers(model: nn.Module, family: str) -> tuple[tuple[MoeLayer, ...], ExpertShape, int, int]:
    """The MoE layers of a (possibly meta-device) model, its expert shape, expert count and top-k.

    Raises ModelError naming what is unsupported.
    """
    found = list(_iter_experts(model))
    if not found:
        if any(hasattr(m, "num_experts") or "expert" in type(m).__name__.lower() for m in model.modules()):
            raise ModelError(
                f"{family}: its experts do not use transformers' standard experts interface "
                "(stacked gate_up_proj / down_proj), so hybrimoe cannot run them"
            )
        raise ModelError(f"{family} is a dense model (no routed experts): hybrimoe runs Mixture-of-Experts models")
    layers, shapes = [], set()
    for index, (name, parent, experts) in enumerate(found):
        if not experts.has_gate:
            raise ModelError(f"{family}: experts without a gate projection (up_proj only) are not supported")
        if getattr(experts, "has_post_expert_norm", False):
            raise ModelError(f"{family}: experts with a post-expert norm are not supported")
        gate_up, down = experts.gate_up_proj, experts.down_proj
        if gate_up.dim() != 3 or down.dim() != 3:
            raise ModelError(f"{family}: {name} does not hold stacked 3-D expert weights")
        n_experts = gate_up.shape[0]
        hidden = gate_up.shape[1] if experts.is_transposed else gate_up.shape[2]
        intermediate = down.shape[1] if experts.is_transposed else down.shape[2]
        router = _find_router(parent, experts, n_experts, hidden)
        if router is None:
            raise ModelError(f"{family}: cannot find the router of {name} (a child with a [{n_experts}, {hidden}] weight)")
        dtype = _DTYPE_NAMES.get(gate_up.dtype)
        if dtype is None:
            raise ModelError(f"{family}: expert weights of dtype {gate_up.dtype} are not supported")
        shapes.add((n_experts, hidden, intermediate, dtype, bool(experts.has_bias)))
        layers.append(MoeLayer(index=index, decoder_layer=_decoder_index(name), experts=experts, router=router))
    if len(shapes) != 1:
        raise ModelError(f"{family}: MoE layers with different expert shapes are not supported")
    n_experts, hidden, intermediate, dtype, has_bias = shapes.pop()
    top_k = getattr(layers[0].router, "top_k", None) or getattr(model.config, "num_experts_per_tok", None)
    if not top_k:
        raise ModelError(f"{family}: cannot tell how many experts each token uses (no top_k)")
    shape = ExpertShape(hidden_size=hidden, intermediate_size=intermediate, dtype=dtype, has_bias=has_bias)
    return tuple(layers), shape, n_experts, int(top_k)


def _decoder_index(module_name: str) -> int:
    """The first integer component of a module path (`model.layers.3.mlp.experts` -> 3)."""
    for part in module_name.split("."):
        if part.isdigit():
            return int(part)
    return -1


# ---------------------------------------------------------------------------------------------
# Checking a checkpoint directory before reading weights


def _safetensors_header(path: Path) -> dict:
    """A safetensors file's header (tensor name -> dtype, shape, data offsets), refused in one line
    when the file is truncated or its header unreadable."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > size - 8:
                raise ModelError(f"{path}: truncated (shorter than its header)")
            header = json.loads(fh.read(header_len))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        data_end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    except (struct.error, ValueError, UnicodeDecodeError, TypeError, KeyError, AttributeError, RecursionError):
        raise ModelError(f"{path}: corrupt (unreadable header)") from None
    if 8 + header_len + data_end > size:
        raise ModelError(f"{path}: truncated ({size} bytes, its header needs {8 + header_len + data_end})")
    from safetensors import SafetensorError, safe_open

    try:  # the library's own checks of the header: known dtypes, offsets that tile the data, string metadata
        with safe_open(path, framework="pt"):
            pass
    except SafetensorError as exc:
        raise ModelError(f"{path}: corrupt ({first_line(exc)})") from None
    return tensors


def check_weights_match(
    path: Path, headers: dict[Path, dict], meta_model: nn.Module, config, facts: ModelFacts
) -> None:
    """Refuses, before any weight is read, a checkpoint whose tensors do not fit the model its config
    describes: a tensor the model has under the same name with another shape, a per-expert matrix
    (as hub checkpoints store experts: `experts.N.gate_proj`, Mixtral's `experts.N.w1`...) of
    another shape than the config's experts, or integer weights where the config declares no
    quantization (they would load as numbers of the wrong kind). Other tensors are left to
    transformers' own conversions."""
    expected = {name: tuple(t.shape) for name, t in meta_model.state_dict().items()}
    # decoder layers the weights hold past the config's (DeepSeek-V3's multi-token prediction layers
    # follow the others, and are declared)
    n_layers = config.num_hidden_layers + (getattr(config, "num_nextn_predict_layers", 0) or 0)
    held = {int(layer.group(1)) for header in headers.values() for name in header if (layer := _LAYER_INDEX.match(name))}
    if held and (max(held) >= n_layers or len(held) < config.num_hidden_layers):
        raise ModelError(f"{path}: the weights hold decoder layers 0-{max(held)} ({len(held)} of them) but config.json "
                         f"declares {config.num_hidden_layers}: the config and the weights are of different models")
    with_experts = {int(layer.group(1)) for header in headers.values() for name in header
                    if (layer := _ROUTED_EXPERTS_LAYER.match(name)) and int(layer.group(1)) < config.num_hidden_layers}
    moe = set(facts.moe_decoder_layers)
    if with_experts and with_experts != moe:
        raise ModelError(f"{path}: the weights hold routed experts in decoder layers {_spans(with_experts)} but "
                         f"config.json places them in {_spans(moe)} (decoder_sparse_step, mlp_only_layers or their "
                         "like): the config and the weights are of different models")
    d, i = facts.expert_shape.hidden_size, facts.expert_shape.intermediate_size
    per_expert = {"gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i), "w1": (i, d), "w3": (i, d), "w2": (d, i)}
    quantized = getattr(config, "quantization_config", None) is not None
    for file, header in headers.items():
        for name, tensor in header.items():
            shape = tuple(tensor.get("shape", ()))
            matrix = _PER_EXPERT.match(name)
            want = expected.get(name) or (per_expert[matrix.group(3)] if matrix else None)
            if want is not None and shape != want:
                raise ModelError(
                    f"{path}: {name} is {list(shape)} in {file.name} but {list(want)} in the model its "
                    "config.json describes: the config and the weights are of different models"
                )
            if not quantized and tensor.get("dtype") in _NOT_FLOAT_DTYPES and want is not None:
                raise ModelError(
                    f"{path}: {name} is stored as {tensor['dtype']} but config.json declares no quantization "
                    "(quantization_config): hybrimoe reads float weights; quantize at load with --quantize instead"
                )
    _check_every_expert_held(path, headers, facts.n_experts)


def _check_every_expert_held(path: Path, headers: dict[Path, dict], n_experts: int) -> None:
    """Refuses, naming it, a per-expert matrix the weights lack (`experts.5.up_proj` of a layer that
    holds the others): transformers would fail on it while merging the experts, after reading."""
    held: dict[str, dict[str, set[int]]] = {}  # "model.layers.0.mlp.experts" -> projection -> experts
    for header in headers.values():
        for name in header:
            if matrix := _PER_EXPERT.match(name):
                prefix, expert, projection = matrix.groups()
                held.setdefault(prefix, {}).setdefault(projection, set()).add(int(expert))
    for prefix, projections in sorted(held.items()):
        names = next(names for names in _PROJECTIONS if names & projections.keys())
        for projection in sorted(names):
            missing = set(range(n_experts)) - projections.get(projection, set())
            if missing:
                raise ModelError(f"{path}: the weights lack {prefix}.{min(missing)}.{projection}.weight"
                                 f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}: "
                                 "the checkpoint is incomplete")


def _spans(indices: set[int]) -> str:
    """{0, 1, 2, 5} -> "0-2, 5"."""
    spans: list[list[int]] = []
    for i in sorted(indices):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def check_weight_files(path: Path, allow_pickle: bool) -> dict[Path, dict]:
    """Refuses missing, truncated or (unless allowed) pickle-based weights with one line; returns
    each safetensors file's header (none for pickle-based weights)."""
    safetensors = sorted(path.glob("*.safetensors"))
    odd = next((file for file in safetensors if not file.is_file()), None)
    if odd is not None:
        raise ModelError(f"{odd}: not a regular file")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise ModelError(f"{index}: malformed safetensors index") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelError(f"{path}: missing weight shard(s) {', '.join(missing)}")
    if not safetensors:
        pickles = [p.name for p in sorted(path.iterdir()) if p.suffix in _PICKLE_SUFFIXES]
        if not pickles:
            raise ModelError(f"{path}: no weights found (expected *.safetensors)")
        if not allow_pickle:
            raise ModelError(
                f"{path}: only pickle-based weights ({pickles[0]}); they can run code when loaded. "
                "Convert them to safetensors, or pass --allow-pickle if you trust them"
            )
        return {}
    return {file: _safetensors_header(file) for file in safetensors}


def load_config(path: Path, trust_remote_code: bool):
    """The checkpoint directory's config, refused in one line when unreadable, unknown or (without
    `trust_remote_code`) shipping its own code for a model transformers does not implement."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    _check_regular_files(path)
    try:
        config_data = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        raise ModelError(f"{path}: no readable config.json (is this a transformers checkpoint?)") from None
    if not isinstance(config_data, dict):
        raise ModelError(f"{path}/config.json: expected a JSON object, got a {type(config_data).__name__}")
    model_type = config_data.get("model_type", "unknown")
    _check_config_numbers(path, config_data)
    _check_generation_config(path, config_data.get("vocab_size"))
    native = _is_native_model(model_type)
    if native and "auto_map" in config_data:
        if trust_remote_code:  # a reference to another repository is refused whether or not it would run
            check_code_is_local(path, config_data, trust_remote_code)
        _note(f"{path}: transformers implements {model_type!r} itself; the checkpoint's own code (auto_map) is not used")
    else:
        check_code_is_local(path, config_data, trust_remote_code)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its notes on odd fields: what cannot build a model is refused in one line
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code and not native, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(f"{path}: unknown architecture {model_type!r} ({first_line(exc)})") from None
    except Exception as exc:  # transformers' config classes validate with errors of their own (huggingface_hub's)
        raise ModelError(f"{path}/config.json: not a valid {model_type} config ({first_line(exc)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _check_config_numbers(path: Path, config_data: dict) -> None:
    """Refuses, in one line naming the field, numbers that transformers would divide by, build from
    or compute with: sizes that are not whole numbers above 0, a non-finite number anywhere at the
    top level (JSON lets NaN through), a pad token outside the vocabulary."""
    for key in _POSITIVE_CONFIG_KEYS:
        value = config_data.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ModelError(f"{path}/config.json: {key} must be a whole number above 0, got {value!r}")
    for key, limit in _CONFIG_SIZE_LIMITS.items():
        value = config_data.get(key)
        too_big = over_limit({limit: value}) if isinstance(value, int) else None
        if too_big:
            raise ModelError(f"{path}/config.json: {key}: {too_big}")
    for key, value in config_data.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ModelError(f"{path}/config.json: {key} is {value}, not a finite number")
    pad, vocab = config_data.get("pad_token_id"), config_data.get("vocab_size")
    if isinstance(pad, int) and isinstance(vocab, int) and not 0 <= pad < vocab:
        raise ModelError(f"{path}/config.json: pad_token_id {pad} is outside the vocabulary (vocab_size {vocab})")


def _check_regular_files(path: Path) -> None:
    """Refuses a checkpoint with a pipe, socket or device among its files (or behind a symlink),
    which a read could wait on forever or never finish (/dev/zero)."""
    odd = next((file for file in sorted(path.iterdir()) if file.exists() and not (file.is_file() or file.is_dir())), None)
    if odd is not None:
        raise ModelError(f"{odd}: not a regular file (a pipe, socket or device)")


def _check_generation_config(path: Path, vocab_size: object) -> None:
    """A generation_config.json, when there is one, must be a JSON object whose EOS ids are token ids
    of the vocabulary and whose lengths and sampling numbers are numbers (transformers would warn
    and go on, or fail with a TypeError while loading)."""
    file = path / "generation_config.json"
    if not file.exists():
        return
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError):
        raise ModelError(f"{file}: not readable JSON") from None
    if not isinstance(data, dict):
        raise ModelError(f"{file}: expected a JSON object, got a {type(data).__name__}")
    eos = data.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ModelError(f"{file}: eos_token_id must be a token id or a list of them, got {eos!r}")
    if isinstance(vocab_size, int) and any(i >= vocab_size for i in ids):
        raise ModelError(f"{file}: eos_token_id {eos!r} is outside the vocabulary (vocab_size {vocab_size})")
    for key in _GENERATION_COUNTS:
        value = data.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise ModelError(f"{file}: {key} must be a whole number of at least 0, got {value!r}")
    for key in _GENERATION_NUMBERS:
        value = data.get(key)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and math.isfinite(value) and value >= 0):
            raise ModelError(f"{file}: {key} must be a finite number of at least 0, got {value!r}")


def _is_native_model(model_type: object) -> bool:
    from transformers import CONFIG_MAPPING

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def _is_native_tokenizer(tokenizer_class: object) -> bool:
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    return isinstance(tokenizer_class, str) and tokenizer_class_from_name(tokenizer_class) is not None


def _note(text: str) -> None:
    """One line on stderr, for what the loader decided on the user's behalf."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(Text(f"note: {text}"))


def _check_permissions_used(path: Path, config, trust_remote_code: bool, allow_pickle: bool) -> None:
    """Refuses a permission the checkpoint gives nothing to: code to trust (an `auto_map` in its
    config, already loaded, or in its tokenizer config), pickle-based weights to allow."""

    def tokenizer_names_code() -> bool:
        try:
            data = json.loads((path / "tokenizer_config.json").read_text())
        except (OSError, ValueError, RecursionError):
            return False
        return isinstance(data, dict) and "auto_map" in data

    if trust_remote_code and getattr(config, "auto_map", None) is None and not tokenizer_names_code():
        raise ModelError(f"{path}: --trust-remote-code, but the checkpoint ships no code of its own (no auto_map)")
    if allow_pickle and not any(file.suffix in _PICKLE_SUFFIXES for file in path.iterdir()):
        raise ModelError(f"{path}: --allow-pickle, but the checkpoint has no pickle-based weights")


def check_code_is_local(path: Path, config_data: dict, trust_remote_code: bool) -> None:
    """Code named by `auto_map` runs only with `trust_remote_code`, and only from the checkpoint
    directory: a reference to another repository ("owner/repo--module.Class") is refused, since
    hybrimoe never fetches from a hub."""
    auto_map = config_data.get("auto_map")
    if auto_map is None:
        return
    if not trust_remote_code:
        raise ModelError(
            f"{path}: the checkpoint ships its own code (auto_map); hybrimoe does not run it unless you "
            "pass --trust-remote-code"
        )
    references = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    for reference in references:
        for name in reference if isinstance(reference, list) else [reference]:
            if name is not None and (not isinstance(name, str) or "--" in name):
                raise ModelError(
                    f"{path}: auto_map names code in another repository ({name!r}); hybrimoe runs model code "
                    "only from the checkpoint directory and never fetches from a hub"
                )


def build_on_meta(config, trust_remote_code: bool) -> nn.Module:
    """The model of `config` on the meta device: its structure, no memory."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # advice about other uses of a model (a dense one is refused just after)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's on initializing empty tensors (a size of 0)
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise ModelError(f"{config.model_type}: not a causal language model transformers knows ({first_line(exc)})") from None
    except (AssertionError, ArithmeticError, TypeError, IndexError, KeyError) as exc:  # the config does not build a model
        detail = f"{first_line(exc)} is not a value transformers knows" if isinstance(exc, KeyError) else first_line(exc)
        raise ModelError(f"{config.model_type}: its config.json does not build a model ({detail})") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def config_dtype(config) -> torch.dtype:
    """The weights' dtype a config names (float32 when it names none)."""
    dtype = getattr(config, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), torch.float32)


def _facts(meta_model: nn.Module, config) -> ModelFacts:
    layers, shape, n_experts, top_k = find_moe_layers(meta_model, config.model_type)
    dtype = config_dtype(config)
    if dtype not in _DTYPE_NAMES:
        raise ModelError(f"{config.model_type}: weights of dtype {dtype} are not supported")
    experts = {id(p) for layer in layers for p in layer.experts.parameters()}
    dense_params = sum(p.numel() for p in meta_model.parameters() if id(p) not in experts)
    shape = dataclasses.replace(shape, dtype=_DTYPE_NAMES[dtype])
    return ModelFacts(
        config.model_type, shape, len(layers), n_experts, top_k, dense_params * dtype.itemsize, config.to_dict(),
        tuple(layer.decoder_layer for layer in layers),
    )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def _load_tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(f"{path}: no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)})")
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            data = json.loads(tokenizer_config.read_text())
        except (OSError, ValueError, RecursionError):
            raise ModelError(f"{tokenizer_config}: not readable JSON") from None
        if isinstance(data, dict) and "auto_map" in data:
            if _is_native_tokenizer(data.get("tokenizer_class")):
                _note(f"{tokenizer_config}: transformers implements {data['tokenizer_class']!r} itself; "
                      "the checkpoint's own tokenizer code (auto_map) is not used")
                trust_remote_code = False
            else:
                check_code_is_local(path, data, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:  # a malformed tokenizer file fails in the tokenizers library in many ways
        raise ModelError(f"{path}: no usable tokenizer ({type(exc).__name__}: {first_line(exc)})") from None


# ---------------------------------------------------------------------------------------------
# Placement: dense parts on the accelerator, routed experts on the host


@dataclass(frozen=True)
class Quantization:
    """How `place` quantizes the weights (`quantized.py`)."""

    experts: str  # "int8" or "int4": the routed experts' format
    group_size: int
    dense: bool = False  # the dense part's linear layers too (not the routers)


def place(
    loaded: LoadedModel, device: torch.device, show_progress: bool = True, quantization: Quantization | None = None
) -> None:
    """Moves every parameter and buffer but the routed experts to `device`, then pools the experts
    into one host buffer per layer (page-locked on CUDA), quantizing them first when asked.

    Tensor by tensor, and layer by layer for the experts. Tied parameters are one Parameter
    object, moved once and still shared.
    """
    experts = {id(layer.experts) for layer in loaded.layers}
    modules = list(loaded.model.modules())
    moved: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id(old) -> (old, new): tied stay tied
    with _terminal_progress(show_progress) as progress:
        task = progress.add_task("Placing weights", total=len(modules) + len(loaded.layers))
        for module in modules:
            if id(module) not in experts:
                for name, param in list(module.named_parameters(recurse=False)):
                    if id(param) not in moved:
                        moved[id(param)] = (param, nn.Parameter(param.data.to(device), requires_grad=False))
                    setattr(module, name, moved[id(param)][1])
                for name, buffer in list(module.named_buffers(recurse=False)):
                    setattr(module, name, buffer.to(device))
            progress.advance(task)
        loaded.host_experts = HostExperts(pinned=device.type == "cuda")
        for layer in loaded.layers:
            if quantization is not None:
                quantize_experts(layer.experts, quantization.experts, quantization.group_size)
            loaded.host_experts.add(pool_layer(layer.experts))
            progress.advance(task)
    if quantization is not None:
        loaded.expert_shape = loaded.expert_shape.quantized(quantization.experts, quantization.group_size)
        if quantization.dense:
            routers = [layer.router for layer in loaded.layers]
            loaded.n_dense_quantized = quantize_dense_layers(
                loaded.model, routers, quantization.experts, quantization.group_size
            )


def load_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    with_tokenizer: bool = True,
    show_progress: bool = True,
    before_weights: Callable[[ModelFacts, object | None], None] | None = None,
    quantization: Quantization | None = None,
) -> LoadedModel:
    """Loads a local MoE checkpoint, dense parts on `device` and routed experts in host memory
    (quantized as `quantization` says, after reading).

    `before_weights` sees the model's facts and its tokenizer before any weight is read, to refuse
    early (a profile for other expert shapes, a memory budget the dense parts alone exceed). The
    facts' expert shape is the checkpoint's.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = local_checkpoint(path)
    config = load_config(path, trust_remote_code)
    _check_permissions_used(path, config, trust_remote_code, allow_pickle)
    model_code = trust_remote_code and not _is_native_model(config.model_type)  # the checkpoint's own
    meta_model = build_on_meta(config, model_code)
    facts = _facts(meta_model, config)
    if quantization is not None:  # refuses a group size that does not split the experts' rows
        facts.expert_shape.quantized(quantization.experts, quantization.group_size)
    tokenizer = _load_tokenizer(path, trust_remote_code) if with_tokenizer else None
    if before_weights is not None:
        before_weights(facts, tokenizer)
    headers = check_weight_files(path, allow_pickle)
    check_weights_match(path, headers, meta_model, config, facts)
    del meta_model
    hf_logging.disable_progress_bar()  # its tqdm bar stays on the terminal; ours goes when done
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report: what matters in it is refused below, in one line
    weight_bytes = sum(file.stat().st_size for file in headers)
    try:
        with _reading(weight_bytes, show_progress), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's notes on pickle files (--allow-pickle was asked)
            model, info = AutoModelForCausalLM.from_pretrained(
                path,
                config=config,
                dtype="auto",
                local_files_only=True,
                trust_remote_code=model_code,
                use_safetensors=None if allow_pickle else True,
                output_loading_info=True,
            )
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        raise ModelError(f"{path}: cannot load the weights ({first_line(exc)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelError(f"{path}: {len(missing)} weight(s) missing from the checkpoint, e.g. {missing[0]}")
    model.requires_grad_(False)
    model.eval()
    layers, shape, n_experts, top_k = find_moe_layers(model, config.model_type)
    loaded = LoadedModel(model, tokenizer, layers, shape, n_experts, top_k, config.model_type, path)
    place(loaded, torch.device(device), show_progress, quantization)
    return loaded


@contextlib.contextmanager
def _reading(weight_bytes: int, show: bool) -> Iterator[None]:
    """A transient line while transformers reads `weight_bytes` of weights."""
    columns = (SpinnerColumn(), TextColumn(f"Reading weights ({weight_bytes / 2**30:.2f} GiB)"), TimeElapsedColumn())
    with _terminal_progress(show, *columns) as progress:
        progress.add_task("read", total=None)
        yield


def _terminal_progress(show: bool, *columns) -> Progress:
    """A transient progress display on stderr, shown only on a terminal (elsewhere it would leave
    blank lines behind)."""
    stderr = Console(stderr=True)
    return Progress(*columns, console=stderr, transient=True, disable=not (show and stderr.is_terminal))


def from_model(
    model: nn.Module, device: torch.device | str = "cpu", tokenizer: object = None,
    quantization: Quantization | None = None,
) -> LoadedModel:
    """Wraps an already built model (tests, benchmarks) the same way `load_model` does."""
    model.requires_grad_(False)
    model.eval()
    family = getattr(model.config, "model_type", type(model).__name__)
    layers, shape, n_experts, top_k = find_moe_layers(model, family)
    if quantization is not None:
        shape.quantized(quantization.experts, quantization.group_size)  # refused before any work
    loaded = LoadedModel(model, tokenizer, layers, shape, n_experts, top_k, family, None)
    place(loaded, torch.device(device), show_progress=False, quantization=quantization)
    return loaded
