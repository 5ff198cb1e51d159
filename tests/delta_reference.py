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


def rel(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)
