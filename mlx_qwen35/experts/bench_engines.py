"""The child side of `python -m mlx_qwen35.experts.bench_scale`: one fresh process loads the synthetic
checkpoint's resident weights, swaps in one engine for the routed experts, routes every token from a trace,
warms the engine with loads only, then times decode tokens and reports counters, disk bytes and peak RSS.

Engines: `ours` / `ours-noprefetch` / `lru` / `floor` (ExpertCache), `mlx-vlm` (its moe_offload ExpertStore and
OffloadedSwitchGLU, imported without the package __init__) and `mmap` (MmapSource: no application cache).
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .. import platform
from . import traces

ENGINES = ("ours", "ours-noprefetch", "lru", "mlx-vlm", "mlx-vlm-plain", "mmap")
# Engines that are another engine run without our CPU settings (bench.PLAIN_CPU), as that peer's users
# have their CPU: the cache comparison alone is "mlx-vlm", the peer as installed is "mlx-vlm-plain".
PLAIN_CPU_ENGINES = {"mlx-vlm-plain": "mlx-vlm"}
TRACES = ("realistic", "realistic-low", "uniform", "shuffled")

def make_trace(kind: str, tokens: int, layers: int, num_experts: int, top_k: int, seed: int = 0):
    if kind == "realistic":
        return traces.realistic_trace(tokens, layers, num_experts, top_k, seed=seed)
    if kind == "realistic-low":
        return traces.realistic_trace(tokens, layers, num_experts, top_k, traces.LOW_SKEW, traces.LOW_RHO, seed)
    if kind == "uniform":
        return traces.uniform_trace(tokens, layers, num_experts, top_k, seed=seed)
    if kind == "shuffled":
        return traces.shuffled(traces.realistic_trace(tokens, layers, num_experts, top_k, seed=seed), seed=seed + 1)
    if kind == "floor":
        return np.broadcast_to(np.arange(top_k), (tokens, layers, top_k)).copy()
    raise ValueError(f"unknown trace {kind!r}: choose one of {TRACES + ('floor',)}")


class TraceRouter:
    """Replaces each MoE block's router: token t of layer l is routed to trace[t, l] with equal weights."""

    def __init__(self, trace):
        self.trace, self.position = trace, [0] * trace.shape[1]

    def route_for(self, layer: int):
        import mlx.core as mx

        def route(x):
            if x.shape[0] != 1:
                raise ValueError("trace routing drives one token at a time")
            ids = self.trace[self.position[layer] % len(self.trace), layer]
            self.position[layer] += 1
            return mx.array(ids[None].astype(np.uint32)), mx.full((1, len(ids)), 1.0 / len(ids), dtype=x.dtype)

        return route

    def upcoming(self, layer: int):
        return self.trace[self.position[layer] % len(self.trace), layer]


class TraceLookahead:
    """Stands in for the next layer's router in CachedExperts' prefetch: "logits" whose top-k holds
    round(precision * k) of the experts the trace routes next, the others drawn at random."""

    def __init__(self, router: TraceRouter, layer: int, precision: float, num_experts: int, seed: int):
        self.router, self.layer, self.precision, self.num_experts = router, layer, precision, num_experts
        self.rng = np.random.default_rng(seed)

    def __call__(self, x):
        import mlx.core as mx

        true = self.router.upcoming(self.layer)
        right = self.rng.permutation(true)[: round(self.precision * len(true))]
        others = np.setdiff1d(np.arange(self.num_experts), true)
        wrong = self.rng.choice(others, len(true) - len(right), replace=False)
        logits = np.zeros((x.shape[0], self.num_experts), dtype=np.float32)
        logits[:, np.concatenate([right, wrong])] = 1.0
        return mx.array(logits)


class MmapSource:
    """The `get`/`release`/`max_experts` side of ExpertCache with no cache at all: every call copies its
    experts out of an mmap of the store files, so only the OS page cache keeps anything."""

    def __init__(self, store_dir: Path):
        manifest = json.loads((store_dir / "manifest.json").read_text())
        self.layers = {int(k): v for k, v in manifest["layers"].items()}
        self.maps = {k: np.memmap(store_dir / v["file"], dtype=np.uint8, mode="r") for k, v in self.layers.items()}
        self.files = {k: store_dir / v["file"] for k, v in self.layers.items()}
        self.accesses, self.bytes_copied, self.copy_seconds = 0, 0, 0.0

    def max_experts(self, layer: int) -> int:
        return 1 << 30

    def get(self, layer: int, experts, prefetch=None) -> dict:
        import mlx.core as mx

        entry, data, out = self.layers[layer], self.maps[layer], {}
        start = time.perf_counter()
        for expert in experts:
            base = entry["offsets"][int(expert)]
            for c in entry["components"]:
                dtype = np.uint32 if c["dtype"] == "U32" else np.float32
                view = np.frombuffer(data, dtype=dtype, count=c["nbytes"] // 4, offset=base + c["offset"])
                out.setdefault(c["name"], []).append(mx.array(view.reshape(c["shape"])))  # copies: page faults
            self.bytes_copied += entry["record_bytes"]
        mx.eval(out)
        self.copy_seconds += time.perf_counter() - start
        self.accesses += len(experts)
        return out

    def release(self, layer: int, experts):
        pass

    def warm(self, layer: int, experts):
        """Bring the experts into the page cache with plain reads (the same page cache the mmap faults use,
        without paying for faults and copies during the untimed warm-up)."""
        fd = os.open(self.files[layer], os.O_RDONLY)
        try:
            for expert in experts:
                os.pread(fd, self.layers[layer]["record_bytes"], self.layers[layer]["offsets"][int(expert)])
        finally:
            os.close(fd)


def _load_mlx_vlm():
    """mlx-vlm's offload modules, imported without the package __init__ (which pulls in Pillow, OpenCV and
    a server that would also inflate this engine's RSS)."""
    import importlib.util
    import types

    if "mlx_vlm" not in sys.modules:
        spec = importlib.util.find_spec("mlx_vlm")
        if spec is None:
            raise ImportError("mlx-vlm is not installed")
        package = types.ModuleType("mlx_vlm")
        package.__path__ = [str(Path(spec.origin).parent)]
        sys.modules["mlx_vlm"] = package
    from mlx_vlm.models.switch_layers import OffloadedSwitchGLU
    from mlx_vlm.moe_offload import ExpertStore

    return ExpertStore, OffloadedSwitchGLU


def load_resident(path: Path):
    """The model with its resident weights; routed experts stay unbuilt placeholders for an engine to replace.
    Returns (model, resident weights)."""
    import mlx.core as mx

    from ..config import ModelConfig
    from ..loading import quantize_model, read_weights, sanitize
    from ..models.qwen35 import Model

    config = ModelConfig.from_path(path)
    weights = sanitize(read_weights(path), config)
    model = Model(config)
    placeholders = {f"model.language_model.layers.{i}.mlp.experts.gate_up_proj_scales": None
                    for i in range(config.text_config.num_hidden_layers)}
    quantize_model(model, config.raw["quantization"], {**weights, **placeholders})
    mx.eval(weights)
    return model, weights


def attach_engine(model, engine: str, path: Path, budget_gb: float, router: TraceRouter, args) -> object:
    import mlx.core as mx
    from mlx import nn

    from .source import CachedExperts, attach_expert_cache
    from .store import ExpertStore

    layers = model.layers
    for i, layer in enumerate(layers):
        layer.mlp.route = router.route_for(i)
    if engine in ("ours", "ours-noprefetch", "lru", "floor"):
        store = ExpertStore(path / "expert_store")
        attach_expert_cache(model, path, {}, budget_gb, mx.float32, policy="lru" if engine == "lru" else "lrfu-adaptive",
                            prefetch=engine == "ours", io_threads=args.io_threads, store=store)
        if engine == "ours":
            E = model.config.text_config.num_experts
            for i, layer in enumerate(layers[:-1]):
                object.__setattr__(layer.mlp.experts, "_next_gate",
                                   TraceLookahead(router, i + 1, args.lookahead_precision, E, seed=1000 + i))
        return model.expert_cache
    if engine == "mlx-vlm":
        ExpertStore, OffloadedSwitchGLU = _load_mlx_vlm()
        store = ExpertStore(str(path / "offload"), expert_cache_bytes=round(budget_gb * 1e9))
        quant = (64, 4, "affine")
        for i, layer in enumerate(layers):
            layer.mlp.experts = OffloadedSwitchGLU(store, i, quant, quant, quant,
                                                   activation=lambda up, gate: nn.silu(gate) * up)
        return store
    if engine == "mmap":
        source = MmapSource(path / "expert_store")
        for i, layer in enumerate(layers):
            layer.mlp.experts = CachedExperts(source, i, (64, 4, "affine"))
        return source
    raise ValueError(f"unknown engine {engine!r}")


def _counters(engine: str, handle) -> dict:
    if engine == "mlx-vlm":
        return {"hits": handle._hits, "misses": handle._misses}
    if engine == "mmap":
        return {"hits": 0, "misses": handle.accesses, "stall_seconds": handle.copy_seconds}
    o = handle.summary()["overall"]
    return {k: o[k] for k in ("hits", "misses", "bytes_read", "stall_seconds", "prefetch_issued", "prefetch_hits",
                              "prefetch_wasted", "predicted", "predicted_correct", "read_seconds")}


def prewarm(engine: str, handle, trace, tokens: int):
    """Replay the first `tokens` tokens of the trace through the engine's loads only (no compute), so the
    timed decode starts from a warm cache without paying minutes of CPU for the warm-up; then zero its counters."""
    import mlx.core as mx

    for t in range(tokens):
        for layer in range(trace.shape[1]):
            experts = np.unique(trace[t, layer])
            if engine == "mlx-vlm":
                mx.eval([a for trip in handle.get_many(layer, experts).values() for p in trip for a in p
                         if a is not None])
            elif engine == "mmap":
                handle.warm(layer, experts)
            else:
                handle.get(layer, experts)
                handle.release(layer, experts)
    if engine == "mlx-vlm":
        handle._hits = handle._misses = handle._evictions = 0
    elif engine == "mmap":
        handle.accesses, handle.bytes_copied, handle.copy_seconds = 0, 0, 0.0
    else:
        handle.drain()
        handle.reset_stats()


def _proc(name: str, field: str) -> int:
    for line in Path(f"/proc/self/{name}").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * (1024 if name == "status" else 1)
    return 0


def child(args) -> dict:
    if args.cgroup:
        Path(args.cgroup, "cgroup.procs").write_text(str(os.getpid()))
    import mlx.core as mx

    path = Path(args.path)
    info = json.loads((path / "info.json").read_text())
    config = info["config"]
    trace = make_trace("floor" if args.engine == "floor" else args.trace, args.prewarm + args.tokens, config["num_hidden_layers"], config["num_experts"],
                       config["num_experts_per_tok"], seed=args.seed)
    model, weights = load_resident(path)
    router = TraceRouter(trace)
    handle = attach_engine(model, args.engine, path, args.budget_gb, router, args)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    resident_rss = _proc("status", "VmRSS:")
    start = time.perf_counter()
    prewarm(args.engine, handle, trace, args.prewarm)
    router.position = [args.prewarm] * trace.shape[1]
    prewarm_seconds = time.perf_counter() - start
    cache, token = model.make_cache(), 0
    io_start, times, snapshots = _proc("io", "read_bytes:"), [], []
    for _ in range(args.tokens):
        start = time.perf_counter()
        logits = model(mx.array([[token]]), cache=cache)
        token = int(mx.argmax(logits[0, -1]).item())
        times.append(time.perf_counter() - start)
        snapshots.append({**_counters(args.engine, handle), "disk_bytes": _proc("io", "read_bytes:") - io_start})
    if hasattr(handle, "close"):
        handle.close()
    return {"engine": args.engine, "trace": args.trace, "tokens": args.tokens, "warmup": args.warmup,
            "budget_gb": args.budget_gb, "prewarm": args.prewarm, "prewarm_seconds": prewarm_seconds, "times": times, "snapshots": snapshots,
            "peak_rss": _proc("status", "VmHWM:"), "rss_after_load": resident_rss,
            "resident_bytes": info["resident_bytes"], "expert_bytes": info["expert_bytes"],
            "mlx_peak": mx.get_peak_memory(), "finite": bool(np.isfinite(np.array(logits)).all()),
            "cpu": platform.cpu_setup()}
