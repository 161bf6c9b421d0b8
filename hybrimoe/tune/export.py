"""Placements for other engines, at the tuned budget, with their simulated speed beside hybrimoe's.

Design choices:
- llama.cpp: `--n-cpu-moe N` keeps the routed experts of the first N layers on the CPU and the
  rest on the GPU; under a fixed budget the best N is the smallest whose GPU layers fit, which is
  what the study's `llamacpp` baseline trial simulated. The equivalent `-ot` override names the
  same layers. Layer numbers are MoE-layer numbers; a model whose first decoder layers are dense
  (DeepSeek) numbers its `blk.` tensors from the first decoder layer, so shift them.
- kTransformers and other static-placement engines: the GPU-resident expert set per layer, the
  budget's most frequent experts on the training traces' profiling tokens, which is what the
  `ktransformers` baseline trial simulated.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from hybrimoe.files import write_atomically
from hybrimoe.policy.baselines import frequency_ranking
from hybrimoe.tune.result import Row, TuneResult
from hybrimoe.tune.setup import Inputs

ENGINES = ("llamacpp", "ktransformers")


@dataclass(frozen=True)
class LlamaCppPlacement:
    n_cpu_moe: int
    override: str  # the same placement as an `-ot` tensor override
    baseline: Row | None  # the study's llamacpp trial: its simulated values
    tuned: Row


def llamacpp_placement(inputs: Inputs, result: TuneResult) -> LlamaCppPlacement:
    meta = inputs.workload.meta
    n_gpu_layers = min(meta.n_layers, inputs.max_slots // meta.n_experts)
    n_cpu_moe = meta.n_layers - n_gpu_layers
    layers = "|".join(str(layer) for layer in range(n_cpu_moe))
    override = f"blk\\.({layers})\\.ffn_.*_exps\\.=CPU" if n_cpu_moe else ""
    return LlamaCppPlacement(n_cpu_moe, override, result.row("llamacpp"), result.tuned)


def ktransformers_path(out: Path) -> Path:
    return out.with_suffix(".ktransformers.json")


def write_ktransformers_placement(inputs: Inputs, result: TuneResult) -> Path:
    """Writes {layer: [GPU-resident experts]} with the budget and the simulated values, as JSON."""
    meta = inputs.workload.meta
    resident = frequency_ranking(inputs.workload.frequencies)[: inputs.max_slots]
    by_layer: dict[str, list[int]] = {str(layer): [] for layer in range(meta.n_layers)}
    for layer, expert in resident:
        by_layer[str(layer)].append(expert)
    baseline = result.row("ktransformers")

    def values(row: Row | None) -> dict | None:
        if row is None:
            return None
        return {part: None if getattr(row, part) is None else dataclasses.asdict(getattr(row, part)) for part in ("train", "holdout")}

    document = {
        "model": meta.model,
        "budget": inputs.budget,
        "gpu_experts": len(resident),
        "objective": inputs.options.objective,
        "gpu_experts_per_layer": {layer: sorted(experts) for layer, experts in by_layer.items()},
        "simulated": {"static_placement": values(baseline), "hybrimoe_tuned": values(result.tuned)},
        "study": inputs.study_name,
    }
    text = json.dumps(document, indent=1) + "\n"
    return write_atomically(ktransformers_path(inputs.options.out), lambda fh: fh.write(text.encode()))
