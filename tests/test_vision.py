"""The vision tower and multimodal forward against transformers run in float64, on tiny random checkpoints
(dense and MoE) loaded through mlx_qwen35.load; identical pixel_values and grids feed both sides.
`python tests/test_vision.py` prints the vision-attention memory benchmark."""

import copy

import mlx.core as mx
import numpy as np
import pytest
import torch

import hf_reference
import mlx_qwen35
from hf_reference import build_hf_model, relative_error, save_hf_checkpoint

BOUND = 1e-5
# Deeper than TINY_VISION, with a 6x6 position table so that grids resample it non-trivially.
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
              spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=36)
IMAGE, VIDEO, START, END = 500, 501, 502, 503
PATCH_DIM = 3 * 2 * 16 * 16


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def models(request, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hf_reference, "TINY_VISION", VISION)
        hf = build_hf_model(moe=request.param, seed=5)
    hf.config.image_token_id, hf.config.video_token_id = IMAGE, VIDEO
    hf.config.vision_start_token_id, hf.config.vision_end_token_id = START, END
    path = save_hf_checkpoint(hf, tmp_path_factory.mktemp("vl"))
    hf64 = copy.deepcopy(hf).double()
    if request.param:
        hf64.set_experts_implementation("eager")
    model, _ = mlx_qwen35.load(path, dtype="float32")
    return hf64, model


def prompt(segments, seed=0):
    """Token ids in the placeholder layout of spec 4.4 and the matching pixel inputs. segments: ("text", n),
    ("image", (1, h, w)) or ("video", (t, h, w)); each video frame gets 3 timestamp tokens before it."""
    rng = np.random.default_rng(seed)
    ids, pixels, grids = [], {"image": [], "video": []}, {"image": [], "video": []}
    for kind, value in segments:
        if kind == "text":
            ids += rng.integers(0, 400, value).tolist()
            continue
        t, h, w = value
        grids[kind].append(value)
        pixels[kind].append(rng.standard_normal((t * h * w, PATCH_DIM)))
        if kind == "image":
            ids += [START] + [IMAGE] * (t * h * w // 4) + [END]
        else:
            for _ in range(t):
                ids += rng.integers(0, 400, 3).tolist() + [START] + [VIDEO] * (h * w // 4) + [END]
    inputs = {}
    for kind, pixel_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                      ("video", "pixel_values_videos", "video_grid_thw")):
        if grids[kind]:
            inputs[pixel_key] = np.concatenate(pixels[kind])
            inputs[grid_key] = np.array(grids[kind])
    return np.array([ids]), inputs


def reference_logits(hf64, ids, inputs):
    types = np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))
    tensors = {k: torch.from_numpy(v) if k.startswith("pixel") else torch.from_numpy(v.astype(np.int64))
               for k, v in inputs.items()}
    with torch.no_grad():
        return hf64(input_ids=torch.from_numpy(ids.astype(np.int64)), mm_token_type_ids=torch.from_numpy(types),
                    use_cache=False, **tensors).logits.numpy()


def ours(inputs):
    return {k: mx.array(v.astype(np.float32)) if k.startswith("pixel") else mx.array(v) for k, v in inputs.items()}


CASES = {
    "one-image": [("text", 5), ("image", (1, 4, 6)), ("text", 7)],
    "three-images": [("text", 3), ("image", (1, 4, 6)), ("text", 2), ("image", (1, 2, 2)), ("text", 4),
                     ("image", (1, 8, 4)), ("text", 3)],
    "video": [("text", 4), ("video", (3, 4, 4)), ("text", 5)],
    "mixed": [("text", 6), ("video", (2, 6, 4)), ("text", 3), ("image", (1, 4, 8)), ("text", 2),
              ("image", (1, 2, 6)), ("text", 4)],
}


def test_vision_features_match_transformers(models):
    hf64, model = models
    rng = np.random.default_rng(1)
    grid = np.array([[1, 4, 6], [2, 4, 4], [1, 2, 2], [1, 10, 6]])
    pixels = rng.standard_normal((int(grid.prod(axis=1).sum()), PATCH_DIM))
    with torch.no_grad():
        expected = hf64.model.visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid)).pooler_output
    features = model.model.visual(mx.array(pixels.astype(np.float32)), mx.array(grid))
    assert features.shape == (grid.prod(axis=1).sum() // 4, 64)
    error = relative_error(np.array(features), expected.numpy())
    assert error <= BOUND, f"vision features relative error {error:.2e}"


@pytest.mark.parametrize("case", CASES)
def test_multimodal_logits_match_transformers(models, case):
    hf64, model = models
    ids, inputs = prompt(CASES[case], seed=len(case))
    expected = reference_logits(hf64, ids, inputs)
    logits = np.array(model(mx.array(ids), **ours(inputs)))
    assert logits.shape == expected.shape
    error = relative_error(logits, expected)
    assert error <= BOUND, f"{case}: relative error {error:.2e}"


def test_decode_after_multimodal_prefill_equals_full_forward(models):
    """Prefill text + video + image, then decode 6 tokens one at a time: with the rope delta stored on the
    model's cache, and with a plain list cache and the delta passed explicitly."""
    hf64, model = models
    ids, inputs = prompt(CASES["mixed"] + [("text", 6)], seed=3)
    expected = reference_logits(hf64, ids, inputs)
    prefill = ids.shape[1] - 6
    _, _, delta = model.embed_multimodal(mx.array(ids[:, :prefill]), **ours(inputs))
    assert int(delta[0]) != 0, "the prompt should shift decode positions"
    for cache, explicit in ((model.make_cache(), None), (list(model.make_cache()), delta)):
        steps = [model(mx.array(ids[:, :prefill]), cache=cache, **ours(inputs))]
        for t in range(prefill, ids.shape[1]):
            steps.append(model(mx.array(ids[:, t:t + 1]), cache=cache, rope_delta=explicit))
        error = relative_error(np.array(mx.concatenate(steps, axis=1)), expected)
        assert error <= BOUND, f"{type(cache).__name__}: decode relative error {error:.2e}"


def test_image_in_a_later_chunk_continues_positions(models):
    """A second turn with a new image, appended to a cache that already holds an image prompt."""
    hf64, model = models
    first = [("text", 4), ("image", (1, 4, 6)), ("text", 3)]
    ids, inputs = prompt(first + [("image", (1, 6, 2)), ("text", 5)], seed=4)
    expected = reference_logits(hf64, ids, inputs)
    split = 4 + 2 + 6 + 3
    ids1, inputs1 = prompt(first, seed=4)
    assert (ids1 == ids[:, :split]).all()
    grids = inputs["image_grid_thw"]
    inputs2 = {"pixel_values": inputs["pixel_values"][24:], "image_grid_thw": grids[1:]}
    cache = model.make_cache()
    steps = [model(mx.array(ids1), cache=cache, **ours(inputs1)),
             model(mx.array(ids[:, split:]), cache=cache, **ours(inputs2))]
    error = relative_error(np.array(mx.concatenate(steps, axis=1)), expected)
    assert error <= BOUND, f"relative error {error:.2e}"


def test_placeholder_count_mismatch_names_both_counts(models):
    _, model = models
    ids, inputs = prompt([("text", 3), ("image", (1, 4, 6)), ("text", 2)])
    ids = np.delete(ids, 5, axis=1)  # one image pad fewer than the grid's 6 features
    cache = model.make_cache()
    with pytest.raises(ValueError, match=r"5 image placeholder tokens.*6 image features"):
        model(mx.array(ids), cache=cache, **ours(inputs))
    assert cache[3].offset == 0 and cache.rope_delta is None
    _, video = prompt([("video", (2, 2, 2))])
    with pytest.raises(ValueError, match=r"0 video placeholder tokens.*2 video features"):
        model(mx.array(ids[:, :3]), **ours(video))


def test_bad_vision_inputs_are_rejected(models):
    _, model = models
    with pytest.raises(ValueError, match="pixel_values has shape"):
        model.model.visual(mx.zeros((10, PATCH_DIM)), mx.array([[1, 4, 4]]))
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        model.model.visual(mx.zeros((12, PATCH_DIM)), mx.array([[1, 3, 4]]))


def vision_attention_peak_memory(model, grids) -> int:
    """Peak bytes the tower allocates beyond its weights and input pixels."""
    pixels = mx.zeros((int(np.prod(grids, axis=1).sum()), PATCH_DIM))
    mx.eval(model.model.visual.parameters(), pixels)
    mx.clear_cache()
    mx.reset_peak_memory()
    baseline = mx.get_active_memory()
    mx.eval(model.model.visual(pixels, mx.array(grids)))
    return mx.get_peak_memory() - baseline


def test_vision_attention_memory_is_per_image_and_bounded(models):
    """Four 32x32-patch images peak near one (attention per image; one matrix across them would hold 16x
    the scores), and one 64x64-patch image stays below its full 4096 x 4096 score matrix (2 heads, 128 MiB)."""
    _, model = models
    if model.config.text_config.is_moe:
        pytest.skip("the vision tower does not depend on the text MLP")
    one = vision_attention_peak_memory(model, [[1, 32, 32]])
    four = vision_attention_peak_memory(model, [[1, 32, 32]] * 4)
    big = vision_attention_peak_memory(model, [[1, 64, 64]])
    assert four < 2.5 * one, f"peak for 4 images {four} vs 1 image {one}"
    assert big < 2 * 4096**2 * 4 / 2, f"peak for a 64x64-patch image {big}"


def benchmark():
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        patch.setattr(hf_reference, "TINY_VISION", VISION)
        model, _ = mlx_qwen35.load(save_hf_checkpoint(build_hf_model(), tmp), dtype="float32")
    print("grids (t,h,w) x count            patches   peak MiB   ms")
    for grids in ([[1, 32, 32]], [[1, 32, 32]] * 2, [[1, 32, 32]] * 4, [[1, 32, 32]] * 8, [[4, 32, 32]],
                  [[1, 64, 64]], [[1, 90, 90]]):
        start = time.perf_counter()
        peak = vision_attention_peak_memory(model, grids)
        ms = (time.perf_counter() - start) * 1e3
        label = f"{grids[0]} x {len(grids)}"
        print(f"{label:32s} {int(np.prod(grids, axis=1).sum()):8d} {peak / 2**20:10.1f} {ms:6.0f}")


if __name__ == "__main__":
    benchmark()
