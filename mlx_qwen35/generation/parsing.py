"""Split Qwen 3.5 output into thinking, answer text and tool calls, either all at once (`parse_response`)
or while it streams (`StreamParser`). Both follow the same rules, so streamed events add up to the
whole-text result however the text is split:

- with thinking on (the prompt ended in `<think>\\n`), text before the first `</think>` is thinking;
  without a `</think>` all of it is;
- `<tool_call>...</tool_call>` blocks in the answer become tool calls; one that is malformed or not
  closed stays in the answer as raw text;
- newlines next to `</think>`, `<tool_call>` and `</tool_call>` and at the start of the answer are
  dropped (the template writes them as separators).
"""

import json
import re
from dataclasses import dataclass, field

THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
STRING_TYPES = frozenset({"string", "str", "text", "varchar", "char", "enum"})

# Lenient like Qwen's reference qwen3coder_tool_parser: a parameter also ends where the next one starts.
_FUNCTION = re.compile(r"<function=(.*?)(?:</function>|$)", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>)|$)", re.DOTALL)


@dataclass(frozen=True)
class Event:
    kind: str  # "thinking", "answer" or "tool_call"
    text: str = ""
    tool_call: dict | None = None


@dataclass
class ParsedResponse:
    thinking: str = ""
    answer: str = ""
    tool_calls: list = field(default_factory=list)

    def add(self, event: Event):
        if event.kind == "thinking":
            self.thinking += event.text
        elif event.kind == "answer":
            self.answer += event.text
        else:
            self.tool_calls.append(event.tool_call)


def tool_schemas(text: str) -> list | None:
    """Tool declarations from JSON text: a list of function schemas (OpenAI's `{"type": "function", "function":
    {...}}` or the bare function object), or one schema; None for empty text. ValueError names what is wrong."""
    if not text or not text.strip():
        return None
    try:
        tools = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON: {error}") from None
    tools = [tools] if isinstance(tools, dict) else tools
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError("not a JSON list of tool schemas (objects)")
    for index, tool in enumerate(tools):
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"tool {index} has no name (expected {{\"type\": \"function\", \"function\": "
                             f"{{\"name\": ..., \"parameters\": ...}}}})")
    return tools


def _parameter_types(name: str, tools) -> dict:
    for tool in tools or ():
        function = tool.get("function", tool)
        if function.get("name") == name:
            properties = (function.get("parameters") or {}).get("properties") or {}
            return {key: str(spec.get("type", "")).lower() for key, spec in properties.items()}
    return {}


def _convert(value: str, declared_type: str):
    if declared_type in STRING_TYPES:
        return value
    try:
        return json.loads(value, strict=False)
    except json.JSONDecodeError:
        return value


def parse_tool_call(block: str, tools=None) -> dict | None:
    """{"name", "arguments"} from the text between `<tool_call>` and `</tool_call>`, or None if it
    names no function. Values are JSON-decoded when they parse (unless `tools` declares the parameter
    a string), else kept as text; one newline is trimmed from each end, as Qwen's parser does."""
    match = _FUNCTION.search(block)
    if match is None or ">" not in match.group(1):
        return None
    name, _, body = match.group(1).partition(">")
    name = name.strip()
    if not name:
        return None
    types = _parameter_types(name, tools)
    arguments = {}
    for parameter in _PARAMETER.findall(body):
        key, separator, value = parameter.partition(">")
        if not separator or not key.strip():
            continue
        value = value.removeprefix("\n").removesuffix("\n")
        arguments[key.strip()] = _convert(value, types.get(key.strip(), ""))
    return {"name": name, "arguments": arguments}


def call_text(call: dict, sort_keys: bool = False) -> str:
    """A parsed call as one line, `name({"argument": value, ...})`."""
    return f"{call.get('name')}({json.dumps(call.get('arguments'), sort_keys=sort_keys)})"


def _tool_call_or_text(block: str, tools) -> Event:
    call = parse_tool_call(block, tools)
    if call is None:
        return Event("answer", TOOL_CALL_START + block + TOOL_CALL_END)
    return Event("tool_call", tool_call=call)


def parse_response(text: str, thinking: bool = True, tools=None) -> ParsedResponse:
    """Parse a complete generated text (see the module docstring for the rules)."""
    result = ParsedResponse()
    if thinking:
        head, marker, text = text.partition(THINK_END)
        if not marker:
            return ParsedResponse(thinking=head)
        result.thinking = head.rstrip("\n")
    while True:
        text = text.lstrip("\n")
        before, marker, after = text.partition(TOOL_CALL_START)
        if not marker:
            result.answer += text
            return result
        result.answer += before.rstrip("\n")
        block, end, rest = after.partition(TOOL_CALL_END)
        if not end:
            result.answer += marker + after
            return result
        result.add(_tool_call_or_text(block, tools))
        text = rest


def _held_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that could still grow into `marker`, together with
    the newlines before it (they are dropped if the marker follows)."""
    held = 0
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            held = size
            break
    return len(text) - len(text[:len(text) - held].rstrip("\n"))


class StreamParser:
    """Incremental `parse_response`: `feed` text deltas, then `finish`; each returns a list of Events.
    It never emits text that could be the start of a marker (such as `</thi`) until that is decided."""

    def __init__(self, thinking: bool = True, tools=None):
        self.state = "thinking" if thinking else "answer"
        self.tools = tools
        self.pending = ""
        self.answer_start = True
        self.result = ParsedResponse()

    def feed(self, delta: str) -> list:
        if not isinstance(delta, str):
            raise ValueError(f"feed() takes text, got {type(delta).__name__}")
        if self.state == "finished":
            raise ValueError("feed() after finish(): make a new StreamParser for a new response")
        self.pending += delta
        events = []
        while self._step(events):
            pass
        return self._record(events)

    def finish(self) -> list:
        if self.state == "finished":
            return []
        events = []
        if self.state == "thinking":
            events.append(Event("thinking", self.pending))
        elif not self.answer_start or self.state == "tool_call":
            events.append(Event("answer", self.pending))
        self.pending, self.state = "", "finished"
        return self._record(events)

    def _record(self, events):
        events = [e for e in events if e.kind == "tool_call" or e.text]
        for event in events:
            self.result.add(event)
        return events

    def _step(self, events) -> bool:
        """Handle what `pending` allows; True when the state changed and there may be more to do."""
        if self.state == "thinking":
            return self._until(THINK_END, "thinking", events, next_state="answer")
        if self.state == "answer":
            if self.answer_start:
                self.pending = self.pending.lstrip("\n")
                if not self.pending:
                    return False
                self.answer_start = False
            return self._until(TOOL_CALL_START, "answer", events, next_state="tool_call", keep_marker=True)
        block, end, rest = self.pending[len(TOOL_CALL_START):].partition(TOOL_CALL_END)
        if not end:
            return False
        events.append(_tool_call_or_text(block, self.tools))
        self.pending, self.state, self.answer_start = rest, "answer", True
        return True

    def _until(self, marker, kind, events, next_state, keep_marker=False) -> bool:
        before, found, after = self.pending.partition(marker)
        if found:
            events.append(Event(kind, before.rstrip("\n")))
            self.pending = marker + after if keep_marker else after
            self.state, self.answer_start = next_state, next_state == "answer"
            return True
        cut = len(self.pending) - _held_suffix(self.pending, marker)
        events.append(Event(kind, self.pending[:cut]))
        self.pending = self.pending[cut:]
        return False
