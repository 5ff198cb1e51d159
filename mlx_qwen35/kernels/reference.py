"""The gated delta rule as a plain per-step recurrence in MLX ops: the reference every other path is
checked against, and the decode path (T = 1) on devices without a fused kernel."""

import mlx.core as mx


def gated_delta_recurrent(q, k, v, g, beta, state=None, mask=None):
    """Run the recurrence S <- g S (I - beta k k^T) + beta v k^T, y = S q, one step at a time.

    Shapes: q, k [B, T, Hk, Dk] (already l2-normalised, q scaled by Dk^-0.5); v [B, T, Hv, Dv];
    g (decay in linear space) and beta [B, T, Hv]; state [B, Hv, Dv, Dk] float32 or None (zeros);
    mask [B, T] bool or None (masked steps leave the state unchanged).
    Returns y [B, T, Hv, Dv] in v's dtype and the final state [B, Hv, Dv, Dk] float32.
    """
    q, k, v, g, beta, state = prepare_inputs(q, k, v, g, beta, state, mask)
    outputs = []
    for t in range(q.shape[1]):
        state = state * g[:, t, :, None, None]
        k_t = k[:, t, :, None, :]
        predicted = (state * k_t).sum(-1)  # [B, Hv, Dv]
        delta = (v[:, t] - predicted) * beta[:, t, :, None]
        state = state + delta[..., None] * k_t
        outputs.append((state * q[:, t, :, None, :]).sum(-1))
    return mx.stack(outputs, axis=1).astype(v.dtype), state


def prepare_inputs(q, k, v, g, beta, state, mask):
    """Expand key heads to value heads, move everything to float32, and fold the padding mask into
    beta = 0 and g = 1 (a step that neither decays nor writes leaves the state unchanged)."""
    B, _, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    if Hv != Hk:
        q = mx.repeat(q, Hv // Hk, axis=2)
        k = mx.repeat(k, Hv // Hk, axis=2)
    q, k = q.astype(mx.float32), k.astype(mx.float32)
    g, beta = g.astype(mx.float32), beta.astype(mx.float32)
    if mask is not None:
        keep = mask[..., None]
        g = mx.where(keep, g, 1.0)
        beta = mx.where(keep, beta, 0.0)
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)
    return q, k, v, g, beta, state.astype(mx.float32)
