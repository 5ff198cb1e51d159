"""The Metal kernels of mlx_qwen35/kernels/metal.py against a float64 NumPy recurrence: executed on the
CPU through metal_emulation/ (the exact source strings, compiled as C++ against the Metal shim, every
threadgroup's threads run as fibers with real barriers and lock-step simd ops), and on a real Metal
device through mx.fast.metal_kernel when one exists."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen35.kernels.metal import (
    STEP,
    KernelSource,
    gated_delta_step_metal,
    step_launch,
)
from mlx_qwen35.kernels.metal_emulation import emulate, f32_to_bf16, run_kernel
from delta_reference import check_step_kernel, numpy_recurrence, random_inputs, rel, to_mx

needs_metal = pytest.mark.skipif(not mx.metal.is_available(), reason="no Metal device")


GRID = [  # B, T, Hk, Hv, D: every B in {1, 3}, T in {1, 2, 63, 64, 65}, Hv/Hk in {1, 2, 4}, D in {64, 128}
    (1, 1, 1, 1, 64), (3, 1, 2, 4, 128), (1, 2, 2, 2, 64), (3, 2, 1, 4, 128), (1, 63, 2, 4, 64),
    (3, 63, 1, 1, 128), (1, 64, 1, 2, 128), (3, 64, 2, 4, 64), (1, 65, 4, 4, 128), (3, 65, 1, 2, 64),
    (2, 300, 1, 2, 64),
]


def run_emulated(inputs):
    return emulate(STEP, **step_launch(*map(to_mx, inputs)))


def run_metal(inputs):
    with mx.stream(mx.gpu):
        y, state = gated_delta_step_metal(*map(to_mx, inputs))
    return np.array(y), np.array(state)


RUNNERS = [pytest.param(run_emulated, id="emulated"), pytest.param(run_metal, id="metal", marks=needs_metal)]


@pytest.mark.parametrize("run", RUNNERS)
@pytest.mark.parametrize("B,T,Hk,Hv,D", GRID)
@pytest.mark.parametrize("variant", ["random-state", "zero-state", "padded"])
def test_step_kernel_matches_float64(run, B, T, Hk, Hv, D, variant):
    check_step_kernel(run, B, T, Hk, Hv, D, variant)


def bf16_inputs(B, T, Hk, Hv, D, seed):
    """Inputs rounded to bfloat16 once, so the float64 reference sees exactly what the kernel reads."""
    q, k, v, g, beta, state, _ = random_inputs(B, T, Hk, Hv, D, seed=seed)
    bits = [f32_to_bf16(x) for x in (q, k, v)]
    exact = [(b.astype(np.uint32) << 16).view(np.float32) for b in bits]
    as_bf16 = [mx.array(b).view(mx.bfloat16) for b in bits]
    return as_bf16, exact, (g, beta, state)


def test_emulated_step_kernel_bf16_drift():
    """bf16 q/k/v over 512 steps: the float32 state tracks the float64 recurrence to float32 accuracy
    (no drift from the input dtype), and y is off only by its final rounding to bfloat16 (2^-9)."""
    (q, k, v), exact, (g, beta, state) = bf16_inputs(2, 512, 2, 4, 128, seed=3)
    expected_y, expected_state = numpy_recurrence(*exact, g, beta, state, None)
    y, new_state = emulate(STEP, **step_launch(q, k, v, mx.array(g), mx.array(beta), mx.array(state)))
    assert rel(new_state, expected_state) <= 2e-5
    assert rel(y, expected_y) <= 2.5e-3
    assert np.abs(y - expected_y).max() <= 2**-8 * np.abs(expected_y).max()


def test_emulated_step_kernel_float32_qk_bf16_v():
    """The model's mix: q, k normalised in float32, v still bfloat16; y comes back in v's dtype."""
    (_, _, v), exact, (g, beta, state) = bf16_inputs(1, 65, 2, 4, 64, seed=5)
    q, k = exact[0], exact[1]
    expected_y, expected_state = numpy_recurrence(q, k, exact[2], g, beta, state, None)
    launch = step_launch(mx.array(q), mx.array(k), v, mx.array(g), mx.array(beta), mx.array(state))
    assert launch["output_dtypes"][0] == mx.bfloat16
    y, new_state = emulate(STEP, **launch)
    assert rel(new_state, expected_state) <= 1e-5
    assert rel(y, expected_y) <= 2.5e-3


def broken(spec, old, new):
    assert old in spec.source
    return spec._replace(name=spec.name + "_broken", source=spec.source.replace(old, new))


@pytest.mark.parametrize("old,new", [
    ("predicted = simd_sum(predicted);", "predicted = predicted + simd_shuffle_xor(predicted, 1);"),
    ("out = simd_sum(out);", "out = simd_sum(out) - simd_shuffle_xor(out, 16) + simd_shuffle_xor(out, 8);"),
    ("s[i] *= decay;", "s[i] *= keep ? decay : 0.0f;"),
], ids=["partial-reduction", "wrong-shuffle", "masked-decay"])
def test_emulator_is_not_vacuous(old, new):
    """Sources with a plausible slip give a wrong answer under the emulator."""
    inputs = random_inputs(2, 9, 1, 2, 64, seed=11, padded=True)
    expected_y, expected_state = numpy_recurrence(*inputs)
    y, state = emulate(broken(STEP, old, new), **step_launch(*map(to_mx, inputs)))
    assert rel(y, expected_y) > 1e-3 or rel(state, expected_state) > 1e-3


REVERSE = KernelSource(
    name="reverse_in_threadgroup",
    input_names=["inp"],
    output_names=["out", "stats"],
    source="""
    const uint i = thread_position_in_grid.x;
    const uint l = thread_position_in_threadgroup.x;
    threadgroup float buf[128];
    buf[l] = inp[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[i] = buf[threads_per_threadgroup.x - 1 - l];
    const float x = inp[i];
    stats[4 * i + 0] = simd_sum(x);
    stats[4 * i + 1] = simd_shuffle_xor(x, 5);
    stats[4 * i + 2] = simd_broadcast(x, 7);
    stats[4 * i + 3] = simd_max(x) + simdgroup_index_in_threadgroup;
""",
)


def test_emulator_barrier_threadgroup_memory_and_simd_ops():
    x = np.random.default_rng(0).normal(size=512).astype(np.float32)
    out, stats = run_kernel(*REVERSE, inputs=[x], grid=(512, 1, 1), threadgroup=(128, 1, 1),
                            output_shapes=[(512,), (512, 4)], output_dtypes=[mx.float32, mx.float32])
    np.testing.assert_array_equal(out, x.reshape(4, 128)[:, ::-1].ravel())
    lanes = x.reshape(16, 32)
    np.testing.assert_allclose(stats[:, 0], np.repeat(lanes.astype(np.float64).sum(1), 32), rtol=1e-5)
    np.testing.assert_array_equal(stats[:, 1], x[np.arange(512) ^ 5])
    np.testing.assert_array_equal(stats[:, 2], np.repeat(lanes[:, 7], 32))
    np.testing.assert_array_equal(stats[:, 3], np.repeat(lanes.max(1) + (np.arange(16) % 4).astype(np.float32), 32))


def test_emulator_catches_missing_barrier():
    """Without the barrier a thread reads threadgroup memory its partner has not written yet; fresh
    threadgroup memory is poisoned, so that shows up as NaN rather than as a lucky zero."""
    spec = broken(REVERSE, "threadgroup_barrier(mem_flags::mem_threadgroup);", "")
    x = np.arange(256, dtype=np.float32)
    out, _ = run_kernel(*spec, inputs=[x], grid=(256, 1, 1), threadgroup=(128, 1, 1),
                        output_shapes=[(256,), (256, 4)], output_dtypes=[mx.float32, mx.float32])
    assert np.isnan(out).any()


@pytest.mark.parametrize("old,new,message", [
    ("const float x = inp[i];", "const float x = l < 16 ? simd_sum(inp[i]) : simd_max(inp[i]);",
     "divergent"),
    ("threadgroup_barrier(mem_flags::mem_threadgroup);",
     ("if (l < 64) { threadgroup_barrier(mem_flags::mem_threadgroup); }\n"
      "    else { threadgroup_barrier(mem_flags::mem_device); }"), "different threadgroup_barrier"),
    ("stats[4 * i + 1] = simd_shuffle_xor(x, 5);", "stats[4 * i + 1] = simd_shuffle(x, 40);", "out of range"),
], ids=["divergent-simd", "divergent-barrier", "bad-lane"])
def test_emulator_rejects_undefined_synchronisation(old, new, message):
    spec = broken(REVERSE, old, new)
    with pytest.raises(RuntimeError, match=message):
        run_kernel(*spec, inputs=[np.zeros(256, np.float32)], grid=(256, 1, 1), threadgroup=(128, 1, 1),
                   output_shapes=[(256,), (256, 4)], output_dtypes=[mx.float32, mx.float32])


def test_step_launch_rejects_bad_inputs():
    q, k, v, g, beta, state, _ = map(to_mx, random_inputs(1, 3, 2, 4, 64, seed=0))
    with pytest.raises(ValueError, match="multiple of 32"):
        step_launch(q[..., :48], k[..., :48], v, g, beta)
    with pytest.raises(ValueError, match="multiple of key heads"):
        step_launch(q, k, v[:, :, :3], g[..., :3], beta[..., :3])
    with pytest.raises(ValueError, match="state must be"):
        step_launch(q, k, v, g, beta, state[:, :2])
    with pytest.raises(ValueError, match="mask must be bool"):
        step_launch(q, k, v, g, beta, state, mx.ones((1, 3), mx.int32))
    with pytest.raises(ValueError, match="dtype"):
        step_launch(q.astype(mx.int32), k.astype(mx.int32), v, g, beta)
    with pytest.raises(ValueError, match="g must be"):
        step_launch(q, k, v, g[:, :2], beta)


@needs_metal
def test_metal_step_kernel_bf16_drift():
    (q, k, v), exact, (g, beta, state) = bf16_inputs(2, 512, 2, 4, 128, seed=3)
    expected_y, expected_state = numpy_recurrence(*exact, g, beta, state, None)
    with mx.stream(mx.gpu):
        y, new_state = gated_delta_step_metal(q, k, v, mx.array(g), mx.array(beta), mx.array(state))
    assert y.dtype == mx.bfloat16
    assert rel(new_state, expected_state) <= 2e-5
    assert rel(y.astype(mx.float32), expected_y) <= 2.5e-3
