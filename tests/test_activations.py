"""The CPU SiLU and sigmoid (kernels/activations.py) against float64 NumPy, values and gradients."""
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_qwen35.kernels.activations import sigmoid, silu

X = np.concatenate([np.linspace(-120, 120, 100_001), np.geomspace(1e-30, 1e3, 2_000), -np.geomspace(1e-30, 1e3, 2_000),
                    [0.0, -87.5, 87.5, 88.5, -88.5, -103.0]]).astype(np.float32)


def reference(name):
    x = X.astype(np.float64)
    with np.errstate(over="ignore"):
        s = 1 / (1 + np.exp(-x))
    return (s, s * (1 - s)) if name == "sigmoid" else (x * s, s * (1 + x * (1 - s)))


@pytest.mark.parametrize("name, ours", [("sigmoid", sigmoid), ("silu", silu)])
def test_cpu_activation_matches_float64(name, ours):
    value, slope = reference(name)
    with mx.stream(mx.cpu):
        x = mx.array(X)
        got = np.array(ours(x)).astype(np.float64)
        grad = np.array(mx.grad(lambda a: ours(a).sum())(x)).astype(np.float64)
    meaningful = np.abs(value) > 1e-30  # below that the float32 result is 0 or subnormal
    assert np.max(np.abs(got - value)[meaningful] / np.abs(value[meaningful])) < 5e-7
    assert np.max(np.abs(got - value)) < 2e-6  # 1.5e-8 relative at x = 120
    assert np.max(np.abs(grad - slope)) < 5e-7


def test_other_dtypes_use_mlx_ops():
    x = mx.array(X[::97]).astype(mx.bfloat16)
    assert mx.array_equal(silu(x), nn.silu(x)) and mx.array_equal(sigmoid(x), mx.sigmoid(x))
    assert silu(x).dtype == sigmoid(x).dtype == mx.bfloat16


def test_training_uses_mlx_activations():
    """Inside `exact` (the trainer's steps, train-default) the model's activations are MLX's own, so a training
    run does not depend on the polynomial."""
    from mlx_qwen35.kernels.activations import exact

    x = mx.array(X[::97])
    with mx.stream(mx.cpu):
        with exact():
            assert mx.array_equal(silu(x), nn.silu(x)) and mx.array_equal(sigmoid(x), mx.sigmoid(x))
        assert not mx.array_equal(silu(x), nn.silu(x))  # outside it, the polynomial (it rounds differently)


def test_cpu_softmax_matches_float64():
    from mlx_qwen35.kernels.activations import softmax

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 300)) * 30).astype(np.float32)
    x[:, 200:] = -np.inf  # masked scores
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    want = e / e.sum(-1, keepdims=True)
    with mx.stream(mx.cpu):
        got = np.array(softmax(mx.array(x))).astype(np.float64)
    assert np.abs(got - want).max() < 1e-6
    assert np.abs(got[:, 200:]).max() < 1e-30


@pytest.mark.parametrize("L, S, heads, kv_heads", [(5, 5, 4, 2), (7, 12, 8, 2), (33, 40, 2, 2)])
def test_cpu_prompt_attention_matches_float64(L, S, heads, kv_heads):
    """models/attention.scores_attention (the CPU prompt path: scores written out, the polynomial softmax)
    against causal grouped-query attention in float64, the last L of S positions being queries."""
    from mlx_qwen35.models.attention import scores_attention

    rng = np.random.default_rng(L * S)
    q = rng.standard_normal((2, heads, L, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, kv_heads, S, 16)).astype(np.float32) for _ in range(2))
    kr, vr = (np.repeat(a.astype(np.float64), heads // kv_heads, axis=1) for a in (k, v))
    scores = q.astype(np.float64) @ kr.swapaxes(-1, -2) / 4.0
    scores[..., np.arange(S)[None] > np.arange(S - L, S)[:, None]] = -np.inf
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    want = (weights / weights.sum(-1, keepdims=True)) @ vr
    with mx.stream(mx.cpu):
        got = np.array(scores_attention(mx.array(q), mx.array(k), mx.array(v), scale=0.25))
    assert np.abs(got - want).max() < 1e-5
