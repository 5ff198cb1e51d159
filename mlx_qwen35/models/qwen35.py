"""The whole Qwen 3.5 model as the checkpoint names it: `model.language_model` (text decoder),
`lm_head` (absent when tied to the embeddings); `model.visual` and `mtp` are kept as raw tensors
until the vision tower and MTP head consume them."""

import mlx.nn as nn

from ..cache import cache_offset
from ..config import ModelConfig
from .text import TextModel


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.language_model = TextModel(config.text_config)


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self._extra_weights = {}

    @property
    def layers(self):
        return self.model.language_model.layers

    @property
    def extra_weights(self) -> dict:
        """Checkpoint tensors of parts not built yet (`model.visual.*`, `mtp.*`), loaded lazily."""
        return self._extra_weights

    def make_cache(self) -> list:
        return self.model.language_model.make_cache()

    def __call__(self, inputs=None, cache=None, input_embeddings=None, position_ids=None, logits_to_keep=0):
        """inputs [B, L] token ids -> logits [B, L, V] (only the last `logits_to_keep` positions if > 0)."""
        L = (inputs if input_embeddings is None else input_embeddings).shape[1]
        limit = self.config.text_config.max_position_embeddings
        if cache_offset(cache) + L > limit:
            raise ValueError(f"sequence of {cache_offset(cache) + L} tokens exceeds max_position_embeddings "
                             f"= {limit}")
        h = self.model.language_model(inputs, cache, input_embeddings, position_ids)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.logits(h)

    def logits(self, hidden):
        if self.config.tie_word_embeddings:
            return self.model.language_model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)
