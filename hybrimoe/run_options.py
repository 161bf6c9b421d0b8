"""What `hybrimoe run` is asked to do (`RunOptions`, `Sampling`) and the checks of it that need no
model: torch-free, so that a bad flag is refused before torch and transformers are imported."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from hybrimoe.capacity import GIB, MARGIN_BYTES
from hybrimoe.config import DTYPE_BYTES, PolicyConfig, load_profile, memory_budget_error
from hybrimoe.errors import ProfileError, TraceError, UserError
from hybrimoe.files import (
    MAX_TEXT_BYTES, check_output, input_file, local_checkpoint, object_without_repeats, real_path,
)
from hybrimoe.profile.directory import profile_dir
from hybrimoe.runtime.replay import check_fits
from hybrimoe.shapes import ModelShape, check_aliases, shape_from_hf_config
from hybrimoe.trace import load_trace_meta


MAX_TEMPERATURE = 2.0  # past it sampling is noise; OpenAI's API and `hybrimoe serve` stop there too


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class RunOptions:
    prompts: tuple[str, ...] = ()  # one per sequence (`run` needs at least one)
    model: Path | None = None  # None: the embedded demo model
    max_new_tokens: int = 64
    sampling: Sampling = field(default_factory=Sampling)
    device: str | None = None  # None: CUDA when present
    profile: Path | None = None
    strategy: str = "hybrimoe"
    cache_experts: int | None = None
    cache_ratio: float | None = None
    gpu_memory_gb: float | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    record_trace: Path | None = None
    overwrite_trace: bool = False
    replay_trace: Path | None = None  # route as this recorded trace says, not as the model's routers do
    threads: int | None = None  # CPU threads for experts; None: the profile's
    quantize: str | None = None  # routed experts as int8 or int4; None: the profile's policy, else the checkpoint's
    group_size: int | None = None  # weights per quantization scale; None: the profile's policy (128)
    quantize_dense: bool = False  # the dense part's linear layers too


def check_options(options: RunOptions) -> None:
    """Refuses options a user can get wrong, in one line each, before anything heavy is imported.
    The prompts are checked only where there are some (`hybrimoe serve` has none up front)."""
    from hybrimoe.config import QUANTIZE_FORMATS
    from hybrimoe.policy.names import NEEDS_FREQUENCIES, STRATEGIES, check_name

    check_device(options.device)
    if any(not p.strip() for p in options.prompts):
        raise UserError("the prompt is empty")
    if options.strategy in NEEDS_FREQUENCIES:
        raise UserError(
            f"strategy {options.strategy!r} needs expert frequencies from a profiling workload; "
            "compare it with `hybrimoe simulate` instead"
        )
    check_name("strategy", options.strategy, tuple(s for s in STRATEGIES if s not in NEEDS_FREQUENCIES))
    if options.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if not 0 <= options.sampling.temperature <= MAX_TEMPERATURE:
        raise UserError(f"--temperature must be in [0, {MAX_TEMPERATURE:g}] (as OpenAI's API takes it), "
                        f"got {options.sampling.temperature}")
    if not 0.0 < options.sampling.top_p <= 1.0:
        raise UserError(f"--top-p must be in (0, 1], got {options.sampling.top_p}")
    if options.sampling.seed is not None and options.sampling.temperature == 0:
        raise UserError("--seed seeds sampling, so it needs a --temperature above 0 (at 0 generation is greedy)")
    if options.strategy == "cpu-only" and (options.cache_experts is not None or options.cache_ratio is not None):
        raise UserError("--strategy cpu-only runs every expert on the CPU: leave --cache-experts and --cache-ratio out")
    if options.sampling.top_p < 1.0 and options.sampling.temperature == 0:
        raise UserError("--top-p samples, so it needs a --temperature above 0 (at 0 generation is greedy)")
    if options.gpu_memory_gb is not None and (error := memory_budget_error("--gpu-memory-gb", options.gpu_memory_gb)):
        raise UserError(error)
    if options.gpu_memory_gb is not None and options.gpu_memory_gb * GIB < MARGIN_BYTES:
        raise UserError(f"--gpu-memory-gb {options.gpu_memory_gb:g} is not enough: the margin for kernel workspaces "
                        f"alone takes {MARGIN_BYTES / GIB:.2f} GiB, before any weight")
    if options.cache_experts is not None and options.cache_ratio is not None:
        raise UserError("pass --cache-experts or --cache-ratio, not both")
    if options.cache_ratio is not None and not 0.0 <= options.cache_ratio <= 1.0:
        raise UserError(f"--cache-ratio must be in [0, 1], got {options.cache_ratio}")
    if options.cache_experts is not None and options.cache_experts < 0:
        raise UserError(f"--cache-experts must be at least 0, got {options.cache_experts}")
    if options.threads is not None and options.threads < 1:
        raise UserError("--threads must be at least 1")
    if options.quantize is not None:
        check_name("quantization", options.quantize, QUANTIZE_FORMATS)
    if options.group_size is not None and (options.group_size < 2 or options.group_size % 2):
        raise UserError(f"--group-size {options.group_size} is not an even number of weights (2 at least)")
    if options.strategy == "gpu-offload" and (options.cache_ratio == 0 or options.cache_experts == 0):
        raise UserError("--strategy gpu-offload computes every expert on the accelerator from its cache: it needs a "
                        "cache above 0 (--strategy cpu-only runs without one)")
    if options.overwrite_trace and options.record_trace is None:
        raise UserError("--force lets --record-trace overwrite a trace: it needs --record-trace")
    if options.model is None and (options.trust_remote_code or options.allow_pickle):
        flag = "--trust-remote-code" if options.trust_remote_code else "--allow-pickle"
        raise UserError(f"{flag} applies to a --model checkpoint; the demo model needs no permission")
    if (options.record_trace is not None and options.replay_trace is not None
            and real_path(options.record_trace) == real_path(options.replay_trace)):
        raise UserError("--record-trace would overwrite the --replay-trace it reads: give another file")
    if options.model is not None:
        local_checkpoint(options.model)
    if options.profile is not None:
        input_file(options.profile, "profile", ProfileError)
    if options.replay_trace is not None:
        input_file(options.replay_trace, "trace", TraceError)
    if options.record_trace is not None:
        if options.record_trace.suffix != ".npz":
            raise UserError(f"{options.record_trace}: a trace file must end in .npz")
        check_output(options.record_trace, options.overwrite_trace, "--record-trace")


_DEVICE = re.compile(r"(cpu|cuda)(:\d+)?")


def check_device(device: str | None) -> None:
    """Refuses, without torch, a --device that is neither cpu nor cuda[:N] (None: the default)."""
    if device is not None and not _DEVICE.fullmatch(device):
        raise UserError(f"unknown device {device!r}; expected cpu or cuda[:N]")


def check_against_config(options: RunOptions, new_tokens: int, flag: str) -> None:
    """Refuses, from config.json alone (no transformers), `new_tokens` (given as `flag`) that leave
    no room for a prompt in the model's positions, a `--cache-experts` past the model's routed
    experts, a replayed trace of another model (its metadata alone), a `--group-size` that does not
    split the experts' rows and a `--profile` for other experts (`options.model` None: the demo
    model); a config that cannot be read is left to the loader to name."""
    from hybrimoe.demo import demo_model_path

    config_path = (demo_model_path() if options.model is None else options.model) / "config.json"
    if not config_path.is_file():  # a pipe is refused by the loader, without reading it
        return
    try:
        config = json.loads(config_path.read_text(), object_pairs_hook=object_without_repeats)
        if not isinstance(config, dict):
            return
        check_aliases(config)
    except (OSError, ValueError, RecursionError):
        return
    except UserError as exc:  # a key given twice, or one setting under two names
        raise UserError(f"{config_path}: {exc}") from None
    positions = config.get("max_position_embeddings")
    if _whole(positions) and 0 < positions <= new_tokens:
        raise UserError(f"{flag} {new_tokens} leaves no room for a prompt in the model's {positions} positions "
                        "(max_position_embeddings): give fewer")
    if _whole(positions) and max(map(len, options.prompts), default=0) > 2 * positions:  # may not fit
        longest = _longest_token_chars(config_path.parent)
        if longest is not None:
            check_prompt_chars(options.prompts, longest, positions)
    shape = _shape(config)
    if shape is None:
        return
    n_routed = shape.n_layers * shape.n_experts
    if options.cache_experts is not None and options.cache_experts > n_routed:
        raise UserError(f"--cache-experts must be in [0, {n_routed}] (the model's routed experts)")
    if options.replay_trace is not None:
        check_fits(load_trace_meta(options.replay_trace), shape.n_layers, shape.n_experts, shape.top_k,
                   str(options.replay_trace))
    if options.profile is None and options.quantize is None and any(profile_dir().glob("*.yaml")):
        return  # the experts' format may be a saved tuned profile's, found once torch names the device
    profile = load_profile(options.profile) if options.profile is not None else None
    quantize, group_size = kept_format(options, profile.policy if profile and profile.policy else PolicyConfig())
    experts = shape.expert_shape().quantized(quantize, group_size)  # refuses a group size that does not split rows
    if profile is not None:
        profile.check_expert_shape(experts)


def prompt_chars_limit(longest_token_chars: int, n_positions: int | None) -> int | None:
    """The most characters a prompt can have and still fit the model's positions whatever its
    tokens: each covers at most the longest vocabulary entry's characters, with a factor of 2 for
    normalizers that drop characters. None when the model names no limit."""
    return 2 * max(1, longest_token_chars) * n_positions if n_positions else None


def check_prompt_chars(prompts: tuple[str, ...], longest_token_chars: int, n_positions: int | None) -> None:
    """Refuses, before tokenizing it (a 24 MB prompt took 40 s and 4.8 GB), a prompt too long to fit
    the model's positions (`prompt_chars_limit`)."""
    limit = prompt_chars_limit(longest_token_chars, n_positions)
    for prompt in prompts:
        if limit is not None and len(prompt) > limit:
            raise UserError(f"the prompt is {len(prompt)} characters, more than any {n_positions} tokens hold (the "
                            "model's max_position_embeddings): shorten it")


def _longest_token_chars(model_dir: Path) -> int | None:
    """The longest entry of the vocabulary in `model_dir`'s tokenizer.json (None when there is no
    such file the loader would read), as the tokenizer's `get_vocab` lists it."""
    path = model_dir / "tokenizer.json"
    if not path.is_file() or path.stat().st_size > MAX_TEXT_BYTES:
        return None
    try:
        data = json.loads(path.read_text())
        vocab = data["model"]["vocab"]  # BPE and WordPiece: {piece: id}; Unigram: [[piece, score], ...]
        pieces = list(vocab) if isinstance(vocab, dict) else [entry[0] for entry in vocab]
        pieces += [token["content"] for token in data.get("added_tokens") or ()]
        return max(map(len, pieces), default=None)
    except (OSError, ValueError, RecursionError, KeyError, TypeError, IndexError):
        return None


def kept_format(options: RunOptions, policy: PolicyConfig) -> tuple[str | None, int]:
    """The format the run keeps the routed experts in (`--quantize`, else the tuned policy's; None:
    the checkpoint's) and its group size."""
    quantize = options.quantize or policy.quantize
    if quantize is None and (options.quantize_dense or options.group_size is not None):
        flag = "--quantize-dense" if options.quantize_dense else "--group-size"
        raise UserError(f"{flag} needs --quantize int8 or int4 (the format the weights are kept in)")
    return quantize, options.group_size or policy.group_size


def _shape(config: dict) -> ModelShape | None:
    """The model's shape as the loader will read it; None where the loader will refuse the config
    (and name the checkpoint)."""
    dtype = config.get("dtype") or config.get("torch_dtype")
    try:
        return shape_from_hf_config(config, name="config.json", dtype=dtype if dtype in DTYPE_BYTES else "float32")
    except UserError:
        return None


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
