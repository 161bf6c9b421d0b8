"""The hybrid runtime computes what plain transformers computes, under every placement.

For each supported family, a tiny random float32 model: prefill logits (16+ tokens), the logits of
16 decode steps and the greedy tokens must match plain transformers (max |diff| <= 1e-4), under
cache capacity 0, partial and full; prefetch depth 0 and 2; forced all-CPU, all-accelerator and
mixed schedules; batch 1 and 2 (the second sequence left-padded). Every family runs two
configurations; Mixtral and DeepSeek-V2 run the whole matrix. The helpers take a device, so
test_cuda.py runs the same checks with the CUDA backend.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from planners import RulePlanner
from tiny_models import FAMILIES

from hybrimoe.runtime.accelerator import CpuStandIn, make_accelerator
from hybrimoe.runtime.executor import LayerExecutor
from hybrimoe.runtime.generate import generate
from hybrimoe.runtime.hybrid import HybridRuntime
from hybrimoe.runtime.loading import load_model

TOLERANCE = 1e-4
# bfloat16 checkpoints: on the CPU the hybrid runtime rounds exactly as transformers' grouped path
# does (bitwise equal here); on CUDA kernels may block their sums differently, so logits may differ
# by a few bfloat16 steps (0.016 at the tiny models' logit scale of about 3)
BF16_TOLERANCE = 0.1
N_NEW = 17  # the prefill's token, then 16 decode steps
CAPACITIES = ("zero", "partial", "full")


def _prompt(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 20] ids and mask; the second sequence has 16 real tokens after 4 pads."""
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, 256, (batch, 20), generator=gen)
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[1, :4] = 0
        mask[1, :4] = 0
    return ids, mask


@functools.cache
def _reference(path: str, batch: int, device: str = "cpu"):
    """Plain transformers (its default experts implementation on CPU, eager on CUDA)."""
    from transformers import AutoModelForCausalLM

    implementation = "eager" if device != "cpu" else None
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation=implementation).eval().to(device)
    ids, mask = (t.to(device) for t in _prompt(batch))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        prefill = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )
    return prefill, torch.stack(out.logits, dim=1), out.sequences[:, ids.shape[1]:]


@functools.cache
def _loaded(path: str, device: str = "cpu"):
    return load_model(path, device, with_tokenizer=False, show_progress=False)


def _run_hybrid(path: str, schedule: str, capacity: str, depth: int, batch: int, device: str = "cpu"):
    loaded = _loaded(path, device)
    n_total = loaded.n_layers * loaded.n_experts
    slots = {"zero": 0, "tight": 2, "partial": 5, "full": n_total}[capacity]
    planner = RulePlanner(schedule, slots, loaded.n_layers, loaded.n_experts, prefetch_depth=depth)
    ids, mask = (t.to(device) for t in _prompt(batch))
    accelerator = CpuStandIn() if device == "cpu" else make_accelerator(device)
    with HybridRuntime(loaded, planner, accelerator, slots) as runtime:
        out = generate(loaded.model, ids, mask, N_NEW, on_step=runtime.end_step, keep_logits=True)
    if depth:
        assert any(planner.predictions_seen), "the planner never saw lookahead predictions"
    return out, runtime.counters


def _max_diffs(path: str, schedule: str, capacity: str, depth: int, batch: int, device: str = "cpu"):
    ref_prefill, ref_steps, ref_tokens = _reference(path, batch, device)
    out, counters = _run_hybrid(path, schedule, capacity, depth, batch, device)
    mask = _prompt(batch)[1].bool().to(device)
    prefill_diff = (out.prefill_logits - ref_prefill).abs()[mask].max().item()
    step_diff = (torch.stack(out.step_logits, dim=1) - ref_steps).abs().max().item()
    return prefill_diff, step_diff, torch.equal(out.tokens, ref_tokens), counters


def _check(path, schedule, capacity, depth, batch, device="cpu", tolerance=TOLERANCE):
    prefill_diff, step_diff, same_tokens, counters = _max_diffs(path, schedule, capacity, depth, batch, device)
    assert prefill_diff <= tolerance, f"prefill logits differ by {prefill_diff}"
    assert step_diff <= tolerance, f"decode logits differ by {step_diff}"
    assert same_tokens
    if schedule == "cpu" or capacity == "zero":
        assert counters.accelerator_runs == 0
    if schedule == "accelerator" and capacity in ("partial", "full"):
        assert counters.accelerator_runs > 0.9 * counters.activations
    if schedule == "accelerator" and capacity == "tight":
        assert counters.accelerator_runs > 0
    if schedule == "mixed" and capacity != "zero":
        assert 0 < counters.cpu_runs < counters.activations
    if capacity in ("tight", "partial") and schedule != "cpu":
        assert counters.demand_loads > 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize(
    "schedule, capacity, depth, batch", [("mixed", "partial", 2, 2), ("accelerator", "full", 0, 1)]
)
def test_every_family_matches_transformers(checkpoint, family, schedule, capacity, depth, batch):
    _check(str(checkpoint(family)), schedule, capacity, depth, batch)


BF16_CASES = [("mixed", "partial", 2, 2), ("accelerator", "tight", 2, 2), ("cpu", "zero", 0, 1)]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "gpt_oss"])
@pytest.mark.parametrize("schedule, capacity, depth, batch", BF16_CASES)
def test_bfloat16_matches_transformers(bf16_checkpoint, family, schedule, capacity, depth, batch):
    path = str(bf16_checkpoint(family))
    assert _loaded(path).expert_shape.dtype == "bfloat16"
    _check(path, schedule, capacity, depth, batch, tolerance=BF16_TOLERANCE)


_MATRIX = list(itertools.product(("cpu", "accelerator", "mixed"), CAPACITIES, (0, 2), (1, 2)))


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])
@pytest.mark.parametrize("schedule, capacity, depth, batch", _MATRIX)
def test_configuration_matrix_matches_transformers(checkpoint, family, schedule, capacity, depth, batch):
    _check(str(checkpoint(family)), schedule, capacity, depth, batch)


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_slots_reused_every_layer_match_transformers(checkpoint, family):
    """Two slots for up to eight experts a layer: loads evict what the previous layer used."""
    _check(str(checkpoint(family)), "accelerator", "tight", 2, 2)


def test_a_routing_weight_mixup_is_caught(checkpoint, monkeypatch):
    """The released prototype gave CPU experts other experts' weights; this suite must notice."""
    original = LayerExecutor._run_cpu

    def mixed_up(self, layer, experts, x_h, weights_h, *rest):
        return original(self, layer, experts, x_h, weights_h.roll(1, dims=-1), *rest)

    monkeypatch.setattr(LayerExecutor, "_run_cpu", mixed_up)
    prefill_diff, step_diff, _, _ = _max_diffs(str(checkpoint("mixtral")), "mixed", "partial", 0, 1)
    assert max(prefill_diff, step_diff) > 100 * TOLERANCE


@pytest.mark.parametrize("family, ratio", [("qwen3_moe", 0.25), ("deepseek_v3", 0.5), ("gpt_oss", 0.25)])
def test_product_planner_matches_transformers(checkpoint, family, ratio):
    """The policy core's HybriMoE planner (MRS cache, impact prefetch) through `build_planner`."""
    from hybrimoe.config import PolicyConfig
    from hybrimoe.runtime.planning import build_planner, model_shape
    from hybrimoe.run import default_profile

    path = str(checkpoint(family))
    loaded = _loaded(path)
    slots = round(ratio * loaded.n_layers * loaded.n_experts)
    profile = default_profile(model_shape(loaded, family))
    planner = build_planner("hybrimoe", loaded, profile, PolicyConfig(prefetch_depth=2), slots)
    ids, mask = _prompt(2)
    with HybridRuntime(loaded, planner, CpuStandIn(), slots) as runtime:
        out = generate(loaded.model, ids, mask, N_NEW, on_step=runtime.end_step, keep_logits=True)
    _, ref_steps, ref_tokens = _reference(path, 2)
    assert (torch.stack(out.step_logits, dim=1) - ref_steps).abs().max().item() <= TOLERANCE
    assert torch.equal(out.tokens, ref_tokens)
    assert runtime.counters.accelerator_runs > 0


_BASELINES = [  # (strategy, cache policy, n_layers -> baseline settings that make its copies happen in 17 steps)
    ("ktransformers-dynamic", "mrs", lambda n_layers: {"refresh_steps": 1, "refresh_decay": 0.5}),
    ("ktransformers-front", "mrs", lambda n_layers: {}),
    ("llamacpp-lru", "mrs", lambda n_layers: {"lru_inserts": 2}),
    ("llamacpp-lru", "mrs", lambda n_layers: {"lru_inserts": 1, "lru_cpu_layers": n_layers - 1}),
    ("gpu-offload", "mrs", lambda n_layers: {"eviction": "least-stale"}),
    ("hybrimoe", "least-stale", lambda n_layers: {}),
]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])
@pytest.mark.parametrize("strategy, cache_policy, settings", _BASELINES)
def test_new_baselines_match_transformers(checkpoint, family, strategy, cache_policy, settings):
    """The peers' mechanisms (refreshes, LRU uploads, Least-Stale eviction) through the runtime."""
    import numpy as np

    from hybrimoe.config import PolicyConfig
    from hybrimoe.policy.costs import CostModel
    from hybrimoe.policy.strategies import BaselineParams, ModelDims, make_planner
    from hybrimoe.runtime.planning import model_shape
    from hybrimoe.run import default_profile

    path = str(checkpoint(family))
    loaded = _loaded(path)
    settings = settings(loaded.n_layers)
    # half the experts; three quarters where whole layers are resident, so some slots remain for the LRU
    slots = loaded.n_layers * loaded.n_experts * (3 if "lru_cpu_layers" in settings else 2) // 4
    dims = ModelDims(loaded.n_layers, loaded.n_experts, loaded.top_k)
    costs = CostModel(default_profile(model_shape(loaded, family)))
    frequencies = np.random.default_rng(0).integers(0, 50, (loaded.n_layers, loaded.n_experts)).astype(float)
    planner = make_planner(strategy, dims, costs, PolicyConfig(cache_policy=cache_policy, prefetch_depth=2), slots,
                           frequencies, BaselineParams(**settings))
    ids, mask = _prompt(2)
    with HybridRuntime(loaded, planner, CpuStandIn(), slots) as runtime:
        out = generate(loaded.model, ids, mask, N_NEW, before_step=runtime.begin_step, on_step=runtime.end_step,
                       keep_logits=True)
    ref_prefill, ref_steps, ref_tokens = _reference(path, 2)
    assert (out.prefill_logits - ref_prefill).abs()[mask.bool()].max().item() <= TOLERANCE
    assert (torch.stack(out.step_logits, dim=1) - ref_steps).abs().max().item() <= TOLERANCE
    assert torch.equal(out.tokens, ref_tokens)
    assert runtime.counters.accelerator_runs > 0
    assert (runtime.counters.cpu_runs > 0) == (strategy != "gpu-offload")
    if strategy in ("ktransformers-dynamic", "llamacpp-lru", "gpu-offload"):
        assert runtime.counters.prefetch_loads + runtime.counters.demand_loads > 0  # its copies ran


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])
def test_bfloat16_models_agree_with_transformers(family):
    """bfloat16 weights; DeepSeek's router hands float32 weights to bfloat16 experts."""
    import copy

    from tiny_models import tiny_model

    from hybrimoe.runtime.loading import from_model

    reference = tiny_model(family).to(torch.bfloat16)
    loaded = from_model(copy.deepcopy(reference))
    ids, mask = _prompt(2)
    ref = generate(reference, ids, mask, 8, keep_logits=True)
    planner = RulePlanner("mixed", 5, loaded.n_layers, loaded.n_experts, prefetch_depth=2)
    with HybridRuntime(loaded, planner, CpuStandIn(), 5) as runtime:
        out = generate(loaded.model, ids, mask, 8, on_step=runtime.end_step, keep_logits=True)
    scale = ref.prefill_logits.abs().max().item()
    assert (out.prefill_logits - ref.prefill_logits).float().abs()[mask.bool()].max().item() <= 0.02 * scale
    assert out.prefill_logits.dtype == torch.bfloat16


def test_demo_model_matches_transformers():
    """The embedded demo model (a trained Qwen2-MoE), with the product planner at a 25% cache."""
    from hybrimoe.config import PolicyConfig
    from hybrimoe.demo import demo_model_path
    from hybrimoe.errors import ModelError
    from hybrimoe.runtime.planning import build_planner, model_shape
    from hybrimoe.run import default_profile

    try:
        path = str(demo_model_path())
    except ModelError:
        pytest.skip("this checkout has no demo model")
    loaded = _loaded(path)
    slots = loaded.n_layers * loaded.n_experts // 4
    planner = build_planner("hybrimoe", loaded, default_profile(model_shape(loaded, "demo")), PolicyConfig(), slots)
    ids, mask = _prompt(2)
    with HybridRuntime(loaded, planner, CpuStandIn(), slots) as runtime:
        out = generate(loaded.model, ids, mask, N_NEW, on_step=runtime.end_step, keep_logits=True)
    ref_prefill, ref_steps, ref_tokens = _reference(path, 2)
    assert (out.prefill_logits - ref_prefill).abs()[mask.bool()].max().item() <= TOLERANCE
    assert (torch.stack(out.step_logits, dim=1) - ref_steps).abs().max().item() <= TOLERANCE
    assert torch.equal(out.tokens, ref_tokens)
