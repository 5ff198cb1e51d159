"""bfloat16 weights and activations against the float64 reference over a 512-token prompt. The bound was
measured on these fixtures (see the numbers in the assertion message) and fixed with headroom: it guards
against precision regressions such as rounding (1 + w) of zero-centred norms to bf16."""

import copy

import mlx.core as mx
import numpy as np
import pytest
import torch

import mlx_qwen35
from hf_reference import build_hf_model, relative_error, save_hf_checkpoint

# Measured 2026-11-23 (relative L2 over all logits, seeds 21-23): ours dense 7.2e-2..8.6e-2, MoE 1.9e-1..2.1e-1;
# transformers' own bf16 run on the same weights: dense 5.7e-2..6.4e-2, MoE 1.9e-1..2.5e-1. MoE is higher in
# both because bf16 rounding flips near-tied expert choices.
BF16_BOUND = {"dense": 0.12, "moe": 0.30}


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_bf16_logits_stay_near_float64_reference(moe, tmp_path):
    hf = build_hf_model(moe=moe, seed=21)
    path = save_hf_checkpoint(hf, tmp_path)
    hf64 = copy.deepcopy(hf).double()
    if moe:
        hf64.set_experts_implementation("eager")
    ids = np.random.default_rng(1).integers(0, 512, size=(1, 512))
    with torch.no_grad():
        expected = hf64(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    model, _ = mlx_qwen35.load(path, dtype="bfloat16")
    assert model.model.language_model.embed_tokens.weight.dtype == mx.bfloat16
    logits = model(mx.array(ids))
    assert logits.dtype == mx.bfloat16
    error = relative_error(np.array(logits.astype(mx.float32)), expected)
    float32_model, _ = mlx_qwen35.load(path, dtype="float32")
    float32_error = relative_error(np.array(float32_model(mx.array(ids))), expected)
    print(f"bf16 relative error {error:.2e}, float32 {float32_error:.2e}")
    bound = BF16_BOUND["moe" if moe else "dense"]
    assert error <= bound, f"bf16 relative error {error:.2e} (float32: {float32_error:.2e})"
    assert float32_error <= 1e-5
