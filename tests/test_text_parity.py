"""Our float32 logits against transformers run in float64, on tiny random checkpoints written to disk as
Hugging Face directories (both MoE expert layouts) and loaded through mlx_qwen35.load."""

import copy

import mlx.core as mx
import numpy as np
import pytest
import torch

import mlx_qwen35
from hf_reference import build_hf_model, relative_error, save_hf_checkpoint

BOUND = 1e-5
LENGTHS = (1, 63, 64, 65, 300)
# (name, text overrides, tied head): GQA ratio nh/nkv, DeltaNet Hv/Hk, layer-type source.
CONFIGS = [
    ("gqa1-hv1-interval", dict(num_key_value_heads=4, linear_num_value_heads=2), False),
    ("gqa2-hv2-explicit-tied", dict(num_key_value_heads=2, linear_num_value_heads=4, layer_types=[
        "full_attention", "linear_attention", "linear_attention", "full_attention"]), True),
    ("gqa2-hv4-interval", dict(num_key_value_heads=2, linear_num_value_heads=8), False),
]


@pytest.fixture(scope="module", params=[(c, moe) for c in CONFIGS for moe in (False, True)],
                ids=lambda p: f"{p[0][0]}-{'moe' if p[1] else 'dense'}")
def reference(request, tmp_path_factory):
    (name, overrides, tie), moe = request.param
    hf = build_hf_model(moe=moe, tie=tie, seed=len(name), **overrides)
    hf64 = copy.deepcopy(hf).double()
    if moe:
        hf64.set_experts_implementation("eager")  # the grouped-mm path has no float64 kernel
    layouts = ("fused", "per_expert") if moe else ("fused",)
    paths = {layout: save_hf_checkpoint(hf, tmp_path_factory.mktemp(f"{name}-{layout}"), layout,
                                        shards=2 if layout == "per_expert" else 1) for layout in layouts}
    return hf64, paths


def reference_logits(hf64, ids):
    with torch.no_grad():
        return hf64(input_ids=torch.from_numpy(np.asarray(ids, np.int64)), use_cache=False).logits.numpy()


@pytest.mark.parametrize("length", LENGTHS)
def test_logits_match_transformers(reference, length):
    hf64, paths = reference
    ids = np.random.default_rng(length).integers(0, 512, size=(1, length))
    expected = reference_logits(hf64, ids)
    for layout, path in paths.items():
        model, _ = mlx_qwen35.load(path, dtype="float32")
        logits = np.array(model(mx.array(ids)))
        assert logits.shape == expected.shape
        error = relative_error(logits, expected)
        assert error <= BOUND, f"{layout}: relative error {error:.2e} at length {length}"


def test_config_layer_types_are_honoured(reference):
    hf64, paths = reference
    model, _ = mlx_qwen35.load(next(iter(paths.values())))
    expected = hf64.config.text_config.layer_types
    assert [("linear_attention" if layer.is_linear else "full_attention") for layer in model.layers] == expected


def test_prefill_then_decode_equals_full_forward(reference):
    """Batch 2: prefill 40 tokens, then decode 25 one at a time through the cache; every step's logits
    must match the reference's single full forward."""
    hf64, paths = reference
    model, _ = mlx_qwen35.load(next(iter(paths.values())))
    ids = np.random.default_rng(7).integers(0, 512, size=(2, 65))
    expected = reference_logits(hf64, ids)
    cache = model.make_cache()
    steps = [model(mx.array(ids[:, :40]), cache=cache)]
    for t in range(40, 65):
        steps.append(model(mx.array(ids[:, t : t + 1]), cache=cache))
    error = relative_error(np.array(mx.concatenate(steps, axis=1)), expected)
    assert error <= BOUND, f"cached decode relative error {error:.2e}"


def test_snapshot_restore_gives_identical_logits(reference):
    hf64, paths = reference
    model, _ = mlx_qwen35.load(next(iter(paths.values())))
    ids = np.random.default_rng(3).integers(0, 512, size=(1, 30))
    cache = model.make_cache()
    model(mx.array(ids[:, :20]), cache=cache)
    saved = mlx_qwen35.snapshot(cache)

    def continue_decoding():
        return [np.array(model(mx.array(ids[:, t : t + 1]), cache=cache)) for t in range(20, 30)]

    first = continue_decoding()
    mlx_qwen35.restore(cache, saved)
    second = continue_decoding()
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    expected = reference_logits(hf64, ids)[:, 20:]
    assert relative_error(np.concatenate(second, axis=1), expected) <= BOUND


def test_blocked_attention_for_long_prompts_matches_reference(reference, monkeypatch):
    """Prompts longer than QUERY_BLOCK attend block by block (memory linear in length); force small blocks."""
    from mlx_qwen35.models import attention

    monkeypatch.setattr(attention, "QUERY_BLOCK", 64)
    hf64, paths = reference
    model, _ = mlx_qwen35.load(next(iter(paths.values())))
    ids = np.random.default_rng(11).integers(0, 512, size=(1, 300))
    cache = model.make_cache()
    first = model(mx.array(ids[:, :100]), cache=cache)
    rest = model(mx.array(ids[:, 100:]), cache=cache)
    expected = reference_logits(hf64, ids)
    assert relative_error(np.array(mx.concatenate([first, rest], axis=1)), expected) <= BOUND
