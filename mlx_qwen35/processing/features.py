"""Vision features into input embeddings, one image / video at a time through a small LRU keyed by a hash
of its pixel values, so a prompt that shows the same picture again does not run the vision tower again."""

import hashlib
from collections import OrderedDict

import mlx.core as mx
import numpy as np




class VisionFeatureCache:
    def __init__(self, max_items: int = 8):
        self.max_items = max_items
        self.entries = OrderedDict()
        self.hits = self.misses = 0

    def features(self, visual, pixels: np.ndarray, grid) -> mx.array:
        """Merged features [t*h*w/merge**2, D] of one image or video: pixels [t*h*w, C*T*P*P], grid (t, h, w)."""
        pixels = np.ascontiguousarray(np.asarray(pixels, np.float32))
        grid = tuple(int(v) for v in grid)
        key = (id(visual), grid, hashlib.sha1(pixels.data).hexdigest())
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        weight = visual.patch_embed.proj.weight
        dtype = weight.dtype if mx.issubdtype(weight.dtype, mx.floating) else mx.float32
        value = visual(mx.array(pixels).astype(dtype), mx.array([grid]))
        mx.eval(value)
        self.entries[key] = value
        while len(self.entries) > self.max_items:
            self.entries.popitem(last=False)
        return value

    def clear(self):
        self.entries.clear()


def items_after(ids, items: dict, start: int, image_token_id: int, video_token_id: int, merge: int = 2):
    """The items (lists of (pixels, grid_thw, ...) per kind, Processor.prepare) whose placeholders lie in
    ids[start:] (ids: one row); None when `start` cuts a run."""
    ids = np.asarray(ids).reshape(-1)
    out = {}
    for kind, token in (("image", image_token_id), ("video", video_token_id)):
        before, done = int((ids[:start] == token).sum()), 0
        for i, item in enumerate(items[kind]):
            if before == 0:
                break
            size = int(np.prod(item[1])) // merge**2
            if before < size:
                return None
            before, done = before - size, i + 1
        out[kind] = items[kind][done:]
    return out


def multimodal_embeddings(model, input_ids, items: dict, cache: VisionFeatureCache, offset: int = 0,
                          rope_delta=None):
    """Model.embed_multimodal with features from `cache`: input_ids [1, L] (continuing a model cache of
    `offset` tokens and rope delta `rope_delta`), items as Processor.prepare returns them.
    Returns (input_embeddings [1, L, H], position_ids [3, 1, L], rope_delta [1])."""
    visual = getattr(model.model, "visual", None)

    def encode(pixels, grids):  # one cache entry per image or video
        rows = np.asarray(grids).reshape(-1, 3).prod(axis=1)
        bounds = np.concatenate([[0], np.cumsum(rows)])
        return mx.concatenate([cache.features(visual, pixels[int(a):int(b)], grid)
                               for a, b, grid in zip(bounds[:-1], bounds[1:], np.asarray(grids).reshape(-1, 3))])

    media = {}
    for kind in ("image", "video"):
        if items.get(kind):
            media[kind] = (np.concatenate([np.asarray(item[0]) for item in items[kind]]),
                           np.array([item[1] for item in items[kind]]).reshape(-1, 3))
    image, video = media.get("image", (None, None)), media.get("video", (None, None))
    return model.embed_multimodal(np.asarray(input_ids).reshape(1, -1), image[0], image[1], video[0], video[1],
                                  offset=offset, rope_delta=rope_delta, encode=encode)
