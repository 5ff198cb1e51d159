"""Gated DeltaNet: three of every four Qwen 3.5 layers. The scan itself is kernels.gated_delta_update."""

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from ..config import TextConfig
from ..kernels.activations import sigmoid, silu
from .layers import GatedRMSNorm


class CausalDepthwiseConv(nn.Module):
    """Depthwise causal conv1d holding its weight in the checkpoint's layout [channels, 1, kernel]."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.weight = mx.zeros((channels, 1, kernel_size))

    def __call__(self, x):
        """x [B, L + kernel - 1, C] (left context included) -> [B, L, C]."""
        K = self.weight.shape[-1]
        L = x.shape[1] - K + 1
        taps = self.weight[:, 0, :].astype(x.dtype)  # [C, K]
        out = x[:, 0:L] * taps[:, 0]
        for i in range(1, K):
            out = out + x[:, i : i + L] * taps[:, i]
        return out


class GatedDeltaNet(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv_kernel_size = config.linear_conv_kernel_dim
        H = config.hidden_size

        self.in_proj_qkv = nn.Linear(H, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(H, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(H, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(H, self.num_v_heads, bias=False)
        self.conv1d = CausalDepthwiseConv(self.conv_dim, self.conv_kernel_size)
        self.dt_bias = mx.ones((self.num_v_heads,))
        self.A_log = mx.zeros((self.num_v_heads,))
        self.norm = GatedRMSNorm(self.head_v_dim, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, H, bias=False)

    def __call__(self, x, cache=None):
        B, L, _ = x.shape
        mixed = self.in_proj_qkv(x)
        z = self.in_proj_z(x).reshape(B, L, self.num_v_heads, self.head_v_dim)
        b = self.in_proj_b(x)
        a = self.in_proj_a(x)
        if L == 1 and kernels.fused_decode_enabled():
            return self.out_proj(self.fused_decode(mixed, z, a, b, cache))

        # The conv cache holds the last kernel-1 pre-conv inputs.
        context = None if cache is None else cache[0]
        if context is None:
            context = mx.zeros((B, self.conv_kernel_size - 1, self.conv_dim), dtype=mixed.dtype)
        conv_input = mx.concatenate([context, mixed], axis=1)
        if cache is not None:
            cache[0] = conv_input[:, -(self.conv_kernel_size - 1) :]
        mixed = silu(self.conv1d(conv_input))

        q, k, v = mx.split(mixed, [self.key_dim, 2 * self.key_dim], axis=-1)
        q = q.reshape(B, L, self.num_k_heads, self.head_k_dim).astype(mx.float32)
        k = k.reshape(B, L, self.num_k_heads, self.head_k_dim).astype(mx.float32)
        v = v.reshape(B, L, self.num_v_heads, self.head_v_dim)
        q = l2_normalize(q) * self.head_k_dim**-0.5
        k = l2_normalize(k)

        beta = sigmoid(b.astype(mx.float32))
        log_decay = -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(
            a.astype(mx.float32) + self.dt_bias.astype(mx.float32))
        state = None if cache is None else cache[1]
        out, state = kernels.gated_delta_update(q, k, v, mx.exp(log_decay), beta, state)
        if cache is not None:
            cache[1] = state

        out = self.norm(out, z)
        return self.out_proj(out.reshape(B, L, -1))

    def fused_decode(self, mixed, z, a, b, cache):
        """T = 1 on a GPU: the conv, norms, gates, scan step and output norm below in one kernel launch.
        mixed [B, 1, conv_dim] -> [B, 1, value_dim] (before out_proj)."""
        conv_state, state = (None, None) if cache is None else (cache[0], cache[1])
        out, conv_state, state = kernels.fused_decode_step(
            mixed[:, 0], conv_state, self.conv1d.weight, z.reshape(z.shape[0], -1), a[:, 0], b[:, 0],
            self.A_log, self.dt_bias, state, self.norm.weight, self.norm.eps, self.num_k_heads)
        if cache is not None:
            cache[0], cache[1] = conv_state, state
        return out[:, None]


def l2_normalize(x, eps: float = 1e-6):
    return x * mx.rsqrt((x * x).sum(-1, keepdims=True) + eps)
