"""Images and video through the generation API, Chat and the CLI on a tiny random checkpoint with the real
tokenizer and the Qwen 3.5 preprocessor_config: greedy tokens equal transformers' greedy generate given the
same pixel values, and the vision tower runs once per distinct image."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

import mlx_qwen35
from hf_reference import build_hf_model, save_hf_checkpoint
from mlx_qwen35.cli import main
from mlx_qwen35.models.vision import VisionModel
from mlx_qwen35.processing.processor import Processor
from mlx_qwen35.tokenizer import write_tokenizer_files

VOCAB = 248320
NEW_TOKENS = 8
STOPS = (248046, 248044)
PREPROCESSOR = {"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16,
                "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = build_hf_model(seed=43, vocab_size=VOCAB, hidden_size=64)
    path = save_hf_checkpoint(hf, tmp_path_factory.mktemp("mm"))
    write_tokenizer_files(path)
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    model, processor = mlx_qwen35.load(path, dtype="float32")
    return path, copy.deepcopy(hf).double(), model, processor


def image(seed, height=200, width=300):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference_greedy(hf64, inputs, new_tokens=NEW_TOKENS):
    """transformers' greedy generate on our processor's ids and pixel values, cut after the first stop."""
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    for key in ("pixel_values", "pixel_values_videos"):
        if key in tensors:
            tensors[key] = tensors[key].double()
    with torch.no_grad():
        out = hf64.generate(**tensors, max_new_tokens=new_tokens, do_sample=False, pad_token_id=248044,
                            eos_token_id=list(STOPS))
    tokens = out[0, tensors["input_ids"].shape[1]:].tolist()
    for i, t in enumerate(tokens):
        if t in STOPS:
            return tokens[: i + 1]
    return tokens


def processed(processor, messages, images=(), videos=()):
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text, images=list(images), videos=list(videos))


@pytest.fixture
def tower_calls(monkeypatch):
    calls = []
    original = VisionModel.__call__

    def counted(self, pixels, grid):
        calls.append(np.asarray(grid).tolist())
        return original(self, pixels, grid)

    monkeypatch.setattr(VisionModel, "__call__", counted)
    return calls


def test_load_returns_the_processor(checkpoint):
    _, _, _, processor = checkpoint
    assert isinstance(processor, Processor)
    assert processor.image_settings["min_pixels"] == 65536 and processor.image_settings["patch_size"] == 16


def test_image_generation_matches_transformers(checkpoint, tower_calls):
    _, hf64, model, processor = checkpoint
    processor.feature_cache.clear()
    picture = image(0)
    messages = [{"role": "user", "content": [{"type": "image", "image": picture},
                                             {"type": "text", "text": "Describe it."}]}]
    expected = reference_greedy(hf64, processed(processor, messages, [picture]))
    tokens = [r.token for r in mlx_qwen35.stream_generate(model, processor, messages, max_tokens=NEW_TOKENS)]
    assert tokens == expected
    # The same image through `images=` and a raw prompt: same ids, features from the cache.
    raw = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                         "text": "Describe it."}]}], add_generation_prompt=True, tokenize=False)
    again = [r.token for r in mlx_qwen35.stream_generate(model, processor, raw, images=[picture],
                                                         max_tokens=NEW_TOKENS)]
    assert again == expected
    assert len(tower_calls) == 1


def test_video_and_two_images_match_transformers(checkpoint):
    _, hf64, model, processor = checkpoint
    frames = [np.asarray(image(10 + i, 64, 96)) for i in range(6)]
    pictures = [image(1, 120, 40), image(2, 300, 300)]
    messages = [{"role": "user", "content": [
        {"type": "video", "video": frames}, {"type": "text", "text": "and"}, {"type": "image", "image": pictures[0]},
        {"type": "image", "image": pictures[1]}, {"type": "text", "text": "What changed?"}]}]
    inputs = processed(processor, messages, pictures, [frames])
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 6]]  # 6 frames at 24 fps -> 4 sampled
    expected = reference_greedy(hf64, inputs)
    tokens = [r.token for r in mlx_qwen35.stream_generate(model, processor, messages, max_tokens=NEW_TOKENS,
                                                          prefill_chunk=64)]
    assert tokens == expected


def test_chat_follow_up_reuses_the_image(checkpoint, tower_calls):
    _, hf64, model, processor = checkpoint
    processor.feature_cache.clear()
    picture = image(3)
    chat = mlx_qwen35.Chat(model, processor, max_tokens=NEW_TOKENS)
    first = [{"type": "image", "image": picture}, {"type": "text", "text": "What is this?"}]
    tokens = [r.token for r in chat.stream(first)]
    assert tokens == reference_greedy(hf64, processed(processor, [{"role": "user", "content": first}], [picture]))
    follow = [r.token for r in chat.stream("And its colour?")]
    assert chat.last_response.prompt_tokens_processed < chat.last_response.prompt_tokens
    assert follow == reference_greedy(hf64, processed(processor, chat.messages[:-1], [picture]))
    assert len(tower_calls) == 1
    # A second image in a later turn: only it is encoded.
    second = [{"type": "image", "image": image(4)}, {"type": "text", "text": "And this one?"}]
    third = [r.token for r in chat.stream(second)]
    assert third == reference_greedy(hf64, processed(processor, chat.messages[:-1], [picture, image(4)]))
    assert len(tower_calls) == 2


def test_cli_generate_with_image_and_video(checkpoint, tmp_path, capsys):
    import av

    path, hf64, _, processor = checkpoint
    picture = tmp_path / "a.png"
    image(5).save(picture)
    video = tmp_path / "c.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(8):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(image(20 + i, 64, 96)),
                                                                   format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    main(["generate", "--model", str(path), "--image", str(picture), "--video", str(video), "--prompt", "Hi",
          "--max-tokens", str(NEW_TOKENS)])
    text = capsys.readouterr().out.rstrip("\n")
    messages = [{"role": "user", "content": [{"type": "image", "image": str(picture)},
                                             {"type": "video", "video": str(video)}, {"type": "text", "text": "Hi"}]}]
    expected = reference_greedy(hf64, processed(processor, messages, [str(picture)], [str(video)]))
    assert text == processor.decode([t for t in expected if t not in STOPS])


def test_media_errors(checkpoint):
    _, _, model, processor = checkpoint
    with pytest.raises(ValueError, match=r"0 image placeholder\(s\) but 1 image"):
        mlx_qwen35.generate(model, processor, "no placeholder here", images=[image(0)], max_tokens=2)
    with pytest.raises(TypeError, match="str holding placeholders or chat messages"):
        mlx_qwen35.generate(model, processor, [1, 2, 3], images=[image(0)], max_tokens=2)
