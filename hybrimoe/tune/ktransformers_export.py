"""kTransformers' frequency placement at the tuned budget: the `.pt` file its loader reads, and its flags.

Shapes: L = MoE layers, D = decoder layers (num_hidden_layers), E = routed experts per layer.

Design choices:
- kTransformers (its SGLang integration) places GPU experts with `--kt-expert-placement-strategy
  frequency --init-expert-location FILE.pt`. Its loader (kTransformers' SGLang fork, kvcache-ai/sglang
  python/sglang/srt/layers/moe/kt_ep_wrapper.py, `_init_kt_gpu_experts_masks`) `torch.load`s FILE with `weights_only=True`, takes `["logical_count"]` of a dict (or
  the bare tensor), requires 3 dimensions [buffer, num_hidden_layers, num_experts] with those
  two sizes equal to the model config's, sums over the buffer, and gives the GPU the global top N
  of that [D, E] sum (kvcache-ai/ktransformers kt-kernel/python/experts_base.py
  `generate_gpu_experts_masks`: `torch.topk(flat, k=N, sorted=False)`); dense layers are then
  marked all-GPU, which for a layer without experts means nothing. There is no flag that takes an
  explicit list, and a `.json` is not read.
- N is `--kt-num-gpu-experts` x the MoE layers (the flag counts per layer), or
  int(MoE layers x E x `--kt-gpu-experts-ratio`) (the ratio wins when both are set); kTransformers
  counts layer i as MoE when i >= first_k_dense_replace and i % moe_layer_freq == 0. The per-layer
  flag is printed when the budget divides evenly, else a ratio chosen so that the loader's int()
  gives exactly N.
- The placement is the study's `ktransformers` trial: the N = budget most frequent experts of the
  profiling workload, ties by layer then expert (`frequency_ranking`). The file holds those counts
  in decoder-layer numbering, dense layers' rows zero, doubled, plus one for each placed expert
  whose count equals the last placed one's: doubling keeps every other order, and the +1 breaks
  the ties at the boundary that `torch.topk` would break as it likes (and lifts placed experts of
  count 0 above the dense layers' zero rows). So the loader's top N is exactly the placement simulated.
  (The loader ranks in float32: exact while a doubled count stays below 2**24.)
- `kt run`'s interactive configuration adds `--kt-enable-dynamic-expert-update` to every command it
  builds (kvcache-ai/ktransformers kt-kernel/python/cli/utils/run_interactive.py,
  `_build_command_preview`; its flag-driven path in cli/commands/run.py, as read at 00dc49b, does
  not): with it the GPU experts are redistributed during serving
  from online statistics (at prefills of at least `--kt-gpu-prefill-token-threshold` tokens), and
  this file only sets the start. The static placement is what the study's `ktransformers` row
  simulated; `ktransformers-dynamic` models the update.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybrimoe.files import write_atomically
from hybrimoe.policy.baselines import frequency_ranking
from hybrimoe.policy.plan import ExpertId
from hybrimoe.tune.result import Row, TuneResult
from hybrimoe.tune.setup import Inputs


@dataclass(frozen=True)
class KTransformersPlacement:
    path: Path  # the .pt for --init-expert-location
    resident: tuple[ExpertId, ...]  # (MoE layer, expert) on the GPU, as simulated
    count_flag: str  # "--kt-num-gpu-experts 12" or "--kt-gpu-experts-ratio 0.2500814"
    baseline: Row | None  # the study's ktransformers trial: its simulated values
    tuned: Row

    def command(self, model: str = "MODEL_DIR", weights: str = "KT_WEIGHTS_DIR") -> str:
        return (f"python -m sglang.launch_server --model {model} --kt-weight-path {weights} "
                f"--kt-expert-placement-strategy frequency --init-expert-location {self.path} {self.count_flag}")


def ktransformers_path(out: Path) -> Path:
    return out.with_suffix(".ktransformers.pt")


def logical_count(frequencies: np.ndarray, moe_decoder_layers: tuple[int, ...], n_decoder_layers: int,
                  n_gpu_experts: int) -> np.ndarray:
    """[L, E] profiling counts -> the [1, D, E] int64 `logical_count` whose global top `n_gpu_experts`
    is exactly `frequency_ranking(frequencies)[:n_gpu_experts]` (see the module docstring)."""
    n_experts = frequencies.shape[1]
    counts = np.rint(frequencies).astype(np.int64)
    scores = 2 * counts  # [L, E]
    resident = frequency_ranking(frequencies)[:n_gpu_experts]
    if resident:
        last = counts[resident[-1]]
        for layer, expert in resident:
            if counts[layer, expert] == last:
                scores[layer, expert] += 1
    out = np.zeros((1, n_decoder_layers, n_experts), dtype=np.int64)  # [1, D, E]
    out[0, list(moe_decoder_layers)] = scores
    return out


def count_flag(n_gpu_experts: int, n_moe_layers: int, n_experts: int) -> str:
    """The kTransformers flag whose N (as its loader computes it) is `n_gpu_experts`."""
    if n_gpu_experts % n_moe_layers == 0:
        return f"--kt-num-gpu-experts {n_gpu_experts // n_moe_layers}"
    total = n_moe_layers * n_experts
    ratio = f"{(n_gpu_experts + 0.5) / total:.10g}"  # the middle of the ratios whose int() is N
    assert int(total * float(ratio)) == n_gpu_experts, ratio
    return f"--kt-gpu-experts-ratio {ratio}"


def write_ktransformers_placement(inputs: Inputs, result: TuneResult) -> KTransformersPlacement:
    """Writes the `.pt` beside --out; returns it with the flags that use it."""
    import torch

    meta, model = inputs.workload.meta, inputs.model
    layers = model.moe_decoder_layers if model is not None else tuple(range(meta.n_layers))
    n_decoder = model.n_decoder_layers if model is not None else meta.n_layers
    counts = logical_count(inputs.workload.frequencies, layers, n_decoder, inputs.max_slots)
    path = write_atomically(ktransformers_path(inputs.options.out),
                            lambda fh: torch.save({"logical_count": torch.from_numpy(counts)}, fh))
    return KTransformersPlacement(
        path=path,
        resident=tuple(frequency_ranking(inputs.workload.frequencies)[: inputs.max_slots]),
        count_flag=count_flag(inputs.max_slots, meta.n_layers, meta.n_experts),
        baseline=result.row("ktransformers"),
        tuned=result.tuned,
    )
