"""Speculative decoding with Qwen 3.5's multi-token-prediction head (spec 3). Each round the MTP head drafts
k tokens (k > 1 chains the head on its own output), the main model runs the pending token and the drafts in
one forward pass, and the drafts are kept up to the first that differs from the main model's greedy choice,
followed by the main model's own token there. Greedy only: the tokens are exactly generate_tokens' at
temperature 0, whatever the drafts are; the drafts change the speed, never the output."""

import time
from dataclasses import dataclass

import mlx.core as mx

from ..cache import cache_offset, mark_position, rewind
from ..tokenizer import STOP_TOKEN_IDS
from .generate import GenerationResponse

MTP_TENSORS = "mtp.fc.weight, mtp.pre_fc_norm_embedding.weight, mtp.pre_fc_norm_hidden.weight, mtp.norm.weight, " \
              "mtp.layers.0.*"


@dataclass
class SpeculativeResponse(GenerationResponse):
    drafted: int = 0  # draft tokens the main model has checked so far
    accepted: int = 0  # of those, the ones it kept
    forward_passes: int = 0  # main-model passes after prefill: one per round, plus one per rejection

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def require_mtp(model):
    """Raise a ValueError saying why `model` cannot draft with an MTP head."""
    if getattr(model, "mtp", None) is not None:
        return
    raw = [k for k in getattr(model, "extra_weights", {}) if k.startswith("mtp.")]
    if raw:
        raise ValueError(f"speculative decoding needs the MTP head, but the checkpoint's config sets "
                         f"mtp_num_hidden_layers = 0 (its {len(raw)} mtp.* tensors were not built)")
    raise ValueError(f"speculative decoding needs the multi-token-prediction head, but this checkpoint has no "
                     f"mtp.* tensors ({MTP_TENSORS}). Qwen's original checkpoints ship them; mlx-lm and mlx-vlm "
                     f"conversions drop them. Generate without speculative decoding, or convert from the original.")


class MTPDrafter:
    """Drafts with the model's MTP head. Its KV cache gets one entry per token the main cache holds, the pair
    (h_t, x_{t+1}) at the target's position t; pairs are queued by `extend` and run by the next `draft` or
    `flush`. Chained drafts add entries for their guesses, which `draft` trims again."""

    def __init__(self, model, cache=None, rope_delta=None):
        require_mtp(model)
        self.mtp = model.mtp
        self.cache = model.make_mtp_cache() if cache is None else cache
        self.rope_delta = rope_delta
        self._queue = []
        self._next_position = None

    def extend(self, hidden, next_ids, start: int):
        """Queue hidden [1, L, H] (the main model's final-normed h_t for t = start..start+L-1) with next_ids,
        the L tokens x_{t+1}."""
        self._queue.append((hidden, list(next_ids), start))

    def flush(self):
        """Run the queued pairs into the MTP cache; return mtp.norm of the last output [1, 1, H] (None if none)."""
        if not self._queue:
            return None
        hidden = mx.concatenate([h for h, _, _ in self._queue], axis=1)
        ids = mx.array([t for _, tokens, _ in self._queue for t in tokens])[None]
        positions = mx.concatenate([self._positions(s, len(tokens)) for _, tokens, s in self._queue], axis=-1)
        self._next_position = self._queue[-1][2] + len(self._queue[-1][1])
        self._queue = []
        return self.mtp.norm(self.mtp.hidden(hidden, ids, positions, self.cache)[:, -1:])

    def draft(self, k: int):
        """k greedy guesses [k] for the tokens after the last queued x_{t+1}, as a lazy array."""
        h = self.flush()
        if h is None:
            raise ValueError("nothing to draft from: extend() the drafter with the main model's hidden states first")
        tokens = []
        for j in range(k):
            tokens.append(mx.argmax(self.mtp.head(h)[:, -1], axis=-1))
            if j + 1 < k:
                # vLLM's chaining: the MTP's own normed output stands in for the target's hidden state
                z = self.mtp.hidden(h, tokens[-1][None], self._positions(self._next_position + j, 1), self.cache)
                h = self.mtp.norm(z)
        for layer_cache in self.cache:
            layer_cache.trim(k - 1)
        return mx.concatenate(tokens)

    def _positions(self, start: int, length: int):
        positions = mx.broadcast_to(mx.arange(start, start + length), (3, 1, length))
        if self.rope_delta is not None:
            positions = positions + mx.array(self.rope_delta).reshape(1, -1, 1)
        return positions


def mtp_cache_for(model, cache):
    """The MTP cache that continues `cache`, kept on it as `cache.mtp_cache` (a ModelCache takes attributes)
    so a follow-up turn drafts with the whole conversation in view. Entries past the main cache (it was rolled
    back since) are trimmed; a stale MTP cache only lowers acceptance, it cannot change the tokens."""
    mtp_cache = getattr(cache, "mtp_cache", None)
    if mtp_cache is None or cache_offset(cache) == 0:
        mtp_cache = model.make_mtp_cache()
    excess = cache_offset(mtp_cache) - cache_offset(cache)
    for layer_cache in mtp_cache if excess > 0 else []:
        layer_cache.trim(excess)
    try:
        cache.mtp_cache = mtp_cache
    except AttributeError:  # a plain list: this call's MTP cache starts empty
        pass
    return mtp_cache


def _hidden(model, ids, cache):
    """Final-normed hidden states [1, L, H] for ids [1, L] continuing `cache`, placed as Model.__call__ places
    text (after a multimodal prompt's rope delta)."""
    offset = cache_offset(cache)
    limit = model.config.text_config.max_position_embeddings
    if offset + ids.shape[1] > limit:
        raise ValueError(f"sequence of {offset + ids.shape[1]} tokens exceeds max_position_embeddings = {limit}")
    if offset == 0 and hasattr(cache, "rope_delta"):
        cache.rope_delta = None  # a fresh text prompt, as Model.__call__ records it
    return model.model.language_model(ids, cache, rope_delta=getattr(cache, "rope_delta", None) if offset else None)


def _greedy(logits, processors, seen, drafts):
    """The main model's greedy token after each checked position, from logits [1 + k, V] float32; position j
    sees the tokens `seen` plus drafts[:j] (for repetition penalties), as generate_tokens' step would."""
    rows = []
    for j in range(logits.shape[0]):
        row = logits[j : j + 1]
        if processors:
            context = mx.array(seen + drafts[:j])
            for processor in processors:
                row = processor(context, row)
        rows.append(row)
    rows = mx.concatenate(rows) if processors else logits
    return mx.argmax(rows - mx.logsumexp(rows, axis=-1, keepdims=True), axis=-1).tolist()


def speculative_tokens(model, prompt_ids, draft_tokens: int = 1, max_tokens: int = 64, logits_processors=(),
                       cache=None, stop_ids=STOP_TOKEN_IDS, prefill_chunk: int = 512, history=(),
                       temperature: float = 0.0, drafter=None):
    """generate_tokens at temperature 0 with `draft_tokens` drafted tokens per round, checked in one main-model
    pass. Yields SpeculativeResponse (a GenerationResponse with running acceptance counts).

    `drafter` replaces the MTP head: an object with extend(hidden, next_ids, start), draft(k) -> [k] ids
    and flush() (see MTPDrafter). With a `cache`, the arguments mean what they mean for generate_tokens, and
    the cache ends holding the same tokens: all but the last one yielded."""
    if temperature:
        raise ValueError(f"speculative decoding is greedy only (temperature 0); got temperature={temperature}. "
                         "Sample without speculative decoding.")
    if draft_tokens < 1:
        raise ValueError(f"speculative decoding drafts at least 1 token per step, got {draft_tokens}")
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty: at least one token is needed")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    vocab_size = model.config.text_config.vocab_size
    out_of_range = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if out_of_range:
        raise ValueError(f"prompt token ids {out_of_range[:5]} are outside the model's vocabulary "
                         f"(size {vocab_size}): is the tokenizer meant for this model?")
    if drafter is None:
        require_mtp(model)
    cache = model.make_cache() if cache is None else cache
    offset = cache_offset(cache)
    if drafter is None:
        delta = getattr(cache, "rope_delta", None) if offset else None
        drafter = MTPDrafter(model, mtp_cache_for(model, cache), delta)
    prompt, stop_ids = [int(t) for t in prompt_ids], set(stop_ids)
    start = time.perf_counter()
    for begin in range(0, len(prompt) - 1, prefill_chunk):
        chunk = prompt[begin : min(begin + prefill_chunk, len(prompt) - 1)]
        drafter.extend(_hidden(model, mx.array(chunk)[None], cache), prompt[begin + 1 : begin + 1 + len(chunk)],
                       offset + begin)
        mx.eval([c.state for c in cache], [x for x in [drafter.flush()] if x is not None])
        mx.clear_cache()

    seen, pending, drafts = list(history) + prompt, prompt[-1], None
    generated = drafted = accepted = passes = 0
    first_token_time = decode_start = None
    while True:
        # Rejected drafts are undone by `rewind`, then the kept tokens run again: one more pass per round with a
        # rejection, none when every draft is accepted.
        mark, position = mark_position(cache), cache_offset(cache)
        inputs = mx.array([pending]) if drafts is None else mx.concatenate([mx.array([pending]), drafts])
        hidden = _hidden(model, inputs[None], cache)
        passes += 1
        guesses = [] if drafts is None else drafts.tolist()
        targets = _greedy(model.logits(hidden)[0].astype(mx.float32), logits_processors, seen, guesses)
        matched = next((j for j, (d, t) in enumerate(zip(guesses, targets)) if d != t), len(guesses))
        new = guesses[:matched] + [targets[matched]]
        stop_at = next((j for j, t in enumerate(new) if t in stop_ids), len(new) - 1)
        new = new[: min(stop_at + 1, max_tokens - generated)]
        drafted, accepted = drafted + len(guesses), accepted + min(matched, len(new))
        finished = new[-1] in stop_ids or generated + len(new) == max_tokens
        # the cache ends holding the inputs before the last new token: pending and the first len(new) - 1 drafts
        if len(new) < len(guesses) + 1:
            rewind(cache, mark)
            _hidden(model, inputs[None, : len(new)], cache)
            passes += 1
        drafter.extend(hidden[:, : len(new)], new, position)
        if finished:
            mx.eval([c.state for c in cache], [x for x in [drafter.flush()] if x is not None])
        else:
            seen, pending = seen + new, new[-1]
            k = min(draft_tokens, max_tokens - generated - len(new) - 1)
            drafts = drafter.draft(k) if k > 0 else None
            mx.async_eval([c.state for c in cache], [drafts] if drafts is not None else [])
        if first_token_time is None:
            first_token_time = time.perf_counter() - start
            decode_start = time.perf_counter()
        try:
            for j, token in enumerate(new):
                generated += 1
                elapsed = time.perf_counter() - decode_start
                last = j == len(new) - 1
                yield SpeculativeResponse(
                    token=token, text="", prompt_tokens=len(history) + len(prompt),
                    prompt_tokens_processed=len(prompt), generation_tokens=generated,
                    time_to_first_token=first_token_time, prefill_tps=len(prompt) / first_token_time,
                    decode_tps=(generated - 1) / elapsed if generated > 1 and elapsed > 0 else 0.0,
                    peak_memory_gb=mx.get_peak_memory() / 1e9,
                    finish_reason=("stop" if token in stop_ids else "length") if finished and last else None,
                    drafted=drafted, accepted=accepted, forward_passes=passes)
        except GeneratorExit:
            # Closed mid-round: the cache may hold tokens after the last one yielded; drop this round's instead.
            if cache_offset(cache) > position + j + 2:
                rewind(cache, mark)
            raise
        if finished:
            return
