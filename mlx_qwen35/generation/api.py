"""The notebook-facing API: `stream_generate` and `generate` over the token loop."""

import time

import mlx.core as mx

from ..cache import cache_offset
from ..processing.features import VisionFeatureCache, multimodal_embeddings
from ..processing.processor import media_from_messages
from ..tokenizer import SpecialIds
from .generate import generate_tokens, make_sampling, prefill, stream_text
from .parsing import StreamParser
from .speculative import speculative_tokens

_FEATURE_CACHE = VisionFeatureCache()  # for a processor without its own


def encode_prompt(processor, prompt, **template_options):
    """A str is encoded as raw text; a list of message dicts goes through the chat template (with the
    generation prompt); a list of ints is taken as token ids."""
    if isinstance(prompt, str):
        return _require(processor).encode(prompt, add_special_tokens=False)
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        return render_messages(processor, prompt, add_generation_prompt=True, **template_options)
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    raise TypeError("prompt must be a str, a list of chat messages (dicts) or a list of token ids")


def render_messages(processor, messages, add_generation_prompt, **template_options):
    ids = _require(processor).apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, **template_options)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _require(processor):
    if processor is None:
        raise ValueError("this checkpoint has no tokenizer files; pass token ids or load one with tokenizer")
    return processor


def stream_generate(model, processor, prompt, max_tokens=256, stop=(), cache=None, prefill_chunk=512,
                    enable_thinking=None, tools=None, history=(), images=None, videos=None, speculative=0,
                    **sampling):
    """Yield GenerationResponse objects whose `.text` are the new text of each token and whose `.events`
    split it into thinking, answer and finished tool calls.

    Sampling settings: temperature (0 = greedy), top_p, top_k, min_p, repetition_penalty, seed.
    `cache` may hold earlier tokens of the same conversation: then `prompt` must be token ids of the
    continuation only, and `history` the earlier tokens (used by repetition penalties).
    `images` / `videos` (paths, PIL images, arrays; a video may be a list of frames) fill the prompt's
    placeholders in order, after those of chat messages' {"type": "image"/"video"} content parts.
    `speculative` = k > 0 drafts k tokens per step with the checkpoint's MTP head (text prompts, greedy only):
    the same tokens, in SpeculativeResponse objects that also count drafted and accepted tokens."""
    options = {k: v for k, v in (("enable_thinking", enable_thinking), ("tools", tools)) if v is not None}
    prompt_ids, items = encode_prompt_with_media(processor, prompt, images, videos, **options)
    yield from stream_ids(model, processor, prompt_ids, items, max_tokens=max_tokens, stop=stop, cache=cache,
                          prefill_chunk=prefill_chunk, tools=tools, history=history, speculative=speculative,
                          **sampling)


def encode_prompt_with_media(processor, prompt, images=None, videos=None, **template_options):
    """(token ids with expanded placeholders, items from Processor.prepare or None without media)."""
    images, videos = list(_listed(images)), list(_listed(videos))
    is_messages = isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt)
    if is_messages:
        in_messages = media_from_messages(prompt)
        images, videos = in_messages[0] + images, in_messages[1] + videos
    if not images and not videos:
        return encode_prompt(processor, prompt, **template_options), None
    if not hasattr(_require(processor), "prepare"):
        raise ValueError("images and videos need a checkpoint with a vision config (its processor); this "
                         "one loaded a plain tokenizer")
    if is_messages:
        text = processor.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False,
                                             **template_options)
    elif isinstance(prompt, str):
        text = prompt
    else:
        raise TypeError("with images or videos, the prompt must be a str holding placeholders or chat messages")
    items = processor.prepare(images, videos)
    return processor.encode_expanded([text], items)["input_ids"][0].tolist(), items


def _listed(media):
    if media is None:
        return []
    return media if isinstance(media, (list, tuple)) else [media]


def has_media(items) -> bool:
    return bool(items) and any(items.values())


def multimodal_prefill(model, processor, ids, items, cache, chunk: int = 512):
    """Run token ids (a list continuing `cache`) holding the placeholders of `items` into the cache: vision
    features (through the processor's feature cache) and 3-D positions for the whole span, then the text
    model in chunks. The rope delta lands on the cache for decoding."""
    if not hasattr(cache, "rope_delta"):
        raise ValueError("multimodal generation needs the cache of model.make_cache() (it keeps the rope delta)")
    offset = cache_offset(cache)
    previous = cache.rope_delta if offset else None
    features = getattr(processor, "feature_cache", None) or _FEATURE_CACHE
    embeddings, positions, delta = multimodal_embeddings(model, mx.array(ids)[None], items, features, offset,
                                                         previous)
    prefill(model, None, cache, chunk, input_embeddings=embeddings, position_ids=positions, rope_delta=delta)
    cache.rope_delta = delta


def stream_ids(model, processor, prompt_ids, items=None, max_tokens=256, stop=(), cache=None, prefill_chunk=512,
               tools=None, history=(), speculative=0, **sampling):
    """stream_generate for token ids whose placeholders (if any) belong to `items` (Processor.prepare)."""
    sampler, processors = make_sampling(**sampling)
    special = SpecialIds.of(processor)
    if speculative:
        if has_media(items):
            raise ValueError("speculative decoding takes text prompts only: leave out speculative= with images "
                             "or videos")
        tokens = speculative_tokens(model, prompt_ids, speculative, max_tokens, processors, cache=cache,
                                    stop_ids=special.stop, prefill_chunk=prefill_chunk, history=history,
                                    temperature=sampling.get("temperature") or 0.0)
    elif has_media(items):
        tokens = _multimodal_tokens(model, processor, prompt_ids, items, max_tokens, sampler, processors, cache,
                                    prefill_chunk, history, special.stop)
    else:
        tokens = generate_tokens(model, prompt_ids, max_tokens, sampler, processors, cache=cache,
                                 stop_ids=special.stop, prefill_chunk=prefill_chunk, history=history)
    if processor is None:
        yield from tokens
        return
    parser = StreamParser(thinking=thinking_is_open(list(history) + list(prompt_ids), special), tools=tools)
    for response in stream_text(processor, tokens, stop):
        response.events = parser.feed(response.text)
        if response.finish_reason:
            response.events += parser.finish()
        yield response


def _multimodal_tokens(model, processor, prompt_ids, items, max_tokens, sampler, processors, cache, chunk,
                       history, stop_ids):
    # All but the last prompt token go through the multimodal prefill (the last one is never a placeholder:
    # each run is closed by <|vision_end|>); the token loop then starts from the last token.
    if len(prompt_ids) < 2:
        raise ValueError("a prompt with images or videos needs their placeholders and at least one more token")
    cache = model.make_cache() if cache is None else cache
    start = time.perf_counter()
    multimodal_prefill(model, processor, prompt_ids[:-1], items, cache, chunk)
    elapsed = time.perf_counter() - start
    for response in generate_tokens(model, prompt_ids[-1:], max_tokens, sampler, processors, cache=cache,
                                    stop_ids=stop_ids, history=list(history) + list(prompt_ids[:-1])):
        response.prompt_tokens_processed += len(prompt_ids) - 1
        response.time_to_first_token += elapsed
        response.prefill_tps = len(prompt_ids) / response.time_to_first_token
        yield response


def thinking_is_open(prompt_ids, special: SpecialIds = SpecialIds()) -> bool:
    """Whether the prompt ends inside a <think> block (the template's default generation prompt)."""
    opened = max((i for i, t in enumerate(prompt_ids) if t == special.think_start), default=-1)
    closed = max((i for i, t in enumerate(prompt_ids) if t == special.think_end), default=-1)
    return opened > closed


def generate(model, processor, prompt, **kwargs) -> str:
    """The whole generated text (see stream_generate for the arguments)."""
    return "".join(response.text for response in stream_generate(model, processor, prompt, **kwargs))
