"""Expert-slot capacity: flags over the profile's policy, capped by a memory budget; the reserve's
arithmetic; the host-memory check."""

import pytest

from hybrimoe.errors import UserError
from hybrimoe.capacity import (
    GIB, MARGIN_BYTES, Reserve, activation_bytes, check_host_memory, reserve_for, resolve_capacity,
)
from hybrimoe.shapes import get_preset

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
    reserve = Reserve(kv_cache_bytes=GIB // 2, activation_bytes=GIB // 4)
    budget = 2 * GIB + reserve.total_bytes + GIB  # room for 10 experts of 0.1 GiB
    capacity = resolve_capacity(**BASE, budget_bytes=budget, budget_source="--gpu-memory-gb 4", reserve=reserve)
    assert capacity.slots == 10 and "capped" in capacity.source
    assert resolve_capacity(**BASE, cache_experts=3, budget_bytes=budget, budget_source="x",
                            reserve=reserve).slots == 3


def test_impossible_budget_is_an_error():
    with pytest.raises(UserError, match="--gpu-memory-gb 2 is not enough"):
        resolve_capacity(**BASE, budget_bytes=2 * GIB, budget_source="--gpu-memory-gb 2")


def test_reserve_is_the_kv_cache_at_full_length_plus_the_prefill_activations():
    shape = get_preset("qwen3-30b-a3b")  # 48 layers, 4 KV heads of 128, bfloat16
    reserve = reserve_for(shape, n_seqs=2, n_prompt_tokens=100, n_new_tokens=28)
    assert reserve.kv_cache_bytes == 2 * 48 * 4 * 128 * 2 * (2 * 128)  # keys and values of 2 x 128 tokens
    assert reserve.activation_bytes == activation_bytes(shape, 200, 2)
    assert reserve.margin_bytes == MARGIN_BYTES
    # activations grow with the prompt's tokens, the KV cache with every token; logits per sequence
    per_token = activation_bytes(shape, 201, 2) - activation_bytes(shape, 200, 2)
    assert activation_bytes(shape, 400, 2) - activation_bytes(shape, 200, 2) == 200 * per_token
    assert activation_bytes(shape, 200, 3) - activation_bytes(shape, 200, 2) == shape.vocab_size * 4
    longer = reserve_for(shape, n_seqs=2, n_prompt_tokens=100, n_new_tokens=1028)
    assert longer.kv_cache_bytes - reserve.kv_cache_bytes == shape.kv_cache_bytes(2 * 1000)
    assert longer.activation_bytes == reserve.activation_bytes
    # an 8k-token prompt of Qwen3-30B-A3B: about 0.75 GiB of KV cache, the activations of the same order
    prompt = reserve_for(shape, 1, 8192, 0)
    assert 0.7 < prompt.kv_cache_bytes / GIB < 0.8 and 0.1 < prompt.activation_bytes / GIB < 2


def test_a_longer_run_leaves_fewer_slots():
    shape = get_preset("qwen3-30b-a3b")
    expert_bytes, budget = shape.expert_shape().expert_bytes, 24 * GIB
    short, long = (reserve_for(shape, 1, n, 256) for n in (128, 32768))
    slots = [resolve_capacity(**{**BASE, "expert_bytes": expert_bytes, "dense_bytes": shape.dense_bytes,
                                 "n_experts_total": 48 * 128, "cache_ratio": 1.0},
                              budget_bytes=budget, budget_source="24 GB", reserve=r).slots for r in (short, long)]
    assert slots[0] > slots[1] > 0


def test_host_memory_check():
    check_host_memory(10 * GIB, 11 * GIB, "the weights")
    check_host_memory(10 * GIB, None, "the weights")  # unknown: not checked
    with pytest.raises(UserError, match="the weights need 10.0 GiB of host memory; this machine has 8.0 GiB"):
        check_host_memory(10 * GIB, 8 * GIB, "the weights")


def test_packed_experts_fit_more_slots_in_the_same_budget():
    shape = get_preset("qwen3-30b-a3b")
    reserve = reserve_for(shape, 1, 128, 128)
    slots = {}
    for quantize in (None, "int8", "int4"):
        expert_bytes = shape.quantized(quantize).expert_shape().expert_bytes
        slots[quantize] = resolve_capacity(
            **{**BASE, "expert_bytes": expert_bytes, "dense_bytes": shape.dense_bytes,
               "n_experts_total": 48 * 128, "cache_ratio": 1.0},
            budget_bytes=24 * GIB, budget_source="24 GB", reserve=reserve,
        ).slots
    room = 24 * GIB - shape.dense_bytes - reserve.total_bytes
    n_weights = 3 * 2048 * 768
    assert slots[None] == room // (2 * n_weights)
    assert slots["int8"] == room // (n_weights + n_weights // 128 * 4)
    assert slots["int4"] == min(48 * 128, room // (n_weights // 2 + n_weights // 128 * 2))  # bfloat16 scales
    assert slots["int4"] > slots["int8"] > 1.9 * slots[None]
