"""Per-layer caches behind mlx-lm's cache protocol (update_and_fetch, state, trim, nbytes, ...): a KV cache
for attention layers and a two-slot array cache (conv context, float32 recurrent state) for DeltaNet layers,
plus snapshot/restore of a whole model cache for speculative decoding and prompt caching."""

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.cache import ArraysCache, KVCache

__all__ = ["KVCache", "DeltaNetCache", "snapshot", "restore", "mark_position", "rewind", "cache_offset",
           "cache_nbytes"]


class DeltaNetCache(ArraysCache):
    """slot 0: the last kernel-1 pre-conv inputs [B, K-1, conv_dim]; slot 1: the state [B, Hv, Dv, Dk]."""

    def __init__(self):
        super().__init__(size=2)


def _fresh(x):
    # A new array object: later in-place cache writes rebind the cache's arrays, never the snapshot's.
    return mx.array(x) if isinstance(x, mx.array) else x


def snapshot(cache: list) -> list:
    """Capture every layer's state; `restore` puts it back. Cheap: arrays are immutable values."""
    states = []
    for layer_cache in cache:
        if isinstance(layer_cache, KVCache):
            keys, values, offset = layer_cache.state if layer_cache.keys is not None else (None, None, 0)
            if keys is not None:
                keys, values = keys[..., :offset, :], values[..., :offset, :]
            states.append(("kv", keys, values, offset))
        else:
            states.append(("arrays", tree_map(_fresh, list(layer_cache.cache))))
    return states


def restore(cache: list, states: list) -> None:
    if len(cache) != len(states):
        raise ValueError(f"snapshot has {len(states)} layers, cache has {len(cache)}")
    for layer_cache, state in zip(cache, states):
        if state[0] == "kv":
            _, keys, values, offset = state
            layer_cache.keys, layer_cache.values = _fresh(keys), _fresh(values)
            layer_cache.offset = offset
        else:
            layer_cache.cache = tree_map(_fresh, list(state[1]))


def mark_position(cache: list):
    """What `rewind` needs to undo the tokens run after this point: the attention caches' offset (they are
    trimmed back) and the DeltaNet arrays themselves (a recurrent state cannot be trimmed; each step replaces
    these arrays, so keeping them costs no copy)."""
    return cache_offset(cache), [None if c.is_trimmable() else list(c.cache) for c in cache]


def rewind(cache: list, mark) -> None:
    offset, saved = mark
    for layer_cache, arrays in zip(cache, saved):
        if arrays is None:
            layer_cache.trim(layer_cache.offset - offset)
        else:
            layer_cache.cache = list(arrays)


def cache_offset(cache: list | None) -> int:
    """Tokens already seen, read from the first attention layer's cache (DeltaNet caches keep no count)."""
    for layer_cache in cache or []:
        if isinstance(layer_cache, KVCache):
            return layer_cache.offset
    return 0


def cache_nbytes(cache: list) -> int:
    return sum(x.nbytes for _, x in tree_flatten([c.state for c in cache]) if isinstance(x, mx.array))
