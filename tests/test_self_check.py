"""The device kernels' first-use check (kernels/self_check.py) in the dispatch of kernels/__init__.py: a kernel
that matches the reference on the device is used, one that disagrees or fails to launch is replaced by the
MLX-ops path (with a warning, once), and MLX_QWEN35_NO_DEVICE_KERNELS keeps them all off. The device is
faked (mx.metal.is_available -> True) and the kernels are the exact Metal sources run in CPU emulation; every
result is compared with the float64 NumPy recurrence."""

import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen35 import kernels
from mlx_qwen35.kernels import self_check
from mlx_qwen35.kernels.metal import STEP, step_launch
from mlx_qwen35.kernels.metal_chunked import CHUNKED, chunked_launch
from mlx_qwen35.kernels.metal_decode import DECODE, decode_launch
from mlx_qwen35.kernels.metal_emulation import emulate
from delta_reference import (bfloat16_decode_inputs, check_decode_step, mx_inputs, numpy_fused_decode,
                             numpy_recurrence, random_decode_inputs, random_inputs, rel)


@pytest.fixture
def metal(monkeypatch, request):
    """A pretend Metal device whose kernels run in emulation; returns the list of kernel names launched. On a
    machine with CUDA, the CUDA kernels are kept out and the MLX-ops references run on the CPU (MLX's CUDA
    matmuls round float32 through TF32, 5e-4 from float64 where these tests hold 1e-5)."""
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    request.addfinalizer(lambda: mx.set_default_device(device))
    monkeypatch.setattr(self_check, "_verdicts", {})
    monkeypatch.delenv("MLX_QWEN35_NO_DEVICE_KERNELS", raising=False)
    launches = []

    def emulated(spec, launch_fn):
        def run(*args):
            launch = launch_fn(*args)
            launches.append(spec.name)
            return [mx.array(o).astype(d) for o, d in zip(emulate(spec, **launch), launch["output_dtypes"])]
        return run

    monkeypatch.setattr(kernels, "gated_delta_chunked_metal", emulated(CHUNKED, chunked_launch))
    monkeypatch.setattr(kernels, "gated_delta_step_metal", emulated(STEP, step_launch))
    monkeypatch.setattr(kernels, "fused_decode_step_metal", emulated(DECODE, decode_launch))
    return launches


def check_scan(y, state, inputs):
    expected_y, expected_state = numpy_recurrence(*inputs)
    assert rel(np.array(y), expected_y) <= 1e-5 and rel(np.array(state), expected_state) <= 1e-5


def test_kernels_that_pass_the_check_are_used_and_checked_once_per_shape(metal):
    prompt = random_inputs(1, 40, 2, 4, 32, seed=1, padded=True)
    check_scan(*kernels.gated_delta_update(*mx_inputs(prompt)), prompt)
    check_scan(*kernels.gated_delta_update(*mx_inputs(prompt)), prompt)
    step = random_inputs(2, 1, 1, 2, 32, seed=2)
    check_scan(*kernels.gated_delta_update(*mx_inputs(step)), step)
    # the chunked kernel: its check, then two calls; the step kernel: its check, then one call
    assert metal == [CHUNKED.name] * 3 + [STEP.name] * 2
    decode = random_decode_inputs(2, 1, 2, 32, seed=3)
    check_decode_step([np.array(x) for x in kernels.fused_decode_step(*mx_inputs(decode))], decode)
    assert metal[-2:] == [DECODE.name] * 2


def test_a_bfloat16_decode_kernel_passes_its_check(metal):
    """In bfloat16 (the model's dtype on a GPU) the kernel and the MLX-ops reference round differently, by a
    few bfloat16 steps (7e-3 apart on a real CUDA device); the check must tell that from a wrong kernel and use
    the kernel. Its result is float64's of the rounded inputs within bfloat16 rounding."""
    inputs = random_decode_inputs(2, 1, 2, 32, 32, seed=6)
    bf16, rounded = bfloat16_decode_inputs(inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out, conv_state, state = kernels.fused_decode_step(*bf16)
    assert metal == [DECODE.name] * 2  # its check, then the call
    want_out, want_conv, want_state = numpy_fused_decode(*rounded)
    assert out.dtype == mx.bfloat16 and rel(np.array(out.astype(mx.float32)), want_out) <= 5e-3
    np.testing.assert_array_equal(np.array(conv_state.astype(mx.float32)), want_conv)
    assert rel(np.array(state), want_state) <= 1e-3


def test_a_kernel_wrong_by_a_few_percent_in_bfloat16_is_still_replaced(metal, monkeypatch):
    kernel, calls = wrong(kernels.fused_decode_step_reference, factor=1.05)
    monkeypatch.setattr(kernels, "fused_decode_step_metal", kernel)
    inputs = random_decode_inputs(2, 1, 2, 32, 32, seed=6)
    bf16, _ = bfloat16_decode_inputs(inputs)
    with pytest.warns(RuntimeWarning, match="Metal fused decode kernel failed its first-use check"):
        kernels.fused_decode_step(*bf16)
    assert len(calls) == 1


def wrong(result, factor=1.01):
    """A kernel that returns its reference's outputs with the first one `factor` off (1%)."""
    calls = []

    def kernel(*args):
        calls.append(1)
        first, *rest = result(*args)
        return (first * factor, *rest)
    return kernel, calls


def test_a_kernel_that_disagrees_is_replaced_by_the_mlx_ops_path(metal, monkeypatch):
    kernel, calls = wrong(kernels.gated_delta_chunked)
    monkeypatch.setattr(kernels, "gated_delta_chunked_metal", kernel)
    prompt = random_inputs(1, 40, 1, 2, 32, seed=4)
    with pytest.warns(RuntimeWarning, match="Metal chunked kernel failed its first-use check"):
        check_scan(*kernels.gated_delta_update(*mx_inputs(prompt)), prompt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        check_scan(*kernels.gated_delta_update(*mx_inputs(prompt)), prompt)
    assert len(calls) == 1  # only the check ran it
    # the step kernel, which passes, takes the prompt instead
    assert metal == [STEP.name] * 3

    decoder, decode_calls = wrong(kernels.fused_decode_step_reference)
    monkeypatch.setattr(kernels, "fused_decode_step_metal", decoder)
    decode = random_decode_inputs(1, 1, 2, 32, seed=5)
    with pytest.warns(RuntimeWarning, match="Metal fused decode kernel"):
        outputs = kernels.fused_decode_step(*mx_inputs(decode))
    check_decode_step([np.array(x) for x in outputs], decode)
    assert len(decode_calls) == 1


def test_a_kernel_that_cannot_launch_is_replaced(metal, monkeypatch):
    def broken(*args):
        raise RuntimeError("Unable to build metal library")

    monkeypatch.setattr(kernels, "gated_delta_chunked_metal", broken)
    monkeypatch.setattr(kernels, "gated_delta_step_metal", broken)
    prompt = random_inputs(1, 20, 1, 1, 64, seed=6)
    with pytest.warns(RuntimeWarning, match="Unable to build metal library"):
        check_scan(*kernels.gated_delta_update(*mx_inputs(prompt)), prompt)


def test_the_environment_switch_keeps_every_kernel_off(metal, monkeypatch):
    monkeypatch.setenv("MLX_QWEN35_NO_DEVICE_KERNELS", "1")
    prompt = random_inputs(1, 40, 1, 2, 32, seed=7)
    check_scan(*kernels.gated_delta_update(*mx_inputs(prompt)), prompt)
    decode = random_decode_inputs(1, 1, 2, 32, seed=8)
    kernels.fused_decode_step(*mx_inputs(decode))
    assert metal == [] and not kernels.fused_decode_enabled()


def test_mismatch_names_what_differs():
    a = mx.ones((2, 3))
    assert self_check.mismatch((a,), (a,)) is None
    assert "relative error" in self_check.mismatch((a * 1.01,), (a,))
    assert "relative error" in self_check.mismatch((a * np.nan,), (a,))
    assert "expected (2, 3)" in self_check.mismatch((a[:1],), (a,))
    assert "bfloat16" in self_check.mismatch((a.astype(mx.bfloat16),), (a,))


def test_gradients_through_a_device_kernel_are_the_mlx_ops_paths(metal):
    """Custom kernels have no vjp: the dispatch gives them the MLX-ops path's, so training on a GPU works."""
    q, k, v, g, beta, state, mask = mx_inputs(random_inputs(1, 40, 1, 2, 32, seed=9, padded=True))
    weights = mx.random.normal((1, 40, 2, 32), key=mx.random.key(3))

    def loss(scan, v, g, state):
        y, final = scan(q, k, v, g, beta, state, mask)
        return (y * weights).sum() + final.sum()

    got = mx.grad(lambda *a: loss(kernels.gated_delta_update, *a), argnums=(0, 1, 2))(v, g, state)
    want = mx.grad(lambda *a: loss(kernels.gated_delta_recurrent, *a), argnums=(0, 1, 2))(v, g, state)
    assert metal == [CHUNKED.name] * 2  # the forward ran the (emulated) kernel
    for a, b in zip(got, want):
        assert rel(np.array(a), np.array(b)) <= 1e-5
