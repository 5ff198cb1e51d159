"""`Chat`: a conversation for notebooks that keeps its history and its cache across turns, so a
follow-up turn runs only the tokens the chat template adds."""

import mlx.core as mx

from ..cache import cache_offset, restore, snapshot
from ..processing.features import items_after
from ..processing.processor import media_from_messages
from .api import has_media, multimodal_prefill, render_messages, stream_generate, stream_ids
from .generate import prefill
from .parsing import ParsedResponse


class Chat:
    def __init__(self, model, processor, system: str | None = None, tools=None, enable_thinking: bool = True,
                 **sampling):
        if processor is None:
            raise ValueError("Chat needs a tokenizer with a chat template; this checkpoint has none")
        self.model, self.processor = model, processor
        self.tools, self.enable_thinking, self.sampling = tools, enable_thinking, sampling
        self.system = system
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = self.model.make_cache()
        self._tokens = []  # what the live cache holds
        self._checkpoint = None  # (tokens, cache snapshot, rope delta) at the end of the last user turn
        self.last_response = None
        self.last_parsed = None

    def _render(self, messages, add_generation_prompt):
        options = {"enable_thinking": self.enable_thinking}
        if self.tools:
            options["tools"] = self.tools
        return render_messages(self.processor, messages, add_generation_prompt, **options)

    def _reuse(self, tokens) -> int:
        """Put the cache in the longest known state that is a prefix of `tokens`; return its length."""
        def prefix_of(held):
            return 0 < len(held) < len(tokens) and tokens[: len(held)] == held

        if prefix_of(self._tokens):
            return len(self._tokens)
        if self._checkpoint and prefix_of(self._checkpoint[0]):
            restore(self.cache, self._checkpoint[1])
            self.cache.rope_delta = self._checkpoint[2]
            return len(self._checkpoint[0])
        self.cache = self.model.make_cache()
        return 0

    def _render_media(self, messages, add_generation_prompt, items):
        options = {"enable_thinking": self.enable_thinking}
        if self.tools:
            options["tools"] = self.tools
        text = self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, **options)
        return self.processor.encode_expanded([text], items)["input_ids"][0].tolist()

    def _media_after(self, tokens, items, start):
        """The images / videos whose placeholders lie in tokens[start:]; None when `start` cuts one."""
        if items is None:
            return None
        config = self.model.config
        return items_after(tokens, items, start, config.image_token_id, config.video_token_id)

    def stream(self, content, role: str = "user", **overrides):
        """Send a message (a str or a list of content parts, which may be {"type": "image", "image": path or
        PIL image} and {"type": "video", "video": path or frames}; role "tool" for a tool's result) and yield
        responses with text deltas and parsed events. The reply lands in `messages[-1]`."""
        messages = self.messages + [{"role": role, "content": content}]
        images, videos = media_from_messages(messages)
        items = None
        if images or videos:
            if not hasattr(self.processor, "prepare"):
                raise ValueError("images and videos need a checkpoint with a vision config (its processor)")
            # Earlier turns' media are prepared again, but their features come from the feature cache.
            items = self.processor.prepare(images, videos)
            full = self._render_media(messages, True, items)
            turn_end = self._render_media(messages, False, items)
        else:
            full = self._render(messages, add_generation_prompt=True)
            turn_end = self._render(messages, add_generation_prompt=False)
        if full[: len(turn_end)] != turn_end:
            turn_end = []
        start = self._reuse(full)
        if items is not None and self._media_after(full, items, start) is None:
            self.cache, start = self.model.make_cache(), 0
        processed = 0
        if len(turn_end) > start:
            new = self._media_after(turn_end, items, start)
            if has_media(new):
                multimodal_prefill(self.model, self.processor, turn_end[start:], new, self.cache)
            else:
                prefill(self.model, mx.array(turn_end[start:])[None], self.cache)
            processed, start = len(turn_end) - start, len(turn_end)
            self._checkpoint = (turn_end, snapshot(self.cache), getattr(self.cache, "rope_delta", None))
        sampling = {**self.sampling, **overrides}
        generated, parsed = [], ParsedResponse()
        if items is None:
            responses = stream_generate(self.model, self.processor, full[start:], cache=self.cache,
                                        history=full[:start], tools=self.tools, **sampling)
        else:
            responses = stream_ids(self.model, self.processor, full[start:], self._media_after(full, items, start),
                                   cache=self.cache, history=full[:start], tools=self.tools, **sampling)
        try:
            for response in responses:
                generated.append(response.token)
                for event in response.events:
                    parsed.add(event)
                response.prompt_tokens = len(full)
                response.prompt_tokens_processed += processed
                self.last_response = response
                yield response
        finally:
            # Also when the caller stops mid-reply: the cache has moved on, whatever the messages say.
            self._tokens = (full + generated)[: cache_offset(self.cache)]
        message = {"role": "assistant", "content": parsed.answer}
        if parsed.thinking:
            message["reasoning_content"] = parsed.thinking
        if parsed.tool_calls:
            message["tool_calls"] = [{"type": "function", "function": call} for call in parsed.tool_calls]
        self.messages = messages + [message]
        self.last_parsed = parsed

    def send(self, content, role: str = "user", **overrides) -> str:
        """Send a message; return the answer. Thinking and tool calls are in `last_parsed` and `messages[-1]`."""
        for _ in self.stream(content, role, **overrides):
            pass
        return self.messages[-1]["content"]

