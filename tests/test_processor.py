"""The image / video processor against transformers' own pieces (torchvision is not installed, so its fast
processors cannot run): Qwen2VLImageProcessorPil for images, and for video transformers' PyAV reader, the
Qwen3-VL frame sampling, video smart_resize, patchify and placeholder expansion, with frames resized by the
same PIL backend. Same grids, same token ids, same pixel values."""

import types

import numpy as np
import pytest
import torch
from PIL import Image

from mlx_qwen35.processing.processor import Processor
from mlx_qwen35.tokenizer import load_tokenizer, write_tokenizer_files

# Measured: 0.0 for every case (both sides resize with PIL bicubic on uint8 and scale in float32); the bound
# leaves room for float32 rounding in the rescale only.
PIXEL_TOLERANCE = 1e-6
QWEN35 = {"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16,
          "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
SMALL = {**QWEN35, "size": {"shortest_edge": 1024, "longest_edge": 160 * 160}}
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    path = write_tokenizer_files(tmp_path_factory.mktemp("tok"))
    return load_tokenizer(path), AutoTokenizer.from_pretrained(path)


def reference_image_processor(config):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**config)


def reference_processor(image_processor, video_merge=2, temporal=2):
    """The Qwen3VLProcessor methods that expand placeholders, on a stand-in self (the class itself needs
    torchvision to be built)."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    me = types.SimpleNamespace(
        image_processor=image_processor, image_token="<|image_pad|>", video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
        video_processor=types.SimpleNamespace(merge_size=video_merge, temporal_patch_size=temporal))
    me._calculate_timestamps = types.MethodType(Qwen3VLProcessor._calculate_timestamps, me)
    me.replace_image_token = types.MethodType(Qwen3VLProcessor.replace_image_token, me)
    me.replace_video_token = types.MethodType(Qwen3VLProcessor.replace_video_token, me)
    return me


def random_image(height, width, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: resampling differences show up, unlike on flat colours.
    y, x = np.mgrid[:height, :width]
    base = np.stack([x * 255 / max(width, 1), y * 255 / max(height, 1), (x + y) % 256], -1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    return image.convert(mode) if mode != "RGB" else image


@pytest.mark.parametrize("config", [QWEN35, SMALL], ids=["qwen3.5", "small-budget"])
def test_images_match_transformers(tokenizers, config, tmp_path):
    ours_tok, hf_tok = tokenizers
    sizes = [(100, 300), (257, 64), (32, 32), (600, 900), (48, 4000)]
    images = [random_image(h, w, i) for i, (h, w) in enumerate(sizes)]
    images[1] = images[1].convert("RGBA")
    images[1].putalpha(128)
    path = tmp_path / "a.png"
    images[2].save(path)
    sources = [images[0], images[1], str(path), np.asarray(images[3]), images[4]]

    reference = reference_image_processor(config)
    expected = reference.preprocess(images, return_tensors="np")
    text = "Look: " + " and ".join([IMAGE] * len(images)) + ". Which?"
    hf = reference_processor(reference)
    pieces = text.split("<|image_pad|>")
    expanded = pieces[0] + "".join(hf.replace_image_token(expected, i) + piece
                                   for i, piece in enumerate(pieces[1:]))

    out = Processor(ours_tok, config)(text, images=sources)
    np.testing.assert_array_equal(out["image_grid_thw"], expected["image_grid_thw"])
    assert out["input_ids"][0].tolist() == hf_tok(expanded, add_special_tokens=False)["input_ids"]
    assert out["pixel_values"].shape == expected["pixel_values"].shape
    error = np.abs(out["pixel_values"] - expected["pixel_values"]).max()
    assert error <= PIXEL_TOLERANCE, f"pixel_values max abs error {error}"
    assert (out["mm_token_type_ids"] == (out["input_ids"] == 248056)).all()


def write_video(path, frames: int, fps: int, height=80, width=120):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.asarray(random_image(height, width, 100 + i))
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def reference_video(path, config):
    """transformers' PyAV reader + Qwen3-VL sampling, resize (PIL backend), patchify and timestamps."""
    from transformers.image_utils import SizeDict
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor, smart_resize
    from transformers.video_utils import read_video_pyav

    sampler = types.SimpleNamespace(fps=2, min_frames=4, max_frames=768)
    frames, metadata = read_video_pyav(str(path), lambda metadata, **_: Qwen3VLVideoProcessor.sample_frames(
        sampler, metadata))
    T, H, W, _ = frames.shape
    h, w = smart_resize(T, H, W, temporal_factor=2, factor=32, min_pixels=config["size"]["shortest_edge"],
                        max_pixels=config["size"]["longest_edge"])
    pil = reference_image_processor({**QWEN35})
    resize = super(type(pil), pil).resize  # the PIL backend's plain resize to (h, w)
    chw = [pil.normalize(pil.rescale(resize(f.transpose(2, 0, 1), SizeDict(height=h, width=w), pil.resample),
                                     1 / 255), [0.5] * 3, [0.5] * 3) for f in frames]
    videos = torch.from_numpy(np.stack(chw)[None])
    patches, t, gh, gw = Qwen3VLVideoProcessor.patchify(None, videos, 16, 2, 2)
    return patches[0].numpy(), [t, gh, gw], metadata


@pytest.mark.parametrize("frames,fps", [(30, 10), (25, 10), (6, 24)], ids=["even", "odd-padded", "min-frames"])
def test_video_file_matches_transformers(tokenizers, tmp_path, frames, fps):
    ours_tok, hf_tok = tokenizers
    path = write_video(tmp_path / "clip.mp4", frames, fps)
    video_config = {**QWEN35, "size": {"shortest_edge": 4096, "longest_edge": 25165824}}
    pixels, grid, metadata = reference_video(path, video_config)
    hf = reference_processor(reference_image_processor(QWEN35))
    placeholder = hf.replace_video_token({"video_grid_thw": [np.array(grid)], "video_metadata": [metadata]}, 0)
    text = f"Watch {VIDEO} now."

    out = Processor(ours_tok, QWEN35, video_config)(text, videos=[str(path)])
    assert out["video_grid_thw"].tolist() == [grid]
    expected_ids = hf_tok(text.replace(VIDEO, placeholder), add_special_tokens=False)["input_ids"]
    assert out["input_ids"][0].tolist() == expected_ids
    assert "seconds>" in placeholder
    error = np.abs(out["pixel_values_videos"] - pixels).max()
    assert error <= PIXEL_TOLERANCE, f"pixel_values_videos max abs error {error}"


def test_frame_list_is_a_video_at_24_fps(tokenizers):
    ours_tok, _ = tokenizers
    frames = [random_image(64, 64, i) for i in range(5)]
    out = Processor(ours_tok, QWEN35)(f"{VIDEO}", videos=[frames])
    # 5 frames at the assumed 24 fps: int(5 / 24 * 2) = 0, clamped up to 4 frames -> 2 temporal groups.
    assert out["video_grid_thw"][:, 0].tolist() == [2]
    text = ours_tok.decode(out["input_ids"][0].tolist())
    assert text.startswith("<0.0 seconds><|vision_start|>") and "<0.1 seconds>" in text


def test_bad_inputs_raise_clearly(tokenizers, tmp_path):
    ours_tok, _ = tokenizers
    processor = Processor(ours_tok, QWEN35)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read image.*garbage.png"):
        processor(IMAGE, images=[str(garbage)])
    whole = tmp_path / "whole.png"
    random_image(64, 64, 0).save(whole)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot read image.*truncated.png"):
        processor(IMAGE, images=[str(truncated)])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        processor(IMAGE, images=[str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match="zero size"):
        processor(IMAGE, images=[np.zeros((0, 10, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"image array of shape \(2, 500, 3\).*aspect ratio 250"):
        processor(IMAGE, images=[np.zeros((2, 500, 3), np.uint8)])
    image = random_image(40, 40, 1)
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\) but 2 image\(s\)"):
        processor(IMAGE, images=[image, image])
    with pytest.raises(ValueError, match=r"2 image placeholder\(s\) but 1 image\(s\)"):
        processor(IMAGE + IMAGE, images=[image])
    with pytest.raises(ValueError, match=r"1 video placeholder\(s\) but 0 video\(s\)"):
        processor(VIDEO)
    with pytest.raises(ValueError, match="has no frames"):
        processor(VIDEO, videos=[[]])
    bad_video = tmp_path / "bad.mp4"
    bad_video.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="cannot read video.*bad.mp4"):
        processor(VIDEO, videos=[str(bad_video)])
    good = write_video(tmp_path / "good.mp4", 12, 10)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.mp4"):
        processor(VIDEO, videos=[str(cut)])
    with pytest.raises(ValueError, match="cannot download"):
        processor(IMAGE, images=["http://127.0.0.1:9/none.png"])


def test_processor_is_still_the_tokenizer(tokenizers):
    ours_tok, hf_tok = tokenizers
    processor = Processor(ours_tok, None)
    assert processor.image_settings["min_pixels"] == 65536 and processor.image_settings["max_pixels"] == 16777216
    ids = processor.encode("Hello, world", add_special_tokens=False)
    assert ids == hf_tok("Hello, world", add_special_tokens=False)["input_ids"]
    assert processor.decode(ids) == "Hello, world"
    messages = [{"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "Hi"}]}]
    assert IMAGE in processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    processor.detokenizer.reset()
