"""The float64 NumPy gated delta rule and the random inputs every delta-rule test draws from."""

import mlx.core as mx
import numpy as np


def numpy_recurrence(q, k, v, g, beta, state, mask):
    """float64, per head: S <- g S; S += beta (v - S k) k^T; y = S q, S [Dv, Dk]; masked steps keep S."""
    rep = v.shape[2] // q.shape[2]
    q, k = np.repeat(q, rep, axis=2).astype(np.float64), np.repeat(k, rep, axis=2).astype(np.float64)
    S = np.array(state, np.float64)
    ys = np.zeros(v.shape)
    for t in range(q.shape[1]):
        keep = np.ones(q.shape[0], bool) if mask is None else mask[:, t]
        gt = np.where(keep[:, None], g[:, t], 1.0)
        bt = np.where(keep[:, None], beta[:, t], 0.0)
        S = S * gt[:, :, None, None]
        delta = (v[:, t] - np.einsum("bhvk,bhk->bhv", S, k[:, t])) * bt[:, :, None]
        S = S + delta[..., None] * k[:, t][:, :, None, :]
        ys[:, t] = np.einsum("bhvk,bhk->bhv", S, q[:, t])
    return ys, S


def random_inputs(B, T, Hk, Hv, Dk, Dv=None, *, seed, zero_state=False, padded=False):
    """float32 (q, k, v, g, beta, state) as the kernels take them, and a bool padding mask or None."""
    Dv = Dv or Dk
    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)

    q = unit(rng.normal(size=(B, T, Hk, Dk))) * Dk**-0.5
    k = unit(rng.normal(size=(B, T, Hk, Dk)))
    v = rng.normal(size=(B, T, Hv, Dv))
    g = np.exp(-rng.uniform(0.0, 1.5, size=(B, T, Hv)))
    beta = rng.uniform(0.0, 1.0, size=(B, T, Hv))
    state = np.zeros((B, Hv, Dv, Dk)) if zero_state else rng.normal(size=(B, Hv, Dv, Dk)) * 0.5
    mask = None
    if padded:
        mask = np.ones((B, T), dtype=bool)
        mask[0, : max(1, T // 3)] = False  # left padding in the first sequence
        if B > 1:
            mask[-1, T - 1] = False
    f32 = [x.astype(np.float32) for x in (q, k, v, g, beta, state)]
    return (*f32, mask)


def to_mx(x):
    return None if x is None else mx.array(x)


def mx_inputs(inputs):
    """A kernel's NumPy inputs as its arguments: arrays to MLX, scalars and None as they are."""
    return [mx.array(x) if isinstance(x, np.ndarray) else x for x in inputs]


def rel(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


def numpy_fused_decode(qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state, norm_weight, eps,
                       num_k_heads):
    """float64 DeltaNet decode step (models/deltanet.py at T = 1): conv + SiLU, l2-normalised q (times
    Dk^-0.5) and k, g = exp(-exp(A_log) softplus(a + dt_bias)), beta = sigmoid(b), one recurrence step,
    then RMSNorm(y) * weight * silu(z). Returns (out [B, Hv*Dv], conv state [B, K-1, C], state)."""
    f64 = [np.asarray(x, np.float64) for x in (qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state,
                                                norm_weight)]
    qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state, norm_weight = f64
    B, C = qkv.shape
    Hv, Dv, Hk = a.shape[1], norm_weight.shape[0], num_k_heads
    Dk = (C - Hv * Dv) // (2 * Hk)
    window = np.concatenate([conv_state, qkv[:, None]], axis=1)  # [B, K, C]
    mixed = np.einsum("bkc,ck->bc", window, conv_weight[:, 0, :])
    mixed = mixed / (1 + np.exp(-mixed))
    q = mixed[:, : Hk * Dk].reshape(B, 1, Hk, Dk)
    k = mixed[:, Hk * Dk : 2 * Hk * Dk].reshape(B, 1, Hk, Dk)
    v = mixed[:, 2 * Hk * Dk :].reshape(B, 1, Hv, Dv)
    q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6) * Dk**-0.5
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    g = np.exp(-np.exp(A_log) * np.logaddexp(a + dt_bias, 0.0))
    beta = 1 / (1 + np.exp(-b))
    y, state = numpy_recurrence(q, k, v, g[:, None], beta[:, None], state, None)
    y = y[:, 0]  # [B, Hv, Dv]
    normed = y / np.sqrt((y * y).mean(-1, keepdims=True) + eps) * norm_weight
    gate = z.reshape(B, Hv, Dv)
    out = normed * gate / (1 + np.exp(-gate))
    return out.reshape(B, Hv * Dv), window[:, 1:], state


def random_decode_inputs(B, Hk, Hv, Dk, Dv=None, K=4, *, seed, zero_state=False):
    """float32 inputs of one fused decode step, in `numpy_fused_decode`'s order (num_k_heads last)."""
    Dv = Dv or Dk
    C = 2 * Hk * Dk + Hv * Dv
    rng = np.random.default_rng(seed)
    qkv = rng.normal(size=(B, C))
    conv_state = np.zeros((B, K - 1, C)) if zero_state else rng.normal(size=(B, K - 1, C))
    conv_weight = rng.normal(size=(C, 1, K)) * 0.5
    z = rng.normal(size=(B, Hv * Dv))
    a, b = rng.normal(size=(B, Hv)) * 2, rng.normal(size=(B, Hv)) * 2
    A_log, dt_bias = rng.uniform(-2.0, 1.0, size=Hv), rng.normal(size=Hv)
    state = np.zeros((B, Hv, Dv, Dk)) if zero_state else rng.normal(size=(B, Hv, Dv, Dk)) * 0.5
    norm_weight = 1 + 0.1 * rng.normal(size=Dv)
    f32 = [x.astype(np.float32) for x in (qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state,
                                          norm_weight)]
    return (*f32, 1e-6, Hk)


def bfloat16_decode_inputs(inputs):
    """A decode step's inputs as a bfloat16 model passes them (qkv, the conv state, z, a and b in bfloat16), and
    those values back in NumPy float32 for `numpy_fused_decode`: (MLX arguments, rounded NumPy inputs)."""
    bf16 = [mx.array(x).astype(mx.bfloat16) if i in (0, 1, 3, 4, 5) else x for i, x in enumerate(mx_inputs(inputs))]
    rounded = [np.array(x.astype(mx.float32)) if i in (0, 1, 3, 4, 5) else y
               for i, (x, y) in enumerate(zip(bf16, inputs))]
    return bf16, rounded


def check_step_kernel(run, B, T, Hk, Hv, D, variant):
    """`run` (inputs -> y, state) on random inputs of these sizes against `numpy_recurrence`: float32
    outputs within 1e-5 relative. `variant`: "random-state", "zero-state" or "padded"."""
    inputs = random_inputs(B, T, Hk, Hv, D, seed=7 * T + D + B, zero_state=variant == "zero-state",
                           padded=variant == "padded")
    expected_y, expected_state = numpy_recurrence(*inputs)
    y, state = run(inputs)
    assert y.shape == expected_y.shape and state.shape == expected_state.shape
    assert y.dtype == np.float32 and state.dtype == np.float32
    assert rel(y, expected_y) <= 1e-5
    assert rel(state, expected_state) <= 1e-5


def check_decode_step(outputs, inputs, tol=1e-5):
    """A fused decode step's (out, conv_state, state) against `numpy_fused_decode` on the same inputs."""
    expected = numpy_fused_decode(*inputs)
    for got, want, name in zip(outputs, expected, ("out", "conv_state", "state")):
        assert got.shape == want.shape, name
        assert got.dtype == np.float32, name
        assert rel(got, want) <= tol, (name, rel(got, want))
