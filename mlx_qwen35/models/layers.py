"""Small building blocks: the two RMSNorm variants, the SwiGLU MLP, and interleaved M-RoPE."""

import mlx.core as mx
import mlx.nn as nn

from ..kernels.activations import silu


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm whose stored weight is an offset from 1. (1 + w) is formed in float32 at run time, so the
    checkpoint keeps its meaning (no +1 baked in at load) and bf16 weights lose no precision."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = mx.zeros((dims,))

    def __call__(self, x):
        scale = 1.0 + self.weight.astype(mx.float32)
        return mx.fast.rms_norm(x.astype(mx.float32), scale, self.eps).astype(x.dtype)


class GatedRMSNorm(nn.Module):
    """The DeltaNet output norm: plain RMSNorm (weight initialised to 1), then a SiLU gate from z."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))

    def __call__(self, x, gate):
        normed = mx.fast.rms_norm(x.astype(mx.float32), None, self.eps).astype(x.dtype) * self.weight
        return (normed.astype(mx.float32) * silu(gate.astype(mx.float32))).astype(x.dtype)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x):
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


class MRoPE:
    """Multimodal rotary positions: each frequency slot reads the t, h or w position of a token.

    With `interleaved` (Qwen 3.5), slot i uses h when i % 3 == 1 and i < 3 * sections[1], w when
    i % 3 == 2 and i < 3 * sections[2], t otherwise; without it the sections are contiguous (Qwen2-VL).
    For text t = h = w, which is ordinary 1-D RoPE."""

    def __init__(self, rotary_dim: int, theta: float, sections, interleaved: bool):
        half = rotary_dim // 2
        self.inv_freq = theta ** (-mx.arange(0, rotary_dim, 2, dtype=mx.float32) / rotary_dim)
        # Not a parameter, so nothing else evaluates it: left lazy, it would belong to this thread's stream, and
        # a forward on another thread could not evaluate it (MLX's streams belong to their thread).
        mx.eval(self.inv_freq)
        axis = [0] * half
        if interleaved:
            for i in range(half):
                if i % 3 == 1 and i < 3 * sections[1]:
                    axis[i] = 1
                elif i % 3 == 2 and i < 3 * sections[2]:
                    axis[i] = 2
        else:
            axis = [0] * sections[0] + [1] * sections[1] + [2] * sections[2]
        self.slot_axis = mx.array(axis)

    def __call__(self, position_ids, dtype):
        """position_ids [3, B, L] -> (cos, sin), each [B, L, rotary_dim] in `dtype`."""
        freqs = position_ids[..., None].astype(mx.float32) * self.inv_freq  # [3, B, L, half]
        freqs = mx.where(self.slot_axis == 0, freqs[0], mx.where(self.slot_axis == 1, freqs[1], freqs[2]))
        angles = mx.concatenate([freqs, freqs], axis=-1)
        return mx.cos(angles).astype(dtype), mx.sin(angles).astype(dtype)


def apply_rotary(x, cos, sin):
    """x [B, heads, L, D]; rotates the first cos.shape[-1] dims (rotate-half pairing), passes the rest."""
    rotary_dim = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = rotated[..., : rotary_dim // 2], rotated[..., rotary_dim // 2 :]
    rotated = rotated * cos + mx.concatenate([-second, first], axis=-1) * sin
    return mx.concatenate([rotated, passed], axis=-1)
