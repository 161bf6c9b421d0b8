"""The accelerator paths of `hybrimoe profile`; skipped without a GPU."""

import pytest
import torch

from hybrimoe.profile.inputs import resolve_model
from hybrimoe.profile.measure import ExpertPool, expert_timer, h2d_stream, interference, latency_curve, transfers
from hybrimoe.profile.run import ProfileOptions, profile_machine

from .conftest import TINY_BUDGET, TINY_CACHE_BYTES, TINY_SHAPE

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def test_accelerator_expert_curve_and_copies():
    device = torch.device("cuda")
    pool = ExpertPool(TINY_SHAPE, torch.float32, device, TINY_CACHE_BYTES)
    with torch.inference_mode():
        curve = latency_curve(expert_timer(pool, torch.cuda.Stream(device)), TINY_BUDGET)
    assert len(curve) >= 2 and all(p.ms > 0 for p in curve)
    copies = transfers(TINY_SHAPE, device, TINY_CACHE_BYTES, TINY_BUDGET)
    assert copies.expert_load.median_ms > 0
    assert min(copies.h2d_pinned_gbps, copies.h2d_pageable_gbps, copies.d2h_gbps, copies.h2d_pinned_expert_gbps) > 0


def test_interference_with_host_to_device_copies():
    cpu_pool = ExpertPool(TINY_SHAPE, torch.float32, torch.device("cpu"), TINY_CACHE_BYTES)
    copies = h2d_stream(torch.device("cuda"), TINY_CACHE_BYTES, chunk_bytes=1 << 20)
    result = interference(cpu_pool, copies, TINY_BUDGET)
    assert result.stream_alone_gbps > 0 and result.stream_busy_gbps > 0


def test_quick_profile_on_the_accelerator():
    model = resolve_model(hidden_size=64, intermediate_size=64, dtype="float32")
    options = ProfileOptions(model, device="cuda", quick=True, max_repeats=2, cache_bytes=TINY_CACHE_BYTES)
    profile = profile_machine(options)
    assert profile.has_accelerator and profile.transfer.expert_load_ms > 0
    assert profile.machine.gpu and profile.machine.cuda
