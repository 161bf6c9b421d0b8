"""llama.cpp's placement at the tuned budget: a complete `llama-server` command line.

Design choices:
- llama.cpp places experts by whole layers: `--n-cpu-moe N` keeps the routed experts of blocks
  0..N-1 on the CPU (common/arg.cpp pushes one buffer override per block, each from
  `llm_ffn_exps_block_regex(i)` in common/common.h, `blk\\.i\\.ffn_(up|down|gate|gate_up)_(ch|)exps`,
  bound to the CPU buffer type), and `-ngl 99` puts everything else on the GPU. Under a fixed
  budget the best N is the smallest whose GPU layers' experts fit, which is what the study's
  `llamacpp` baseline simulated.
- N counts decoder blocks (`blk.N`, src/llama-arch.cpp's tensor names), not MoE layers: a model
  whose first blocks are dense (DeepSeek's `first_k_dense_replace`) has no experts there, so the
  CPU's first k MoE layers are `--n-cpu-moe` up to the block after the k-th MoE layer. The `-ot`
  equivalent names those blocks.
- The bytes: with `--model X.gguf`, each layer's experts are the file's own tensors (types mixed
  per tensor, as in Q4_K_M) and the room is the budget's rest after the tensors `-ngl 99` keeps
  on the GPU (`gguf_header.py`); otherwise every layer is experts x the profile's expert bytes.
- `--fit` (llama.cpp's automatic placement, on by default in recent builds) does not touch this
  command: common/fit.cpp gives up when the user set tensor buffer overrides ("model_params::
  tensor_buft_overrides already set by user, abort") or `-ngl` ("n_gpu_layers already set by
  user"), so the placement is the one printed (with a warning that fitting failed; `--fit off`
  silences it on builds that have the flag, so the command leaves it out). Without `-ot`/
  `--n-cpu-moe` and `-ngl`, `--fit` would choose its own placement against the free memory instead.
- `-c` is the context the budget reserved for; `-t` the profiled machine's cores (llama.cpp's CPU
  experts run on them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hybrimoe.tune.result import Row, TuneResult
from hybrimoe.tune.setup import Inputs


@dataclass(frozen=True)
class LlamaCppPlacement:
    n_cpu_moe_layers: int  # MoE layers whose experts stay on the CPU: the first ones
    n_cpu_moe: int  # the flag's value: decoder blocks 0..n_cpu_moe-1 (dense blocks included)
    cpu_blocks: tuple[int, ...]  # `blk.N` numbers of the MoE layers on the CPU
    gpu_expert_bytes: int  # the experts left on the GPU
    expert_room_bytes: int  # what the budget leaves for experts
    override: str  # the same placement as an `-ot` tensor override ("" when nothing stays on the CPU)
    command: str
    baseline: Row | None  # the study's llamacpp trial: its simulated values
    tuned: Row


def layer_expert_bytes(inputs: Inputs) -> tuple[int, ...]:
    """Per MoE layer, the bytes of all its routed experts, as llama.cpp would place them."""
    if inputs.gguf is not None:
        return inputs.gguf.layer_expert_bytes
    meta = inputs.workload.meta
    return (meta.n_experts * inputs.profile.expert_shape.expert_bytes,) * meta.n_layers


def n_cpu_layers(layer_bytes: tuple[int, ...], room_bytes: int) -> int:
    """The fewest leading layers to keep on the CPU so that the others' experts fit in `room_bytes`."""
    on_gpu = 0
    for n_cpu in range(len(layer_bytes), -1, -1):
        on_gpu += layer_bytes[n_cpu] if n_cpu < len(layer_bytes) else 0
        if on_gpu > room_bytes:
            return n_cpu + 1
    return 0


def llamacpp_placement(inputs: Inputs, result: TuneResult) -> LlamaCppPlacement:
    meta, model, options = inputs.workload.meta, inputs.model, inputs.options
    layer_bytes = layer_expert_bytes(inputs)
    n_cpu = n_cpu_layers(layer_bytes, inputs.expert_room_bytes)
    blocks = model.moe_decoder_layers if model is not None else tuple(range(meta.n_layers))
    cpu_blocks = blocks[:n_cpu]
    n_cpu_moe = cpu_blocks[-1] + 1 if cpu_blocks else 0
    override = "blk\\.(" + "|".join(map(str, cpu_blocks)) + ")\\.ffn_.*_exps\\.=CPU" if cpu_blocks else ""
    threads = inputs.profile.machine.cores or os.cpu_count() or 1
    gguf = str(options.model) if inputs.gguf is not None else "MODEL.gguf"
    placement = f" --n-cpu-moe {n_cpu_moe}" if n_cpu_moe else ""
    command = f"llama-server -m {gguf} -ngl 99{placement} -c {options.context_tokens} -t {threads}"
    return LlamaCppPlacement(
        n_cpu_moe_layers=n_cpu, n_cpu_moe=n_cpu_moe, cpu_blocks=cpu_blocks,
        gpu_expert_bytes=sum(layer_bytes[n_cpu:]), expert_room_bytes=inputs.expert_room_bytes,
        override=override, command=command, baseline=result.row("llamacpp"), tuned=result.tuned,
    )
