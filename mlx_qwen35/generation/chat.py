"""`Chat`: a conversation for notebooks that keeps its history and its cache across turns, so a
follow-up turn runs only the tokens the chat template adds."""

import mlx.core as mx

from ..cache import cache_offset, restore, snapshot
from .api import render_messages, stream_generate
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
        self._checkpoint = None  # (tokens, cache snapshot) at the end of the last user turn
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
            return len(self._checkpoint[0])
        self.cache = self.model.make_cache()
        return 0

    def stream(self, content, role: str = "user", **overrides):
        """Send a message (a str or a list of content parts; role "tool" for a tool's result) and yield
        responses with text deltas and parsed events. The reply lands in `messages[-1]`."""
        messages = self.messages + [{"role": role, "content": content}]
        full = self._render(messages, add_generation_prompt=True)
        turn_end = self._render(messages, add_generation_prompt=False)
        if full[: len(turn_end)] != turn_end:
            turn_end = []
        start = self._reuse(full)
        processed = 0
        if len(turn_end) > start:
            prefill(self.model, mx.array(turn_end[start:])[None], self.cache)
            processed, start = len(turn_end) - start, len(turn_end)
            self._checkpoint = (turn_end, snapshot(self.cache))
        sampling = {**self.sampling, **overrides}
        generated, parsed = [], ParsedResponse()
        for response in stream_generate(self.model, self.processor, full[start:], cache=self.cache,
                                        history=full[:start], tools=self.tools, **sampling):
            generated.append(response.token)
            for event in response.events:
                parsed.add(event)
            response.prompt_tokens = len(full)
            response.prompt_tokens_processed += processed
            self.last_response = response
            yield response
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

