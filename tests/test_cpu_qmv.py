"""kernels/cpu_qmv.c: quantised matrix-vector products on the CPU, against a float64 NumPy product over weights
unpacked from MLX's packed words here (not by MLX's dequantize), and its place in kernels.expert_matmul."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen35 import kernels
from mlx_qwen35.kernels import cpu_qmv

pytestmark = pytest.mark.skipif(cpu_qmv.status() != "on", reason=f"cpu_qmv unavailable: {cpu_qmv.status()}")


def unpack(packed, scales, biases, group_size, bits):
    """float64 weights [E, out, in] from MLX's affine layout: value j of a row sits in bits
    [bits * (j % per_word), ...) of word j // per_word; weight = scale * q + bias per group."""
    packed = np.array(packed).astype(np.uint64)
    per_word = 32 // bits
    shifts = (np.arange(per_word) * bits).astype(np.uint64)
    q = ((packed[..., None] >> shifts) & ((1 << bits) - 1)).reshape(*packed.shape[:-1], -1).astype(np.float64)
    scale = np.repeat(np.array(scales).astype(np.float64), group_size, axis=-1)
    bias = np.repeat(np.array(biases).astype(np.float64), group_size, axis=-1)
    return scale * q + bias


def quantized(experts, out, inputs, group_size, bits, seed):
    w = mx.random.normal((experts, out, inputs), key=mx.random.key(seed)) * 0.05
    return mx.quantize(w, group_size=group_size, bits=bits)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (4, 128), (8, 32), (8, 64)])
@pytest.mark.parametrize("rows", [1, 7])
def test_matches_float64(bits, group_size, rows):
    packed, scales, biases = quantized(5, 48, 256, group_size, bits, seed=bits + group_size)
    x = mx.random.normal((rows, 1, 256), key=mx.random.key(rows))
    experts = mx.array(sorted(np.random.default_rng(rows).integers(0, 5, rows).tolist()), dtype=mx.uint32)
    got = np.array(cpu_qmv.quantized_matvec(x, packed, scales, biases, experts, group_size, bits))
    weights = unpack(packed, scales, biases, group_size, bits)[np.array(experts)]
    expected = np.einsum("ni,noi->no", np.array(x)[:, 0].astype(np.float64), weights)[:, None]
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= 1e-6


def test_expert_matmul_takes_it_for_decode_rows_only(monkeypatch):
    packed, scales, biases = quantized(4, 32, 128, 64, 4, seed=1)
    calls = []
    original = cpu_qmv.quantized_matvec
    monkeypatch.setattr(cpu_qmv, "quantized_matvec", lambda *a: calls.append(1) or original(*a))
    for rows, expected_calls in ((3, 1), (cpu_qmv.MAX_ROWS + 1, 1)):
        x = mx.random.normal((rows, 1, 128))
        experts = mx.array(sorted((np.arange(rows) % 4).tolist()), dtype=mx.uint32)
        out = kernels.expert_matmul(x, packed, experts, scales=scales, biases=biases, group_size=64, bits=4)
        weights = unpack(packed, scales, biases, 64, 4)[np.array(experts)]
        expected = np.einsum("ni,noi->no", np.array(x)[:, 0].astype(np.float64), weights)[:, None]
        assert np.linalg.norm(np.array(out) - expected) / np.linalg.norm(expected) <= 1e-5
        assert len(calls) == expected_calls  # a prompt's many rows go to gather_qmm
    # shapes and types it does not take
    x = mx.random.normal((2, 1, 128))
    assert not cpu_qmv.applies(x, packed, scales.astype(mx.bfloat16), biases, 64, 4, "affine")
    assert not cpu_qmv.applies(x.astype(mx.bfloat16), packed, scales, biases, 64, 4, "affine")
    assert not cpu_qmv.applies(x, packed, scales, biases, 32, 4, "affine")  # 4 words per group: under 8
    assert not cpu_qmv.applies(x, packed, scales, None, 64, 4, "mxfp4")


def test_gradient_is_gather_qmms():
    packed, scales, biases = quantized(3, 32, 128, 64, 4, seed=2)
    x = mx.random.normal((4, 1, 128))
    experts = mx.array([0, 1, 1, 2], dtype=mx.uint32)
    cotangent = mx.random.normal((4, 1, 32))

    def loss(matmul):
        return lambda x: (matmul(x) * cotangent).sum()

    got = mx.grad(loss(lambda x: kernels.expert_matmul(x, packed, experts, scales=scales, biases=biases,
                                                       group_size=64, bits=4)))(x)
    weights = unpack(packed, scales, biases, 64, 4)[np.array(experts)]
    expected = np.einsum("no,noi->ni", np.array(cotangent)[:, 0].astype(np.float64), weights)[:, None]
    assert np.linalg.norm(np.array(got) - expected) / np.linalg.norm(expected) <= 1e-5


def test_environment_switch(monkeypatch):
    monkeypatch.setattr(cpu_qmv, "_status", None)
    monkeypatch.setattr(cpu_qmv, "_library", None)
    monkeypatch.setenv("MLX_QWEN35_NO_CPU_QMV", "1")
    packed, scales, biases = quantized(2, 32, 128, 64, 4, seed=3)
    assert not cpu_qmv.applies(mx.zeros((1, 1, 128)), packed, scales, biases, 64, 4, "affine")
    assert "MLX_QWEN35_NO_CPU_QMV" in cpu_qmv.status()


def test_bad_expert_indices_are_refused_before_the_c_code_reads():
    packed, scales, biases = quantized(3, 32, 128, 64, 4, seed=4)
    x = mx.random.normal((2, 1, 128))
    for experts in ([0, 3], [0]):
        with pytest.raises(ValueError, match="expert indices"):
            cpu_qmv.quantized_matvec(x, packed, scales, biases, mx.array(experts, dtype=mx.uint32), 64, 4)
