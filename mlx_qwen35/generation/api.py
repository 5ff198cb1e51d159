"""The notebook-facing API: `stream_generate` and `generate` over the token loop."""

from .generate import STOP_TOKEN_IDS, generate_tokens, make_sampling, stream_text
from .parsing import StreamParser

THINK_START, THINK_END = 248068, 248069


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
                    enable_thinking=None, tools=None, history=(), **sampling):
    """Yield GenerationResponse objects whose `.text` are the new text of each token and whose `.events`
    split it into thinking, answer and finished tool calls.

    Sampling settings: temperature (0 = greedy), top_p, top_k, min_p, repetition_penalty, seed.
    `cache` may hold earlier tokens of the same conversation: then `prompt` must be token ids of the
    continuation only, and `history` the earlier tokens (used by repetition penalties)."""
    options = {k: v for k, v in (("enable_thinking", enable_thinking), ("tools", tools)) if v is not None}
    prompt_ids = encode_prompt(processor, prompt, **options)
    sampler, processors = make_sampling(**sampling)
    tokens = generate_tokens(model, prompt_ids, max_tokens, sampler, processors, cache=cache,
                             stop_ids=STOP_TOKEN_IDS, prefill_chunk=prefill_chunk,
                             history=history)
    if processor is None:
        yield from tokens
        return
    parser = StreamParser(thinking=thinking_is_open(list(history) + prompt_ids), tools=tools)
    for response in stream_text(processor, tokens, stop):
        response.events = parser.feed(response.text)
        if response.finish_reason:
            response.events += parser.finish()
        yield response


def thinking_is_open(prompt_ids) -> bool:
    """Whether the prompt ends inside a <think> block (the template's default generation prompt)."""
    opened = max((i for i, t in enumerate(prompt_ids) if t == THINK_START), default=-1)
    closed = max((i for i, t in enumerate(prompt_ids) if t == THINK_END), default=-1)
    return opened > closed


def generate(model, processor, prompt, **kwargs) -> str:
    """The whole generated text (see stream_generate for the arguments)."""
    return "".join(response.text for response in stream_generate(model, processor, prompt, **kwargs))
