"""`mlx-qwen35 bench`: prefill and decode speed and peak memory, optionally beside mlx-lm on the same
weights in the same process. Each engine runs through its own generation loop (ours: generate_tokens;
mlx-lm: generate_step), repeated, and the median is reported."""

import gc
import statistics
import time

import mlx.core as mx

from . import platform
from .generation import generate_tokens


def run_ours(model, prompt, max_tokens):
    last = None
    for last in generate_tokens(model, prompt, max_tokens):
        pass
    return last.prefill_tps, last.decode_tps


def run_mlx_lm(model, prompt, max_tokens):
    from mlx_lm.generate import generate_step

    start = time.perf_counter()
    decode_start = None
    n = 0
    for n, _ in enumerate(generate_step(mx.array(prompt), model, max_tokens=max_tokens), start=1):
        if n == 1:
            decode_start = time.perf_counter()
            prefill_tps = len(prompt) / (decode_start - start)
    return prefill_tps, (n - 1) / (time.perf_counter() - decode_start)


def load_mlx_lm(path, dtype):
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def bench(path, prompt_lengths=(512,), max_tokens=64, repeats=3, dtype=None, compare=()):
    from .loading import load_model

    dtype = platform.parse_dtype(dtype) or platform.default_dtype()
    engines = {"mlx-qwen35": (lambda: load_model(path, dtype), run_ours)}
    if "mlx-lm" in compare:
        engines["mlx-lm"] = (lambda: load_mlx_lm(path, dtype), run_mlx_lm)
    print(f"# device {platform.device_name()}, dtype {dtype}, BLAS {platform.blas_in_use()}, "
          f"{max_tokens} new tokens, median of {repeats}")
    rows = {}
    for name, (loader, runner) in engines.items():
        model = loader()
        for length in prompt_lengths:
            prompt = mx.random.randint(0, 240000, (length,), key=mx.random.key(length)).tolist()
            runner(model, prompt[:16], 4)  # warm-up
            samples, peaks = [], []
            for _ in range(repeats):
                mx.reset_peak_memory()
                samples.append(runner(model, prompt, max_tokens))
                peaks.append(mx.get_peak_memory() / 2**30)
            prefill = statistics.median(s[0] for s in samples)
            decode = statistics.median(s[1] for s in samples)
            rows[(name, length)] = (prefill, decode)
            print(f"{name:11s} prompt {length:5d}: prefill {prefill:8.1f} tok/s  decode {decode:6.2f} tok/s  "
                  f"peak {max(peaks):.2f} GiB  (prefill runs {', '.join(f'{s[0]:.1f}' for s in samples)})",
                  flush=True)
        del model
        gc.collect()
        mx.clear_cache()
    for other in engines:
        if other == "mlx-qwen35":
            continue
        for length in prompt_lengths:
            ours, theirs = rows[("mlx-qwen35", length)], rows[(other, length)]
            print(f"ratio vs {other}, prompt {length}: prefill {ours[0] / theirs[0]:.2f}x, "
                  f"decode {ours[1] / theirs[1]:.2f}x")
    return rows


def attention_memory(lengths=(4096, 8192, 16384), heads=8, kv_heads=2, head_dim=256):
    """Peak memory of one causal attention call over a whole prompt: ours (query blocks) against a single
    mx.fast.scaled_dot_product_attention call, at Qwen3.5-0.8B attention shapes."""
    from .models.attention import causal_attention

    print(f"# attention peak memory above inputs, {heads}/{kv_heads} heads, head_dim {head_dim}, "
          f"device {platform.device_name()}, float32")
    for length in lengths:
        q = mx.random.normal((1, heads, length, head_dim))
        k = mx.random.normal((1, kv_heads, length, head_dim))
        mx.eval(q, k)
        peaks = []
        for attend in (lambda: causal_attention(q, k, k, head_dim**-0.5),
                       lambda: mx.fast.scaled_dot_product_attention(q, k, k, scale=head_dim**-0.5, mask="causal")):
            mx.clear_cache()
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            mx.eval(attend())
            peaks.append((mx.get_peak_memory() - base) / 2**20)
        print(f"length {length:6d}: blocked {peaks[0]:8.0f} MiB   single call {peaks[1]:8.0f} MiB", flush=True)
