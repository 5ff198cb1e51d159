"""The token loop every front end drives: chunked prefill (only the last position goes through the
vocabulary head), then decode with the next step queued before the current token is returned."""

import time
from dataclasses import dataclass

import mlx.core as mx


@dataclass
class GenerationResponse:
    token: int
    prompt_tokens: int
    generation_tokens: int
    time_to_first_token: float  # seconds
    prefill_tps: float
    decode_tps: float
    peak_memory_gb: float
    finish_reason: str | None = None


def sample(logits, temperature: float):
    if temperature == 0:
        return mx.argmax(logits, axis=-1)
    return mx.random.categorical(logits * (1.0 / temperature))


def generate_tokens(model, prompt_ids, max_tokens: int = 64, temperature: float = 0.0, cache=None,
                    stop_ids=(), prefill_chunk: int = 512):
    """Yield one GenerationResponse per generated token for a 1-D list of prompt token ids."""
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty: at least one token is needed")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    vocab_size = model.config.text_config.vocab_size
    out_of_range = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if out_of_range:
        raise ValueError(f"prompt token ids {out_of_range[:5]} are outside the model's vocabulary "
                         f"(size {vocab_size}): is the tokenizer meant for this model?")
    cache = model.make_cache() if cache is None else cache
    prompt = mx.array(prompt_ids)[None]
    start = time.perf_counter()
    for begin in range(0, prompt.shape[1] - 1, prefill_chunk):
        end = min(begin + prefill_chunk, prompt.shape[1] - 1)
        model(prompt[:, begin:end], cache=cache, logits_to_keep=1)
        mx.eval([c.state for c in cache])
        mx.clear_cache()

    def step(tokens):
        logits = model(tokens, cache=cache, logits_to_keep=1)
        return sample(logits[:, -1].astype(mx.float32), temperature)

    token = step(prompt[:, -1:])
    mx.eval(token)
    first_token_time = time.perf_counter() - start
    prefill_tps = prompt.shape[1] / first_token_time
    decode_start = time.perf_counter()
    stop_ids = set(stop_ids)
    for n in range(1, max_tokens + 1):
        next_token = None
        if n < max_tokens:
            next_token = step(token[:, None])
            mx.async_eval(next_token)
        value = int(token.item())
        elapsed = time.perf_counter() - decode_start
        finish = "stop" if value in stop_ids else ("length" if n == max_tokens else None)
        yield GenerationResponse(
            token=value, prompt_tokens=prompt.shape[1], generation_tokens=n,
            time_to_first_token=first_token_time, prefill_tps=prefill_tps,
            decode_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 1e9, finish_reason=finish)
        if finish:
            return
        token = next_token
