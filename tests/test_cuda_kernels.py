"""The CUDA kernels of mlx_qwen35/kernels/cuda.py (the Metal bodies under a CUDA dialect header) against
float64 NumPy: compiled as MLX's CUDA backend would build them, against metal_emulation/cuda_shim.h (CUDA's
thread indices, warp shuffles and __syncthreads on the emulator's fibers), and on a real CUDA device
through mx.fast.cuda_kernel when MLX's CUDA backend is present."""

import mlx.core as mx
import numpy as np
import pytest
from delta_reference import (check_decode_step, check_step_kernel, mx_inputs, random_decode_inputs, random_inputs,
                             rel, to_mx)
from test_metal_decode import deltanet, prefilled_twins

from mlx_qwen35.kernels.cuda import (
    DECODE_CUDA,
    DIALECT,
    STEP_CUDA,
    cuda_source,
    fused_decode_step_cuda,
    gated_delta_step_cuda,
)
from mlx_qwen35.kernels.metal import STEP, step_launch
from mlx_qwen35.kernels.metal_decode import DECODE, decode_launch
from mlx_qwen35.kernels.metal_emulation import emulate

needs_cuda = pytest.mark.skipif(not mx.cuda.is_available(), reason="no CUDA device (MLX's CUDA backend)")


def test_cuda_kernels_are_the_metal_bodies():
    for cuda, metal, scalar in ((STEP_CUDA, STEP, "T"), (DECODE_CUDA, DECODE, "eps")):
        assert cuda.source == metal.source and cuda.output_names == metal.output_names
        assert cuda.input_names == [f"{n}_scalar" if n == scalar else n for n in metal.input_names]
        assert cuda.header.startswith(DIALECT) and f"#define {scalar} (*{scalar}_scalar)" in cuda.header
    with pytest.raises(ValueError, match="not an input"):
        cuda_source(STEP, scalars=("eps",))


def step_emulated(inputs):
    return emulate(STEP_CUDA, dialect="cuda", **step_launch(*map(to_mx, inputs)))


def step_cuda(inputs):
    with mx.stream(mx.gpu):
        return [np.array(x) for x in gated_delta_step_cuda(*map(to_mx, inputs))]


STEP_RUNNERS = [pytest.param(step_emulated, id="emulated"), pytest.param(step_cuda, id="cuda", marks=needs_cuda)]


@pytest.mark.parametrize("run", STEP_RUNNERS)
@pytest.mark.parametrize("B,T,Hk,Hv,D", [(1, 1, 1, 1, 64), (3, 2, 1, 4, 128), (1, 65, 2, 4, 64),
                                         (3, 63, 1, 2, 128)])
@pytest.mark.parametrize("variant", ["random-state", "zero-state", "padded"])
def test_step_kernel_matches_float64(run, B, T, Hk, Hv, D, variant):
    check_step_kernel(run, B, T, Hk, Hv, D, variant)


def decode_emulated(inputs):
    return emulate(DECODE_CUDA, dialect="cuda", **decode_launch(*mx_inputs(inputs)))


def decode_cuda(inputs):
    with mx.stream(mx.gpu):
        return [np.array(x) for x in fused_decode_step_cuda(*mx_inputs(inputs))]


DECODE_RUNNERS = [pytest.param(decode_emulated, id="emulated"),
                  pytest.param(decode_cuda, id="cuda", marks=needs_cuda)]


@pytest.mark.parametrize("run", DECODE_RUNNERS)
@pytest.mark.parametrize("B,Hk,Hv,Dk,Dv,K", [(1, 1, 1, 64, 64, 4), (3, 2, 4, 128, 128, 4),
                                             (2, 2, 4, 32, 48, 2), (1, 1, 2, 256, 16, 3)])
@pytest.mark.parametrize("zero_state", [False, True], ids=["random-state", "zero-state"])
def test_decode_step_matches_float64(run, B, Hk, Hv, Dk, Dv, K, zero_state):
    inputs = random_decode_inputs(B, Hk, Hv, Dk, Dv, K, seed=B + 10 * Hv + Dk + Dv, zero_state=zero_state)
    check_decode_step(run(inputs), inputs)


def test_cuda_entry_points_refuse_without_cuda():
    if mx.cuda.is_available():
        pytest.skip("CUDA is present")
    inputs = random_inputs(1, 2, 1, 1, 64, seed=0)
    with pytest.raises(RuntimeError, match="needs MLX's CUDA backend"):
        gated_delta_step_cuda(*map(to_mx, inputs))


def test_model_dispatch_with_cuda_on_runs_both_kernels(monkeypatch):
    """With CUDA_KERNELS on a CUDA device, a DeltaNet layer's decode step is one DECODE_CUDA launch and a short
    prompt's scan one STEP_CUDA launch (emulated here), matching the MLX-ops paths."""
    from mlx_qwen35 import kernels
    from mlx_qwen35.kernels import self_check

    layer = deltanet()
    cache, twin = prefilled_twins(layer, 2, 5, mx.float32)
    x = mx.random.normal((2, 1, 96))
    expected = layer(x, twin)
    prompt = mx.random.normal((2, 6, 96))
    expected_prompt = layer(prompt, None)
    launches = []

    def emulated(spec, launch_fn):
        def run(*args):
            launch = launch_fn(*args)
            launches.append(spec.name)
            return [mx.array(o).astype(d) for o, d in
                    zip(emulate(spec, dialect="cuda", **launch), launch["output_dtypes"])]
        return run

    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "CUDA_KERNELS", True)
    monkeypatch.setattr(self_check, "_verdicts", {})
    monkeypatch.setattr(kernels, "fused_decode_step_cuda", emulated(DECODE_CUDA, decode_launch))
    monkeypatch.setattr(kernels, "gated_delta_step_cuda", emulated(STEP_CUDA, step_launch))
    got = layer(x, cache)
    got_prompt = layer(prompt, None)
    # each kernel: its first-use check, then the layer's call
    assert launches == [DECODE_CUDA.name] * 2 + [STEP_CUDA.name] * 2
    assert rel(np.array(got), np.array(expected)) <= 1e-5
    assert rel(np.array(cache[1]), np.array(twin[1])) <= 1e-5
    assert rel(np.array(got_prompt), np.array(expected_prompt)) <= 1e-5


@needs_cuda
@pytest.mark.parametrize("variant", ["random-state", "padded"])
def test_dispatch_takes_the_cuda_kernels_on_a_real_device(monkeypatch, variant):
    """On a real CUDA device both kernels pass their first-use checks (no warning, every verdict true), and what
    the model's entries return from them matches float64 NumPy."""
    import warnings

    from mlx_qwen35 import kernels
    from mlx_qwen35.kernels import self_check

    monkeypatch.setattr(self_check, "_verdicts", {})
    with warnings.catch_warnings(), mx.stream(mx.gpu):
        warnings.simplefilter("error", RuntimeWarning)
        check_step_kernel(lambda inputs: [np.array(x) for x in kernels.gated_delta_update(*map(to_mx, inputs))],
                          2, 7, 2, 4, 128, variant)
        inputs = random_decode_inputs(2, 2, 4, 128, 128, 4, seed=3)
        check_decode_step([np.array(x) for x in kernels.fused_decode_step(*mx_inputs(inputs))], inputs)
    assert {name for name, _ in self_check._verdicts} == {"CUDA step", "CUDA fused decode"}
    assert all(self_check._verdicts.values())
