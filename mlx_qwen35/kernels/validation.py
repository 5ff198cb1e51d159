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
