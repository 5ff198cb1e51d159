"""The whole Qwen 3.5 model as the checkpoint names it: `model.language_model` (text decoder), `model.visual`
(vision tower, when the config has one) and `lm_head` (absent when tied to the embeddings). Vision features
reach the text model only as input embeddings plus 3-D position ids, so text, images and video share one
decode path and one cache. `mtp` (the multi-token prediction head) is built when the loader finds `mtp.*`
tensors and the config asks for MTP layers; otherwise `mtp.*` tensors are kept raw in `extra_weights`."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cache import cache_offset
from ..config import ModelConfig
from ..processing.positions import rope_index
from .mtp import MTP
from .text import TextModel
from .vision import VisionConfig, VisionModel


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.language_model = TextModel(config.text_config)
        if config.vision_config is not None:
            self.visual = VisionModel(VisionConfig.from_dict(config.vision_config))


class ModelCache(list):
    """The per-layer caches plus the rope delta of a multimodal prompt: decoding the token at cache index p
    uses position p + rope_delta on all three axes (None = text only, delta 0)."""

    rope_delta = None


class Model(nn.Module):
    def __init__(self, config: ModelConfig, mtp_layers: int = 0):
        """`mtp_layers` > 0 builds the MTP head (`mtp.*`) with that many decoder layers."""
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        if mtp_layers > 0:
            self.mtp = MTP(config.text_config, mtp_layers)
            # bound methods, not modules: the MTP head shares the main embedding and head without owning them
            self.mtp.embed, self.mtp.head = self._embed, self.logits
        else:
            self.mtp = None
        self._extra_weights = {}

    @property
    def layers(self):
        return self.model.language_model.layers

    @property
    def extra_weights(self) -> dict:
        """Checkpoint tensors of parts not built yet (`mtp.*`), loaded lazily."""
        return self._extra_weights

    def make_cache(self) -> ModelCache:
        return ModelCache(self.model.language_model.make_cache())

    def make_mtp_cache(self) -> list:
        """The MTP head's own KV cache (one per MTP layer)."""
        if self.mtp is None:
            raise ValueError("this model has no MTP head (its checkpoint has no mtp.* tensors)")
        return self.mtp.make_cache()

    def mtp_logits(self, hidden, next_ids, position_ids=None, cache=None):
        """MTP logits [B, L, V] for token t+2 from hidden [B, L, H] (the main model's final-normed hidden
        state h_t) and next_ids [B, L] (token t+1). position_ids [3, B, L] are the target's positions of h_t
        (default: text positions continuing the MTP `cache`, from make_mtp_cache)."""
        if self.mtp is None:
            raise ValueError("this model has no MTP head (its checkpoint has no mtp.* tensors)")
        return self.mtp(hidden, next_ids, position_ids, cache)

    def _embed(self, ids):
        return self.model.language_model.embed_tokens(ids)

    def __call__(self, inputs=None, cache=None, input_embeddings=None, position_ids=None, logits_to_keep=0, *,
                 rope_delta=None, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                 video_grid_thw=None):
        """inputs [B, L] token ids -> logits [B, L, V] (only the last `logits_to_keep` positions if > 0).

        With pixel_values / pixel_values_videos, their features replace the image / video placeholder tokens
        of `inputs` and the 3-D positions are computed; the resulting rope delta is stored on a ModelCache
        so later calls with that cache decode at the right positions. `rope_delta` overrides the stored one."""
        L = (inputs if input_embeddings is None else input_embeddings).shape[1]
        offset = cache_offset(cache)
        limit = self.config.text_config.max_position_embeddings
        if offset + L > limit:
            raise ValueError(f"sequence of {offset + L} tokens exceeds max_position_embeddings = {limit}")
        if rope_delta is None and offset:
            rope_delta = getattr(cache, "rope_delta", None)
        if pixel_values is not None or pixel_values_videos is not None:
            if input_embeddings is not None or position_ids is not None:
                raise ValueError("pass token ids (not input_embeddings or position_ids) with pixel values")
            input_embeddings, position_ids, rope_delta = self.embed_multimodal(
                inputs, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, offset, rope_delta)
        if isinstance(cache, ModelCache):
            cache.rope_delta = rope_delta
        h = self.model.language_model(inputs, cache, input_embeddings, position_ids, rope_delta)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.logits(h)

    def embed_multimodal(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                         video_grid_thw=None, offset=0, rope_delta=None, encode=None):
        """input_ids [B, L] whose image / video placeholder tokens (spec 4.4 layout) are replaced, in order
        across the batch, by the vision features of pixel_values [N, C*T*P*P] with image_grid_thw [n, 3]
        (and likewise for video). `offset` and `rope_delta` describe a cache the ids continue (0 and None
        for a fresh prompt); `encode(pixels, grid)` replaces the vision tower call (a feature cache).
        Returns (input_embeddings [B, L, H], position_ids [3, B, L], rope_delta [B])."""
        ids = np.array(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length]; got shape {ids.shape}")
        visual = getattr(self.model, "visual", None)
        cfg = self.config
        merge = visual.config.spatial_merge_size if visual is not None else 2
        inputs = [("image", cfg.image_token_id, pixel_values, image_grid_thw),
                  ("video", cfg.video_token_id, pixel_values_videos, video_grid_thw)]
        for name, token, pixels, grid in inputs:
            if (pixels is None) != (grid is None):
                raise ValueError(f"{name}: pass both the pixel values and their grid_thw, or neither")
            if pixels is not None and visual is None:
                raise ValueError(f"this checkpoint has no vision tower; it cannot take {name} input")
            tokens = int((ids == token).sum())
            features = 0 if grid is None else int(np.asarray(grid).reshape(-1, 3).prod(axis=1).sum()) // merge**2
            if tokens != features:
                raise ValueError(f"input_ids hold {tokens} {name} placeholder tokens but the {name} grids give "
                                 f"{features} {name} features")
        previous = np.zeros(ids.shape[0], np.int64) if rope_delta is None else np.array(rope_delta)
        positions, delta = rope_index(ids, image_grid_thw, video_grid_thw, image_token_id=cfg.image_token_id,
                                      video_token_id=cfg.video_token_id, spatial_merge_size=merge,
                                      start=offset + previous)

        embeddings = self.model.language_model.embed_tokens(mx.array(ids))
        B, L, H = embeddings.shape
        flat = embeddings.reshape(B * L, H)
        encode = encode or visual
        for name, token, pixels, grid in inputs:
            if pixels is not None:
                features = encode(pixels, grid)
                flat[mx.array(np.flatnonzero(ids.reshape(-1) == token))] = features.astype(flat.dtype)
        return flat.reshape(B, L, H), mx.array(positions), mx.array(delta + previous)

    def logits(self, hidden):
        if self.config.tie_word_embeddings:
            return self.model.language_model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)
