"""The gated delta rule in chunks (the WY/UT form, as in transformers' torch_chunk_gated_delta_rule and
flash-linear-attention), in MLX ops: a few batched matmuls per chunk of 64 steps instead of 64 sequential
rank-1 updates. Differentiable and device-agnostic. Math: shared/docs/qwen35_spec.md section 5."""

import mlx.core as mx

from .reference import prepare_inputs

CHUNK = 64
# exp(-80) is far below float32 resolution of any decayed state, and keeps log-space sums finite.
MIN_LOG_DECAY = -80.0


def gated_delta_chunked(q, k, v, g, beta, state=None, mask=None, chunk_size: int = CHUNK):
    """Same signature, shapes and result as `gated_delta_recurrent`, computed chunk by chunk."""
    q, k, v, g, beta, state = prepare_inputs(q, k, v, g, beta, state, mask)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    out_dtype = v.dtype
    v = v.astype(mx.float32)
    # Clamping g before the log (not the log after) keeps the gradient finite where g underflowed to 0.
    log_g = mx.log(mx.maximum(g, mx.exp(mx.array(MIN_LOG_DECAY, g.dtype))))
    if pad:
        # Padded steps: k = 0, beta = 0, g = 1, so they change nothing.
        q, k, v = (mx.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]) for x in (q, k, v))
        log_g, beta = (mx.pad(x, [(0, 0), (0, pad), (0, 0)]) for x in (log_g, beta))
    N = (T + pad) // C

    def chunks(x):  # [B, T', H, D] -> [B, H, N, C, D]
        return x.reshape(B, N, C, H, -1).transpose(0, 3, 1, 2, 4)

    q, k, v = chunks(q), chunks(k), chunks(v)
    beta = beta.reshape(B, N, C, H).transpose(0, 3, 1, 2)
    gamma = mx.cumsum(log_g.reshape(B, N, C, H).transpose(0, 3, 1, 2), axis=-1)  # [B, H, N, C]

    causal = mx.tril(mx.ones((C, C), dtype=mx.bool_))
    log_pair = gamma[..., :, None] - gamma[..., None, :]
    pair_decay = mx.exp(mx.where(causal, log_pair, -mx.inf))  # Gamma_ij = exp(gamma_i - gamma_j), i >= j

    k_beta = k * beta[..., None]
    strict = mx.tril(mx.ones((C, C), dtype=mx.bool_), k=-1)
    A = mx.where(strict, (k_beta @ k.swapaxes(-1, -2)) * pair_decay, 0.0)
    T_inv = unit_lower_inverse(A)  # (I + A)^-1
    u = T_inv @ (v * beta[..., None])  # [B, H, N, C, Dv]
    w = T_inv @ (k_beta * mx.exp(gamma)[..., None])  # [B, H, N, C, Dk]

    q_decayed = q * mx.exp(gamma)[..., None]
    intra = (q @ k.swapaxes(-1, -2)) * pair_decay  # [B, H, N, C, C]
    k_to_end = k * mx.exp(gamma[..., -1:] - gamma)[..., None]
    chunk_decay = mx.exp(gamma[..., -1])[..., None, None]  # [B, H, N, 1, 1]

    S = state.swapaxes(-1, -2)  # [B, H, Dk, Dv]: the transposed state keeps the products below plain matmuls
    outputs = []
    for n in range(N):
        v_new = u[:, :, n] - w[:, :, n] @ S
        outputs.append(q_decayed[:, :, n] @ S + intra[:, :, n] @ v_new)
        S = S * chunk_decay[:, :, n] + k_to_end[:, :, n].swapaxes(-1, -2) @ v_new
    y = mx.stack(outputs, axis=2)  # [B, H, N, C, Dv]
    y = y.transpose(0, 2, 3, 1, 4).reshape(B, N * C, H, Dv)[:, :T]
    return y.astype(out_dtype), S.swapaxes(-1, -2)


def unit_lower_inverse(A):
    """(I + A)^-1 for strictly lower-triangular A [..., C, C], C a power of two, by recursive 2x2 block
    inversion: inv [[X, 0], [Y, Z]] = [[X^-1, 0], [-Z^-1 Y X^-1, Z^-1]]. Stable like forward substitution,
    batched over all diagonal blocks at each of log2(C) levels, and made of differentiable ops only."""
    C = A.shape[-1]
    if C & (C - 1):
        raise ValueError(f"chunk size must be a power of two, got {C}")
    lead = A.shape[:-2]
    inverse = mx.ones(lead + (C, 1, 1), dtype=A.dtype)  # the C diagonal 1x1 blocks
    size = 1
    while size < C:
        blocks = C // (2 * size)
        # Below-diagonal block of each 2x2 group of diagonal blocks: rows [2is+s, 2is+2s), cols [2is, 2is+s).
        grid = A.reshape(lead + (blocks, 2, size, blocks, 2, size))
        lower = mx.diagonal(grid[..., :, 1, :, :, 0, :], axis1=-4, axis2=-2)  # [..., s, s, blocks]
        lower = mx.moveaxis(lower, -1, -3)  # [..., blocks, s, s]
        paired = inverse.reshape(lead + (blocks, 2, size, size))
        upper_inv, lower_inv = paired[..., 0, :, :], paired[..., 1, :, :]
        corner = -(lower_inv @ lower @ upper_inv)
        zeros = mx.zeros_like(corner)
        top = mx.concatenate([upper_inv, zeros], axis=-1)
        bottom = mx.concatenate([corner, lower_inv], axis=-1)
        inverse = mx.concatenate([top, bottom], axis=-2)  # [..., blocks, 2s, 2s]
        size *= 2
    return inverse.reshape(lead + (C, C))
