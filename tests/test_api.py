"""The generation API, the CLI and Chat on a tiny random checkpoint with the real Qwen 3.5 tokenizer:
greedy tokens equal transformers' greedy generate, every front end agrees, and a follow-up Chat turn runs
only the tokens the template adds."""

import copy

import numpy as np
import pytest
import torch

import mlx_qwen35
from hf_reference import build_hf_model, save_hf_checkpoint
from mlx_qwen35.cli import main
from mlx_qwen35.tokenizer import write_tokenizer_files

VOCAB = 248320
NEW_TOKENS = 10
QUESTION = "What is 2 + 2? Answer briefly."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = build_hf_model(seed=41, vocab_size=VOCAB, hidden_size=64)
    path = save_hf_checkpoint(hf, tmp_path_factory.mktemp("api"))
    write_tokenizer_files(path)
    hf64 = copy.deepcopy(hf).double()
    model, processor = mlx_qwen35.load(path)
    return path, hf64, model, processor


def reference_greedy(hf64, ids, new_tokens=NEW_TOKENS):
    """transformers' greedy generate, cut after the first stop token as our loop stops there."""
    ids = torch.tensor([ids])
    with torch.no_grad():
        out = hf64.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                            do_sample=False, pad_token_id=248044, eos_token_id=[248046, 248044])
    tokens = out[0, ids.shape[1]:].tolist()
    for i, t in enumerate(tokens):
        if t in (248046, 248044):
            return tokens[: i + 1]
    return tokens


def chat_ids(processor, messages, **options):
    return list(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **options))


def test_api_cli_and_chat_agree_with_transformers(checkpoint, capsys):
    path, hf64, model, processor = checkpoint
    messages = [{"role": "user", "content": QUESTION}]
    expected = reference_greedy(hf64, chat_ids(processor, messages))

    api_tokens = [r.token for r in mlx_qwen35.stream_generate(model, processor, messages, max_tokens=NEW_TOKENS)]
    assert api_tokens == expected

    main(["generate", "--model", str(path), "--prompt", QUESTION, "--max-tokens", str(NEW_TOKENS)])
    cli_text = capsys.readouterr().out.rstrip("\n")
    assert cli_text == processor.decode([t for t in expected if t not in (248046, 248044)])

    chat = mlx_qwen35.Chat(model, processor, max_tokens=NEW_TOKENS)
    assert [r.token for r in chat.stream(QUESTION)] == expected


def test_second_chat_turn_runs_only_new_tokens(checkpoint):
    _, hf64, model, processor = checkpoint
    chat = mlx_qwen35.Chat(model, processor, max_tokens=NEW_TOKENS)
    list(chat.stream(QUESTION))
    first_turn = [{"role": "user", "content": QUESTION}]
    first_turn_end = list(processor.apply_chat_template(first_turn, add_generation_prompt=False, tokenize=True))

    follow_up = "And 3 + 3?"
    tokens = [r.token for r in chat.stream(follow_up)]
    full = chat_ids(processor, chat.messages[:-1])
    assert chat.last_response.prompt_tokens == len(full)
    # Everything up to the end of the first user turn was already in the cache.
    assert full[: len(first_turn_end)] == first_turn_end
    assert chat.last_response.prompt_tokens_processed == len(full) - len(first_turn_end)
    assert tokens == reference_greedy(hf64, full)


def test_stop_strings_end_the_text_before_them(checkpoint):
    _, _, model, processor = checkpoint
    text = mlx_qwen35.generate(model, processor, "The quick brown fox", max_tokens=12)
    assert len(text) > 6
    stop = text[3:6]
    stopped = mlx_qwen35.generate(model, processor, "The quick brown fox", max_tokens=12, stop=[stop])
    assert stopped == text[: text.find(stop)]


def test_sampling_settings(checkpoint):
    _, _, model, processor = checkpoint
    prompt = "Once upon a time"
    greedy = mlx_qwen35.generate(model, processor, prompt, max_tokens=8)
    assert mlx_qwen35.generate(model, processor, prompt, max_tokens=8, temperature=1.0, top_k=1) == greedy
    first = mlx_qwen35.generate(model, processor, prompt, max_tokens=8, temperature=1.5, seed=3)
    second = mlx_qwen35.generate(model, processor, prompt, max_tokens=8, temperature=1.5, seed=3)
    assert first == second
    for bad in (dict(temperature=-1), dict(top_p=1.5), dict(top_k=-2), dict(min_p=2.0),
                dict(repetition_penalty=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            mlx_qwen35.generate(model, processor, prompt, max_tokens=2, **bad)


def test_enable_thinking_false_changes_the_prompt(checkpoint):
    _, _, model, processor = checkpoint
    messages = [{"role": "user", "content": QUESTION}]
    on = processor.decode(chat_ids(processor, messages))
    off = processor.decode(chat_ids(processor, messages, enable_thinking=False))
    assert on.endswith("<|im_start|>assistant\n<think>\n")
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    np.testing.assert_equal(
        [r.token for r in mlx_qwen35.stream_generate(model, processor, messages, max_tokens=3,
                                                     enable_thinking=False)],
        [r.token for r in mlx_qwen35.stream_generate(model, processor, chat_ids(
            processor, messages, enable_thinking=False), max_tokens=3)])


def test_cli_chat_session(checkpoint, capsys, typed_lines):
    path = checkpoint[0]
    typed_lines("Hi there", "/reset", "Hello again")
    main(["chat", "--model", str(path), "--max-tokens", "5"])
    err = capsys.readouterr().err
    assert "(conversation cleared)" in err
    # After /reset the second message is a fresh conversation: every prompt token is processed again.
    stats = [line for line in err.splitlines() if line.startswith("prompt ")]
    assert len(stats) == 2
    for line in stats:
        total, processed = line.split(" tokens (")[0].split()[-1], line.split("(")[1].split()[0]
        assert total == processed


def test_chat_stopped_mid_reply_keeps_its_cache_bookkeeping(checkpoint):
    """Closing the stream mid-reply (the app's Stop): the tokens Chat believes its cache holds must be what
    the cache holds, or a later turn could reuse a stale prefix; and the next turn must still be right."""
    from mlx_qwen35.cache import cache_offset

    _, _, model, processor = checkpoint
    chat = mlx_qwen35.Chat(model, processor, enable_thinking=False, max_tokens=6)
    chat.send("First question.")
    stream = chat.stream("Second question.")
    streamed = [next(stream).token, next(stream).token]
    stream.close()
    second_prompt = chat_ids(processor, chat.messages + [{"role": "user", "content": "Second question."}],
                             enable_thinking=False)
    assert len(chat._tokens) == cache_offset(chat.cache)
    assert chat._tokens == (second_prompt + streamed)[: len(chat._tokens)]
    tokens = [r.token for r in chat.stream("Third question.")]
    expected_prompt = chat_ids(processor, chat.messages[:-1], enable_thinking=False)
    expected = [r.token for r in mlx_qwen35.stream_generate(model, processor, expected_prompt, max_tokens=6)]
    assert tokens == expected
