"""The token loop every front end drives: chunked prefill (only the last position goes through the
vocabulary head), then decode with the next step queued before the current token is returned; and the
text layer over it: detokenised deltas, stop strings, and the stats shown by every front end."""

import time
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from ..cache import mark_position, rewind
from ..tokenizer import STOP_TOKEN_IDS


@dataclass
class GenerationResponse:
    token: int
    text: str  # the new text this token completes (may be empty while a character or stop string is pending)
    prompt_tokens: int  # tokens of the prompt, including those already in the cache
    prompt_tokens_processed: int  # tokens actually run through the model for this prompt
    generation_tokens: int
    time_to_first_token: float  # seconds
    prefill_tps: float
    decode_tps: float
    peak_memory_gb: float
    finish_reason: str | None = None  # "stop" or "length" on the last response
    events: list = field(default_factory=list)  # parsing.Event: thinking / answer deltas, finished tool calls


def make_sampling(temperature=0.0, top_p=0.0, top_k=0, min_p=0.0, repetition_penalty=None,
                  repetition_context_size=20, seed=None):
    """(sampler, logits processors) from user-facing settings; greedy when temperature is 0."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k)
    processors = make_logits_processors(repetition_penalty=repetition_penalty,
                                        repetition_context_size=repetition_context_size)
    return sampler, processors


def prefill(model, tokens, cache, chunk: int = 512, input_embeddings=None, position_ids=None, rope_delta=None):
    """Run tokens [1, L] (or input_embeddings [1, L, H] at position_ids [3, 1, L], a multimodal prompt) into
    the cache in chunks (bounded memory), skipping the vocabulary head."""
    length = tokens.shape[1] if input_embeddings is None else input_embeddings.shape[1]
    for begin in range(0, length, chunk):
        part = slice(begin, begin + chunk)
        if input_embeddings is None:
            model(tokens[:, part], cache=cache, logits_to_keep=1)
        else:
            model(None, cache=cache, input_embeddings=input_embeddings[:, part],
                  position_ids=position_ids[:, :, part], rope_delta=rope_delta, logits_to_keep=1)
        mx.eval([c.state for c in cache])
        mx.clear_cache()


def generate_tokens(model, prompt_ids, max_tokens: int = 64, sampler=None, logits_processors=(),
                    cache=None, stop_ids=STOP_TOKEN_IDS, prefill_chunk: int = 512, history=(), **sampling):
    """Yield one GenerationResponse (text empty) per generated token for a list of prompt token ids.

    With a `cache` already holding earlier tokens, `prompt_ids` are only the new ones and `history` the
    earlier ones (for repetition penalties). Extra keyword arguments build a sampler (see make_sampling)."""
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty: at least one token is needed")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    vocab_size = model.config.text_config.vocab_size
    out_of_range = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if out_of_range:
        raise ValueError(f"prompt token ids {out_of_range[:5]} are outside the model's vocabulary "
                         f"(size {vocab_size}): is the tokenizer meant for this model?")
    if sampler is None:
        sampler, logits_processors = make_sampling(**sampling)
    cache = model.make_cache() if cache is None else cache
    prompt = mx.array(prompt_ids)[None]
    seen = mx.array(list(history) + list(prompt_ids))
    start = time.perf_counter()
    prefill(model, prompt[:, :-1], cache, prefill_chunk)

    def step(tokens):
        nonlocal seen
        logits = model(tokens, cache=cache, logits_to_keep=1)[:, -1].astype(mx.float32)
        for processor in logits_processors:
            logits = processor(seen, logits)
        token = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        seen = mx.concatenate([seen, token])
        return token

    token = step(prompt[:, -1:])
    mx.eval(token)
    first_token_time = time.perf_counter() - start
    prefill_tps = prompt.shape[1] / first_token_time
    decode_start = time.perf_counter()
    stop_ids = set(stop_ids)
    for n in range(1, max_tokens + 1):
        next_token = None
        if n < max_tokens:
            # Built before `token` is read, so the graph is made while the device computes `token` (mlx-lm's
            # order); after a stop token this step is wasted and undone, so the cache holds what it held.
            before = mark_position(cache)
            next_token = step(token[:, None])
            mx.async_eval(next_token)
        value = int(token.item())
        finish = "stop" if value in stop_ids else ("length" if n == max_tokens else None)
        if finish == "stop" and next_token is not None:
            rewind(cache, before)
        elapsed = time.perf_counter() - decode_start
        yield GenerationResponse(
            token=value, text="", prompt_tokens=len(history) + prompt.shape[1],
            prompt_tokens_processed=prompt.shape[1], generation_tokens=n,
            time_to_first_token=first_token_time, prefill_tps=prefill_tps,
            decode_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 1e9, finish_reason=finish)
        if finish:
            return
        token = next_token


def stream_text(tokenizer, responses, stop=()):
    """Attach detokenised text deltas to token responses, and end at the first stop string (which is not
    emitted). Text that could still become a stop string is held back until it cannot."""
    stop = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
    stop_ids = set(getattr(tokenizer, "eos_token_ids", None) or STOP_TOKEN_IDS)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    text, emitted = "", 0
    for response in responses:
        if response.finish_reason == "stop" and response.token in stop_ids:
            response.text = text[emitted:]
            yield response
            return
        detokenizer.add_token(response.token)
        if response.finish_reason:
            detokenizer.finalize()
        text = detokenizer.text
        hit = min((i for i in (text.find(s, max(0, emitted - len(s))) for s in stop) if i >= 0), default=-1)
        if hit >= 0:
            response.text, response.finish_reason = text[emitted:hit], "stop"
            yield response
            return
        safe = len(text) if response.finish_reason else _safe_length(text, stop)
        response.text, emitted = text[emitted:max(emitted, safe)], max(emitted, safe)
        yield response


def _safe_length(text: str, stop) -> int:
    """Length of the prefix of `text` that no continuation can turn into a stop string match."""
    held = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                held = max(held, k)
                break
    return len(text) - held
