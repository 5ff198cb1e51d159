"""Speculative decoding with the MTP head against the plain greedy loop (generate_tokens, itself checked
against transformers in test_generation.py), on tiny random checkpoints with random mtp.* tensors: the same
tokens for every draft length, through stop tokens and follow-up turns; drafts that are the MTP head's own
greedy guesses; and, with scripted drafts, exact acceptance counts and forward-pass savings."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import mlx_qwen35
from hf_reference import build_hf_model, save_hf_checkpoint
from mlx_qwen35.cache import KVCache, cache_offset
from mlx_qwen35.generation import generate_tokens, speculative_tokens
from mlx_qwen35.generation.speculative import MTPDrafter
from mlx_qwen35.models.text import TextModel
from test_mtp import ReferenceMTP, randomize

NEW_TOKENS = 40
PROMPT = np.random.default_rng(7).integers(0, 512, size=37).tolist()


def write_mtp_checkpoint(path, moe, seed, vocab_size=None, mtp_layers=1):
    overrides = {} if vocab_size is None else {"vocab_size": vocab_size}
    hf = build_hf_model(moe=moe, seed=seed, **overrides)
    save_hf_checkpoint(hf, path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["mtp_num_hidden_layers"] = mtp_layers
    (path / "config.json").write_text(json.dumps(config))
    mtp = ReferenceMTP(hf.config.text_config, moe).float()
    randomize(mtp, torch.Generator().manual_seed(seed))
    tensors = {f"mtp.{k}": v.detach().float().numpy() for k, v in mtp.state_dict().items()}
    save_file(tensors, str(path / "mtp.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def model(request, tmp_path_factory):
    path = write_mtp_checkpoint(tmp_path_factory.mktemp("spec"), request.param, seed=21 + request.param)
    model, _ = mlx_qwen35.load(path, dtype="float32")
    assert model.mtp is not None
    return model


def plain(model, prompt, max_tokens=NEW_TOKENS, stop_ids=(), cache=None, **options):
    return [r.token for r in generate_tokens(model, prompt, max_tokens, cache=cache, stop_ids=stop_ids, **options)]


class RecordingDrafter(MTPDrafter):
    """The MTP drafter, logging each draft with the position of the token it continues."""

    def __init__(self, *args):
        super().__init__(*args)
        self.log = []

    def draft(self, k):
        tokens = super().draft(k)
        self.log.append((self._next_position, tokens.tolist()))
        return tokens


class ScriptedDrafter:
    """Drafts the true greedy continuation `sequence` (prompt + plain output), corrupting the draft at index
    corrupt(round) (none when that is >= k); counts the drafts that should be accepted."""

    def __init__(self, sequence, corrupt=lambda round: 99):
        self.sequence, self.corrupt = sequence, corrupt
        self.rounds = self.expected_accepted = self.rejections = 0
        self.pending = None

    def extend(self, hidden, next_ids, start):
        assert hidden.shape[:2] == (1, len(next_ids))
        assert list(next_ids) == self.sequence[start + 1 : start + 1 + len(next_ids)]
        self.pending = start + len(next_ids)  # position of the last next id: the token not yet run

    def draft(self, k):
        guesses = self.sequence[self.pending + 1 : self.pending + 1 + k]
        assert len(guesses) == k, "drafts are never asked for past the token budget"
        bad = self.corrupt(self.rounds)
        if bad < k:
            guesses[bad] = (guesses[bad] + 1) % 512
        self.rounds += 1
        self.expected_accepted += min(bad, k)
        self.rejections += bad < k
        return mx.array(guesses)

    def flush(self):
        return None


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_tokens_equal_the_plain_loop(model, k):
    expected = plain(model, PROMPT, prefill_chunk=16)
    responses = list(speculative_tokens(model, PROMPT, k, NEW_TOKENS, stop_ids=(), prefill_chunk=16))
    assert [r.token for r in responses] == expected
    assert [r.generation_tokens for r in responses] == list(range(1, NEW_TOKENS + 1))
    assert [r.finish_reason for r in responses] == [None] * (NEW_TOKENS - 1) + ["length"]
    last = responses[-1]
    assert last.prompt_tokens == last.prompt_tokens_processed == len(PROMPT)
    assert 0 < last.drafted <= k * NEW_TOKENS and 0 <= last.accepted <= last.drafted
    assert 0.0 <= last.acceptance_rate <= 1.0


@pytest.mark.parametrize("k", [1, 2])
def test_drafts_are_the_mtp_heads_greedy_guesses(model, k):
    """Each draft equals the MTP head's guess recomputed from scratch over the pairs (h_t, x_{t+1}) of the
    whole sequence (its default positions, a fresh cache), chained once for the second draft: so the MTP
    cache holds exactly the right pairs, chained entries are trimmed, and positions are right."""
    cache = model.make_cache()
    drafter = RecordingDrafter(model, model.make_mtp_cache())
    tokens = [r.token for r in speculative_tokens(model, PROMPT, k, 24, cache=cache, stop_ids=(),
                                                  prefill_chunk=16, drafter=drafter)]
    sequence = PROMPT + tokens
    hidden = model.model.language_model(mx.array([sequence]))
    mtp = model.mtp
    assert len(drafter.log) > 5
    for position, drafts in drafter.log:
        t = position - 1  # the last pair is (h_t, x_{t+1})
        reference_cache = model.make_mtp_cache()
        z = mtp.hidden(hidden[:, : t + 1], mx.array([sequence[1 : t + 2]]), cache=reference_cache)
        h = mtp.norm(z[:, -1:])
        expected = [int(mx.argmax(mtp.head(h)[0, -1]))]
        if len(drafts) > 1:
            z = mtp.hidden(h, mx.array([[expected[0]]]), cache=reference_cache)
            expected.append(int(mx.argmax(mtp.head(mtp.norm(z))[0, -1])))
        assert drafts == expected[: len(drafts)], f"drafts after position {position}"


@pytest.mark.parametrize("k", [1, 3])
def test_a_stop_token_inside_a_round_ends_generation_there(model, k):
    full = plain(model, PROMPT)
    stop = full[len(full) // 2]
    expected = full[: full.index(stop) + 1]
    assert plain(model, PROMPT, stop_ids=(stop,)) == expected

    plain_cache, spec_cache = model.make_cache(), model.make_cache()
    plain(model, PROMPT, stop_ids=(stop,), cache=plain_cache)
    responses = list(speculative_tokens(model, PROMPT, k, NEW_TOKENS, stop_ids=(stop,), cache=spec_cache))
    assert [r.token for r in responses] == expected
    assert responses[-1].finish_reason == "stop"
    # scripted drafts run straight through the stop token: it must still end the reply
    scripted = list(speculative_tokens(model, PROMPT, 4, NEW_TOKENS, stop_ids=(stop,),
                                       drafter=ScriptedDrafter(PROMPT + full)))
    assert [r.token for r in scripted] == expected
    assert cache_offset(spec_cache) == cache_offset(plain_cache) == len(PROMPT) + len(expected) - 1


@pytest.mark.parametrize("k", [1, 2])
def test_the_cache_continues_like_the_plain_loops(model, k):
    """A second turn on the cache a speculative turn left (speculative again, or plain) gives the tokens the
    plain loop gives on its own cache, and the caches hold the same state."""
    first = plain(model, PROMPT, max_tokens=17)
    follow = [first[-1]] + np.random.default_rng(3).integers(0, 512, size=9).tolist()
    history = PROMPT + first[:-1]
    plain_cache = model.make_cache()
    plain(model, PROMPT, max_tokens=17, cache=plain_cache)
    expected = plain(model, follow, cache=plain_cache, history=history)

    for second_turn_speculative in (True, False):
        cache = model.make_cache()
        assert [r.token for r in speculative_tokens(model, PROMPT, k, 17, cache=cache, stop_ids=())] == first
        assert cache_offset(cache) == cache_offset(cache.mtp_cache) == len(history)
        if second_turn_speculative:
            second = [r.token for r in speculative_tokens(model, follow, k, NEW_TOKENS, cache=cache, stop_ids=(),
                                                           history=history)]
        else:
            second = plain(model, follow, cache=cache, history=history)
        assert second == expected
        n = cache_offset(cache)
        assert n == cache_offset(plain_cache)
        for ours, theirs in zip(cache, plain_cache):
            if isinstance(ours, KVCache):
                pairs = [(ours.keys[..., :n, :], theirs.keys[..., :n, :]),
                         (ours.values[..., :n, :], theirs.values[..., :n, :])]
            else:
                pairs = list(zip(ours.cache, theirs.cache))
            for a, b in pairs:
                np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)


def test_scripted_drafts_are_all_accepted_with_fewer_forward_passes(model, monkeypatch):
    expected = plain(model, PROMPT)
    calls = []
    original = TextModel.__call__

    def counted(self, input_ids=None, *args, **kwargs):
        calls.append(input_ids.shape[1])
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(TextModel, "__call__", counted)
    plain(model, PROMPT)
    assert calls == [len(PROMPT) - 1] + [1] * NEW_TOKENS  # prefill, then one pass per token
    for k in (1, 3):
        calls.clear()
        drafter = ScriptedDrafter(PROMPT + expected)
        responses = list(speculative_tokens(model, PROMPT, k, NEW_TOKENS, stop_ids=(), drafter=drafter))
        assert [r.token for r in responses] == expected
        last = responses[-1]
        assert last.accepted == last.drafted == drafter.expected_accepted > 0
        assert last.acceptance_rate == 1.0
        rounds = 1 + -(-(NEW_TOKENS - 1) // (k + 1))  # the first token, then k + 1 tokens per pass
        assert calls[0] == len(PROMPT) - 1 and len(calls) - 1 == last.forward_passes == rounds < NEW_TOKENS


@pytest.mark.parametrize("k", [2, 4])
def test_partly_wrong_drafts_keep_the_tokens_and_count_acceptance(model, k):
    """Scripted drafts wrong at a varying index (0 .. past the end): every accept/reject split is exercised,
    the tokens stay the plain loop's, and accepted drafts are exactly the correct prefixes."""
    expected = plain(model, PROMPT)
    drafter = ScriptedDrafter(PROMPT + expected, corrupt=lambda round: round % (k + 2))
    responses = list(speculative_tokens(model, PROMPT, k, NEW_TOKENS, stop_ids=(), drafter=drafter))
    assert [r.token for r in responses] == expected
    last = responses[-1]
    assert last.accepted == drafter.expected_accepted and 0 < last.accepted < last.drafted
    assert 0 < drafter.rejections < drafter.rounds
    # passes: the first token's, one per drafted round, one per round left with a single token (no drafts),
    # and one re-run per rejection
    undrafted = NEW_TOKENS - 1 - (drafter.expected_accepted + drafter.rounds)
    assert undrafted in (0, 1)
    assert last.forward_passes == 1 + drafter.rounds + undrafted + drafter.rejections


def test_closing_the_stream_mid_round_leaves_a_truthful_cache(model):
    """Stopped early (the app's Stop), the cache must hold no token after the last one yielded, and a
    continuation from what it holds must give the plain loop's tokens."""
    expected = plain(model, PROMPT)
    cache = model.make_cache()
    stream = speculative_tokens(model, PROMPT, 3, NEW_TOKENS, stop_ids=(), cache=cache,
                                drafter=ScriptedDrafter(PROMPT + expected))
    yielded = [next(stream).token for _ in range(3)]  # the first round, then into the second (4 tokens)
    stream.close()
    held = cache_offset(cache)
    sequence = PROMPT + yielded
    assert held <= len(sequence)
    extra = [5, 6, 7]
    continued = plain(model, sequence[held:] + extra, max_tokens=8, cache=cache, history=sequence[:held])
    assert continued == plain(model, sequence + extra, max_tokens=8)


def test_greedy_only_and_argument_errors(model):
    with pytest.raises(ValueError, match="greedy only"):
        next(speculative_tokens(model, PROMPT, 1, 4, temperature=0.7))
    with pytest.raises(ValueError, match="at least 1"):
        next(speculative_tokens(model, PROMPT, 0, 4))
    with pytest.raises(ValueError, match="empty"):
        next(speculative_tokens(model, [], 1, 4))
    with pytest.raises(ValueError, match="greedy only"):
        next(mlx_qwen35.stream_generate(model, None, PROMPT, max_tokens=4, speculative=2, temperature=0.5))


def test_api_speculative_matches_plain_and_reports_acceptance(model):
    plain_responses = list(mlx_qwen35.stream_generate(model, None, PROMPT, max_tokens=12))
    responses = list(mlx_qwen35.stream_generate(model, None, PROMPT, max_tokens=12, speculative=2))
    assert [r.token for r in responses] == [r.token for r in plain_responses]
    assert responses[-1].drafted > 0 and hasattr(responses[-1], "acceptance_rate")


def test_a_checkpoint_without_mtp_tensors_cannot_speculate(tmp_path):
    hf = build_hf_model(seed=2)
    path = save_hf_checkpoint(hf, tmp_path / "plain")
    model, _ = mlx_qwen35.load(path)
    assert model.mtp is None
    with pytest.raises(ValueError, match=r"no mtp\.\* tensors \(mtp\.fc\.weight"):
        next(speculative_tokens(model, PROMPT, 1, 4))
    with pytest.raises(ValueError, match="no mtp"):
        list(mlx_qwen35.stream_generate(model, None, PROMPT, max_tokens=4, speculative=1))

    path = write_mtp_checkpoint(tmp_path / "zero", moe=False, seed=2, mtp_layers=0)
    model, _ = mlx_qwen35.load(path)
    assert model.mtp is None and any(k.startswith("mtp.") for k in model.extra_weights)
    with pytest.raises(ValueError, match="mtp_num_hidden_layers = 0"):
        next(speculative_tokens(model, PROMPT, 1, 4))


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    from mlx_qwen35.tokenizer import write_tokenizer_files

    path = write_mtp_checkpoint(tmp_path_factory.mktemp("spec-api"), moe=False, seed=43, vocab_size=248320)
    write_tokenizer_files(path)
    return path


def test_cli_and_chat_with_speculative_decoding(chat_checkpoint, capsys):
    from mlx_qwen35.cli import main

    args = ["generate", "--model", str(chat_checkpoint), "--prompt", "What is 12 + 34?", "--max-tokens", "12"]
    main(args)
    plain_out = capsys.readouterr().out
    main(args + ["--speculative", "2", "--stats"])
    captured = capsys.readouterr()
    assert captured.out == plain_out
    assert "speculative decoding:" in captured.err and "drafted tokens accepted" in captured.err

    model, processor = mlx_qwen35.load(chat_checkpoint)
    replies = []
    for options in ({}, {"speculative": 2}):
        chat = mlx_qwen35.Chat(model, processor, max_tokens=8, **options)
        replies.append([[r.token for r in chat.stream(text)] for text in ("Hello.", "And then?")])
    assert replies[0] == replies[1]
