"""Expert-slot capacity: flags over the profile's policy, capped by a memory budget."""

import pytest

from hybrimoe.errors import UserError
from hybrimoe.runtime.capacity import GIB, RESERVE_BYTES, resolve_capacity

BASE = dict(n_experts_total=100, expert_bytes=GIB // 10, dense_bytes=2 * GIB, policy_ratio=0.25,
            policy_source="the default policy")


def test_policy_ratio_is_the_default():
    capacity = resolve_capacity(**BASE)
    assert capacity.slots == 25 and "default policy" in capacity.source


def test_flags_override_the_policy():
    assert resolve_capacity(**BASE, cache_experts=7).slots == 7
    assert resolve_capacity(**BASE, cache_ratio=0.5).slots == 50
    with pytest.raises(UserError, match="not both"):
        resolve_capacity(**BASE, cache_experts=7, cache_ratio=0.5)
    with pytest.raises(UserError, match=r"\[0, 100\]"):
        resolve_capacity(**BASE, cache_experts=101)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        resolve_capacity(**BASE, cache_ratio=1.5)


def test_budget_caps_the_slots():
    budget = 2 * GIB + RESERVE_BYTES + GIB  # room for 10 experts of 0.1 GiB
    capacity = resolve_capacity(**BASE, budget_bytes=budget, budget_source="--gpu-memory-gb 4")
    assert capacity.slots == 10 and "capped" in capacity.source
    assert resolve_capacity(**BASE, cache_experts=3, budget_bytes=budget, budget_source="x").slots == 3


def test_impossible_budget_is_an_error():
    with pytest.raises(UserError, match="--gpu-memory-gb 2 is not enough"):
        resolve_capacity(**BASE, budget_bytes=2 * GIB, budget_source="--gpu-memory-gb 2")
