"""Tiny shapes and budgets so profile tests measure real kernels in well under a second each."""

from __future__ import annotations

import pytest

from hybrimoe.config import ExpertShape
from hybrimoe.profile.inputs import resolve_model
from hybrimoe.profile.timing import Budget

TINY_SHAPE = ExpertShape(hidden_size=32, intermediate_size=48, dtype="float32")
TINY_CACHE_BYTES = 1 << 20
TINY_BUDGET = Budget(
    warmup=1, min_repeats=2, max_repeats=3, round_size=2, max_seconds=0.2, settle_rel=0.5,
    max_tokens=16, curve_stop_ms=50.0, large_copy_bytes=1 << 20, window_s=0.05,
)


@pytest.fixture
def tiny_model():
    return resolve_model(hidden_size=32, intermediate_size=48, dtype="float32")
