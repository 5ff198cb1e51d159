"""The Qwen 3.5 text decoder: pre-norm layers mixing tokens with Gated DeltaNet or gated attention, and
mixing channels with a SwiGLU MLP (dense) or a sparse MoE block."""

import mlx.core as mx
import mlx.nn as nn

from ..cache import DeltaNetCache, KVCache, cache_offset
from ..config import TextConfig
from .attention import GatedAttention
from .deltanet import GatedDeltaNet
from .layers import MLP, MRoPE, ZeroCenteredRMSNorm
from .moe import SparseMoeBlock


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_type: str):
        super().__init__()
        self.is_linear = layer_type == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(config)
        else:
            self.self_attn = GatedAttention(config)
        self.mlp = SparseMoeBlock(config) if config.is_moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)

    def __call__(self, x, rotary, cache=None):
        h = self.input_layernorm(x)
        if self.is_linear:
            h = self.linear_attn(h, cache)
        else:
            h = self.self_attn(h, rotary, cache)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, t) for t in config.layer_types]
        self.norm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)
        self._rope = MRoPE(config.rotary_dim, config.rope_theta, config.mrope_section, config.mrope_interleaved)

    def __call__(self, input_ids=None, cache=None, input_embeddings=None, position_ids=None, rope_delta=None):
        """input_ids [B, L] or input_embeddings [B, L, H]; position_ids [3, B, L] (default: text positions
        continuing the cache, shifted by rope_delta, an int or [B], after a multimodal prefill).
        Returns the final-normed hidden states [B, L, H]."""
        h = self.embed_tokens(input_ids) if input_embeddings is None else input_embeddings
        B, L, _ = h.shape
        if position_ids is None:
            start = cache_offset(cache)
            position_ids = mx.broadcast_to(mx.arange(start, start + L), (3, B, L))
            if rope_delta is not None:
                position_ids = position_ids + mx.array(rope_delta).reshape(1, -1, 1)
        rotary = self._rope(position_ids, h.dtype)
        cache = cache or [None] * len(self.layers)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, rotary, layer_cache)
        return self.norm(h)

    def make_cache(self) -> list:
        return [DeltaNetCache() if layer.is_linear else KVCache() for layer in self.layers]
