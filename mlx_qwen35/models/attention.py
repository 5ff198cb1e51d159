"""Gated full attention: every fourth layer of Qwen 3.5."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from ..config import TextConfig
from ..kernels import activations
from ..kernels.activations import sigmoid
from .layers import ZeroCenteredRMSNorm, apply_rotary

# Prompts longer than this attend in blocks of queries, so scores take [block, keys], never [L, L].
QUERY_BLOCK = 1024
# Where the scores are written out (scores_attention), blocks shrink so that one block's stay under this.
SCORES_BYTES = 16 << 20


class GatedAttention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, 2 * self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = ZeroCenteredRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = ZeroCenteredRMSNorm(self.head_dim, config.rms_norm_eps)

    def __call__(self, x, rotary, cache=None):
        B, L, _ = x.shape
        # q_proj rows are per-head [query | gate] pairs of head_dim each.
        query_and_gate = self.q_proj(x).reshape(B, L, self.num_heads, 2 * self.head_dim)
        queries, gate = mx.split(query_and_gate, 2, axis=-1)
        gate = gate.reshape(B, L, -1)
        queries = self.q_norm(queries).transpose(0, 2, 1, 3)
        keys = self.k_norm(self.k_proj(x).reshape(B, L, self.num_kv_heads, -1)).transpose(0, 2, 1, 3)
        values = self.v_proj(x).reshape(B, L, self.num_kv_heads, -1).transpose(0, 2, 1, 3)

        cos, sin = rotary
        queries, keys = apply_rotary(queries, cos, sin), apply_rotary(keys, cos, sin)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)

        out = causal_attention(queries, keys, values, self.scale)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out * sigmoid(gate))


def causal_attention(queries, keys, values, scale, block: int | None = None):
    """queries [B, nh, L, D] are the last L positions of keys/values [B, nkv, S, D] (S >= L)."""
    block = block or QUERY_BLOCK
    L, S = queries.shape[2], keys.shape[2]
    if L == 1:
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale)
    # On the CPU, MLX's fused attention takes MLX's scalar exp (about 16 ns a score); written out with the
    # polynomial softmax, in blocks of at most SCORES_BYTES of scores, prompt attention is about twice as fast.
    if activations.fast_path(queries):
        attend = scores_attention
        block = max(1, min(block, SCORES_BYTES // (queries.shape[1] * S * 4)))
    else:
        attend = partial(mx.fast.scaled_dot_product_attention, mask="causal")
    if L <= block:
        return attend(queries, keys, values, scale=scale)
    outputs = []
    for start in range(0, L, block):
        end = min(start + block, L)
        visible = S - L + end  # keys after the block's last query are masked anyway: leave them out
        outputs.append(attend(queries[:, :, start:end], keys[:, :, :visible], values[:, :, :visible], scale=scale))
        # Evaluating block by block bounds the live scores to one block's.
        mx.eval(outputs[-1])
    return mx.concatenate(outputs, axis=2)


def scores_attention(queries, keys, values, scale):
    """Causal attention with the scores written out: queries [B, nh, L, D] are the last L of keys/values
    [B, nkv, S, D]. Same result as mx.fast.scaled_dot_product_attention(..., mask="causal")."""
    B, heads, L, D = queries.shape
    kv_heads, S = keys.shape[1], keys.shape[2]
    grouped = queries.reshape(B, kv_heads, heads // kv_heads * L, D)  # the query heads that share a KV head
    scores = (grouped * scale) @ keys.swapaxes(-1, -2)
    scores = scores.reshape(B, kv_heads, heads // kv_heads, L, S)
    visible = mx.arange(S)[None] <= mx.arange(S - L, S)[:, None]  # [L, S]
    scores = mx.where(visible, scores, mx.array(-mx.inf, scores.dtype))
    weights = activations.softmax(scores).reshape(B, kv_heads, heads // kv_heads * L, S)
    return (weights @ values).reshape(B, heads, L, values.shape[-1])
