"""A byte-budgeted cache of routed expert weights over an expert store.

Misses are read with positional reads on a thread pool (one future per distinct expert, so all tokens of a
prefill chunk routed to an expert share one load); prefetches go to the same pool and are collected later.
Every resident expert and every read in flight holds its bytes against `budget_bytes`. All bookkeeping
runs on the caller's thread: workers only read bytes, so MLX arrays are only made on the caller's thread.
Under memory pressure (MLX's active memory would pass `memory_limit_bytes`, or an allocation fails) the
budget shrinks, never below one layer's active experts, instead of the process failing.
"""

import heapq
import math
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import mlx.core as mx

from .store import ExpertReadError

MLX_DTYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "U32": mx.uint32, "U8": mx.uint8,
              "I32": mx.int32, "F64": mx.float32}
ITEMSIZE = {mx.float32: 4, mx.float16: 2, mx.bfloat16: 2, mx.uint32: 4, mx.uint8: 1, mx.int32: 4}


# ----------------------------------------------------------------------------------------------- policies
class LRUPolicy:
    """Evict the least recently used expert (the baseline, kept for comparison)."""

    name = "lru"

    def configure(self, capacity: int, layers):
        self.order = OrderedDict()

    def access(self, key, now: int):
        self.order[key] = None
        self.order.move_to_end(key)

    insert = access

    def remove(self, key):
        self.order.pop(key, None)

    def victim(self, pinned):
        return next((k for k in self.order if k not in pinned), None)


class LRFUPolicy:
    """Frequency-aware eviction with per-layer balance.

    Each expert's score is an exponentially decayed access count (LRFU): score = 1 + score * 2^(-dt/half_life),
    with `now` counted in layer calls. Scores are kept as log2(score) + t/half_life, which orders entries the
    same at any time, so one heap per layer with lazy deletion finds victims in O(log n). A layer keeps at least
    `balance * capacity / layers` entries, so hot layers cannot starve the others.
    """

    name = "lrfu"

    def __init__(self, half_life: float | None = None, balance: float = 0.5):
        self.half_life, self.balance = half_life, balance

    def configure(self, capacity: int, layers):
        layers = list(layers)
        self.h = self.half_life or 16.0 * max(1, len(layers))  # about 16 tokens
        self.floor = int(self.balance * capacity / max(1, len(layers)))
        self.score, self.heaps, self.counts = {}, {layer: [] for layer in layers}, {layer: 0 for layer in layers}

    def access(self, key, now: int):
        t = now / self.h
        old = self.score.get(key)
        # log2(1 + 2^(old - t)), stable for very old entries
        new = t + (math.log2(1.0 + 2.0 ** (old - t)) if old is not None and old - t > -60 else 0.0)
        if old is None:
            self.counts[key[0]] = self.counts.get(key[0], 0) + 1
            self.heaps.setdefault(key[0], [])
        self.score[key] = new
        heap = self.heaps[key[0]]
        heapq.heappush(heap, (new, key))
        if len(heap) > 4 * self.counts[key[0]] + 64:  # drop stale entries now and then
            self.heaps[key[0]] = [(v, k) for k, v in self.score.items() if k[0] == key[0]]
            heapq.heapify(self.heaps[key[0]])

    insert = access

    def remove(self, key):
        if self.score.pop(key, None) is not None:
            self.counts[key[0]] -= 1

    def _min(self, layer, pinned):
        heap, held, found = self.heaps[layer], [], None
        while heap:
            score, key = heap[0]
            if self.score.get(key) != score:
                heapq.heappop(heap)  # stale
            elif key in pinned:
                held.append(heapq.heappop(heap))
            else:
                found = (score, key)
                break
        for item in held:
            heapq.heappush(heap, item)
        return found

    def victim(self, pinned):
        for respect_floor in (True, False):
            best = None
            for layer in self.heaps:
                if respect_floor and self.counts[layer] <= self.floor:
                    continue
                candidate = self._min(layer, pinned)
                if candidate and (best is None or candidate[0] < best[0]):
                    best = candidate
            if best:
                return best[1]
        return None


class AdaptiveLRFUPolicy:
    """LRFU whose half-life follows the workload. Which half-life wins depends on the routing: a short one
    (recency) when tokens reuse the previous tokens' experts, a long one (frequency) when popularity is
    skewed but reuse is not. Shadow caches of the same capacity replay the demand accesses under each
    candidate half-life (keys only, no data); evictions follow the candidate with the most recent shadow hits.
    """

    name = "lrfu-adaptive"

    def __init__(self, half_lives=(1.0, 4.0, 16.0), balance: float = 0.5, memory_tokens: float = 64.0):
        self.half_lives, self.balance, self.memory_tokens = half_lives, balance, memory_tokens

    def configure(self, capacity: int, layers):
        layers = list(layers)
        n = max(1, len(layers))  # half-lives are given in tokens, `now` counts layer calls

        def make():
            policies = [LRFUPolicy(h * n, self.balance) for h in self.half_lives]
            for policy in policies:
                policy.configure(capacity, layers)
            return policies

        self.rankers, self.shadows = make(), make()
        self.resident = [set() for _ in self.half_lives]
        self.capacity = capacity
        self.hits = [0.0] * len(self.half_lives)
        self.decay = 1.0 - 1.0 / (self.memory_tokens * n)
        self.best = len(self.half_lives) // 2

    def _replay(self, key, now: int):
        for i, (shadow, resident) in enumerate(zip(self.shadows, self.resident)):
            self.hits[i] *= self.decay
            if key in resident:
                self.hits[i] += 1.0
                shadow.access(key, now)
                continue
            while len(resident) >= self.capacity:
                victim = shadow.victim({key})
                resident.discard(victim)
                shadow.remove(victim)
            resident.add(key)
            shadow.insert(key, now)
            shadow.access(key, now)
        self.best = max(range(len(self.hits)), key=self.hits.__getitem__)

    def access(self, key, now: int):
        """A demand access (ExpertCache calls it once per routed expert)."""
        self._replay(key, now)
        for ranker in self.rankers:
            ranker.access(key, now)

    def insert(self, key, now: int):
        for ranker in self.rankers:
            ranker.insert(key, now)

    def remove(self, key):
        for ranker in self.rankers:
            ranker.remove(key)

    def victim(self, pinned):
        return self.rankers[self.best].victim(pinned)


POLICIES = {"lru": LRUPolicy, "lrfu": LRFUPolicy, "lrfu-adaptive": AdaptiveLRFUPolicy}


def make_policy(policy):
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"unknown expert cache policy {policy!r}: choose one of {sorted(POLICIES)}")
        return POLICIES[policy]()
    return policy


def simulate(policy, trace, capacity: int) -> float:
    """Hit rate of `policy` holding `capacity` experts over `trace`, a list of (layer, experts) calls; the
    experts of the current call are never evicted while it runs (as in ExpertCache)."""
    policy = make_policy(policy)
    policy.configure(capacity, sorted({layer for layer, _ in trace}))
    resident, hits, total = set(), 0, 0
    for now, (layer, experts) in enumerate(trace):
        pinned = {(layer, int(e)) for e in experts}
        for key in pinned:
            total += 1
            if key in resident:
                hits += 1
                policy.access(key, now)
                continue
            while len(resident) >= capacity:
                victim = policy.victim(pinned)
                resident.discard(victim)
                policy.remove(victim)
            resident.add(key)
            policy.insert(key, now)
            policy.access(key, now)  # as ExpertCache: a demand read is inserted, then accessed
    return hits / max(1, total)


def simulate_optimal(trace, capacity: int) -> float:
    """The hit rate of Belady's offline optimum over `trace` (as `simulate`): on a miss, evict the resident
    expert whose next use is furthest away. No online policy can do better at this capacity; prefetching is
    the only way past it."""
    keys = [[(layer, int(e)) for e in dict.fromkeys(experts)] for layer, experts in trace]
    if keys and capacity < max(map(len, keys)):
        raise ValueError(f"capacity {capacity} is below one call's {max(map(len, keys))} experts")
    next_use, seen = [None] * len(keys), {}
    for now in range(len(keys) - 1, -1, -1):
        next_use[now] = [seen.get(key, math.inf) for key in keys[now]]
        seen.update((key, now) for key in keys[now])
    resident, furthest, hits, total = {}, [], 0, 0  # resident: key -> its next use; furthest: a lazy max-heap
    for now, call in enumerate(keys):
        pinned = set(call)
        for key, following in zip(call, next_use[now]):
            total += 1
            if key in resident:
                hits += 1
            else:
                skipped = []
                while len(resident) >= capacity:
                    negated, victim = heapq.heappop(furthest)
                    if resident.get(victim) != -negated:
                        continue  # a stale entry: that key was used again since
                    if victim in pinned:
                        skipped.append((negated, victim))
                        continue
                    del resident[victim]
                for entry in skipped:
                    heapq.heappush(furthest, entry)
            resident[key] = following
            heapq.heappush(furthest, (-following, key))
    return hits / max(1, total)


# ------------------------------------------------------------------------------------------------ stats
@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0
    reads: int = 0
    read_seconds: float = 0.0  # summed over reader threads
    stall_seconds: float = 0.0  # time the caller waited for reads
    prefetch_issued: int = 0
    prefetch_hits: int = 0  # demand accesses served by a prefetched expert
    prefetch_wasted: int = 0  # prefetched experts evicted before any use
    predicted: int = 0
    predicted_correct: int = 0
    read_errors: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)

    @property
    def prefetch_accuracy(self) -> float:
        return self.predicted_correct / max(1, self.predicted)

    def add(self, other: "LayerStats"):
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(hit_rate=self.hit_rate, prefetch_accuracy=self.prefetch_accuracy)
        return out


@dataclass
class _Entry:
    arrays: dict
    nbytes: int
    prefetched: bool = False  # loaded by a prefetch and not used yet


# ------------------------------------------------------------------------------------------------ cache
class ExpertCache:
    """At most `budget_bytes` of expert weights (resident plus in flight) read from `store`.

    `get(layer, experts)` returns {name: [array per expert]} for the experts (their count must fit the budget,
    see `max_experts`); the returned experts stay pinned until `release(layer)`. `prefetch(layer, experts)`
    starts reads in the background without waiting. `dtype` casts float tensors on load, as `load` casts
    resident weights, so cached and resident weights are the same arrays bit for bit. `memory_limit_bytes`
    (default: MLX's memory limit, `mx.get_memory_limit()`) is checked against `mx.get_active_memory()`
    before each read; `shrink` lowers the budget by hand.
    """

    def __init__(self, store, budget_bytes: int, policy="lrfu-adaptive", top_k: int | None = None, dtype=None,
                 io_threads: int = 4, memory_limit_bytes: int | None = None):
        self.store, self.dtype = store, dtype
        self.layers = list(store.layers)
        self.expert_nbytes = {layer: self._memory_nbytes(layer) for layer in self.layers}
        self.top_k = top_k or 1
        largest = max(self.expert_nbytes.values())
        minimum = self.top_k * largest
        if budget_bytes < minimum:
            raise ValueError(f"expert cache budget {budget_bytes} bytes ({budget_bytes / 1e9:.4f} GB) is below one "
                             f"layer's active experts: at least {minimum} bytes ({minimum / 1e9:.4f} GB = "
                             f"{self.top_k} experts x {largest} bytes) are needed")
        self.budget_bytes = int(budget_bytes)
        self.minimum_bytes = minimum
        self.memory_limit = memory_limit_bytes if memory_limit_bytes is not None else mx.get_memory_limit()
        self.shrinks = []  # (call counter, new budget, reason)
        self.policy = make_policy(policy)
        self.policy.configure(self.budget_bytes // largest, self.layers)
        self.entries, self.inflight, self.pinned = {}, {}, set()
        self.used_bytes = 0  # resident entries
        self.reserved_bytes = 0  # reads in flight
        self.peak_bytes = 0
        self.now = 0
        self.predictions, self.failed = {}, {}
        self.stats = {layer: LayerStats() for layer in self.layers}
        self.pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="expert-io")

    def _memory_nbytes(self, layer: int) -> int:
        total = 0
        for _, dtype, shape in self.store.components(layer):
            target = MLX_DTYPES[dtype]
            if self.dtype is not None and mx.issubdtype(target, mx.floating):
                target = self.dtype
            total += math.prod(shape) * ITEMSIZE[target]
        return total

    def max_experts(self, layer: int) -> int:
        return self.budget_bytes // self.expert_nbytes[layer]

    @property
    def nbytes(self) -> int:
        return self.used_bytes + self.reserved_bytes

    # -- reads
    def _read(self, layer, expert):
        start = time.perf_counter()
        arrays = self.store.read(layer, expert)
        return arrays, time.perf_counter() - start

    def _to_mlx(self, layer, arrays: dict) -> dict:
        out = {}
        for name, dtype, _ in self.store.components(layer):
            value = mx.array(arrays[name])
            if dtype == "BF16":
                value = value.view(mx.bfloat16)
            elif dtype == "F64":
                value = value.astype(mx.float32)
            if self.dtype is not None and mx.issubdtype(value.dtype, mx.floating):
                value = value.astype(self.dtype)
            out[name] = value
        mx.eval(out)
        return out

    def _submit(self, key, prefetched: bool):
        nbytes = self.expert_nbytes[key[0]]
        self.failed.pop(key, None)
        self.reserved_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        self.inflight[key] = (self.pool.submit(self._read, *key), nbytes, prefetched)

    def _finish(self, key, wait: bool = True):
        """Turn a finished (or, with wait, any) in-flight read into an entry. Returns the error, if any."""
        future, nbytes, prefetched = self.inflight[key]
        if not wait and not future.done():
            return None
        stats = self.stats[key[0]]
        if not future.done():
            start = time.perf_counter()
            future.exception()
            stats.stall_seconds += time.perf_counter() - start
        del self.inflight[key]
        self.reserved_bytes -= nbytes
        error = future.exception()
        if error is not None:
            stats.read_errors += 1
            self.failed[key] = error
            return error
        arrays, seconds = future.result()
        stats.reads += 1
        stats.read_seconds += seconds
        stats.bytes_read += sum(a.nbytes for a in arrays.values())
        try:
            value = self._to_mlx_or_shrink(key[0], arrays)
        except (MemoryError, RuntimeError) as error:
            stats.read_errors += 1
            self.failed[key] = error
            return error
        self.entries[key] = _Entry(value, nbytes, prefetched)
        self.used_bytes += nbytes
        self.policy.insert(key, self.now)
        return None

    def _to_mlx_or_shrink(self, layer, arrays):
        """On an allocation failure: halve the budget, evict down to it and try once more."""
        try:
            return self._to_mlx(layer, arrays)
        except (MemoryError, RuntimeError) as error:
            if not isinstance(error, MemoryError) and "allocat" not in str(error).lower():
                raise
            self.shrink(self.budget_bytes // 2, reason=f"allocation failed: {error}")
            mx.clear_cache()
            return self._to_mlx(layer, arrays)

    def shrink(self, budget_bytes: int, reason: str = "requested") -> int:
        """Lower the budget to `budget_bytes` (never below one layer's active experts) and evict unpinned
        experts down to it. Returns the new budget."""
        # The experts of the call in progress stay within the budget, so that call can still finish.
        floor = max(self.minimum_bytes, sum(self.expert_nbytes[layer] for layer, _ in self.pinned))
        new = max(floor, min(self.budget_bytes, int(budget_bytes)))
        if new < self.budget_bytes:
            self.budget_bytes = new
            self.shrinks.append((self.now, new, reason))
            self._make_room(0, wait=False)
        return self.budget_bytes

    def _check_pressure(self, incoming: int):
        if not self.memory_limit:
            return
        over = mx.get_active_memory() + incoming - self.memory_limit
        if over > 0:
            self.shrink(self.budget_bytes - over, reason=f"active memory over the {self.memory_limit} byte limit")

    def _collect(self):
        for key in [k for k, (f, _, _) in self.inflight.items() if f.done()]:
            self._finish(key)

    def _evict(self, key):
        entry = self.entries.pop(key)
        self.used_bytes -= entry.nbytes
        self.policy.remove(key)
        stats = self.stats[key[0]]
        stats.evictions += 1
        stats.prefetch_wasted += entry.prefetched

    def _make_room(self, nbytes: int, wait: bool) -> bool:
        if nbytes:
            self._check_pressure(nbytes)
        while self.used_bytes + self.reserved_bytes + nbytes > self.budget_bytes:
            victim = self.policy.victim(self.pinned)
            if victim is not None:
                self._evict(victim)
                continue
            if not wait or not self.inflight:
                return False
            # Only reads in flight hold the remaining bytes: wait for the oldest and make it evictable.
            key = next(iter(self.inflight))
            self._finish(key)
        return True

    # -- public
    def get(self, layer: int, experts, prefetch=None) -> dict:
        """Pin and return the weights of `experts` (distinct ids) of `layer`: {name: [array per expert]}.
        `prefetch` = (layer, experts) is submitted after this call's own reads and before waiting for them,
        so it overlaps them and the compute that follows. A read error raises ExpertReadError after the cache
        is put back in order (nothing stays pinned)."""
        experts = [int(e) for e in experts]
        if len(experts) > self.max_experts(layer):  # callers split by max_experts (which shrinking lowers)
            raise ValueError(f"{len(experts)} experts of layer {layer} do not fit the budget "
                             f"({self.max_experts(layer)} at most); split the call")
        self.now += 1
        self._collect()
        stats = self.stats[layer]
        predicted = self.predictions.pop(layer, None)
        if predicted is not None:
            stats.predicted += len(predicted)
            stats.predicted_correct += len(predicted & set(experts))
        keys = [(layer, e) for e in experts]
        self.pinned.update(keys)
        try:
            missing = []
            for key in keys:
                if key in self.entries:
                    stats.hits += 1
                elif key in self.inflight:
                    self.failed.pop(key, None)
                    stats.hits += self.inflight[key][2]  # a prefetch already on its way counts as a hit
                    stats.misses += not self.inflight[key][2]
                    missing.append(key)
                else:
                    self.failed.pop(key, None)
                    stats.misses += 1
                    if not self._make_room(self.expert_nbytes[layer], wait=True):
                        raise RuntimeError("expert cache: no room although the call fits the budget")
                    self._submit(key, prefetched=False)
                    missing.append(key)
            if prefetch is not None and prefetch[0] is not None:
                self.prefetch(*prefetch)
            for key in missing:
                if key in self.inflight:
                    self._finish(key)
            for key in keys:
                if key not in self.entries:
                    error = self.failed.pop(key, None)
                    if isinstance(error, ExpertReadError):
                        raise error
                    raise ExpertReadError(layer, key[1], getattr(self.store, "directory", ""),
                                          str(error)) from error
            out = {}
            for key in keys:
                entry = self.entries[key]
                if entry.prefetched:
                    stats.prefetch_hits += 1
                    entry.prefetched = False
                self.policy.access(key, self.now)
                for name, value in entry.arrays.items():
                    out.setdefault(name, []).append(value)
            return out
        except BaseException:
            self.pinned.difference_update(keys)
            raise

    def release(self, layer: int, experts):
        self.pinned.difference_update((layer, int(e)) for e in experts)

    def prefetch(self, layer: int, experts):
        """Start background reads of `experts` of `layer` that are neither resident nor in flight, as far as
        the budget allows without evicting pinned experts. Never blocks on I/O."""
        if layer not in self.stats:
            return
        experts = {int(e) for e in experts}
        self.predictions[layer] = experts
        for expert in sorted(experts):
            key = (layer, expert)
            if key in self.entries or key in self.inflight:
                continue
            if not self._make_room(self.expert_nbytes[layer], wait=False):
                break
            self._submit(key, prefetched=True)
            self.stats[layer].prefetch_issued += 1

    def drain(self):
        """Wait for every read in flight (prefetch errors are dropped: a later demand read retries)."""
        for key in list(self.inflight):
            self._finish(key)

    def summary(self) -> dict:
        total = LayerStats()
        for stats in self.stats.values():
            total.add(stats)
        return {"overall": total.as_dict(), "layers": {layer: s.as_dict() for layer, s in self.stats.items()},
                "budget_bytes": self.budget_bytes, "resident_bytes": self.used_bytes, "peak_bytes": self.peak_bytes,
                "resident_experts": len(self.entries), "policy": self.policy.name, "shrinks": len(self.shrinks),
                "memory_limit_bytes": self.memory_limit}

    def reset_stats(self):
        self.stats = {layer: LayerStats() for layer in self.layers}

    def close(self):
        self.drain()
        self.pool.shutdown(wait=True)
        self.store.close()
