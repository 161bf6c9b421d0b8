"""`hybrimoe run` as one library call: load, plan, generate, report.

Design choices:
- Everything a user can get wrong is refused before the weights are read where possible (bad
  options, a profile for other expert shapes, an impossible memory budget), as one UserError line.
- No profile means this machine's: the one `hybrimoe profile` measured for this model and machine
  kind (`profile/directory.py`), else the datasheet estimate for this kind of machine (the CPU
  stand-in's without a GPU); the report says which.
- Threads: the CPU experts use the thread count the profile was measured with (`--threads`
  overrides; an estimate uses every core but one on CUDA, every core without an accelerator), so
  the run matches its profile.
- TTFT and tokens/s are measured after a warm-up forward step on a throwaway runtime (first calls
  of kernels cost extra), and the report puts the simulator's prediction for the same profile,
  routing and planner next to them; the planner sees each step's start (`begin_step`), as the
  simulator's does.
- The planner and the prediction come from `runtime/planning.py`; the profile from this
  machine's profile directory or the estimate (`profile/`): this module sits above both packages,
  so the runtime never imports the profile package (which measures with the runtime).
- The routing is always recorded (the planner needs it on the host anyway); it is written to a
  file only with `record_trace`.
- Quantized experts: `quantize` (else a tuned profile's `policy.quantize`) names the format; the
  profile must be one made for that format, and the memory plan counts packed expert bytes (and
  the checkpoint's, which are read first). This machine's profile is looked up under the
  format's own name (`MODEL.int4g128`).
- `replay_trace`: every MoE layer routes as a recorded trace says (`runtime/replay.py`), so a model
  with random weights routes like the trained model the trace came from; the trace is read and
  checked against the model's shapes before the weights, and a trace of more MoE layers than the
  model is replayed by its first layers.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hybrimoe import __version__
from hybrimoe.config import DEFAULT_GROUP_SIZE, HardwareProfile, PolicyConfig, load_profile
from hybrimoe.errors import ModelError, UserError, printable
from hybrimoe.host import available_ram_bytes
from hybrimoe.policy.plan import Planner
from hybrimoe.capacity import GIB, Capacity, Reserve, check_host_memory, reserve_for, resolve_capacity
from hybrimoe.run_options import RunOptions, check_options, check_prompt_chars, kept_format, prompt_chars_limit
from hybrimoe.runtime import native
from hybrimoe.runtime.generate import Generated, TextStream, generate
from hybrimoe.runtime.loading import LoadedModel, ModelFacts, Quantization
from hybrimoe.runtime.planning import TRACE_LOOKAHEAD_DEPTH, build_planner, predict_run, trace_step
from hybrimoe.runtime.replay import RoutingReplay, check_fits
from hybrimoe.runtime.stats import RunStats
from hybrimoe.shapes import ModelShape, shape_from_hf_config
from hybrimoe.trace import RoutingTrace, TraceStep, load_trace, trace_meta_from_shape

if TYPE_CHECKING:
    from hybrimoe.runtime.accelerator import Accelerator
    from hybrimoe.runtime.hybrid import HybridRuntime

WARM_UP_TOKENS = 16  # prompt tokens of the warm-up step


@dataclass
class RunReport:
    stats: RunStats
    texts: list[str]  # the generated text of each sequence


def default_profile(shape: ModelShape, device: str = "cpu") -> HardwareProfile:
    """The datasheet estimate for this kind of machine, for this model's shapes."""
    from hybrimoe.profile.estimate import estimate_for_this_machine

    return estimate_for_this_machine(shape, device)


def this_machines_profile(
    model_name: str, device: str, quantize: str | None = None, group_size: int | None = None
) -> Path | None:
    """The profile `hybrimoe profile` saved for this model (its experts in this format) on this kind
    of machine, if any."""
    from hybrimoe.profile.directory import find_profile, profile_model_name, this_machine_key

    name = profile_model_name(model_name, quantize, None if quantize is None else group_size or DEFAULT_GROUP_SIZE)
    return find_profile(this_machine_key(device), name)


def run_threads(options: RunOptions, profile: HardwareProfile, is_cuda: bool) -> tuple[int, str]:
    """CPU expert threads for the run, and where the number came from."""
    from hybrimoe.runtime.threads import default_threads, default_threads_source

    if options.threads is not None:
        return options.threads, "--threads"
    if not profile.estimated and profile.machine.threads:
        return profile.machine.threads, "the profile"
    return default_threads(is_cuda), default_threads_source(is_cuda)


def _policy(profile: HardwareProfile | None) -> PolicyConfig:
    """The profile's tuned policy, else the default one."""
    return profile.policy if profile is not None and profile.policy is not None else PolicyConfig()


def quantization_for_run(options: RunOptions, profile: HardwareProfile | None) -> Quantization | None:
    """How the run keeps its weights: the options', else the profile's tuned policy's."""
    quantize, group_size = kept_format(options, _policy(profile))
    return None if quantize is None else Quantization(quantize, group_size, dense=options.quantize_dense)


def _profile_for_run(
    profile: HardwareProfile | None, profile_path: Path | None, options: RunOptions, shape: ModelShape, device: str
) -> tuple[HardwareProfile, str]:
    """The profile the run plans with (an estimate for this kind of machine when none was found),
    and how the summary names it."""
    if profile is None:
        profile = default_profile(shape, device)
        label = f"built-in estimate ({profile.name}, for this kind of machine): `hybrimoe profile` measures this one"
        return profile, label
    if options.profile is None:
        return profile, f"{profile.name}, this machine's ({profile_path})"
    return profile, profile.name


def _other_machine(profile: HardwareProfile, device: str) -> str | None:
    """The kind of machine `profile` describes (`profile/directory.py`'s key), when it is not the one
    `device` runs on here."""
    from hybrimoe.profile.directory import machine_key, this_machine_key

    kind = machine_key(None if profile.stand_in else profile.machine.gpu, profile.machine.cores)
    return None if kind == this_machine_key(device) else kind


def _placement(options: RunOptions, profile: HardwareProfile, capacity: Capacity) -> tuple[str, int, str]:
    """(strategy, expert slots, where the slots came from) as the run will really place experts:
    a profile without an accelerator section places every expert on the CPU."""
    if not profile.has_accelerator:
        return "cpu-only", 0, f"none: profile {profile.name} has no accelerator section"
    return options.strategy, capacity.slots, capacity.source


def _check_accelerator_flags(options: RunOptions, profile: HardwareProfile) -> None:
    """Refuses placement flags a profile without an accelerator section would leave without effect."""
    if profile.has_accelerator:
        return
    asked = [flag for flag, value in (("--cache-experts", options.cache_experts), ("--cache-ratio", options.cache_ratio),
                                      ("--gpu-memory-gb", options.gpu_memory_gb)) if value is not None]
    if asked or options.strategy not in ("hybrimoe", "cpu-only"):
        what = asked[0] if asked else f"--strategy {options.strategy}"
        raise UserError(f"{what} places experts on an accelerator, but profile {profile.name} has none "
                        "(every expert runs on the CPU): leave it out, or give a profile with one")


def _check_replay_length(replayed: RoutingTrace, prompt_shape: tuple[int, int], options: RunOptions) -> None:
    """Refuses, before the weights load, a replayed trace too short for the run."""
    n_seqs, n_prompt = prompt_shape
    n_decode = options.max_new_tokens - 1  # steps after the prefill, one token per sequence each
    n_needed = n_seqs * (n_prompt + n_decode)
    if n_needed > replayed.n_tokens:
        raise UserError(
            f"{options.replay_trace}: the trace has {replayed.n_tokens} tokens of routing; this run needs up to "
            f"{n_needed} ({n_seqs} x {n_prompt} prompt + {n_seqs} x {n_decode} decode tokens); "
            "lower --max-new-tokens"
        )


def eos_ids(loaded: LoadedModel) -> tuple[int, ...]:
    """Every token id that ends a sequence: the generation config's and the tokenizer's."""
    eos = loaded.model.generation_config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    tokenizer_eos = loaded.tokenizer.eos_token_id
    if tokenizer_eos is not None and tokenizer_eos not in eos_ids:
        eos_ids += (tokenizer_eos,)
    return eos_ids


def recorded_trace(
    shape: ModelShape, steps: list[TraceStep], options: RunOptions, command: str = "run"
) -> RoutingTrace:
    """The routing of `command`'s steps as a trace, written to `options.record_trace` when asked."""
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    provenance = f"hybrimoe {command} {__version__}, {stamp}"
    if options.replay_trace is not None:
        provenance += f"; routing replayed from {options.replay_trace.name}"
    trace = RoutingTrace(trace_meta_from_shape(shape, provenance), tuple(steps))
    if options.record_trace is not None:
        from hybrimoe.trace import save_trace

        save_trace(trace, options.record_trace, overwrite=options.overwrite_trace)
    return trace


def _model_shape(facts: ModelFacts, model_name: str, quantization: Quantization | None) -> ModelShape:
    """The model's shape from its config, its experts in the format the run keeps them in."""
    shape = shape_from_hf_config(facts.config, name=model_name, dtype=facts.expert_shape.dtype)
    return shape if quantization is None else shape.quantized(quantization.experts, quantization.group_size)


def prepare_tokenizer(tokenizer) -> None:
    """Left padding (the generation loop's layout), with EOS as the pad token where there is none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def _tokenize(
    prompts: tuple[str, ...], facts: ModelFacts, tokenizer, max_new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as left-padded ids [B, S] and mask [B, S] on the host, refused (before any weight
    is read) when they cannot fit the model's positions with `max_new_tokens` more."""
    prepare_tokenizer(tokenizer)
    n_positions = facts.config.get("max_position_embeddings")
    check_prompt_chars(prompts, _longest_entry(tokenizer), n_positions)
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    _check_positions(ids.shape[1], max_new_tokens, n_positions)
    return ids, mask


def max_prompt_chars(tokenizer, n_positions: int | None) -> int | None:
    """`prompt_chars_limit` for this tokenizer's vocabulary."""
    return prompt_chars_limit(_longest_entry(tokenizer), n_positions)


def _longest_entry(tokenizer) -> int:
    return max(map(len, tokenizer.get_vocab()), default=1)


def _check_positions(n_prompt_tokens: int, max_new_tokens: int, n_positions: int | None) -> None:
    """Refuses a prompt that, with the tokens to generate, runs past the model's positions."""
    if n_positions and n_prompt_tokens + max_new_tokens > n_positions:
        raise UserError(
            f"the prompt is {n_prompt_tokens} tokens and {max_new_tokens} more are asked for, but the model "
            f"has {n_positions} positions (max_position_embeddings): shorten the prompt or lower --max-new-tokens"
        )


def plan_memory(
    facts: ModelFacts, shape: ModelShape, prompt_shape: tuple[int, int], options: RunOptions,
    profile: HardwareProfile | None, accelerator,
) -> tuple[Capacity, Reserve]:
    """The expert slots the accelerator's budget allows once the dense weights and the reserve for
    this run's tokens (`prompt_shape`: sequences, padded prompt tokens) are placed, and a refusal
    when the host cannot hold the weights (and, on the CPU stand-in, the slots). Experts count in
    the format `shape` keeps them in (packed when quantized); the checkpoint's are read first."""
    n_seqs, n_prompt_tokens = prompt_shape
    reserve = reserve_for(shape, n_seqs, n_prompt_tokens, options.max_new_tokens)
    policy = _policy(profile)
    budget = options.gpu_memory_gb
    expert_bytes, n_experts_total = shape.expert_shape().expert_bytes, facts.n_layers * facts.n_experts
    capacity = resolve_capacity(
        n_experts_total=n_experts_total,
        expert_bytes=expert_bytes,
        dense_bytes=facts.dense_bytes,
        policy_ratio=policy.cache_ratio,
        policy_source=f"profile {profile.name}" if profile is not None and profile.policy else "the default policy",
        cache_experts=options.cache_experts,
        cache_ratio=options.cache_ratio,
        budget_bytes=int(budget * GIB) if budget is not None else accelerator.free_memory_bytes(),
        budget_source=f"--gpu-memory-gb {budget:g}" if budget is not None else "the accelerator's free memory",
        reserve=reserve,
    )
    # every weight is read into host memory first (as the checkpoint holds it), and pooling copies
    # one layer's experts (as the run keeps them) at a time
    host_bytes = facts.dense_bytes + n_experts_total * facts.expert_shape.expert_bytes + facts.n_experts * expert_bytes
    what = "the weights"
    if not accelerator.is_cuda:
        host_bytes += capacity.slots * expert_bytes
        what = "the weights and the CPU stand-in's expert slots"
    check_host_memory(host_bytes, available_ram_bytes(), what)
    return capacity, reserve


def _weights_report(loaded: LoadedModel, quantization: Quantization | None) -> str:
    """The routed experts' format and bytes, and the dense part's format, in words."""
    shape = loaded.expert_shape
    experts = f"routed experts {shape.format} ({shape.expert_bytes / 2**20:.2f} MiB each)"
    if quantization is None:
        return f"{experts}; dense part {shape.dtype}"
    if not quantization.dense:
        return f"{experts}, quantized at load; dense part {shape.dtype}"
    return (f"{experts}, quantized at load; dense part {shape.format} "
            f"({loaded.n_dense_quantized} linear layers; routers {shape.dtype})")


def _memory_report(
    loaded: LoadedModel, dense_bytes: int, capacity: int, reserve: Reserve, accelerator
) -> tuple[str, str]:
    """(host memory, accelerator memory) in words, for the run summary."""
    slots_bytes = capacity * loaded.expert_shape.expert_bytes
    host = f"routed experts {loaded.host_experts.describe()}"
    if not accelerator.is_cuda:
        return f"{host}; {slots_bytes / GIB:.2f} GiB of expert slots (the CPU stand-in's)", "none (CPU stand-in)"
    return host, (
        f"{dense_bytes / GIB:.2f} GiB dense weights + {slots_bytes / GIB:.2f} GiB for {capacity} expert slots; "
        f"peak {accelerator.peak_memory_bytes() / GIB:.2f} GiB allocated; planned reserve: {reserve.describe()}"
    )



@dataclass
class Session:
    """A model loaded and planned for, as `run` and `serve` use it: where the experts go, with
    which profile and threads, and the memory plan behind the expert slots."""

    loaded: LoadedModel
    accelerator: Accelerator
    shape: ModelShape  # the experts in the format the run keeps them in
    profile: HardwareProfile
    profile_label: str  # how the summary names the profile
    estimated: bool  # the profile is a built-in estimate, not this machine's measurement
    profile_machine: str | None  # the machine kind a given profile describes, when it is not this one
    quantization: Quantization | None
    strategy: str
    capacity: int  # expert slots on the accelerator
    capacity_source: str
    threads: int  # CPU expert threads
    threads_source: str
    reserve: Reserve
    dense_bytes: int  # every weight but the routed experts
    replay: RoutingReplay | None

    def planner(self) -> Planner:
        """A fresh planner (its own cache state) for this session's strategy and profile."""
        return build_planner(self.strategy, self.loaded, self.profile, _policy(self.profile), self.capacity)

    def runtime(self, record_depth: int | None = None, replaying: bool = True) -> HybridRuntime:
        """The hybrid runtime installed on the model with a fresh planner; it routes as the replayed
        trace says (when there is one) only while `replaying`."""
        from hybrimoe.runtime.hybrid import HybridRuntime

        return HybridRuntime(self.loaded, self.planner(), self.accelerator, self.capacity, record_depth=record_depth,
                             replay=self.replay if replaying else None, cpu_threads=self.threads)

    def launching_threads(self) -> int:
        """The torch threads of the thread that launches the steps (`runtime/threads.py`)."""
        from hybrimoe.runtime.threads import launching_threads

        return launching_threads(self.threads, self.accelerator.is_cuda)

    def warm_up(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """One prefill and one decode step on a throwaway runtime, so timed work pays no first calls;
        the accelerator's peak memory is counted from after it. The model routes by its own routers
        (a replayed trace is kept for the timed steps). Outputs that are not finite are refused: the
        weights hold NaN or inf."""
        with self.runtime(replaying=False) as runtime:
            warm = generate(self.loaded.model, ids, mask, 2, before_step=runtime.begin_step,
                            on_step=runtime.end_step, sync=self.accelerator.synchronize, keep_logits=True)
        if not all(bool(torch.isfinite(logits).all()) for logits in warm.step_logits):
            raise ModelError(f"{self.loaded.path or 'the model'}: its outputs on a warm-up step are not finite (NaN "
                             "or inf): the checkpoint's weights hold NaN or inf values")
        self.accelerator.reset_peak_memory()


def open_session(
    options: RunOptions,
    batch_shape: Callable[[ModelFacts, object], tuple[int, int]],
    show_progress: bool = True,
) -> Session:
    """Loads the model `options` name and plans its expert placement. Before any weight is read it
    refuses what cannot work: a profile for other expert shapes, a replayed trace that does not
    fit, a memory budget too small for `batch_shape(facts, tokenizer)` = (sequences, prompt tokens
    each) with `options.max_new_tokens` more."""
    from hybrimoe.demo import demo_model_path
    from hybrimoe.runtime.accelerator import make_accelerator
    from hybrimoe.runtime.loading import load_model

    check_options(options)
    native.check_setting()
    accelerator = make_accelerator(options.device)
    path = options.model if options.model is not None else demo_model_path()
    model_name = printable(path.name) if options.model is not None else "demo"  # a trace's model name
    profile_path = options.profile or this_machines_profile(
        model_name, str(accelerator.device), options.quantize, options.group_size
    )
    profile = load_profile(profile_path) if profile_path is not None else None
    replayed = load_trace(options.replay_trace) if options.replay_trace is not None else None
    quantization = quantization_for_run(options, profile)
    planned: list[tuple[ModelShape, int, Capacity, Reserve]] = []

    def before_weights(facts: ModelFacts, tokenizer) -> None:
        shape = _model_shape(facts, model_name, quantization)
        if profile is not None:
            profile.check_expert_shape(shape.expert_shape())
        if replayed is not None:
            check_fits(replayed.meta, facts.n_layers, facts.n_experts, facts.top_k, str(options.replay_trace))
        prompt_shape = batch_shape(facts, tokenizer)
        if replayed is not None:
            _check_replay_length(replayed, prompt_shape, options)
        if profile is not None:
            _check_accelerator_flags(options, profile)
        capacity, reserve = plan_memory(facts, shape, prompt_shape, options, profile, accelerator)
        planned.append((shape, facts.dense_bytes, capacity, reserve))

    loaded = load_model(
        path,
        accelerator.device,
        trust_remote_code=options.trust_remote_code,
        allow_pickle=options.allow_pickle,
        show_progress=show_progress,
        before_weights=before_weights,
        quantization=quantization,
    )
    shape, dense_bytes, capacity_chosen, reserve = planned[0]
    estimated = profile is None or profile.estimated
    profile_machine = None if profile is None else _other_machine(profile, str(accelerator.device))
    profile, profile_label = _profile_for_run(profile, profile_path, options, shape, str(accelerator.device))
    strategy, capacity, capacity_source = _placement(options, profile, capacity_chosen)
    threads, threads_source = run_threads(options, profile, accelerator.is_cuda)
    replay = None if replayed is None else RoutingReplay.for_model(
        replayed, loaded.n_layers, loaded.n_experts, loaded.top_k, str(options.replay_trace)
    )
    return Session(
        loaded=loaded, accelerator=accelerator, shape=shape, profile=profile, profile_label=profile_label,
        estimated=estimated, profile_machine=profile_machine, quantization=quantization, strategy=strategy, capacity=capacity,
        capacity_source=capacity_source, threads=threads, threads_source=threads_source, reserve=reserve,
        dense_bytes=dense_bytes, replay=replay,
    )


def run(
    options: RunOptions,
    on_text: Callable[[str], None] | None = None,
    show_progress: bool = True,
    on_start: Callable[[], None] | None = None,
) -> RunReport:
    """Loads the model, runs it with the hybrid runtime, streams the first sequence's text.

    `on_start` is called once everything is loaded, just before the prefill."""
    from hybrimoe.runtime.threads import torch_threads

    if not options.prompts:
        raise UserError("give a prompt")
    tokenized: list[tuple[torch.Tensor, torch.Tensor]] = []

    def batch_shape(facts: ModelFacts, tokenizer) -> tuple[int, int]:
        tokenized.append(_tokenize(options.prompts, facts, tokenizer, options.max_new_tokens))
        return tuple(tokenized[0][0].shape)

    session = open_session(options, batch_shape, show_progress)
    loaded, accelerator = session.loaded, session.accelerator
    ids, mask = (t.to(accelerator.device) for t in tokenized[0])
    planner_for_depth = session.planner()
    # the routing is always recorded (the prediction replays it), with the lookahead the planner
    # uses; a trace written to a file carries the paper's depth
    depth = TRACE_LOOKAHEAD_DEPTH if options.record_trace is not None else planner_for_depth.lookahead_layers
    tokenizer = loaded.tokenizer
    stream = TextStream(tokenizer)
    steps: list[TraceStep] = []

    def on_tokens(tokens: torch.Tensor) -> None:
        if on_text is not None:
            piece = stream.push(int(tokens[0]))
            if piece:
                on_text(piece)

    with torch_threads(session.launching_threads()):
        session.warm_up(ids[:, -WARM_UP_TOKENS:], mask[:, -WARM_UP_TOKENS:])
        with session.runtime(record_depth=depth) as runtime:
            if on_start is not None:
                on_start()
            out = generate(
                loaded.model, ids, mask, options.max_new_tokens, options.sampling,
                eos_token_ids=eos_ids(loaded),
                pad_token_id=tokenizer.pad_token_id or 0,
                on_tokens=on_tokens,
                before_step=runtime.begin_step,
                on_step=lambda: steps.append(trace_step(runtime.end_step(), depth)),
                sync=accelerator.synchronize,
            )
    trace = recorded_trace(session.shape, steps, options)
    return RunReport(_run_stats(session, options, runtime, out, tuple(ids.shape), trace), [
        tokenizer.decode(row, skip_special_tokens=True) for row in out.tokens.tolist()
    ])


def _run_stats(
    session: Session, options: RunOptions, runtime: HybridRuntime, out: Generated, prompt_shape: tuple[int, int],
    trace: RoutingTrace,
) -> RunStats:
    """The run's report: what was measured, beside the simulator's prediction for the same routing."""
    loaded, accelerator, capacity = session.loaded, session.accelerator, session.capacity
    n_seqs, n_prompt_tokens = prompt_shape
    host_memory, accelerator_memory = _memory_report(
        loaded, session.dense_bytes, capacity, session.reserve, accelerator
    )
    cache_ratio = capacity / (loaded.n_layers * loaded.n_experts)
    simulated_ttft_s, simulated_tps = predict_run(trace, session.planner(), session.strategy, cache_ratio, n_seqs)
    n_new = out.tokens.shape[1]
    return RunStats(
        model=session.shape.name,
        family=loaded.family,
        device=accelerator.describe(),
        profile=session.profile_label,
        planner=session.strategy,
        capacity=capacity,
        capacity_source=session.capacity_source,
        threads=session.threads,
        threads_source=session.threads_source,
        n_experts_total=loaded.n_layers * loaded.n_experts,
        batch_size=n_seqs,
        n_prompt_tokens=n_prompt_tokens,
        n_new_tokens=n_new,
        ttft_s=out.ttft_s,
        prefill_tokens_per_s=n_seqs * n_prompt_tokens / out.ttft_s,
        decode_tokens_per_s=(n_new - 1) / out.decode_s if n_new > 1 and out.decode_s > 0 else None,
        counters=runtime.counters,
        weights=_weights_report(loaded, session.quantization),
        simulated_ttft_s=simulated_ttft_s,
        simulated_decode_tokens_per_s=simulated_tps,
        host_memory=host_memory,
        accelerator_memory=accelerator_memory,
        stand_in=not accelerator.is_cuda,
        prediction_from_estimate=session.estimated,
        profile_machine=session.profile_machine,
        host_expert_bytes=loaded.host_experts.n_bytes,
        slot_bytes=capacity * loaded.expert_shape.expert_bytes,
        accelerator_dense_bytes=session.dense_bytes if accelerator.is_cuda else 0,
        accelerator_peak_bytes=accelerator.peak_memory_bytes() if accelerator.is_cuda else 0,
        trace_path=str(options.record_trace) if options.record_trace is not None else None,
        replay_trace=str(options.replay_trace) if options.replay_trace is not None else None,
    )
