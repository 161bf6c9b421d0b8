"""Sampling's edges: temperatures and top_p so small that float32 cannot hold what they divide into."""

from __future__ import annotations

import pytest
import torch

from hybrimoe.run_options import Sampling
from hybrimoe.runtime.generate import sampler


@pytest.mark.parametrize("temperature, top_p", [(1e-320, 1.0), (1e-50, 1.0), (1.0, 1e-300), (1e-50, 1e-300)])
def test_extreme_settings_sample_the_top_token(temperature, top_p):
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9], [-7.0, -8.0, -6.5, float("-inf")]])  # [B, V]
    sample = sampler(Sampling(temperature=temperature, top_p=top_p, seed=0), torch.device("cpu"))
    assert sample(logits).tolist() == [1, 2]


def test_ordinary_settings_still_sample_every_token():
    logits = torch.zeros(1, 4)  # [B, V]
    sample = sampler(Sampling(temperature=1.0, top_p=1.0, seed=0), torch.device("cpu"))
    assert {sample(logits).item() for _ in range(200)} == {0, 1, 2, 3}
