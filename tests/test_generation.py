"""Greedy decoding through our loop and through mlx-lm's generate_step (our model speaks its protocol)
gives the tokens transformers' own greedy generate gives."""

import copy

import mlx.core as mx
import numpy as np
import pytest
import torch

import mlx_qwen35
from hf_reference import build_hf_model, save_hf_checkpoint
from mlx_qwen35.generation import generate_tokens

NEW_TOKENS = 12


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def setup(request, tmp_path_factory):
    hf = build_hf_model(moe=request.param, seed=31)
    path = save_hf_checkpoint(hf, tmp_path_factory.mktemp("gen"))
    hf64 = copy.deepcopy(hf).double()
    if request.param:
        hf64.set_experts_implementation("eager")
    prompt = np.random.default_rng(5).integers(0, 512, size=(1, 37))
    with torch.no_grad():
        ids = torch.from_numpy(prompt)
        # An explicit all-ones mask: otherwise generate masks every prompt token equal to pad_token_id.
        out = hf64.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                            do_sample=False, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    expected = out[0, prompt.shape[1]:].tolist()
    model, _ = mlx_qwen35.load(path)
    return model, prompt[0].tolist(), expected


def test_our_loop_matches_transformers_greedy(setup):
    model, prompt, expected = setup
    responses = list(generate_tokens(model, prompt, max_tokens=NEW_TOKENS, prefill_chunk=16))
    assert [r.token for r in responses] == expected
    assert responses[-1].finish_reason == "length"
    assert responses[-1].prompt_tokens == len(prompt)


def test_a_reply_ended_by_a_stop_token_leaves_the_cache_ready_to_continue(setup):
    """The loop runs one step past each token before reading it; after a stop token that step is undone, so
    feeding the stop token next continues transformers' greedy sequence exactly."""
    model, prompt, expected = setup
    k = next(i for i in range(len(expected) // 2, len(expected)) if expected[i] not in expected[:i])
    cache = model.make_cache()
    replied = [r.token for r in generate_tokens(model, prompt, NEW_TOKENS, cache=cache, stop_ids=(expected[k],))]
    assert replied == expected[: k + 1]
    rest = generate_tokens(model, [expected[k]], NEW_TOKENS - k - 1, cache=cache, stop_ids=(),
                           history=prompt + expected[:k])
    assert [r.token for r in rest] == expected[k + 1:]


def test_mlx_lm_generate_step_drives_our_model(setup):
    from mlx_lm.generate import generate_step

    model, prompt, expected = setup
    tokens = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=NEW_TOKENS,
                                                prefill_step_size=16)]
    assert tokens == expected


def test_bad_generation_requests(setup):
    model, prompt, _ = setup
    with pytest.raises(ValueError, match="empty"):
        next(generate_tokens(model, [], max_tokens=4))
    with pytest.raises(ValueError, match="max_tokens"):
        next(generate_tokens(model, prompt, max_tokens=0))
