"""The fused DeltaNet decode kernel of mlx_qwen35/kernels/metal_decode.py: emulated on the CPU through
metal_emulation/ (the exact source string) and run for real on a Metal device when one exists, against
a float64 NumPy decode step; and its MLX-ops reference against the model's own T = 1 path."""

import mlx.core as mx
import numpy as np
import pytest
from delta_reference import (bfloat16_decode_inputs, check_decode_step, mx_inputs, numpy_fused_decode,
                             random_decode_inputs, rel)
from mlx.utils import tree_flatten, tree_unflatten

from mlx_qwen35 import kernels
from mlx_qwen35.kernels import self_check
from mlx_qwen35.cache import DeltaNetCache
from mlx_qwen35.config import TextConfig
from mlx_qwen35.kernels.metal_decode import (
    DECODE,
    decode_launch,
    fused_decode_step_metal,
)
from mlx_qwen35.kernels.metal_emulation import emulate
from mlx_qwen35.kernels.reference import fused_decode_step_reference
from mlx_qwen35.models.deltanet import GatedDeltaNet

needs_metal = pytest.mark.skipif(not mx.metal.is_available(), reason="no Metal device")


def run_emulated(inputs):
    return emulate(DECODE, **decode_launch(*mx_inputs(inputs)))


def run_metal(inputs):
    with mx.stream(mx.gpu):
        return [np.array(x) for x in fused_decode_step_metal(*mx_inputs(inputs))]


def run_reference(inputs):
    return [np.array(x) for x in fused_decode_step_reference(*mx_inputs(inputs))]


RUNNERS = [pytest.param(run_emulated, id="emulated"), pytest.param(run_reference, id="mlx-reference"),
           pytest.param(run_metal, id="metal", marks=needs_metal)]
HEADS = [(1, 1), (1, 2), (2, 4), (4, 4), (1, 4)]  # (Hk, Hv)


@pytest.mark.parametrize("run", RUNNERS)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("Hk,Hv", HEADS)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("zero_state", [False, True], ids=["random-state", "zero-state"])
def test_decode_step_matches_float64(run, B, Hk, Hv, D, zero_state):
    inputs = random_decode_inputs(B, Hk, Hv, D, seed=B + 10 * Hv + D, zero_state=zero_state)
    check_decode_step(run(inputs), inputs)


@pytest.mark.parametrize("run", RUNNERS)
@pytest.mark.parametrize("Dk,Dv,K", [(64, 128, 4), (128, 32, 4), (32, 48, 2), (256, 16, 3)])
def test_decode_step_odd_sizes(run, Dk, Dv, K):
    """Dk != Dv, Dv not a multiple of 32 (fewer simdgroups than rows), kernel sizes 2 and 3."""
    inputs = random_decode_inputs(2, 2, 4, Dk, Dv, K, seed=Dk + Dv + K)
    check_decode_step(run(inputs), inputs)


def test_launch_shape():
    launch = decode_launch(*mx_inputs(random_decode_inputs(3, 2, 4, 128, seed=0)))
    assert launch["grid"] == (512, 1, 12) and launch["threadgroup"] == (512, 1, 1)
    assert launch["template"] == [("Dk", 128), ("Dv", 128), ("OutT", mx.float32)]


def test_emulated_bf16_matches_float64_of_rounded_inputs():
    """bfloat16 projections (the model's dtype): the kernel rounds the conv output, y and the norm as the
    model's bfloat16 tensors are rounded, so the result is float64's within bfloat16 rounding; the new
    conv state is an exact copy."""
    inputs = random_decode_inputs(2, 2, 4, 64, seed=5)
    bf16, rounded = bfloat16_decode_inputs(inputs)
    launch = decode_launch(*bf16)
    assert launch["output_dtypes"] == [mx.bfloat16, mx.bfloat16, mx.float32]
    out, conv_state, state = emulate(DECODE, **launch)
    want_out, want_conv, want_state = numpy_fused_decode(*rounded)
    np.testing.assert_array_equal(conv_state, want_conv)
    assert rel(state, want_state) <= 1e-3  # measured 2.8e-4
    assert rel(out, want_out) <= 5e-3  # measured 3.3e-3: a few bfloat16 roundings (2^-9 each)


# ---- the model's T = 1 path --------------------------------------------------------------------------------

def deltanet(Hk=2, Hv=4, Dk=32, Dv=64, dtype=mx.float32, seed=0):
    config = TextConfig(hidden_size=96, num_hidden_layers=1, vocab_size=64, num_attention_heads=2,
                        num_key_value_heads=1, intermediate_size=128, linear_num_key_heads=Hk,
                        linear_num_value_heads=Hv, linear_key_head_dim=Dk, linear_value_head_dim=Dv)
    mx.random.seed(seed)
    layer = GatedDeltaNet(config)
    params = [(k, (mx.random.normal(v.shape) * (0.3 if v.ndim == 1 else v.shape[-1] ** -0.5)).astype(dtype))
              for k, v in tree_flatten(layer.parameters())]
    layer.update(tree_unflatten(params))
    return layer


def decode_inputs(layer, x, cache):
    """The fused step's inputs as the layer computes them for the one token x [B, 1, H]."""
    return [layer.in_proj_qkv(x)[:, 0], cache[0], layer.conv1d.weight, layer.in_proj_z(x)[:, 0],
            layer.in_proj_a(x)[:, 0], layer.in_proj_b(x)[:, 0], layer.A_log, layer.dt_bias, cache[1],
            layer.norm.weight, layer.norm.eps, layer.num_k_heads]


def prefilled(layer, B, prompt, dtype):
    cache = DeltaNetCache()
    layer(mx.random.normal((B, prompt, layer.in_proj_qkv.weight.shape[1])).astype(dtype), cache)
    return cache


def prefilled_twins(layer, B, prompt, dtype):
    """Two caches holding the same prefilled state: one for the path under test, one for the reference."""
    cache = prefilled(layer, B, prompt, dtype)
    twin = DeltaNetCache()
    twin[0], twin[1] = cache[0], cache[1]
    return cache, twin


@pytest.mark.skipif(mx.metal.is_available(), reason="on Metal the layer itself takes the fused path")
@pytest.mark.parametrize("prompt", [0, 5])
def test_reference_equals_model_decode_path(prompt):
    """The MLX-ops fused step, then out_proj, equals one GatedDeltaNet call with T = 1 and a cache (after
    a 5-token prefill, or on an empty cache), output and both cache slots; so does the emulated kernel."""
    layer = deltanet()
    cache = prefilled(layer, 2, prompt, mx.float32) if prompt else DeltaNetCache()
    x = mx.random.normal((2, 1, 96))
    inputs = decode_inputs(layer, x, cache)
    out, conv_state, state = fused_decode_step_reference(*inputs)
    emulated = emulate(DECODE, **decode_launch(*inputs))
    expected = layer(x, cache)
    assert rel(layer.out_proj(out)[:, None], np.array(expected)) <= 1e-5
    assert rel(conv_state, np.array(cache[0])) == 0
    assert rel(state, np.array(cache[1])) <= 1e-5
    assert rel(layer.out_proj(mx.array(emulated[0]))[:, None], np.array(expected)) <= 1e-5
    assert rel(emulated[1], np.array(cache[0])) == 0
    assert rel(emulated[2], np.array(cache[1])) <= 1e-5


@pytest.mark.skipif(mx.metal.is_available(), reason="on Metal the layer itself takes the fused path")
def test_emulated_kernel_tracks_bf16_model_decode():
    """A bfloat16 layer: the kernel (float32 inside, rounded where the model rounds) stays within
    bfloat16 noise of the model's bfloat16 ops."""
    layer = deltanet(dtype=mx.bfloat16)
    cache = prefilled(layer, 2, 3, mx.bfloat16)
    x = mx.random.normal((2, 1, 96)).astype(mx.bfloat16)
    inputs = decode_inputs(layer, x, cache)
    out, conv_state, state = emulate(DECODE, **decode_launch(*inputs))
    expected = layer(x, cache)
    assert rel(conv_state, np.array(cache[0].astype(mx.float32))) == 0
    assert rel(state, np.array(cache[1])) <= 2e-2  # measured 7e-3 and 1.2e-2 (the model's conv is bf16 ops)
    assert rel(layer.out_proj(mx.array(out).astype(mx.bfloat16))[:, None].astype(mx.float32),
               np.array(expected.astype(mx.float32))) <= 2e-2


@pytest.mark.skipif(mx.metal.is_available(), reason="runs the Metal hook with the kernel emulated")
def test_layer_metal_hook_with_emulated_kernel(monkeypatch):
    """GatedDeltaNet's T = 1 Metal branch, run here: Metal reported available, the kernel emulated. Output
    and cache match the layer's MLX-ops path."""
    layer = deltanet()
    cache, twin = prefilled_twins(layer, 3, 4, mx.float32)
    x = mx.random.normal((3, 1, 96))
    expected = layer(x, twin)
    launches = []

    def emulated(*args):
        launch = decode_launch(*args)
        launches.append(launch)
        return [mx.array(o).astype(d) for o, d in zip(emulate(DECODE, **launch), launch["output_dtypes"])]

    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "METAL_FUSED_DECODE", True)
    monkeypatch.setattr(kernels, "fused_decode_step_metal", emulated)
    monkeypatch.setattr(self_check, "_verdicts", {})
    got = layer(x, cache)
    # the first-use check on small inputs (2 sequences), then the layer's step (3 sequences)
    assert [launch["grid"][2] for launch in launches] == [2 * 2, 3 * 4]  # B * Hv
    assert rel(np.array(got), np.array(expected)) <= 1e-5
    assert rel(np.array(cache[0]), np.array(twin[0])) == 0
    assert rel(np.array(cache[1]), np.array(twin[1])) <= 1e-5


@needs_metal
def test_metal_layer_decode_uses_kernel_and_matches_reference():
    layer = deltanet()
    cache = prefilled(layer, 2, 5, mx.float32)
    x = mx.random.normal((2, 1, 96))
    inputs = decode_inputs(layer, x, cache)
    out, conv_state, state = fused_decode_step_reference(*inputs)
    got = layer(x, cache)
    assert rel(np.array(got), np.array(layer.out_proj(out)[:, None])) <= 1e-5
    assert rel(np.array(cache[0]), np.array(conv_state)) == 0
    assert rel(np.array(cache[1]), np.array(state)) <= 1e-5


def test_dispatch_off_metal_is_the_reference():
    inputs = mx_inputs(random_decode_inputs(1, 1, 2, 16, seed=1))  # Dk 16: no kernel even on Metal
    for got, want in zip(kernels.fused_decode_step(*inputs), fused_decode_step_reference(*inputs)):
        np.testing.assert_array_equal(np.array(got), np.array(want))


# ---- bad inputs and slips --------------------------------------------------------------------------------

def replaced(inputs, i, value):
    return [value if j == i else x for j, x in enumerate(inputs)]


@pytest.mark.parametrize("change,message", [
    (lambda x: replaced(x, 11, 3), "multiple of key heads"),
    (lambda x: replaced(x, 1, x[1].astype(mx.float16)), "conv_state dtype"),
    (lambda x: replaced(x, 3, x[3][:, :-1]), "z must be"),
    (lambda x: replaced(x, 8, x[8][..., :32]), "state must be"),
    (lambda x: replaced(x, 2, x[2][:, :, :1]), "conv_weight"),
    (lambda x: replaced(x, 0, x[0][:, None]), "qkv must be"),
])
def test_bad_inputs_raise_before_launch(change, message):
    inputs = change(mx_inputs(random_decode_inputs(1, 2, 4, 64, seed=2)))
    for fn in (decode_launch, fused_decode_step_reference, kernels.fused_decode_step):
        with pytest.raises(ValueError, match=message):
            fn(*inputs)


def test_kernel_rejects_dk_not_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        decode_launch(*mx_inputs(random_decode_inputs(1, 1, 2, 48, seed=3)))


def broken(old, new):
    assert old in DECODE.source
    return DECODE._replace(name=DECODE.name + "_broken", source=DECODE.source.replace(old, new))


@pytest.mark.parametrize("old,new", [
    ("hist[size_t(i + 1) * C]", "hist[size_t(i) * C]"),
    ("k_reg[i] = k_reg[i] * k_norm;", "k_reg[i] = k_reg[i] * q_norm;"),
    ("const uint hk = hv / (Hv / Hk);", "const uint hk = hv % Hk;"),
    ("(j >= 2 * Dk || writes_qk)", "(j >= 2 * Dk)"),
    ("simd_sum(ss) / float(Dv)", "ss * 32.0f / float(Dv)"),
    ("y_s[dv] = static_cast<float>(static_cast<OutT>(y));", "y_s[dv % 32] = y;"),
], ids=["conv-shift", "k-norm", "gqa-map", "qk-conv-state", "partial-rms", "y-index"])
def test_emulator_is_not_vacuous(old, new):
    """Sources with a plausible slip fail the float64 comparison (or leave NaN in an output)."""
    inputs = random_decode_inputs(2, 2, 4, 64, seed=4)
    outputs = emulate(broken(old, new), **decode_launch(*mx_inputs(inputs)))
    with pytest.raises(AssertionError):
        check_decode_step(outputs, inputs)


def test_emulator_catches_missing_barrier():
    inputs = random_decode_inputs(1, 1, 1, 64, seed=6)
    source = DECODE.source.replace("threadgroup_barrier(mem_flags::mem_threadgroup);", "", 1)
    outputs = emulate(DECODE._replace(name=DECODE.name + "_nobarrier", source=source),
                      **decode_launch(*mx_inputs(inputs)))
    assert not np.isfinite(outputs[0]).all()

