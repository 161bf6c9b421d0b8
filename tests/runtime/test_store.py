"""The expert store's slots and bookkeeping, and the executor refusing inconsistent plans."""

from __future__ import annotations


import pytest
import torch
from planners import RulePlanner
from tiny_models import tiny_model

from hybrimoe.policy.plan import SlotLoad
from hybrimoe.runtime.accelerator import CpuStandIn
from hybrimoe.runtime.generate import generate
from hybrimoe.runtime.hybrid import HybridRuntime
from hybrimoe.runtime.loading import from_model
from hybrimoe.runtime.store import ExpertStore


@pytest.fixture(scope="module")
def loaded():
    return from_model(tiny_model("gpt_oss"))


def test_loads_copy_experts_into_separate_slots(loaded):
    store = ExpertStore(loaded.layers, CpuStandIn(), capacity=2)
    assert store.load([SlotLoad((1, 3), 0), SlotLoad((2, 5), 1)]) == 2
    assert store.resident == [(1, 3), (2, 5)]
    assert store.slot_of == {(1, 3): 0, (2, 5): 1}
    host = loaded.layers[1].experts
    assert torch.equal(store.slots["gate_up_proj"][0], host.gate_up_proj[3])
    assert torch.equal(store.slots["down_proj_bias"][0], host.down_proj_bias[3])
    assert store.slots["gate_up_proj"][0].data_ptr() != host.gate_up_proj[3].data_ptr()
    store.load([SlotLoad((0, 7), 0)])  # evicts (1, 3)
    assert store.resident == [(0, 7), (2, 5)]
    assert store.slot_of == {(0, 7): 0, (2, 5): 1}
    assert store.expert_bytes == sum(t[0].nbytes for t in (host.gate_up_proj, host.down_proj,
                                                          host.gate_up_proj_bias, host.down_proj_bias))


def test_bad_slots_are_planner_bugs(loaded):
    store = ExpertStore(loaded.layers, CpuStandIn(), capacity=2)
    with pytest.raises(RuntimeError, match="slot 2 outside"):
        store.load([SlotLoad((0, 0), 2)])
    store.load([SlotLoad((0, 1), 0)])
    with pytest.raises(RuntimeError, match="planner bug"):
        store.check_resident(0, {2: 0}, [2])


class _Tamper:
    """Wraps a planner and breaks each plan with `edit`."""

    def __init__(self, inner, edit):
        self.inner, self.edit = inner, edit
        self.lookahead_layers = inner.lookahead_layers

    def initial_loads(self):
        return self.inner.initial_loads()

    def plan_layer(self, *args):
        return self.edit(self.inner.plan_layer(*args))

    def plan_prefetch(self, plan):
        return self.inner.plan_prefetch(plan)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p._replace(cpu=p.cpu[1:]), "are activated"),  # an expert dropped
        (lambda p: p._replace(gpu=p.gpu + p.cpu[:1], cpu=p.cpu[1:]), "planned from slot"),
    ],
)
def test_inconsistent_plans_raise(loaded, edit, message):
    planner = _Tamper(RulePlanner("cpu", 0, loaded.n_layers, loaded.n_experts), edit)
    ids = torch.randint(0, 256, (1, 4))
    with HybridRuntime(loaded, planner, CpuStandIn(), 0) as runtime:
        with pytest.raises(RuntimeError, match=message):
            generate(loaded.model, ids, torch.ones_like(ids), 1, on_step=runtime.end_step)


def test_hooks_are_removed_on_close(loaded):
    before = loaded.model.config._experts_implementation
    planner = RulePlanner("mixed", 4, loaded.n_layers, loaded.n_experts)
    with HybridRuntime(loaded, planner, CpuStandIn(), 4):
        assert loaded.model.config._experts_implementation == "hybrimoe"
    assert loaded.model.config._experts_implementation == before
    assert not any(layer.router._forward_hooks for layer in loaded.layers)


def test_host_experts_are_views_of_one_buffer_per_layer():
    model = tiny_model("gpt_oss")
    before = {name: p.detach().clone() for name, p in model.named_parameters() if ".experts." in name}
    loaded = from_model(model)
    pooled = loaded.host_experts
    assert len(pooled.buffers) == loaded.n_layers and not pooled.pinned
    weights_bytes = sum(p.nbytes for layer in loaded.layers for p in layer.experts.parameters())
    assert weights_bytes <= pooled.n_bytes < weights_bytes + 64 * 4 * loaded.n_layers  # only alignment
    for layer, buffer in zip(loaded.layers, pooled.buffers):
        start, stop = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
        for name, param in layer.experts.named_parameters():
            assert param.untyped_storage().data_ptr() == start, name  # a view, not its own allocation
            assert start <= param.data_ptr() and param.data_ptr() + param.nbytes <= stop
            assert param.data_ptr() % 64 == 0
    for name, param in model.named_parameters():
        if name in before:
            assert torch.equal(param, before[name]), name
    store = ExpertStore(loaded.layers, CpuStandIn(), capacity=1)
    assert store.host_layer(1)["down_proj"].untyped_storage().data_ptr() == pooled.buffers[1].data_ptr()
