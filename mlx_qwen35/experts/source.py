"""The cached expert source: a drop-in for `Experts` / `QuantizedExperts` (the resident source) whose weights
come from an ExpertCache. It stacks only the routed experts, remaps the indices onto that stack and runs the
resident module's own code on it, so outputs are bit-identical to the fully loaded model."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..models.moe import Experts, QuantizedExperts
from .cache import ExpertCache
from .store import open_store

EXPERT_KEY = ".mlp.experts."


class CachedExperts(nn.Module):
    def __init__(self, cache: ExpertCache, layer: int, quantization: tuple | None = None, next_layer=None,
                 next_gate=None, next_top_k: int = 0):
        super().__init__()
        self.cache, self.layer, self.next_layer, self.next_top_k = cache, layer, next_layer, next_top_k
        # Plain attributes: nn.Module would file a tuple or a module (the next layer's router) as parameters.
        object.__setattr__(self, "quantization", quantization)
        object.__setattr__(self, "_next_gate", next_gate)

    def _view(self, arrays: dict) -> Experts:
        """An Experts (or QuantizedExperts) over just the stacked routed experts."""
        if self.quantization is None:
            view = Experts.__new__(Experts)
            nn.Module.__init__(view)
        else:
            view = QuantizedExperts.__new__(QuantizedExperts)
            nn.Module.__init__(view)
            view.group_size, view.bits, view.mode = self.quantization
        for name, values in arrays.items():
            view[name] = mx.stack(values)
        return view

    def _predict_next(self, x):
        if self._next_gate is None:
            return None
        logits = np.array(self._next_gate(x).astype(mx.float32))
        top = np.argpartition(-logits, self.next_top_k - 1, axis=-1)[:, : self.next_top_k]
        return np.unique(top)

    def __call__(self, x, expert_indices):
        """x [N, H], expert_indices [N, K] -> per-choice outputs [N, K, H], as Experts.__call__."""
        N, K = expert_indices.shape
        # The one sync per layer: the cache has to know which experts were routed to.
        indices = np.array(expert_indices)
        distinct = np.unique(indices)
        predicted = self._predict_next(x)
        if len(distinct) <= self.cache.max_experts(self.layer):
            return self._run_group(x, indices, distinct, predicted)
        # More distinct experts than the budget holds (prefill under a small budget): one choice per row, a
        # group of experts at a time; every row's product is independent of the others, so still exact.
        # Groups are cut one at a time: memory pressure may shrink the budget between them.
        flat = indices.reshape(-1)
        rows = mx.repeat(x, K, axis=0)
        outputs, order, start = [], [], 0
        while start < len(distinct):
            group = distinct[start: start + self.cache.max_experts(self.layer)]
            start += len(group)
            selected = np.nonzero(np.isin(flat, group))[0]
            outputs.append(self._run_group(rows[mx.array(selected)], flat[selected][:, None], group,
                                           predicted if start == len(distinct) else None))
            order.append(selected)
        inverse = np.argsort(np.concatenate(order))
        return mx.concatenate(outputs)[mx.array(inverse)].reshape(N, K, -1)

    def _run_group(self, x, indices: np.ndarray, group: np.ndarray, predicted):
        prefetch = (self.next_layer, predicted) if predicted is not None else None
        weights = self.cache.get(self.layer, group, prefetch=prefetch)
        try:
            local = np.searchsorted(group, indices).astype(np.uint32)
            out = self._view(weights)(x, mx.array(local))
            # Evaluated before the experts are released, so evicting them frees their memory.
            mx.eval(out)
            return out
        finally:
            self.cache.release(self.layer, group)


def attach_expert_cache(model, checkpoint, weights: dict, cache_gb: float, dtype, policy="lrfu-adaptive",
                        prefetch: bool = True, io_threads: int = 4, store=None, memory_limit_bytes=None) -> dict:
    """Swap every MoE layer's experts for a CachedExperts over one shared ExpertCache of `cache_gb` (1e9 bytes)
    and return `weights` without the routed expert tensors, which are then only ever read through the store
    (`store`, else the dedicated store beside the checkpoint when there is one, else the checkpoint's
    safetensors)."""
    layers = model.layers
    moe = [i for i, layer in enumerate(layers) if isinstance(getattr(layer.mlp, "experts", None), Experts)]
    if not moe:
        raise ValueError("expert_cache_gb was given but the model has no routed experts (not a MoE checkpoint)")
    store = store if store is not None else open_store(checkpoint)
    if sorted(store.layers) != moe:
        store.close()
        raise ValueError(f"the expert store holds layers {store.layers}, the model has MoE layers {moe}")
    top_k = max(layers[i].mlp.top_k for i in moe)
    try:
        cache = ExpertCache(store, round(cache_gb * 1e9), policy=policy, top_k=top_k, dtype=dtype,
                            io_threads=io_threads, memory_limit_bytes=memory_limit_bytes)
    except ValueError:
        store.close()
        raise
    for position, i in enumerate(moe):
        experts = layers[i].mlp.experts
        quantization = ((experts.group_size, experts.bits, experts.mode) if isinstance(experts, QuantizedExperts)
                        else None)
        following = moe[position + 1] if prefetch and position + 1 < len(moe) else None
        layers[i].mlp.experts = CachedExperts(
            cache, i, quantization, next_layer=following,
            next_gate=layers[following].mlp.gate if following is not None else None,
            next_top_k=layers[following].mlp.top_k if following is not None else 0)
    model.expert_cache = cache
    return {k: v for k, v in weights.items() if EXPERT_KEY not in k}
