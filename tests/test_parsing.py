"""Thinking and tool-call parsing: whole-text results against hand-written expectations and mlx-lm's
port of Qwen's qwen3_coder parser; streaming against the whole-text parse at every split point."""

import json
import random

import pytest
from mlx_lm.tool_parsers.qwen3_coder import parse_tool_call as reference_parse_tool_call

from mlx_qwen35.generation.parsing import (THINK_END, TOOL_CALL_START, ParsedResponse, StreamParser, call_text,
                                           parse_response, parse_tool_call, tool_schemas)
from mlx_qwen35.tokenizer import render_chat

WEATHER_CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nSão Paulo\n</parameter>\n"
                "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
WRITE_CALL = ("<tool_call>\n<function=write_file>\n<parameter=path>\n/tmp/a.py\n</parameter>\n"
              "<parameter=content>\ndef f():\n    return \"<tag>\"\n\n</parameter>\n"
              "<parameter=options>\n{\"mode\": \"w\",\n \"lines\": [1, 2]}\n</parameter>\n"
              "</function>\n</tool_call>")
WEATHER = {"name": "get_weather", "arguments": {"city": "São Paulo", "days": 3}}
WRITE = {"name": "write_file", "arguments": {"path": "/tmp/a.py", "content": 'def f():\n    return "<tag>"\n',
                                             "options": {"mode": "w", "lines": [1, 2]}}}

CASES = {
    "thinking_answer": (
        True, "The user greets me.\nI should answer < 3 words </thin or so.\n</think>\n\nHello there!\n",
        ParsedResponse("The user greets me.\nI should answer < 3 words </thin or so.", "Hello there!\n", [])),
    "thinking_truncated": (
        True, "Still thinking\n\n</thi", ParsedResponse("Still thinking\n\n</thi", "", [])),
    "no_thinking": (
        False, "\nJust an answer with </think> and <tool_ inside.",
        ParsedResponse("", "Just an answer with </think> and <tool_ inside.", [])),
    "one_tool_call": (
        True, "I need the weather.\n</think>\n\nLet me check.\n\n" + WEATHER_CALL,
        ParsedResponse("I need the weather.", "Let me check.", [WEATHER])),
    "two_tool_calls": (
        True, "Plan: weather, then write.\n</think>\n\n" + WEATHER_CALL + "\n" + WRITE_CALL + "\n",
        ParsedResponse("Plan: weather, then write.", "", [WEATHER, WRITE])),
    "two_tool_calls_no_thinking": (
        False, "Doing both.\n\n" + WRITE_CALL + "\n" + WEATHER_CALL,
        ParsedResponse("", "Doing both.", [WRITE, WEATHER])),
    "malformed_and_unclosed": (
        False, "A\n<tool_call>\nno function here\n</tool_call>\n\nB\n<tool_call>\n<function=x>\n<param",
        ParsedResponse("", "A<tool_call>\nno function here\n</tool_call>"
                           "B<tool_call>\n<function=x>\n<param", [])),
}


def stream(text, chunks, thinking):
    parser = StreamParser(thinking=thinking)
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.finish()
    return parser.result, events


@pytest.mark.parametrize("name", sorted(CASES))
def test_whole_text_parse(name):
    thinking, text, expected = CASES[name]
    assert parse_response(text, thinking=thinking) == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_stream_equals_whole_parse_at_every_split(name):
    thinking, text, expected = CASES[name]
    for cut in range(len(text) + 1):
        assert stream(text, [text[:cut], text[cut:]], thinking)[0] == expected, cut
    assert stream(text, list(text), thinking)[0] == expected
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), 5))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert stream(text, chunks, thinking)[0] == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_stream_never_emits_partial_markers(name):
    thinking, text, _ = CASES[name]
    parser = StreamParser(thinking=thinking)
    for char in text:
        for event in parser.feed(char):
            marker = THINK_END if event.kind == "thinking" else TOOL_CALL_START
            assert not any(event.text.endswith(marker[:size]) for size in range(1, len(marker))), event


def test_events_arrive_in_order():
    _, text, _ = CASES["one_tool_call"]
    _, events = stream(text, list(text), thinking=True)
    kinds = [event.kind for event in events]
    assert kinds == sorted(kinds, key=["thinking", "answer", "tool_call"].index)
    assert events[-1].tool_call == WEATHER


TOOLS = [{"type": "function",
          "function": {"name": name, "parameters": {"type": "object", "properties": props}}}
         for name, props in (
             ("get_weather", {"city": {"type": "string"}, "days": {"type": "integer"}}),
             ("write_file", {"path": {"type": "string"}, "content": {"type": "string"},
                             "options": {"type": "object"}}))]


@pytest.mark.parametrize("call", [WEATHER_CALL, WRITE_CALL, WRITE_CALL.replace('"w"', '"123"')])
def test_tool_call_matches_mlx_lm_qwen3_coder_parser(call):
    block = call[len("<tool_call>\n"):-len("\n</tool_call>")]
    assert parse_tool_call(block, tools=TOOLS) == reference_parse_tool_call(block, tools=TOOLS)


def test_values_are_json_decoded_unless_declared_strings():
    block = "<function=f>\n<parameter=n>\n123\n</parameter>\n<parameter=s>\n123\n</parameter>\n" \
            "<parameter=b>\ntrue\n</parameter>\n<parameter=t>\nnot json\n</parameter>\n</function>"
    tools = [{"type": "function",
              "function": {"name": "f", "parameters": {"properties": {"s": {"type": "string"}}}}}]
    assert parse_tool_call(block, tools=tools) == {"name": "f", "arguments": {"n": 123, "s": "123", "b": True,
                                                                             "t": "not json"}}
    assert parse_tool_call("no function") is None


def test_template_round_trip():
    """What the chat template writes for an assistant tool call parses back to the same call."""
    calls = [{"type": "function", "function": {"name": "write_file", "arguments": WRITE["arguments"]}},
             {"type": "function", "function": WEATHER}]
    messages = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": "Sure.", "reasoning_content": "Two calls.",
                 "tool_calls": calls}]
    rendered = render_chat(messages, add_generation_prompt=False)
    generated = rendered.split("<|im_start|>assistant\n<think>\n", 1)[1].removesuffix("<|im_end|>\n")
    assert parse_response(generated) == ParsedResponse("Two calls.", "Sure.", [WRITE, WEATHER])


def test_bad_use_raises():
    parser = StreamParser()
    with pytest.raises(ValueError, match="takes text"):
        parser.feed(5)
    parser.finish()
    assert parser.finish() == []
    with pytest.raises(ValueError, match="after finish"):
        parser.feed("more")


def test_tool_schemas_take_either_form_and_name_what_is_wrong():
    wrapped = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    bare = {"name": "get_weather", "parameters": {"type": "object"}}
    assert tool_schemas(json.dumps([wrapped, bare])) == [wrapped, bare]
    assert tool_schemas(json.dumps(bare)) == [bare]
    assert tool_schemas("  \n") is None
    with pytest.raises(ValueError, match="not valid JSON"):
        tool_schemas("[{")
    with pytest.raises(ValueError, match="not a JSON list of tool schemas"):
        tool_schemas('["add"]')
    with pytest.raises(ValueError, match="tool 1 has no name"):
        tool_schemas(json.dumps([wrapped, {"type": "function", "function": {"parameters": {}}}]))


def test_call_text_is_one_line_of_json_arguments():
    call = parse_tool_call("<function=add>\n<parameter=b>\n2\n</parameter>\n<parameter=a>\n40\n</parameter>\n</function>")
    assert call_text(call) == 'add({"b": 2, "a": 40})'
    assert call_text(call, sort_keys=True) == 'add({"a": 40, "b": 2})'
