"""The multi-token prediction head (spec 3): from the main model's final-normed hidden state h_t and the
embedding of token t+1, one full-attention decoder layer predicts token t+2. Attribute names are the
checkpoint's keys under `mtp.`; it has no embedding or head of its own and reuses the main model's."""

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache, cache_offset
from ..config import TextConfig
from .layers import MRoPE, ZeroCenteredRMSNorm
from .text import DecoderLayer


def mtp_num_layers(raw_config: dict) -> int:
    """mtp_num_hidden_layers from a config.json dict (read from its text_config when it has one)."""
    text = raw_config.get("text_config") or raw_config
    return int(text.get("mtp_num_hidden_layers", raw_config.get("mtp_num_hidden_layers", 0)) or 0)


class MTP(nn.Module):
    def __init__(self, config: TextConfig, num_layers: int = 1):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.pre_fc_norm_embedding = ZeroCenteredRMSNorm(H, eps)
        self.pre_fc_norm_hidden = ZeroCenteredRMSNorm(H, eps)
        self.norm = ZeroCenteredRMSNorm(H, eps)
        self.layers = [DecoderLayer(config, "full_attention") for _ in range(num_layers)]
        self._rope = MRoPE(config.rotary_dim, config.rope_theta, config.mrope_section, config.mrope_interleaved)
        # The main model's embedding and head, set by Model (plain attributes: not parameters of this module).
        self.embed = None
        self.head = None

    def make_cache(self) -> list:
        return [KVCache() for _ in self.layers]

    def hidden(self, hidden, next_ids, position_ids=None, cache=None, embed=None):
        """hidden [B, L, H] (the main model's final-normed h_t), next_ids [B, L] (token t+1);
        position_ids [3, B, L] (default: text positions continuing `cache`, i.e. position t).
        Returns the MTP layer stack's output before mtp.norm [B, L, H]."""
        embed = embed or self.embed
        e = self.pre_fc_norm_embedding(embed(next_ids))
        h = self.pre_fc_norm_hidden(hidden.astype(e.dtype))
        z = self.fc(mx.concatenate([e, h], axis=-1))
        B, L, _ = z.shape
        if position_ids is None:
            start = cache_offset(cache)
            position_ids = mx.broadcast_to(mx.arange(start, start + L), (3, B, L))
        rotary = self._rope(position_ids, z.dtype)
        for layer, layer_cache in zip(self.layers, cache or [None] * len(self.layers)):
            z = layer(z, rotary, layer_cache)
        return z

    def logits(self, z):
        """Logits for token t+2 from the layer stack's output `z` [..., H] (`hidden`)."""
        return self.head(self.norm(z))

    def __call__(self, hidden, next_ids, position_ids=None, cache=None):
        """Logits [B, L, V] for token t+2 from (h_t, token t+1)."""
        return self.logits(self.hidden(hidden, next_ids, position_ids, cache))
