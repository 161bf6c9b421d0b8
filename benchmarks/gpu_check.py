"""One-shot check of the hybrid runtime on a GPU machine, one step per subcommand (`gpu_check.sh` runs them).

Steps:
- `env`: torch, CUDA and the device, in one line; fails when `--device cuda` finds no GPU.
- `smoke`: the CUDA exactness tests (`tests/runtime/test_cuda.py -m cuda`); with `--device cpu` a
  few-second subset of the CPU exactness tests instead.
- `profile`: a quick measured profile (`hybrimoe profile --quick` as a library call) for the key
  table's model shapes, written as profile.yaml for the next steps to plan with.
- `table`: the key table. Decode and prefill tokens/s of a random-weight model with Qwen3-30B-A3B's
  experts (128 experts of 3 x 2048 x 768 bfloat16, top-8, its attention shapes, its vocabulary)
  and `--layers` MoE layers, whose routing is replayed from the shipped Qwen3-30B-A3B trace, so the
  cache sees real routing. Strategies hybrimoe, gpu-offload and llamacpp at 25% and 50% of all
  routed experts cached, and cpu-only; beside each cell the simulator's prediction for the routing
  the run recorded; hybrimoe's decode speed-up over cpu-only and gpu-offload at 25% cache.
- `quantized`: the key table's model with int4 experts (`run --quantize int4`: packed host store
  and slots, dequantized on the GPU), decode tokens/s of hybrimoe and gpu-offload at 25% cache,
  hybrimoe with every expert cached, and cpu-only (torch's int4 matmul on the CPU), each beside
  the simulator's prediction with the int4 estimate; to set beside the key table's bfloat16 cells.
- `overlap`: a torch.profiler trace of three decode steps of hybrimoe at 25% cache; on CUDA the
  kernel time, the host-to-device copy time and how much of the copy time overlaps kernels.

Design choices:
- The model is built on the meta device and materialised once on the host; its experts cycle
  through 8 random weight sets and the rest is tiled from one random block (drawing billions of
  numbers would take minutes). Routing is replayed (`runtime/replay.py`), so the random weights
  only decide the routing weights, never which experts run.
- Each generation gets a fresh planner, routing replay and runtime, so every repeat starts from the
  planner's warm start and replays the same tokens from the trace's first one; a cell is one
  warm-up generation and `REPEATS` measured ones, reported as the median.
- Every table is rewritten to --out after each cell, so a step cut short by its time budget still
  leaves what it measured; `table` also stops starting cells once `--budget-s` would be overrun.
- `--small` shrinks hidden size, expert size, layers and vocabulary (not the 128 experts and top-8
  the trace routes), and the token counts, so the script can be checked on a CPU in seconds.
- torch, transformers and the runtime are imported inside the steps that use them, so `smoke`
  starts without them and the overlap arithmetic can be tested without building anything.

Usage: python benchmarks/gpu_check.py {env,smoke,profile,table,quantized,overlap} --out DIR [--device cuda|cpu] [--small]
       (table, quantized and overlap: [--profile PROFILE.yaml] [--layers N]; table, quantized: [--budget-s S])
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hybrimoe.config import HardwareProfile
    from hybrimoe.shapes import ModelShape
    from hybrimoe.runtime.accelerator import Accelerator
    from hybrimoe.runtime.loading import LoadedModel
    from hybrimoe.trace import RoutingTrace

REPO = Path(__file__).resolve().parent.parent
TRACE = REPO / "traces" / "qwen3-30b-a3b.npz"
STRATEGIES = ("hybrimoe", "cpu-only", "gpu-offload", "llamacpp")  # hybrimoe first, then its baselines
CACHE_RATIOS = (0.25, 0.5)
REPEATS = 3
QUANTIZED = "int4"  # the `quantized` step's format, groups of QUANTIZED_GROUP
QUANTIZED_GROUP = 128
QUANTIZED_CELLS = (("hybrimoe", 0.25), ("gpu-offload", 0.25), ("hybrimoe", 1.0), ("cpu-only", 0.0))
TARGET_OVER_CPU_ONLY = 1.5  # hybrimoe's decode speed-up over cpu-only expected on a GPU machine


@dataclass(frozen=True)
class Sizes:
    """Token counts and layers of a run: the full check, or the scaled-down one (`--small`)."""

    table_layers: int
    overlap_layers: int
    decode_prompt_tokens: int
    decode_new_tokens: int
    prefill_tokens: int


FULL = Sizes(table_layers=12, overlap_layers=4, decode_prompt_tokens=16, decode_new_tokens=32, prefill_tokens=256)
SMALL = Sizes(table_layers=2, overlap_layers=2, decode_prompt_tokens=8, decode_new_tokens=16, prefill_tokens=64)


# ---------------------------------------------------------------------------------------------
# Output: every table goes to stdout and to --out as it is made


def write_table(out: Path, stem: str, suffix: str, text: str, data: dict) -> None:
    """Writes `stem.suffix` (the table as printed) and `stem.json` (the same numbers)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}{suffix}").write_text(text + "\n", encoding="utf-8")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def shout(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------
# env and smoke


def env_step(args: argparse.Namespace) -> int:
    import torch

    line = f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    if torch.cuda.is_available():
        line += f", CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}"
    shout(line)
    (args.out / "env.txt").write_text(line + "\n", encoding="utf-8")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        shout("gpu_check: torch sees no CUDA device (use --device cpu --small to check the script)")
        return 1
    return 0


def smoke_command(device: str) -> list[str]:
    """The CUDA exactness tests on a GPU; on the CPU, the mixed-schedule Qwen3 ones (a few seconds)."""
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if device.startswith("cuda"):
        # bfloat16 on every case, float32 on the mixed schedule, quantized experts in CUDA slots and the
        # pinned host store: about 40 s
        return [*pytest, "-m", "cuda", "tests/runtime/test_cuda.py", "-k", "bfloat16 or mixed or pinned or quantized"]
    return [*pytest, "tests/runtime/test_exactness.py", "-k", "qwen3_moe and mixed"]


def smoke_step(args: argparse.Namespace) -> int:
    """pytest's output goes to the screen and to smoke.txt line by line, so a step cut short by its
    budget still shows how far the tests got; smoke.json (exit status, summary line) at the end."""
    command = smoke_command(args.device)
    shout(f"$ python {shlex.join(command[1:])}")
    started = time.perf_counter()
    last = ""
    with (args.out / "smoke.txt").open("w", encoding="utf-8") as log, subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            log.write(line)
            log.flush()
            last = line.strip() or last
    summary = {"command": command[1:], "rc": proc.returncode, "summary": last,
               "wall_s": round(time.perf_counter() - started, 1)}
    (args.out / "smoke.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return proc.returncode


# ---------------------------------------------------------------------------------------------
# The model: Qwen3-30B-A3B's experts and attention, random weights


def qwen3_config(n_layers: int, small: bool):
    from transformers import Qwen3MoeConfig

    sizes = dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_attention_heads=32,
                 num_key_value_heads=4, head_dim=128, vocab_size=151936)
    if small:
        sizes = dict(hidden_size=256, moe_intermediate_size=128, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, vocab_size=1024)
    return Qwen3MoeConfig(
        **sizes, num_hidden_layers=n_layers, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def model_name(small: bool) -> str:
    return "qwen3-30b-a3b-experts-random" + ("-small" if small else "")


def qwen3_random(config):
    """Built on the meta device in bfloat16, then materialised once on the host."""
    import torch
    from transformers import AutoModelForCausalLM

    from hybrimoe.profile.measure import fill_weights

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    sets: dict[tuple, torch.Tensor] = {}  # expert tensor shape -> [8, ...] random weight sets
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            elif ".experts." in name:  # [E, ...]: copies of 8 random experts
                shape = tuple(param.shape[1:])
                if shape not in sets:
                    sets[shape] = torch.empty((8, *shape), dtype=param.dtype).normal_(0.0, 0.02, generator=gen)
                for start in range(0, param.shape[0], 8):
                    param[start : start + 8].copy_(sets[shape][: param.shape[0] - start])
            else:
                fill_weights(param.data)
        for module in model.modules():  # to_empty left the rotary frequencies uninitialised
            if type(module).__name__.endswith("RotaryEmbedding"):
                fresh = type(module)(config=module.config)
                module.inv_freq = fresh.inv_freq
                module.original_inv_freq = fresh.original_inv_freq
    return model.eval()


def model_shape_of(config, small: bool):
    """The policy core's description of the model, from its config alone (no weights)."""
    from hybrimoe.shapes import shape_from_hf_config

    return shape_from_hf_config(config.to_dict(), name=model_name(small), dtype="bfloat16")


# ---------------------------------------------------------------------------------------------
# profile


def profile_step(args: argparse.Namespace) -> int:
    from hybrimoe.config import save_profile
    from hybrimoe.profile.run import ProfileOptions, profile_machine

    sizes = SMALL if args.small else FULL
    shape = model_shape_of(qwen3_config(sizes.table_layers, args.small), args.small)
    options = ProfileOptions(model=shape, device=args.device, quick=True, name=f"gpu-check.{shape.name}",
                             command="benchmarks/gpu_check.py profile")
    started = time.perf_counter()
    shown = set()

    def progress(what: str, done: int, total: int) -> None:  # each measurement once, so a timeout shows where
        if what and what.split(",")[0] not in shown:
            shown.add(what.split(",")[0])
            shout(f"  [{time.perf_counter() - started:3.0f} s, {done}/{total}] {what}")

    profile = profile_machine(options, progress)
    path = save_profile(profile, args.out / "profile.yaml", overwrite=True)
    lines = [
        f"profile {profile.name}: measured in {time.perf_counter() - started:.0f} s (quick) -> {path}",
        f"  CPU expert {profile.cpu_expert.ms(1):.3f} ms at 1 token, {profile.cpu_expert.ms(64):.3f} ms at 64; "
        f"{profile.machine.threads} CPU threads",
    ]
    if profile.has_accelerator:
        lines.append(
            f"  accelerator expert {profile.gpu_expert.ms(1):.3f} ms at 1 token; expert load "
            f"{profile.transfer.expert_load_ms:.3f} ms ({profile.transfer.h2d_pinned_gbps:.1f} GB/s pinned)"
        )
    text = "\n".join(lines)
    shout(text)
    (args.out / "profile.txt").write_text(text + "\n", encoding="utf-8")
    return 0


# ---------------------------------------------------------------------------------------------
# The bench: one model, its planning profile and the replayed trace, shared by every cell


@dataclass(frozen=True)
class Cell:
    mode: str  # "decode" or "prefill"
    strategy: str
    cache_ratio: float

    @property
    def cache(self) -> str:
        return "-" if self.strategy == "cpu-only" else f"{self.cache_ratio:.0%}"

    @property
    def label(self) -> str:
        return f"{self.mode} {self.strategy} {self.cache}"


@dataclass
class Bench:
    loaded: LoadedModel
    accelerator: Accelerator
    profile: HardwareProfile  # what the planners plan with
    profile_label: str  # which profile that is, for the tables
    shape: ModelShape
    trace: RoutingTrace  # the replayed one
    threads: int
    sizes: Sizes

    @property
    def n_experts_total(self) -> int:
        return self.loaded.n_layers * self.loaded.n_experts

    def capacity(self, cache_ratio: float) -> int:
        return round(cache_ratio * self.n_experts_total)

    def planner(self, cell: Cell):
        from hybrimoe.config import PolicyConfig
        from hybrimoe.runtime.planning import build_planner

        policy = self.profile.policy or PolicyConfig()
        return build_planner(cell.strategy, self.loaded, self.profile, policy, self.capacity(cell.cache_ratio))

    def replay(self):
        """A fresh replay from the trace's first token (a replay is consumed as it routes)."""
        from hybrimoe.runtime.replay import RoutingReplay

        loaded = self.loaded
        return RoutingReplay.for_model(self.trace, loaded.n_layers, loaded.n_experts, loaded.top_k, str(TRACE))


def open_bench(args: argparse.Namespace, n_layers: int, quantize: str | None = None) -> Bench:
    import torch

    from hybrimoe.config import load_profile
    from hybrimoe.runtime.accelerator import make_accelerator
    from hybrimoe.runtime.loading import Quantization, from_model
    from hybrimoe.run import default_profile
    from hybrimoe.runtime.threads import default_threads
    from hybrimoe.trace import load_trace

    sizes = SMALL if args.small else FULL
    accelerator = make_accelerator(args.device)
    config = qwen3_config(n_layers, args.small)
    shape = model_shape_of(config, args.small).quantized(quantize, QUANTIZED_GROUP)
    measured = load_profile(args.profile) if args.profile is not None and args.profile.is_file() else None
    if measured is not None and measured.expert_shape.format == shape.expert_shape().format:
        profile = measured
        label = f"measured, {profile.name} ({args.profile})"
    else:
        profile = default_profile(shape, str(accelerator.device))
        label = f"built-in estimate, {profile.name} (no measured profile)"
    trace = load_trace(TRACE)
    started = time.perf_counter()
    quantization = None if quantize is None else Quantization(quantize, QUANTIZED_GROUP)
    loaded = from_model(qwen3_random(config), device=accelerator.device, quantization=quantization)
    profile.check_expert_shape(loaded.expert_shape)
    threads = profile.machine.threads if not profile.estimated and profile.machine.threads else default_threads(accelerator.is_cuda)
    shout(f"model built and placed in {time.perf_counter() - started:.0f} s: {loaded.n_layers} MoE layers x "
          f"{loaded.n_experts} experts ({loaded.expert_shape.describe()}), top-{loaded.top_k}; "
          f"{accelerator.describe()}, {threads} CPU expert threads; torch {torch.__version__}")
    shout(f"planning profile: {label}")
    return Bench(loaded, accelerator, profile, label, shape, trace, threads, sizes)


# ---------------------------------------------------------------------------------------------
# One generation


@dataclass(frozen=True)
class Sample:
    """One measured generation: its speed, its cache behaviour and its routing as a trace."""

    tokens_per_s: float  # decode tokens/s, or prefill tokens/s (prompt tokens / TTFT)
    ttft_s: float
    hit_rate: float | None  # of the measured mode's steps (decode steps only, in decode mode)
    cpu_share: float | None
    trace: RoutingTrace  # the whole generation's routing, as the runtime recorded it


def prompt_ids(bench: Bench, n_tokens: int):
    """[1, n_tokens] random token ids on the accelerator (the routing is replayed, not computed)."""
    import torch

    gen = torch.Generator().manual_seed(n_tokens)
    vocab = bench.loaded.model.config.vocab_size
    return torch.randint(0, vocab, (1, n_tokens), generator=gen).to(bench.accelerator.device)


def generate_once(bench: Bench, cell: Cell, on_step: Callable[[], None] = lambda: None) -> Sample:
    """One generation of `cell` on a fresh planner, replay and runtime; `on_step` after each step."""
    import torch

    from hybrimoe.runtime.generate import generate
    from hybrimoe.runtime.hybrid import HybridRuntime
    from hybrimoe.runtime.planning import trace_step
    from hybrimoe.runtime.threads import launching_threads, torch_threads
    from hybrimoe.trace import RoutingTrace, trace_meta_from_shape

    sizes = bench.sizes
    decode = cell.mode == "decode"
    ids = prompt_ids(bench, sizes.decode_prompt_tokens if decode else sizes.prefill_tokens)  # [1, S]
    n_new = sizes.decode_new_tokens if decode else 1
    planner = bench.planner(cell)
    depth = planner.lookahead_layers
    records = []  # per step: the executor's per-layer records
    after_prefill = []  # the counters once the prefill has run

    def step_done() -> None:
        records.append(runtime.end_step())
        if len(records) == 1:
            after_prefill.append(dataclasses.replace(runtime.counters))
        on_step()

    accelerator = bench.accelerator
    with torch_threads(launching_threads(bench.threads, accelerator.is_cuda)), HybridRuntime(
        bench.loaded, planner, accelerator, bench.capacity(cell.cache_ratio), record_depth=depth,
        replay=bench.replay(), cpu_threads=bench.threads,
    ) as runtime:
        out = generate(bench.loaded.model, ids, torch.ones_like(ids), n_new, before_step=runtime.begin_step,
                       on_step=step_done, sync=accelerator.synchronize)
    counters = runtime.counters
    if decode:
        counters = _difference(counters, after_prefill[0])
    steps = tuple(trace_step(r, depth) for r in records)
    trace = RoutingTrace(trace_meta_from_shape(bench.shape, f"gpu_check.py, replayed from {TRACE.name}"), steps)
    return Sample(
        tokens_per_s=(n_new - 1) / out.decode_s if decode else ids.shape[1] / out.ttft_s,
        ttft_s=out.ttft_s,
        hit_rate=counters.hit_rate,
        cpu_share=counters.cpu_share,
        trace=trace,
    )


def _difference(after, before):
    """Counters of the steps between two snapshots (activations, hits, CPU runs are what we read)."""
    fields = ("activations", "hits", "cpu_runs", "accelerator_runs")
    return dataclasses.replace(after, **{f: getattr(after, f) - getattr(before, f) for f in fields})


# ---------------------------------------------------------------------------------------------
# table


@dataclass(frozen=True)
class Result:
    cell: Cell
    slots: int
    tokens_per_s: float | None  # median of the repeats; None: skipped
    repeats_tokens_per_s: tuple[float, ...] = ()
    predicted_tokens_per_s: float | None = None
    ttft_ms: float | None = None
    predicted_ttft_ms: float | None = None
    hit_rate: float | None = None
    cpu_share: float | None = None
    wall_s: float = 0.0  # the whole cell: warm-up, repeats, prediction


def table_cells() -> list[Cell]:
    """Decode before prefill, 25% before 50%: the cells the ratios need come first. cpu-only caches
    nothing, so it runs once per mode (cache ratio 0)."""
    cells = [
        Cell(mode, strategy, 0.0 if strategy == "cpu-only" else ratio)
        for mode in ("decode", "prefill")
        for ratio in CACHE_RATIOS
        for strategy in STRATEGIES
    ]
    return list(dict.fromkeys(cells))  # drops cpu-only's repeats, keeps the order


def measure_cell(bench: Bench, cell: Cell) -> Result:
    from hybrimoe.runtime.planning import predict_run

    started = time.perf_counter()
    generate_once(bench, cell)  # warm-up: first calls of kernels and allocations
    samples = [generate_once(bench, cell) for _ in range(REPEATS)]
    slots = bench.capacity(cell.cache_ratio)
    predicted_ttft_s, predicted_decode = predict_run(
        samples[0].trace, bench.planner(cell), cell.strategy, slots / bench.n_experts_total, 1
    )
    n_prompt = samples[0].trace.steps[0].n_tokens
    predicted = predicted_decode if cell.mode == "decode" else n_prompt / predicted_ttft_s
    return Result(
        cell=cell,
        slots=slots,
        tokens_per_s=statistics.median(s.tokens_per_s for s in samples),
        repeats_tokens_per_s=tuple(s.tokens_per_s for s in samples),
        predicted_tokens_per_s=predicted,
        ttft_ms=1000 * statistics.median(s.ttft_s for s in samples),
        predicted_ttft_ms=1000 * predicted_ttft_s,
        hit_rate=_median_or_none([s.hit_rate for s in samples]),
        cpu_share=_median_or_none([s.cpu_share for s in samples]),
        wall_s=time.perf_counter() - started,
    )


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _decode_tokens_per_s(results: list[Result], strategy: str, ratio: float) -> float | None:
    return next((r.tokens_per_s for r in results if r.cell == Cell("decode", strategy, ratio)), None)


def speedups(results: list[Result]) -> dict[str, float | None]:
    """hybrimoe's decode tokens/s at 25% cache over cpu-only's and over gpu-offload's at 25% cache."""
    ours = _decode_tokens_per_s(results, "hybrimoe", CACHE_RATIOS[0])
    theirs = {"cpu-only": _decode_tokens_per_s(results, "cpu-only", 0.0),
              "gpu-offload": _decode_tokens_per_s(results, "gpu-offload", CACHE_RATIOS[0])}
    return {name: (ours / tps if ours and tps else None) for name, tps in theirs.items()}


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def render_table(bench: Bench, results: list[Result], pending: list[Cell], note: str, title: str = "Key table") -> str:
    sizes, loaded = bench.sizes, bench.loaded
    ups = speedups(results)
    lines = [
        f"# {title}: {loaded.n_layers} MoE layers of Qwen3-30B-A3B experts ({loaded.expert_shape.format}, random "
        f"weights), routing replayed from {TRACE.relative_to(REPO)}",
        "",
        f"hybrimoe decode at {CACHE_RATIOS[0]:.0%} cache: {_fmt(ups['cpu-only'], '.2f', 'x')} cpu-only "
        f"(target >= {TARGET_OVER_CPU_ONLY}x on a GPU), {_fmt(ups['gpu-offload'], '.2f', 'x')} gpu-offload",
        "",
        f"{bench.accelerator.describe()}, {bench.threads} CPU expert threads; planning profile: {bench.profile_label}",
        f"decode: {sizes.decode_prompt_tokens}-token prompt, {sizes.decode_new_tokens} new tokens (decode tok/s of "
        f"the last {sizes.decode_new_tokens - 1}); prefill: {sizes.prefill_tokens}-token prompt (prompt tokens / "
        f"TTFT); median of {REPEATS} after 1 warm-up; predicted: the simulator on each run's recorded routing",
        "",
        "| mode | strategy | cache | slots | tok/s measured | tok/s predicted | measured/predicted "
        "| TTFT ms | hit rate | CPU share | cell s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.cell
        if r.tokens_per_s is None:
            lines.append(f"| {c.mode} | {c.strategy} | {c.cache} | {r.slots} | skipped: time budget | | | | | | |")
            continue
        ratio = r.tokens_per_s / r.predicted_tokens_per_s if r.predicted_tokens_per_s else None
        lines.append(
            f"| {c.mode} | {c.strategy} | {c.cache} | {r.slots} | {r.tokens_per_s:.1f} "
            f"| {_fmt(r.predicted_tokens_per_s, '.1f')} | {_fmt(ratio, '.2f')} | {r.ttft_ms:.1f} "
            f"| {_fmt(r.hit_rate, '.1%')} | {_fmt(r.cpu_share, '.1%')} | {r.wall_s:.1f} |"
        )
    lines += [f"| {c.mode} | {c.strategy} | {c.cache} | | pending | | | | | | |" for c in pending]
    if note:
        lines += ["", note]
    return "\n".join(lines)


def table_json(bench: Bench, results: list[Result]) -> dict:
    return {
        "model": bench.shape.name,
        "moe_layers": bench.loaded.n_layers,
        "device": bench.accelerator.describe(),
        "cpu_threads": bench.threads,
        "profile": bench.profile_label,
        "trace": str(TRACE.relative_to(REPO)),
        "sizes": dataclasses.asdict(bench.sizes),
        "repeats": REPEATS,
        "hybrimoe_decode_speedup_at_25pct": speedups(results),
        "results": [{**dataclasses.asdict(r), "cell": dataclasses.asdict(r.cell)} for r in results],
    }


def table_step(args: argparse.Namespace) -> int:
    sizes = SMALL if args.small else FULL
    bench = open_bench(args, args.layers or sizes.table_layers)
    return run_cells(args, bench, table_cells(), "key_table", "Key table")


def quantized_step(args: argparse.Namespace) -> int:
    """The key table's model with int4 experts (`run --quantize`), decode only: the cells to set
    beside the key table's bfloat16 ones."""
    sizes = SMALL if args.small else FULL
    bench = open_bench(args, args.layers or sizes.table_layers, quantize=QUANTIZED)
    cells = [Cell("decode", strategy, ratio) for strategy, ratio in QUANTIZED_CELLS]
    return run_cells(args, bench, cells, "quantized_table", f"{QUANTIZED} experts")


def run_cells(args: argparse.Namespace, bench: Bench, cells: list[Cell], stem: str, title: str) -> int:
    """Measures the cells in turn, rewriting the table to --out after each; cells that would run
    past --budget-s are skipped and marked."""
    started = time.perf_counter()
    results: list[Result] = []
    longest_s = 0.0
    note = ""
    for i, cell in enumerate(cells):
        elapsed_s = time.perf_counter() - started
        if elapsed_s + longest_s > args.budget_s:  # a cell that would overrun is skipped, not cut
            results.append(Result(cell, bench.capacity(cell.cache_ratio), None))
            note = f"Cells marked skipped would have run past the step's {args.budget_s:.0f} s budget."
            continue
        result = measure_cell(bench, cell)
        results.append(result)
        longest_s = max(longest_s, result.wall_s)
        shout(f"  [{time.perf_counter() - started:5.0f} s] {cell.label}: {result.tokens_per_s:.1f} tok/s "
              f"(predicted {_fmt(result.predicted_tokens_per_s, '.1f')}), cell {result.wall_s:.1f} s")
        write_table(args.out, stem, ".md", render_table(bench, results, cells[i + 1 :], note, title),
                    table_json(bench, results))
    text = render_table(bench, results, [], note, title)
    write_table(args.out, stem, ".md", text, table_json(bench, results))
    shout("\n" + text)
    shout(f"\n{stem}: {time.perf_counter() - started:.0f} s")
    return 0 if all(r.tokens_per_s is not None for r in results) else 1


# ---------------------------------------------------------------------------------------------
# overlap

PROFILED_STEPS = 3  # decode steps in the trace
UNPROFILED_DECODE_STEPS = 2  # decode steps after the prefill and before the profiled ones


def intervals_union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, disjoint intervals covering the same time as `intervals` ((start, end) pairs)."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def covered(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals_union(intervals))


def overlap_of(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Time covered by both `a` and `b`."""
    a, b = intervals_union(a), intervals_union(b)
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def gpu_summary(chrome_trace: dict) -> dict:
    """Kernel time, host-to-device copy time and their overlap (ms), from a chrome trace's GPU events
    (kineto's categories: "kernel", "gpu_memcpy"; times in microseconds)."""
    kernels, copies, copy_bytes = [], [], 0
    for event in chrome_trace.get("traceEvents", []):
        if event.get("ph") != "X" or "dur" not in event:
            continue
        span = (float(event["ts"]), float(event["ts"]) + float(event["dur"]))
        if event.get("cat") == "kernel":
            kernels.append(span)
        elif event.get("cat") == "gpu_memcpy" and "HtoD" in event.get("name", ""):
            copies.append(span)
            copy_bytes += int(event.get("args", {}).get("bytes", 0))
    kernel_ms, copy_ms = covered(kernels) / 1000, covered(copies) / 1000
    overlap_ms = overlap_of(kernels, copies) / 1000
    return {
        "kernels": len(kernels),
        "kernel_ms": kernel_ms,
        "h2d_copies": len(copies),
        "h2d_mib": copy_bytes / 2**20,
        "h2d_ms": copy_ms,
        "overlap_ms": overlap_ms,
        "overlap_share_of_copy": overlap_ms / copy_ms if copy_ms else None,
    }


def render_gpu_summary(s: dict) -> str:
    return (
        f"GPU, {PROFILED_STEPS} decode steps: kernels busy {s['kernel_ms']:.2f} ms ({s['kernels']} kernels); "
        f"host-to-device copies {s['h2d_ms']:.2f} ms ({s['h2d_copies']} copies, {s['h2d_mib']:.0f} MiB); "
        f"copy time overlapping kernels {s['overlap_ms']:.2f} ms "
        f"({_fmt(s['overlap_share_of_copy'], '.0%')} of the copy time)"
    )


def overlap_step(args: argparse.Namespace) -> int:
    from torch.profiler import ProfilerActivity, profile, schedule

    sizes = SMALL if args.small else FULL
    bench = open_bench(args, args.layers or sizes.overlap_layers)
    bench = dataclasses.replace(bench, sizes=dataclasses.replace(
        sizes, decode_new_tokens=1 + UNPROFILED_DECODE_STEPS + PROFILED_STEPS))
    cell = Cell("decode", "hybrimoe", CACHE_RATIOS[0])
    generate_once(bench, cell)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.accelerator.is_cuda else [])
    trace_path = args.out / "overlap_trace.json"
    # the prefill is skipped, the next decode steps warm the profiler up, the last ones are recorded
    when = schedule(skip_first=1, wait=0, warmup=UNPROFILED_DECODE_STEPS, active=PROFILED_STEPS, repeat=1)
    with profile(activities=activities, schedule=when,
                 on_trace_ready=lambda prof: prof.export_chrome_trace(str(trace_path))) as prof:
        sample = generate_once(bench, cell, on_step=prof.step)
    lines = [
        f"# Overlap: hybrimoe at {CACHE_RATIOS[0]:.0%} cache, {bench.loaded.n_layers} MoE layers, "
        f"{PROFILED_STEPS} decode steps profiled ({sample.tokens_per_s:.1f} decode tok/s under the profiler)",
        f"chrome trace: {trace_path} (open in chrome://tracing or https://ui.perfetto.dev)",
    ]
    data: dict = {"moe_layers": bench.loaded.n_layers, "trace": str(trace_path)}
    if bench.accelerator.is_cuda:
        summary = gpu_summary(json.loads(trace_path.read_text()))
        lines.append(render_gpu_summary(summary))
        data["gpu"] = summary
        sort_by = "self_device_time_total"
    else:
        sort_by = "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=12)
    lines += ["", f"Top ops by {sort_by}:", table]
    data["top_ops"] = [
        {"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000}
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    ]
    text = "\n".join(lines)
    write_table(args.out, "overlap", ".txt", text, data)
    shout(text)
    return 0 if trace_path.is_file() else 1


# ---------------------------------------------------------------------------------------------


STEPS = {"env": env_step, "smoke": smoke_step, "profile": profile_step, "table": table_step,
         "quantized": quantized_step, "overlap": overlap_step}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=list(STEPS))
    parser.add_argument("--out", type=Path, required=True, help="directory the tables are written to")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for the CPU stand-in")
    parser.add_argument("--small", action="store_true", help="a scaled-down model, to check the script on a CPU")
    parser.add_argument("--profile", type=Path, default=None,
                        help="planning profile (table, overlap); absent or missing: the built-in estimate")
    parser.add_argument("--layers", type=int, default=None, help="MoE layers of the model (table, overlap)")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="table: start no cell that would end after this many seconds")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    return STEPS[args.step](args)


if __name__ == "__main__":
    sys.exit(main())
