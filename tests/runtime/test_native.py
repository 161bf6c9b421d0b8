"""The native CPU kernels (`runtime/native/`) compute what torch's do, run where they should, and
step aside everywhere else (the fallback path stays exact and tested)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybrimoe.runtime import native
from hybrimoe.runtime.kernels import expert_mlp, packed_expert_mlp, stacked_expert_mlp
from hybrimoe.runtime.quantized import dense_experts, quantize_stack, runs_packed_kernel

REPO = Path(__file__).resolve().parents[2]
needs_native = pytest.mark.skipif(
    not native.available(torch.float32), reason="the native kernels are not built here or the CPU lacks AVX-512"
)
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to the output's largest value


def _experts(dtype: torch.dtype, d: int, i: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "gate_up_proj": (torch.randn(n, 2 * i, d, generator=gen) / d**0.5).to(dtype),  # [N, 2I, D]
        "down_proj": (torch.randn(n, d, i, generator=gen) / i**0.5).to(dtype),  # [N, D, I]
    }


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    scale = expected.float().abs().max().item()
    assert (actual.float() - expected.float()).abs().max().item() <= TOLERANCES[dtype] * scale


def _within_a_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """`expected` to one rounding of its dtype at its largest value: the same products, but torch
    picks its packed kernels' blocking by CPU (on an AMD Zen 4 an intermediate value in a few
    thousand rounds the other way, and the output moves by a rounding of its own size)."""
    largest = expected.float().abs().max()
    assert (actual.float() - expected.float()).abs().max() <= torch.finfo(expected.dtype).eps * largest


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d, i", [(256, 128), (200, 72)])  # the second has tails shorter than a vector
@pytest.mark.parametrize("n_tokens", [1, 3, 4, 7])  # 7: two passes over each weight row
def test_experts_match_torch(dtype, d, i, n_tokens):
    if not native.available(dtype):
        pytest.skip(f"this CPU has no native {dtype} kernel")
    weights = _experts(dtype, d, i, n=6)
    gen = torch.Generator().manual_seed(n_tokens)
    x = torch.randn(n_tokens, d, generator=gen).to(dtype)  # [T, D]
    ids = np.stack([np.random.default_rng(t).choice(6, 2, replace=False) for t in range(n_tokens)])  # [T, 2]
    topk_weights = torch.rand(n_tokens, 2, generator=gen)  # [T, 2]
    expected = torch.zeros(n_tokens, d)
    for t in range(n_tokens):
        for j, e in enumerate(ids[t]):
            y = expert_mlp(x[t : t + 1], weights["gate_up_proj"][e], weights["down_proj"][e])
            expected[t] += (y * topk_weights[t, j]).float()[0]
    order = np.argsort(ids.reshape(-1), kind="stable")  # pairs grouped by expert
    experts, counts = np.unique(ids.reshape(-1), return_counts=True)
    out = torch.zeros(n_tokens, d)
    native.add_experts(out, x, order // 2, topk_weights.reshape(-1)[torch.from_numpy(order)], experts,
                       np.cumsum(counts), weights)
    _close(out, expected, dtype)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 256, 96), (4, 200, 33), (2, 3, 7, 64)])  # [..., K] -> O
def test_linear_matches_torch(dtype, bias, shape):
    if not native.available(dtype):
        pytest.skip(f"this CPU has no native {dtype} kernel")
    *lead, k, o = shape
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(*lead, k, generator=gen).to(dtype)
    weight = (torch.randn(o, k, generator=gen) / k**0.5).to(dtype)
    b = torch.randn(o, generator=gen).to(dtype) if bias else None
    out = native.linear(x, weight, b)
    assert out.shape == (*lead, o) and out.dtype == dtype
    _close(out, F.linear(x, weight, b), dtype)


@needs_native
def test_native_linears_serve_decode_and_step_aside():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8, bias=False)).eval()
    installed = native.NativeLinears(model)
    calls = []
    real = native.linear
    native.linear = lambda *a: calls.append(a[0].shape) or real(*a)
    try:
        with torch.inference_mode():
            many_tokens = native.max_tokens(native._DENSE, torch.float32) + 1
            few, many = torch.randn(2, 64), torch.randn(many_tokens, 64)
            expected = F.linear(F.linear(few, model[0].weight, model[0].bias), model[1].weight)
            _close(model(few), expected, torch.float32)
            assert len(calls) == 2  # both layers, at two tokens
            model(many)
            assert len(calls) == 2  # more tokens than the kernel serves: torch's
        with torch.enable_grad():
            model(torch.randn(2, 64)).sum().backward()  # training keeps torch's (autograd)
        assert len(calls) == 2
    finally:
        native.linear = real
    installed.remove()
    assert "forward" not in vars(model[0]) and "forward" not in vars(model[1])


def test_the_runtime_runs_native_kernels_and_the_fallback_stays_exact(monkeypatch, checkpoint):
    """The exactness check of test_exactness, once with the native kernels (which must really run
    where this CPU has them) and once with HYBRIMOE_NATIVE=0 (which must not run them)."""
    from test_exactness import TOLERANCE, _max_diffs

    path = str(checkpoint("qwen3_moe"))
    for enabled in (True, False):
        monkeypatch.setenv("HYBRIMOE_NATIVE", "1" if enabled else "0")
        native._library.cache_clear()
        calls = {"experts": 0, "linear": 0}
        real_experts, real_linear = native.add_experts, native.linear

        def count(name, real):
            def wrapped(*args):
                calls[name] += 1
                return real(*args)
            return wrapped

        monkeypatch.setattr(native, "add_experts", count("experts", real_experts))
        monkeypatch.setattr(native, "linear", count("linear", real_linear))
        prefill_diff, step_diff, same_tokens, _ = _max_diffs(path, "mixed", "partial", 2, 1)
        assert prefill_diff <= TOLERANCE and step_diff <= TOLERANCE and same_tokens
        if enabled and native.available(torch.float32):
            assert calls["experts"] > 0 and calls["linear"] > 0
        if not enabled:
            assert calls == {"experts": 0, "linear": 0}
        monkeypatch.undo()
    native._library.cache_clear()


def test_bench_cpu_kernels_small_runs():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_cpu_kernels.py"), "--small", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "tokens/expert" in out.stdout


def test_bench_cpu_peer_says_how_to_build_llama_cpp(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_cpu_peer.py"), "--llama-cpp", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode != 0
    assert "build.sh" in out.stderr and "LLAMA_CPP_DIR" in out.stderr


def _packed(dtype: torch.dtype, quantize: str, d: int, i: int, group_size: int) -> dict[str, torch.Tensor]:
    """Six experts quantized as `quantize_experts` does: packed stacks, no dense ones."""
    packed = {}
    for name, stack in _experts(dtype, d, i, n=6).items():
        packed[f"{name}_qdata"], packed[f"{name}_scale"] = quantize_stack(stack, quantize, group_size, transposed=False)
    return packed


@needs_native
@pytest.mark.parametrize("quantize, dtype, d, i, group_size", [
    ("int8", torch.float32, 256, 128, 64),
    ("int8", torch.float32, 200, 80, 40),  # rows and groups that are not whole vectors
    ("int8", torch.bfloat16, 256, 128, 32),
    ("int8", torch.bfloat16, 200, 80, 40),
    ("int4", torch.bfloat16, 256, 128, 64),
    ("int4", torch.bfloat16, 128, 192, 32),
    ("int4", torch.float32, 256, 128, 64),
])
@pytest.mark.parametrize("n_tokens", [1, 4])
def test_packed_experts_match_torchs_packed_kernels(quantize, dtype, d, i, group_size, n_tokens):
    if native.max_tokens({"int8": native._INT8, "int4": native._INT4}[quantize], dtype) == 0:
        pytest.skip(f"this CPU's kernels do not serve {quantize} experts with {dtype} activations")
    weights = _packed(dtype, quantize, d, i, group_size)
    gen = torch.Generator().manual_seed(n_tokens)
    x = torch.randn(n_tokens, d, generator=gen).to(dtype)  # [T, D]
    assert native.runs(weights, x, n_tokens, standard_gate=True)
    for expert in range(6):  # one expert: what torch's packed matmuls give (int4 to a rounding, as torch rounds it)
        expected = packed_expert_mlp(x, weights, expert) if runs_packed_kernel(weights, x) else None
        actual = stacked_expert_mlp(x, weights, expert)
        reference = expert_mlp(x, *(w[0] for w in dense_experts(
            {name: stack[expert : expert + 1] for name, stack in weights.items()}, slice(None), dtype, transposed=False)))
        _close(actual, reference, dtype)
        if quantize == "int4" and native.instruction_set(dtype) == "avx512":  # the same products, in bfloat16
            _within_a_rounding(actual, expected)
        elif expected is not None:
            _close(actual, expected, dtype)


@needs_native
@pytest.mark.parametrize("reason, quantize, dtype, d, i, group_size", [
    ("int4 with float32 activations keeps torch's kernel on AVX-512", "int4", torch.float32, 256, 128, 64),
    ("groups under 32", "int8", torch.float32, 256, 128, 16),
    ("int4 rows not in whole blocks (80 of 32 or 64)", "int4", torch.bfloat16, 80, 80, 40),
])
def test_packed_experts_the_native_kernel_does_not_read_stay_with_torch(
    only_isa, reason, quantize, dtype, d, i, group_size
):
    if "AVX-512" in reason:
        only_isa("avx512")
    weights = _packed(dtype, quantize, d, i, group_size)
    assert not native.runs(weights, torch.randn(1, d).to(dtype), 1, standard_gate=True), reason


@pytest.fixture
def only_isa(monkeypatch):
    """only_isa("avx2") allows only that instruction set's kernels until the test ends."""
    def only(isa: str) -> None:
        monkeypatch.setenv("HYBRIMOE_NATIVE", isa)
        native._library.cache_clear()

    yield only
    monkeypatch.undo()
    native._library.cache_clear()


@needs_native
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_instruction_set_matches_torch(only_isa, isa, dtype):
    """Where the CPU runs both, the AVX2 kernels are tested as well as the AVX-512 ones."""
    only_isa(isa)
    if native.instruction_set(dtype) != isa:
        pytest.skip(f"this CPU has no {isa} kernel for {dtype}")
    test_experts_match_torch(dtype, 200, 72, 3)
    test_linear_matches_torch(dtype, True, (4, 200, 33))
    test_packed_experts_match_torchs_packed_kernels("int8", dtype, 200, 80, 40, 3)
