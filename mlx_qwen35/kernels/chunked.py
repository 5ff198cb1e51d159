"""The gated delta rule in chunks (the WY/UT form, as in transformers' torch_chunk_gated_delta_rule and
flash-linear-attention), in MLX ops: a few batched matmuls per chunk of 64 steps instead of 64 sequential
rank-1 updates. Differentiable and device-agnostic. Math: shared/docs/qwen35_spec.md section 5."""

import mlx.core as mx

from .reference import prepare_inputs

CHUNK = 64
SEGMENT = 8  # chunks per segment (512 steps)
# exp(-80) is far below float32 resolution of any decayed state, and keeps log-space sums finite.
MIN_LOG_DECAY = -80.0


def gated_delta_chunked(q, k, v, g, beta, state=None, mask=None, chunk_size: int = CHUNK,
                        segment: int = SEGMENT):
    """Same signature, shapes and result as `gated_delta_recurrent`, computed chunk by chunk.

    Value heads are grouped under the key head they share ([B, Hk, R, ...], R = Hv / Hk), so the products of
    keys with keys and queries with keys run once per key head, not once per value head."""
    q, k, v, g, beta, state = prepare_inputs(q, k, v, g, beta, state, mask, expand_heads=False)
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    R = Hv // Hk
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

    def key_chunks(x):  # [B, T', Hk, D] -> [B, Hk, 1, N, C, D]
        return x.reshape(B, N, C, Hk, 1, -1).transpose(0, 3, 4, 1, 2, 5)

    def value_chunks(x):  # [B, T', Hv, ...] -> [B, Hk, R, N, C, ...]
        x = x.reshape((B, N, C, Hk, R) + x.shape[3:])
        return x.transpose((0, 3, 4, 1, 2) + tuple(range(5, x.ndim)))

    # Materialised once: MLX's CPU matmul copies a strided operand at every use, and each chunk is used often.
    q, k = mx.contiguous(key_chunks(q)), mx.contiguous(key_chunks(k))
    v, beta = mx.contiguous(value_chunks(v)), value_chunks(beta)
    gamma = mx.cumsum(value_chunks(log_g), axis=-1)  # [B, Hk, R, N, C]

    S = state.reshape(B, Hk, R, Dv, Dk).swapaxes(-1, -2)  # [B, Hk, R, Dk, Dv]: products stay plain matmuls
    outputs = []
    # A segment of chunks at a time keeps the [.., C, C] temporaries small enough to stay in cache.
    for first in range(0, N, segment):
        part = slice(first, first + segment)
        y, S = _chunk_segment(q[..., part, :, :], k[..., part, :, :], v[..., part, :, :],
                              beta[..., part, :], gamma[..., part, :], S)
        outputs.append(y)
    y = mx.concatenate(outputs, axis=3)  # [B, Hk, R, N, C, Dv]
    y = y.transpose(0, 3, 4, 1, 2, 5).reshape(B, N * C, Hv, Dv)[:, :T]
    return y.astype(out_dtype), S.swapaxes(-1, -2).reshape(B, Hv, Dv, Dk)


def _chunk_segment(q, k, v, beta, gamma, S):
    """Chunks [.., n, C, ..] of one segment from state S [B, Hk, R, Dk, Dv]: (outputs [B, Hk, R, n, C, Dv], S)."""
    C, Dv = v.shape[-2], v.shape[-1]
    decay = mx.exp(gamma)[..., None]
    pair_decay = causal_pair_decay(gamma)  # Gamma_ij = exp(gamma_i - gamma_j) for i >= j, else 0
    strict = mx.tril(mx.ones((C, C), dtype=mx.float32), k=-1)
    A = (k @ k.swapaxes(-1, -2)) * (beta[..., None] * strict) * pair_decay  # rows scaled by beta_i
    T_inv = unit_lower_inverse(A)  # (I + A)^-1
    u = T_inv @ (v * beta[..., None])
    w = T_inv @ (k * (beta[..., None] * decay))
    intra = (q @ k.swapaxes(-1, -2)) * pair_decay  # [B, Hk, R, n, C, C]
    # Row-major [Dk, C]: a transposed left operand runs at half speed in the CPU BLAS here.
    k_to_end = mx.contiguous((k * mx.exp(gamma[..., -1:] - gamma)[..., None]).swapaxes(-1, -2))
    chunk_decay = mx.exp(gamma[..., -1])[..., None, None]  # [B, Hk, R, n, 1, 1]
    q_decayed = q * decay
    # Two products with S per chunk rather than one on [w; q_decayed]: stacking them costs a copy of both.
    outputs = []
    for n in range(v.shape[3]):
        v_new = u[..., n, :, :] - w[..., n, :, :] @ S
        outputs.append(q_decayed[..., n, :, :] @ S + intra[..., n, :, :] @ v_new)
        S = S * chunk_decay[..., n, :, :] + k_to_end[..., n, :, :] @ v_new
    return mx.stack(outputs, axis=3), S


def causal_pair_decay(gamma, block: int = 16):
    """exp(gamma_i - gamma_j) for i >= j and 0 above the diagonal, [..., C] -> [..., C, C], for gamma
    non-increasing along its last axis (cumulative log decays).

    A C x C exp is the costliest step of the scan on CPUs whose exp is not vectorised (about 12 ns per value
    here, against 0.2 ns for a multiply), so exps run only inside diagonal blocks of `block` steps. Below
    them, with r the first step of row i's block (j < r <= i), exp(gamma_i - gamma_j) = exp(gamma_i - gamma_r)
    * exp(gamma_r - gamma_j): two exps of vectors whose exponents are both <= 0, so neither factor overflows
    however strong the decay (a product that underflows to 0 is below float32 resolution of the sum)."""
    C = gamma.shape[-1]
    if C % block:
        raise ValueError(f"chunk size {C} is not a multiple of the decay block {block}")
    S = C // block
    lead = gamma.shape[:-1]
    blocks = gamma.reshape(lead + (S, block))
    first = blocks[..., :1]  # gamma at each block's first step, [..., S, 1]
    within = mx.exp(blocks - first)  # exp(gamma_i - gamma_r), [..., S, block]
    starts = mx.arange(S)[:, None] * block
    before = (mx.arange(C)[None, :] < starts).astype(gamma.dtype)  # [S, C]: j before block I
    # Zeroing the exponent where the mask is 0 (not clamping it) keeps exact gradients at ties (g = 1).
    back = mx.exp((first - gamma[..., None, :]) * before) * before  # exp(gamma_r - gamma_j), [..., S, C]
    below = (within[..., :, :, None] * back[..., :, None, :]).reshape(lead + (C, C))
    local = blocks[..., :, :, None] - blocks[..., :, None, :]  # [..., S, block, block]
    tril = mx.tril(mx.ones((block, block), dtype=gamma.dtype))
    diagonal = mx.exp(local * tril) * tril
    eye = mx.eye(S, dtype=gamma.dtype)
    on_diagonal = (diagonal[..., :, :, None, :] * eye[:, None, :, None]).reshape(lead + (C, C))
    return below + on_diagonal


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
