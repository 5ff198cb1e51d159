"""Routed experts streamed from disk: the on-disk store, the byte-budgeted cache over it, and the cached
expert source the MoE block calls instead of resident stacked tensors."""

from .cache import AdaptiveLRFUPolicy, ExpertCache, LRFUPolicy, LRUPolicy, simulate, simulate_optimal
from .source import CachedExperts, attach_expert_cache
from .store import (
                    CheckpointExpertStore,
                    ExpertReadError,
                    ExpertStore,
                    ExpertStoreError,
                    open_store,
                    write_expert_store,
)

__all__ = [
                    "AdaptiveLRFUPolicy",
                    "CachedExperts",
                    "CheckpointExpertStore",
                    "ExpertCache",
                    "ExpertReadError",
                    "ExpertStore",
                    "ExpertStoreError",
                    "LRFUPolicy",
                    "LRUPolicy",
                    "attach_expert_cache",
                    "open_store",
                    "simulate", "simulate_optimal",
                    "write_expert_store",
]
