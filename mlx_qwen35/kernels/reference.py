"""The gated delta rule as a plain per-step recurrence in MLX ops: the reference every other path is
checked against, and the decode path (T = 1) on devices without a fused kernel. Also the whole DeltaNet
decode step in MLX ops, the reference of the fused decode kernel."""

import mlx.core as mx
import mlx.nn as nn

from .validation import decode_shapes


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


def prepare_inputs(q, k, v, g, beta, state, mask, expand_heads: bool = True):
    """Expand key heads to value heads (unless told not to), move everything to float32, and fold the padding
    mask into beta = 0 and g = 1 (a step that neither decays nor writes leaves the state unchanged)."""
    B, _, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    if Hv != Hk and expand_heads:
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


def fused_decode_step_reference(qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state, norm_weight, eps,
                                num_k_heads):
    """One DeltaNet token from the projections to the gated norm, in MLX ops, as models/deltanet.py does it
    for T = 1 (the reference of the fused decode kernel in metal_decode.py).

    Shapes: qkv [B, C] (q | k | v channels, C = 2 Hk Dk + Hv Dv); conv_state [B, K-1, C] in qkv's dtype or
    None (zeros); conv_weight [C, 1, K]; z [B, Hv*Dv]; a, b [B, Hv]; A_log, dt_bias [Hv]; state
    [B, Hv, Dv, Dk] float32 or None; norm_weight [Dv]; num_k_heads = Hk.
    Returns out [B, Hv*Dv] (before out_proj) and the new conv state in qkv's dtype, and the state float32.
    """
    B, C, K, Hk, Hv, Dk, Dv = decode_shapes(qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state,
                                            norm_weight, num_k_heads)
    if conv_state is None:
        conv_state = mx.zeros((B, K - 1, C), qkv.dtype)
    window = mx.concatenate([conv_state, qkv[:, None]], axis=1)  # [B, K, C]
    taps = conv_weight[:, 0, :].astype(qkv.dtype)  # [C, K]
    mixed = window[:, 0] * taps[:, 0]
    for i in range(1, K):
        mixed = mixed + window[:, i] * taps[:, i]
    q, k, v = mx.split(nn.silu(mixed), [Hk * Dk, 2 * Hk * Dk], axis=-1)
    q = _l2_normalize(q.reshape(B, 1, Hk, Dk).astype(mx.float32)) * Dk**-0.5
    k = _l2_normalize(k.reshape(B, 1, Hk, Dk).astype(mx.float32))
    beta = mx.sigmoid(b.astype(mx.float32))
    log_decay = -mx.exp(A_log.astype(mx.float32)) * nn.softplus(a.astype(mx.float32) + dt_bias.astype(mx.float32))
    y, state = gated_delta_recurrent(q, k, v.reshape(B, 1, Hv, Dv), mx.exp(log_decay)[:, None], beta[:, None],
                                     state)
    # models.layers.GatedRMSNorm
    normed = mx.fast.rms_norm(y.astype(mx.float32), None, eps).astype(y.dtype) * norm_weight
    out = (normed.astype(mx.float32) * nn.silu(z.reshape(B, 1, Hv, Dv).astype(mx.float32))).astype(y.dtype)
    return out.reshape(B, Hv * Dv), window[:, 1:], state


def _l2_normalize(x, eps: float = 1e-6):
    return x * mx.rsqrt((x * x).sum(-1, keepdims=True) + eps)
