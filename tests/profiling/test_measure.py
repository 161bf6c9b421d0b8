import itertools

import pytest
import torch

from hybrimoe.config import CurvePoint
from hybrimoe.errors import UserError
from hybrimoe.profile import machine
from hybrimoe.profile.measure import (
    Background,
    ExpertPool,
    expert_timer,
    fill_weights,
    first_expert,
    host_read_gbps,
    interference,
    latency_curve,
    memcpy_stream,
    pool_size,
    torch_dtype,
    torch_threads,
)
from hybrimoe.profile.standins import DenseLayer, LayerOverhead
from hybrimoe.profile.timing import Budget, settle
from hybrimoe.runtime.kernels import expert_mlp
from hybrimoe.shapes import get_preset

from .conftest import TINY_BUDGET, TINY_CACHE_BYTES, TINY_SHAPE

CPU = torch.device("cpu")


def test_cache_sizes_are_read_from_sys(tmp_path):
    assert machine.parse_cache_size("307200K") == 300 * machine.MiB
    assert machine.parse_cache_size("32M") == 32 * machine.MiB
    assert machine.parse_cache_size("weird") is None
    for index, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "32M")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert machine.llc_bytes(tmp_path) == 32 * machine.MiB
    assert machine.llc_bytes(tmp_path / "missing") == machine.DEFAULT_LLC_BYTES


def test_settle_stops_when_the_median_settles_and_keeps_the_spread():
    times = itertools.cycle([1.0, 1.2])
    sample = settle(lambda: next(times), Budget(warmup=0, min_repeats=4, max_repeats=50, round_size=2, settle_rel=0.05))
    assert sample.n_repeats < 50
    assert sample.spread_ms == pytest.approx(0.2)
    assert 1.0 <= sample.median_ms <= 1.2
    capped = settle(lambda: 1.0, Budget().capped(3))
    assert capped.n_repeats == 3


def test_pool_rotates_past_the_cache_and_runs_the_runtime_kernel():
    assert pool_size(item_bytes=10, cache_bytes=100) == 20
    assert pool_size(item_bytes=10**9, cache_bytes=100) == 2
    pool = ExpertPool(TINY_SHAPE, torch.float32, CPU, TINY_CACHE_BYTES)
    assert pool.n_experts * TINY_SHAPE.expert_bytes >= 2 * TINY_CACHE_BYTES
    x = pool.tokens(3)
    gate_up, down = pool.weights["gate_up_proj"], pool.weights["down_proj"]
    # the runtime's kernel for 3 tokens: the native one where it runs, which sums in another order
    torch.testing.assert_close(pool.run(x), expert_mlp(x, gate_up[0], down[0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pool.run(x), expert_mlp(x, gate_up[1], down[1]), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(gate_up).all() and gate_up.abs().max() > 0


def test_fill_weights_covers_every_element():
    t = fill_weights(torch.full((3, (1 << 20) + 7), float("nan"), dtype=torch.bfloat16))
    assert torch.isfinite(t).all()


def test_expert_curve_doubles_tokens_and_stops_after_a_slow_point():
    """The curve's logic on fake timings (a real expert's wall time depends on the machine's load);
    the real timer is checked to give a positive time, never a speed."""
    fast = latency_curve(lambda n: (lambda: 0.01 * n), TINY_BUDGET)
    assert [p.n_tokens for p in fast] == [1, 2, 4, 8, 16]
    slow_from_4 = latency_curve(lambda n: (lambda: 100.0 if n >= 4 else 1.0), TINY_BUDGET)
    assert [p.n_tokens for p in slow_from_4] == [1, 2, 4]
    slow = latency_curve(lambda n: (lambda: 100.0), TINY_BUDGET)
    assert [p.n_tokens for p in slow] == [1, 2]  # two points, so the curve can be fitted
    assert isinstance(slow[0], CurvePoint)
    pool = ExpertPool(TINY_SHAPE, torch.float32, CPU, TINY_CACHE_BYTES)
    with torch.inference_mode():
        real = latency_curve(expert_timer(pool), TINY_BUDGET, counts=iter([1, 2]))
    assert [p.n_tokens for p in real] == [1, 2] and all(p.ms > 0 and p.spread_ms >= 0 for p in real)


def test_a_noisy_point_is_measured_again_and_the_steadier_kept():
    calls = {n: 0 for n in (1, 2)}

    def run(n_tokens):
        calls[n_tokens] += 1
        first_pass = calls[n_tokens] == 1
        timings = iter([1.0, 1.0, 20.0, 1.0] * 15) if first_pass and n_tokens == 1 else iter([1.0] * 60)
        return lambda: next(timings)

    curve = latency_curve(run, TINY_BUDGET, counts=iter([1, 2]))
    assert calls == {1: 2, 2: 1}  # only the noisy point again
    assert curve[0].spread_ms == 0.0


def test_first_expert_and_memory_bandwidth_measure():
    pool = ExpertPool(TINY_SHAPE, torch.float32, CPU, TINY_CACHE_BYTES)
    result = first_expert(pool, experts_per_layer=2, budget=TINY_BUDGET, gap_s=0.0)
    assert result.first.n_repeats >= 3 and result.later.n_repeats >= 3
    assert result.extra_ms >= 0.0
    assert host_read_gbps(TINY_CACHE_BYTES, TINY_BUDGET) > 0


def test_interference_runs_with_a_memcpy_stream():
    pool = ExpertPool(TINY_SHAPE, torch.float32, CPU, TINY_CACHE_BYTES)
    with torch.inference_mode():
        result = interference(pool, memcpy_stream(TINY_CACHE_BYTES), TINY_BUDGET, threads=1)
    assert result.cpu_alone.median_ms > 0 and result.cpu_busy.median_ms > 0
    assert result.stream_alone_gbps > 0 and result.stream_busy_gbps > 0
    assert result.cpu_slowdown > 0 and result.copy_slowdown > 0


def test_background_hands_its_error_to_the_foreground():
    def broken() -> int:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        with Background(broken):
            pass


def test_torch_threads_restores_the_setting():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_quantized_dtypes_are_refused_in_one_line():
    with pytest.raises(UserError, match="--dtype") as info:
        torch_dtype("int4")
    assert "\n" not in str(info.value)


def test_stand_ins_run_on_the_cpu():
    model = get_preset("demo")
    dense = DenseLayer(model, torch.float32, CPU, TINY_CACHE_BYTES, max_tokens=8)
    with torch.inference_mode():
        for n_tokens in (1, 8):
            x = dense.tokens(n_tokens)
            mask = dense.causal_mask(n_tokens)
            assert dense.run(x, mask).shape == (n_tokens, model.hidden_size)
        assert dense.causal_mask(1) is None
        assert dense.causal_mask(2).shape == (2, dense.context_tokens + 2)
        assert LayerOverhead(model, torch.float32, CPU).run().shape == (1, LayerOverhead.TINY)


def test_an_expert_loads_one_copy_per_weight_tensor():
    from hybrimoe.config import ExpertShape
    from hybrimoe.profile.measure import weight_bytes

    plain = ExpertShape(hidden_size=8, intermediate_size=4, dtype="bfloat16")
    assert weight_bytes(plain) == [2 * 4 * 8 * 2, 8 * 4 * 2]
    assert sum(weight_bytes(plain)) == plain.expert_bytes
    assert len(weight_bytes(ExpertShape(8, 4, "float32", has_bias=True))) == 4
