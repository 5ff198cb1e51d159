"""Input checks shared by every delta-rule path, raised before any work or kernel launch."""

import mlx.core as mx


def check_inputs(q, k, v, g, beta, state, mask):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got ranks {q.ndim}, {k.ndim}, {v.ndim}")
    if q.shape != k.shape:
        raise ValueError(f"q {q.shape} and k {k.shape} must have the same shape")
    B, T, Hk, Dk = q.shape
    if T < 1 or B < 1:
        raise ValueError(f"need at least one batch row and one step, got q {q.shape}")
    if v.shape[:2] != (B, T):
        raise ValueError(f"v {v.shape} must share [B, T] = {(B, T)} with q")
    Hv, Dv = v.shape[2:]
    if Hv % Hk:
        raise ValueError(f"value heads ({Hv}) must be a multiple of key heads ({Hk})")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, Hv):
            raise ValueError(f"{name} must be [B, T, Hv] = {(B, T, Hv)}, got {x.shape}")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k dtypes differ: {q.dtype} vs {k.dtype}")
    if state is not None and state.shape != (B, Hv, Dv, Dk):
        raise ValueError(f"state must be [B, Hv, Dv, Dk] = {(B, Hv, Dv, Dk)}, got {state.shape}")
    if mask is not None and (mask.shape != (B, T) or mask.dtype != mx.bool_):
        raise ValueError(f"mask must be bool [B, T] = {(B, T)}, got {mask.dtype} {mask.shape}")


def decode_shapes(qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state, norm_weight, num_k_heads):
    """(B, C, K, Hk, Hv, Dk, Dv) of one fused decode step; ValueError on inconsistent shapes."""
    if qkv.ndim != 2:
        raise ValueError(f"qkv must be [B, conv_dim], got {qkv.shape}")
    B, C = qkv.shape
    if conv_weight.ndim != 3 or conv_weight.shape[:2] != (C, 1) or conv_weight.shape[2] < 2:
        raise ValueError(f"conv_weight must be [conv_dim, 1, K >= 2] = [{C}, 1, K], got {conv_weight.shape}")
    K = conv_weight.shape[2]
    if a.ndim != 2 or a.shape[0] != B or b.shape != a.shape:
        raise ValueError(f"a and b must both be [B, Hv] with B = {B}, got {a.shape} and {b.shape}")
    Hv, Hk = a.shape[1], num_k_heads
    if norm_weight.ndim != 1:
        raise ValueError(f"norm_weight must be [Dv], got {norm_weight.shape}")
    Dv = norm_weight.shape[0]
    if Hk < 1 or Hv % Hk:
        raise ValueError(f"value heads ({Hv}) must be a multiple of key heads ({Hk})")
    if C <= Hv * Dv or (C - Hv * Dv) % (2 * Hk):
        raise ValueError(f"conv_dim {C} is not 2 Hk Dk + Hv Dv for Hk = {Hk}, Hv = {Hv}, Dv = {Dv}")
    Dk = (C - Hv * Dv) // (2 * Hk)
    for name, x, shape in (("z", z, (B, Hv * Dv)), ("A_log", A_log, (Hv,)), ("dt_bias", dt_bias, (Hv,)),
                           ("conv_state", conv_state, (B, K - 1, C)), ("state", state, (B, Hv, Dv, Dk))):
        if (x is not None or name in ("z", "A_log", "dt_bias")) and getattr(x, "shape", None) != shape:
            raise ValueError(f"{name} must be {shape}, got {x.shape}")
    if conv_state is not None and conv_state.dtype != qkv.dtype:
        raise ValueError(f"conv_state dtype {conv_state.dtype} differs from qkv's {qkv.dtype}")
    return B, C, K, Hk, Hv, Dk, Dv
