"""The Qwen 3.5 vision tower (`model.visual`): Conv3d patch embedding, a learned position table resampled to
each grid, ViT blocks with 2-D rotary attention inside each frame, and the 2x2 patch merger that projects to
the text width. Patches arrive in spatial-merge-block order: (frame, block_row, block_col, in_row, in_col)."""

import math
from dataclasses import dataclass, field, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# Attention scores (frames x queries x keys, per head) computed in one step; larger grids attend in blocks.
SCORE_BUDGET = 1 << 22

@dataclass
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    rope_parameters: dict = field(default_factory=lambda: {"rope_theta": 10000.0})

    @classmethod
    def from_dict(cls, values: dict) -> "VisionConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names and v is not None})

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision hidden_act {self.hidden_act!r} is not supported; expected one of "
                             f"{sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"vision hidden_size {self.hidden_size} / num_heads {self.num_heads} must be a "
                             f"multiple of 4 (2-D rotary)")
        side = math.isqrt(self.num_position_embeddings)
        if side * side != self.num_position_embeddings:
            raise ValueError(f"num_position_embeddings {self.num_position_embeddings} is not a square")

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


# nn.gelu_approx is the tanh form (gelu_pytorch_tanh), compiled into one fused kernel.
ACTIVATIONS = {"gelu_pytorch_tanh": nn.gelu_approx, "gelu": nn.gelu}


class LayerNorm(nn.LayerNorm):
    """LayerNorm in float32 whatever the weight and input dtypes (the loader may keep norm weights in float32)."""

    def __call__(self, x):
        out = mx.fast.layer_norm(x.astype(mx.float32), self.weight.astype(mx.float32),
                                 self.bias.astype(mx.float32), self.eps)
        return out.astype(x.dtype)


class Conv3dPatches(nn.Module):
    """The Conv3d with kernel = stride = patch: one matmul over flattened patches, weight kept as stored."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        t, p = config.temporal_patch_size, config.patch_size
        self.weight = mx.zeros((config.hidden_size, config.in_channels, t, p, p))
        self.bias = mx.zeros((config.hidden_size,))

    def __call__(self, x):
        weight = self.weight.reshape(self.weight.shape[0], -1)
        return mx.addmm(self.bias.astype(x.dtype), x, weight.astype(x.dtype).T)


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = Conv3dPatches(config)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def __call__(self, x, rotary, frames):
        """x [N, Dv]; rotary (cos, sin) [N, head_dim] float32; frames: (count, patches per frame) in order."""
        N = x.shape[0]
        q, k, v = self.qkv(x).reshape(N, 3, self.num_heads, self.head_dim).transpose(1, 0, 2, 3)
        q, k = rotate(q, *rotary), rotate(k, *rotary)
        outputs, start = [], 0
        # Attention never crosses frames, and runs in steps of at most SCORE_BUDGET (frames x queries x keys)
        # evaluated one by one, so live scores stay bounded whatever the number and size of the images.
        for count, size in frames:
            end = start + count * size

            def split(a):  # [count*size, heads, hd] -> [count, heads, size, hd]
                return a[start:end].reshape(count, size, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

            q_, k_, v_ = split(q), split(k), split(v)
            rows = max(1, min(size, SCORE_BUDGET // size))
            step = max(1, SCORE_BUDGET // (rows * size))
            for f in range(0, count, step):
                parts = []
                for r in range(0, size, rows):
                    parts.append(mx.fast.scaled_dot_product_attention(
                        q_[f:f + step, :, r:r + rows], k_[f:f + step], v_[f:f + step], scale=self.head_dim**-0.5))
                    mx.eval(parts[-1])
                out = mx.concatenate(parts, axis=2) if len(parts) > 1 else parts[0]
                outputs.append(out.transpose(0, 2, 1, 3).reshape(-1, self.num_heads * self.head_dim))
            start = end
        return self.proj(mx.concatenate(outputs, axis=0) if len(outputs) > 1 else outputs[0])


def rotate(x, cos, sin):
    """x [N, heads, hd] rotated in float32 (rotate-half pairing over the full head dim)."""
    xf = x.astype(mx.float32)
    first, second = mx.split(xf, 2, axis=-1)
    out = xf * cos[:, None] + mx.concatenate([-second, first], axis=-1) * sin[:, None]
    return out.astype(x.dtype)


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def __call__(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = LayerNorm(config.hidden_size, eps=1e-6)
        self.norm2 = LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def __call__(self, x, rotary, frames):
        x = x + self.attn(self.norm1(x), rotary, frames)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        merged = config.hidden_size * config.spatial_merge_size**2
        self.norm = LayerNorm(config.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(merged, merged)
        self.linear_fc2 = nn.Linear(merged, config.out_hidden_size)

    def __call__(self, x):
        x = self.norm(x)
        x = x.reshape(-1, self.linear_fc1.weight.shape[1])  # the 4 patches of each 2x2 block side by side
        return self.linear_fc2(nn.gelu(self.linear_fc1(x)))


class VisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = [VisionBlock(config) for _ in range(config.depth)]
        self.merger = PatchMerger(config)
        head_dim = config.hidden_size // config.num_heads
        theta = config.rope_parameters.get("rope_theta", 10000.0)
        self._inv_freq = 1.0 / theta ** (np.arange(0, head_dim // 2, 2, dtype=np.float64) / (head_dim // 2))

    def __call__(self, pixel_values, grid_thw):
        """pixel_values [N, C*T*P*P] (rows viewed as (C, T, P, P)), grid_thw [num_images, 3] with
        N = sum(t*h*w) -> merged features [N / merge**2, out_hidden_size]."""
        pixel_values = mx.array(pixel_values) if not isinstance(pixel_values, mx.array) else pixel_values
        grids = self.check_inputs(pixel_values, grid_thw)
        x = self.patch_embed.proj(pixel_values.astype(self.pos_embed.weight.dtype))
        taps, weights, rows, cols = self.grid_tables(grids)
        table = self.pos_embed.weight.astype(mx.float32)
        pos = (table[mx.array(taps)] * mx.array(weights)[..., None]).sum(axis=1)  # [N, Dv]
        x = x + pos.astype(x.dtype)
        freqs = np.concatenate([rows[:, None] * self._inv_freq, cols[:, None] * self._inv_freq], axis=-1)
        angles = mx.array(np.concatenate([freqs, freqs], axis=-1), dtype=mx.float32)
        rotary = (mx.cos(angles), mx.sin(angles))
        frames = [(t, h * w) for t, h, w in grids]
        for block in self.blocks:
            x = block(x, rotary, frames)
        return self.merger(x)

    def check_inputs(self, pixel_values, grid_thw) -> list:
        grid = np.asarray(grid_thw).astype(np.int64)
        if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0 or (grid <= 0).any():
            raise ValueError(f"grid_thw must be [num_images, 3] positive (t, h, w) rows; got {grid.tolist()}")
        m = self.config.spatial_merge_size
        if (grid[:, 1:] % m).any():
            raise ValueError(f"grid h and w must be multiples of spatial_merge_size {m}; got {grid.tolist()}")
        expected = (int(grid.prod(axis=1).sum()), self.config.patch_dim)
        if tuple(pixel_values.shape) != expected:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; grid_thw {grid.tolist()} "
                             f"needs {expected}")
        return [tuple(int(v) for v in row) for row in grid]

    def grid_tables(self, grids):
        """Per patch, in merge-block order: the 4 bilinear (align_corners) taps into the position table and
        their weights, and the patch's row and column for the rotary."""
        side, m = math.isqrt(self.config.num_position_embeddings), self.config.spatial_merge_size
        taps, weights, rows, cols = [], [], [], []
        for t, h, w in grids:
            r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            # raster [h, w] -> (block_row, block_col, in_row, in_col)
            r = r.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
            c = c.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
            (r0, r1), (wr0, wr1) = bilinear(r, h, side)
            (c0, c1), (wc0, wc1) = bilinear(c, w, side)
            tap = np.stack([r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1], axis=-1)
            weight = np.stack([wr0 * wc0, wr0 * wc1, wr1 * wc0, wr1 * wc1], axis=-1)
            taps.append(np.tile(tap, (t, 1)))
            weights.append(np.tile(weight, (t, 1)))
            rows.append(np.tile(r, t))
            cols.append(np.tile(c, t))
        return (np.concatenate(taps).astype(np.int32), np.concatenate(weights).astype(np.float32),
                np.concatenate(rows).astype(np.float64), np.concatenate(cols).astype(np.float64))


def bilinear(index, size, side):
    """align_corners=True source taps (floor, floor+1, clamped) and weights for `index` in 0..size-1."""
    src = index * (side - 1) / max(size - 1, 1)
    low = np.floor(src)
    frac = src - low
    low = low.astype(np.int64)
    return (np.clip(low, 0, side - 1), np.clip(low + 1, 0, side - 1)), (1 - frac, frac)
