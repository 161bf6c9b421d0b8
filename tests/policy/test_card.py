"""Which cache sizes fit the profile's accelerator: `run`'s arithmetic on the shipped profiles."""

from pathlib import Path

import pytest

from hybrimoe.config import load_profile
from hybrimoe.policy.card import card_budget
from hybrimoe.policy.comparison import compare_strategies
from hybrimoe.trace import load_trace

from .conftest import make_profile, make_trace

REPO = Path(__file__).resolve().parents[2]
TRACE = REPO / "traces" / "qwen3-30b-a3b.npz"
RTX4090 = REPO / "profiles" / "rtx4090-desktop.qwen3-30b-a3b.yaml"
A6000 = REPO / "profiles" / "a6000-xeon5220r.qwen3-30b-a3b.yaml"


def test_the_rtx4090_holds_what_tune_computes():
    budget = card_budget(load_profile(RTX4090), load_trace(TRACE).meta)
    assert budget.max_slots == 2248  # tune --gpu-memory-gb 24's number for the same context
    assert budget.fits(2248) and not budget.fits(2249)
    assert budget.fits(round(0.25 * 6144))
    assert not budget.fits(round(0.5 * 6144)) and not budget.fits(round(0.75 * 6144))  # 27.0 and 40.5 GiB


def test_the_a6000_holds_every_shipped_cache_size():
    assert card_budget(load_profile(A6000), load_trace(TRACE).meta).fits(round(0.75 * 6144))


def test_no_card_size_or_no_preset_means_no_budget():
    assert card_budget(make_profile(), make_trace().meta) is None


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_the_summary_counts_only_cache_sizes_that_fit(mode):
    comparison = compare_strategies(
        load_trace(TRACE), load_profile(RTX4090), ratios=(0.25, 0.5, 0.75), strategies=("hybrimoe", "ktransformers"),
        mode=mode, max_tokens=8, prefill_tokens=4, references=False,
    )
    assert [comparison.fits(ratio) for ratio in comparison.ratios] == [True, False, False]
    fitting = comparison.vs_best_baseline("hybrimoe", 0.25)
    assert comparison.vs_best_baseline_range("hybrimoe") == (fitting, fitting)
