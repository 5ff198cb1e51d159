"""The chunked Metal kernel of mlx_qwen35/kernels/metal_chunked.py and the simdgroup-matrix subset of the
Metal shim it relies on, against NumPy: emulated on the CPU through metal_emulation/ (the exact source
strings), and on a real Metal device through mx.fast.metal_kernel when one exists."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen35.kernels.metal import KernelSource
from mlx_qwen35.kernels.metal_chunked import (
    CHUNKED,
    chunked_launch,
    gated_delta_chunked_metal,
)
from mlx_qwen35.kernels.metal_emulation import emulate, f32_to_bf16, run_kernel
from delta_reference import check_step_kernel, numpy_recurrence, random_inputs, rel, to_mx

needs_metal = pytest.mark.skipif(not mx.metal.is_available(), reason="no Metal device")


# ---- simdgroup matrices in the shim ----------------------------------------------------------------

# Two simdgroups, each on its own 8-row band of `a` and `b` (10 x 12 buffers per band, the 8 x 8
# block at column 2, row 1): device and threadgroup loads with stride, origin and transpose, fills,
# the diagonal constructor, multiply(-accumulate) and strided, transposed stores.
MATOPS = KernelSource(
    name="simdgroup_matrix_ops",
    input_names=["a", "b"],
    output_names=["out"],
    source="""
    const uint sg = simdgroup_index_in_threadgroup;
    const uint lane = thread_index_in_simdgroup;
    threadgroup float tb[2 * 120];
    for (uint e = lane; e < 120; e += 32) {
      tb[sg * 120 + e] = b[sg * 120 + e];
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_float8x8 ma, mb, mc, md, me, mf;
    simdgroup_load(ma, a + sg * 120, 12, ulong2(2, 1));
    simdgroup_load(mb, tb + sg * 120, 12, ulong2(2, 1), true);
    mc = make_filled_simdgroup_matrix<float, 8, 8>(0.5f);
    simdgroup_multiply_accumulate(md, ma, mb, mc);
    simdgroup_multiply(me, ma, mb);
    simdgroup_float8x8 three(3.0f);
    simdgroup_multiply(mf, three, ma);
    device float* o = out + sg * 4 * 80;
    simdgroup_store(md, o, 10, ulong2(1, 0));
    simdgroup_store(me, o + 80, 8, ulong2(0, 0), true);
    simdgroup_store(mf, o + 160);
    simdgroup_store(mc, o + 240);
""",
)


def run_matops(spec, a, b):
    (out,) = run_kernel(*spec, inputs=[a, b], grid=(64, 1, 1), threadgroup=(64, 1, 1),
                        output_shapes=[(2, 4, 80)], output_dtypes=[mx.float32], init_value=-7.0)
    return out


def test_emulated_simdgroup_matrix_ops_match_numpy():
    """Small integers, so every product and sum is exact in float32 and the comparison can be exact."""
    rng = np.random.default_rng(0)
    a = rng.integers(-4, 5, size=(2, 10, 12)).astype(np.float32)
    b = rng.integers(-4, 5, size=(2, 10, 12)).astype(np.float32)
    out = run_matops(MATOPS, a.reshape(-1), b.reshape(-1))
    for s in range(2):
        A, Bt = a[s, 1:9, 2:10], b[s, 1:9, 2:10].T  # the loaded blocks (b's transposed)
        d = np.full((8, 10), -7.0, np.float32)
        d[:, 1:9] = A @ Bt + 0.5
        np.testing.assert_array_equal(out[s, 0], d.ravel())
        np.testing.assert_array_equal(out[s, 1, :64].reshape(8, 8), (A @ Bt).T)
        np.testing.assert_array_equal(out[s, 2, :64].reshape(8, 8), 3 * A)
        np.testing.assert_array_equal(out[s, 3, :64], np.full(64, 0.5, np.float32))
        np.testing.assert_array_equal(out[s, 1:, 64:], -7.0)  # nothing written past the 8 x 8 blocks


def broken(spec, old, new):
    assert old in spec.source
    return spec._replace(name=spec.name + "_broken", source=spec.source.replace(old, new))


@pytest.mark.parametrize("old,new,message", [
    ("simdgroup_multiply_accumulate(md, ma, mb, mc);",
     "if (lane != 5) { simdgroup_multiply_accumulate(md, ma, mb, mc); }", "divergent"),
    ("simdgroup_load(ma, a + sg * 120, 12, ulong2(2, 1));",
     "if (lane == 31) { return; }\n    simdgroup_load(ma, a + sg * 120, 12, ulong2(2, 1));", "fewer than 32 lanes"),
    ("threadgroup float tb[2 * 120];",
     ("threadgroup float tb[2 * 120];\n    threadgroup float big[8192];\n    big[lane] = 0.0f;"), "over 32 KiB"),
], ids=["lane-skips-mma", "lane-exits-before-load", "threadgroup-memory"])
def test_emulator_rejects_bad_simdgroup_matrix_use(old, new, message):
    a = np.zeros(240, np.float32)
    with pytest.raises(RuntimeError, match=message):
        run_matops(broken(MATOPS, old, new), a, a)


# ---- the chunked kernel ----------------------------------------------------------------------------


GRID = [  # B, T, Hk, Hv, D: B {1, 2}, T {1, 2, 63, 64, 65, 130}, Hv/Hk {1, 2, 4}, D {64, 128}
    (1, 1, 1, 1, 64), (2, 1, 2, 4, 128), (2, 2, 1, 4, 64), (1, 63, 1, 2, 128), (2, 64, 2, 2, 64),
    (1, 65, 1, 4, 128), (2, 65, 2, 4, 64), (2, 130, 2, 4, 128), (1, 130, 1, 1, 64),
]


def run_emulated(inputs):
    return emulate(CHUNKED, **chunked_launch(*map(to_mx, inputs)))


def run_metal(inputs):
    with mx.stream(mx.gpu):
        y, state = gated_delta_chunked_metal(*map(to_mx, inputs))
    return np.array(y), np.array(state)


RUNNERS = [pytest.param(run_emulated, id="emulated"), pytest.param(run_metal, id="metal", marks=needs_metal)]


@pytest.mark.parametrize("run", RUNNERS)
@pytest.mark.parametrize("B,T,Hk,Hv,D", GRID)
@pytest.mark.parametrize("variant", ["random-state", "zero-state", "padded"])
def test_chunked_kernel_matches_float64(run, B, T, Hk, Hv, D, variant):
    check_step_kernel(run, B, T, Hk, Hv, D, variant)


@pytest.mark.parametrize("D,value_block", [(128, 128), (128, 32), (64, 64)])
def test_emulated_chunked_kernel_value_blocks(D, value_block):
    """Every split of the value columns over threadgroups (1 to 4 blocks) gives the same result."""
    inputs = random_inputs(2, 70, 1, 2, D, D, seed=D + value_block, padded=True)
    expected_y, expected_state = numpy_recurrence(*inputs)
    launch = chunked_launch(*map(to_mx, inputs), value_block=value_block)
    assert launch["grid"][1] == D // value_block
    y, state = emulate(CHUNKED, **launch)
    assert rel(y, expected_y) <= 1e-5
    assert rel(state, expected_state) <= 1e-5


def test_emulated_chunked_kernel_unequal_dims_and_hard_decay():
    """Dk != Dv, and decays of exactly 0 and 1 inside chunks (log-decay clamped at -80, as chunked.py)."""
    q, k, v, g, beta, state, _ = random_inputs(2, 97, 2, 4, 128, 64, seed=5)
    g[:, 10] = 0.0
    g[0, 40:75] = 1.0
    g[1, 33] = 0.0
    expected_y, expected_state = numpy_recurrence(q, k, v, g, beta, state, None)
    y, new_state = emulate(CHUNKED, **chunked_launch(*map(to_mx, (q, k, v, g, beta, state))))
    assert rel(y, expected_y) <= 1e-5
    assert rel(new_state, expected_state) <= 1e-5


def test_emulated_chunked_kernel_bf16():
    """bfloat16 q/k/v rounded once, so the float64 reference sees what the kernel reads: the float32 state
    stays at float32 accuracy over 300 steps, and y is off only by its rounding to bfloat16."""
    q, k, v, g, beta, state, _ = random_inputs(2, 300, 2, 4, 64, 64, seed=3)
    bits = [f32_to_bf16(x) for x in (q, k, v)]
    exact = [(b.astype(np.uint32) << 16).view(np.float32) for b in bits]
    expected_y, expected_state = numpy_recurrence(*exact, g, beta, state, None)
    launch = chunked_launch(*[mx.array(b).view(mx.bfloat16) for b in bits], *map(mx.array, (g, beta, state)))
    assert launch["output_dtypes"][0] == mx.bfloat16
    y, new_state = emulate(CHUNKED, **launch)
    assert rel(new_state, expected_state) <= 2e-5
    assert rel(y, expected_y) <= 2.5e-3
    assert np.abs(y - expected_y).max() <= 2**-8 * np.abs(expected_y).max()


@pytest.mark.parametrize("old,new", [
    ("simdgroup_multiply(st[h * (DS / 8) + d][cc], st[h * (DS / 8) + d][cc], chunk_decay);", ""),
    ("for (int j = 0; j <= ct; ++j) {\n            simdgroup_float8x8 ta, ra;",
     "for (int j = 0; j < ct; ++j) {\n            simdgroup_float8x8 ta, ra;"),
    ("simdgroup_load(kb, kq + tj * 8 * DS + d * 8, DS, ulong2(0, 0), true);",
     "simdgroup_load(kb, kq + tj * 8 * DS + d * 8, DS);"),
    ("tri[e] = i > j ? bet[i] * tri[e] * decay : 0.0f;", "tri[e] = i > j ? tri[e] * decay : 0.0f;"),
], ids=["no-chunk-decay", "triangular-bound", "untransposed-k", "no-beta-in-A"])
def test_emulated_chunked_kernel_is_not_vacuous(old, new):
    """Sources with a plausible slip give a wrong answer under the emulator."""
    inputs = random_inputs(2, 70, 1, 2, 64, 64, seed=11, padded=True)
    expected_y, expected_state = numpy_recurrence(*inputs)
    y, state = emulate(broken(CHUNKED, old, new), **chunked_launch(*map(to_mx, inputs)))
    assert rel(y, expected_y) > 1e-3 or rel(state, expected_state) > 1e-3


def test_emulated_chunked_kernel_catches_missing_barrier():
    """Staging the next K/Q slab without waiting for the other simdgroups corrupts or poisons the result."""
    old = "for (int h = 0; h < Dk / DS; ++h) {\n        threadgroup_barrier(mem_flags::mem_threadgroup);"
    spec = broken(CHUNKED, old, "for (int h = 0; h < Dk / DS; ++h) {")
    inputs = random_inputs(1, 40, 1, 1, 64, 64, seed=2)
    expected_y, _ = numpy_recurrence(*inputs)
    y, _ = emulate(spec, **chunked_launch(*map(to_mx, inputs)))
    assert not np.isfinite(y).all() or rel(y, expected_y) > 1e-3


def test_chunked_launch_rejects_bad_inputs():
    q, k, v, g, beta, state, _ = map(to_mx, random_inputs(1, 3, 2, 4, 64, 64, seed=0))
    with pytest.raises(ValueError, match="Dv"):
        chunked_launch(q, k, v[..., :48], g, beta)
    with pytest.raises(ValueError, match="multiple of 32"):
        chunked_launch(q[..., :48], k[..., :48], v, g, beta)
    q2, k2 = (mx.zeros((1, 3, 2, 288)) for _ in range(2))
    with pytest.raises(ValueError, match="Dk"):
        chunked_launch(q2, k2, v, g, beta)
    with pytest.raises(ValueError, match="state must be"):
        chunked_launch(q, k, v, g, beta, state[:, :2])
    with pytest.raises(ValueError, match="value_block"):
        chunked_launch(q, k, v, g, beta, value_block=128)


@needs_metal
def test_metal_chunked_kernel_bf16():
    q, k, v, g, beta, state, _ = random_inputs(2, 300, 2, 4, 128, 128, seed=3)
    bits = [f32_to_bf16(x) for x in (q, k, v)]
    exact = [(b.astype(np.uint32) << 16).view(np.float32) for b in bits]
    expected_y, expected_state = numpy_recurrence(*exact, g, beta, state, None)
    with mx.stream(mx.gpu):
        y, new_state = gated_delta_chunked_metal(*[mx.array(b).view(mx.bfloat16) for b in bits],
                                                 *map(mx.array, (g, beta, state)))
    assert y.dtype == mx.bfloat16
    assert rel(new_state, expected_state) <= 2e-5
    assert rel(y.astype(mx.float32), expected_y) <= 2.5e-3
