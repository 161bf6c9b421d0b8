"""`tune --export`: the kTransformers `.pt` read back by a loader written to kTransformers' rules, and
the llama.cpp command's layers and bytes checked against a GGUF's own tensor sizes.

The loader below follows kTransformers' SGLang integration: kvcache-ai/sglang
python/sglang/srt/layers/moe/kt_ep_wrapper.py, `_init_kt_gpu_experts_masks` (the `frequency`
branch: `torch.load(..., weights_only=True)`, a dict's "logical_count" or the bare tensor, 3 dims
[buffer, num_hidden_layers, num_experts] checked against the config, summed over the buffer as
float; N from `--kt-gpu-experts-ratio` (int(MoE layers x experts x ratio), winning) or
`--kt-num-gpu-experts` x MoE layers; MoE layers are i >= first_k_dense_replace and
i % moe_layer_freq == 0; non-MoE layers' masks set all-True afterwards) and kvcache-ai/ktransformers
kt-kernel/python/experts_base.py `generate_gpu_experts_masks` (`torch.topk(flat, k=N, sorted=False)`
over the flattened [layers, experts] table).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hybrimoe.cli import app
from hybrimoe.policy.baselines import frequency_ranking
from hybrimoe.trace import load_trace
from hybrimoe.tune.ktransformers_export import count_flag, logical_count

REPO = Path(__file__).resolve().parents[2]
QWEN_TRACE = REPO / "traces" / "qwen3-30b-a3b.npz"
QWEN_PROFILE = REPO / "profiles" / "rtx4090-desktop.qwen3-30b-a3b.yaml"
QUICK = ["--max-tokens", "120", "--objective", "decode", "--storage", "memory", "--trials", "4"]
runner = CliRunner()


def kt_gpu_masks(path: Path, flag: str, num_hidden_layers: int, num_experts: int, first_k_dense_replace: int = 0,
                 moe_layer_freq: int = 1) -> torch.Tensor:
    """[num_hidden_layers, num_experts] bool: the GPU experts kTransformers' loader picks."""
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    counts = loaded["logical_count"] if isinstance(loaded, dict) else loaded
    assert counts.dim() == 3
    _, file_layers, file_experts = counts.shape
    assert (file_layers, file_experts) == (num_hidden_layers, num_experts)
    freq = counts.sum(dim=0).float()
    is_moe = [i >= first_k_dense_replace and i % moe_layer_freq == 0 for i in range(num_hidden_layers)]
    n_moe = sum(is_moe)
    name, value = flag.split()
    if name == "--kt-gpu-experts-ratio":
        n_gpu = int(n_moe * num_experts * float(value))
    else:
        assert name == "--kt-num-gpu-experts"
        n_gpu = int(value) * n_moe
    flat = freq.view(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    _, top = torch.topk(flat, k=n_gpu, largest=True, sorted=False)
    mask[top] = True
    mask = mask.view(num_hidden_layers, num_experts)
    for layer, moe in enumerate(is_moe):
        if not moe:
            mask[layer, :] = True
    return mask


def placed(mask: torch.Tensor, moe_decoder_layers: tuple[int, ...]) -> set[tuple[int, int]]:
    return {(moe_index, int(e)) for moe_index, layer in enumerate(moe_decoder_layers)
            for e in torch.nonzero(mask[layer]).flatten()}


def round_trip(tmp_path: Path, frequencies: np.ndarray, moe_layers: tuple[int, ...], n_decoder: int, n_gpu: int,
               first_k_dense_replace: int = 0) -> tuple[set, set]:
    path = tmp_path / "counts.pt"
    torch.save({"logical_count": torch.from_numpy(logical_count(frequencies, moe_layers, n_decoder, n_gpu))}, path)
    flag = count_flag(n_gpu, len(moe_layers), frequencies.shape[1])
    mask = kt_gpu_masks(path, flag, n_decoder, frequencies.shape[1], first_k_dense_replace)
    return placed(mask, moe_layers), set(frequency_ranking(frequencies)[:n_gpu])


def test_ties_at_the_boundary_and_zero_counts_are_placed_as_simulated(tmp_path):
    # every expert ties: torch.topk alone could pick any; zero counts compete with nothing
    frequencies = np.ones((3, 8))
    frequencies[1, 5] = 0
    for n_gpu in (1, 5, 12, 23, 24):
        got, want = round_trip(tmp_path, frequencies, (0, 1, 2), 3, n_gpu)
        assert got == want, n_gpu


def test_dense_leading_layers_are_zero_rows_and_do_not_take_budget(tmp_path):
    """DeepSeek-style: decoder layer 0 is dense (first_k_dense_replace=1); MoE layer m is decoder m+1."""
    rng = np.random.default_rng(0)
    frequencies = rng.integers(0, 4, size=(4, 16)).astype(float)  # many ties, some zeros
    for n_gpu in (3, 16, 37, 64):
        got, want = round_trip(tmp_path, frequencies, (1, 2, 3, 4), 5, n_gpu, first_k_dense_replace=1)
        assert got == want, n_gpu
    counts = logical_count(frequencies, (1, 2, 3, 4), 5, 10)
    assert counts.shape == (1, 5, 16) and not counts[0, 0].any()


def test_count_flag_gives_the_loader_exactly_n():
    for n_moe, n_experts in ((48, 128), (26, 64), (3, 8)):
        for n_gpu in range(1, n_moe * n_experts + 1, 7):
            name, value = count_flag(n_gpu, n_moe, n_experts).split()
            got = int(value) * n_moe if name == "--kt-num-gpu-experts" else int(n_moe * n_experts * float(value))
            assert got == n_gpu


def test_tune_export_ktransformers_round_trips_through_the_loader(tmp_path):
    out = tmp_path / "tuned.yaml"
    result = runner.invoke(app, ["tune", "--trace", str(QWEN_TRACE), "--profile", str(QWEN_PROFILE), "--out", str(out),
                                 "--gpu-memory-gb", "16", "--export", "ktransformers", *QUICK])
    assert result.exit_code == 0, result.output
    path = out.with_suffix(".ktransformers.pt")
    flag = re.search(r"(--kt-(?:num-gpu-experts|gpu-experts-ratio) [0-9.]+)", result.output).group(1)
    n_slots = int(re.search(r"up to (\d+) expert slots", result.output).group(1))
    mask = kt_gpu_masks(path, flag, 48, 128)
    trace = load_trace(QWEN_TRACE)
    n_train = trace.n_tokens - round(0.3 * trace.n_tokens)  # the default holdout, then the profiling quarter
    frequencies = trace.tokens(0, round(0.25 * n_train)).expert_frequencies()
    assert placed(mask, tuple(range(48))) == set(frequency_ranking(frequencies)[:n_slots])
    assert f"--init-expert-location {path}" in result.output and "--kt-expert-placement-strategy frequency" in result.output
