"""The options `run` and `serve` share: which model, where its experts go, how its weights are kept.

Each is a typed alias (`Annotated`) that a command names as a parameter's type, so both commands
parse and document the same flags in the same help panels; `options_for` turns them into the
library's `RunOptions`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

INPUT = "Model and prompt"
PLACE = "Placement"
WEIGHTS = "Weights"
OUT = "Output"
MAX_THREADS = 1024  # libgomp crashes on absurd counts (a segfault was seen); no CPU has more cores

Model = Annotated[Path | None, typer.Option(
    "--model", "-m", rich_help_panel=INPUT,
    help="Local transformers MoE checkpoint directory (default: the embedded demo model).",
)]
TrustRemoteCode = Annotated[bool, typer.Option(
    "--trust-remote-code", rich_help_panel=INPUT, help="Allow running model code shipped with the checkpoint.",
)]
AllowPickle = Annotated[bool, typer.Option(
    "--allow-pickle", rich_help_panel=INPUT, help="Allow pickle-based weight files (.bin); safetensors otherwise.",
)]
Device = Annotated[str | None, typer.Option(
    "--device", rich_help_panel=PLACE,
    help="cuda[:N], or cpu (a CPU stand-in accelerator); default: cuda when present.",
)]
Profile = Annotated[Path | None, typer.Option(
    "--profile", rich_help_panel=PLACE,
    help="Hardware profile (YAML, measured or tuned); default: this machine's from `hybrimoe profile`, "
    "else a built-in estimate for this kind of machine.",
)]
Strategy = Annotated[str, typer.Option(
    "--strategy", rich_help_panel=PLACE,
    help="Placement: hybrimoe, ktransformers-dynamic (from kTransformers' uniform start), ktransformers-front, "
    "llamacpp, llamacpp-lru, gpu-offload or cpu-only (frequency-placed baselines: `hybrimoe simulate`).",
)]
CacheExperts = Annotated[int | None, typer.Option(
    "--cache-experts", rich_help_panel=PLACE, help="Expert slots on the accelerator.",
)]
CacheRatio = Annotated[float | None, typer.Option(
    "--cache-ratio", rich_help_panel=PLACE, help="Expert slots as a fraction of all routed experts.",
)]
Threads = Annotated[int | None, typer.Option(
    "--threads", min=1, max=MAX_THREADS, rich_help_panel=PLACE,
    help="CPU threads for expert kernels (default: the profile's, as it was measured with).",
)]
GpuMemoryGb = Annotated[float | None, typer.Option(
    "--gpu-memory-gb", rich_help_panel=PLACE,
    help="Accelerator memory to use, dense weights included (default: what is free).",
)]
Quantize = Annotated[str | None, typer.Option(
    "--quantize", rich_help_panel=WEIGHTS,
    help="Keep the routed experts as int8 or int4 (weight-only, group-wise, quantized at load from the "
    "checkpoint's weights; default: a tuned profile's choice, else the checkpoint's dtype).",
)]
GroupSize = Annotated[int | None, typer.Option(
    "--group-size", min=2, rich_help_panel=WEIGHTS,
    help="Weights per quantization scale along each row (default: a tuned profile's, else 128).",
)]
QuantizeDense = Annotated[bool, typer.Option(
    "--quantize-dense", rich_help_panel=WEIGHTS,
    help="Quantize the dense part's linear layers too (not the routers), with torchao: "
    "pip install 'hybrimoe\\[quantize]'.",
)]
Force = Annotated[bool, typer.Option(
    "--force", rich_help_panel=OUT, help="Overwrite an existing --record-trace file.",
)]
