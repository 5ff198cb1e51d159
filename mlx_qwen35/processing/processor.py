"""`Processor`: text with image and video placeholders -> token ids with the placeholders expanded, plus the
pixel values and grids of every image and video (the names transformers' Qwen3-VL processor uses). It wraps
the tokenizer and answers every tokenizer attribute (encode, decode, apply_chat_template, detokenizer)."""

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np

from .features import VisionFeatureCache
from .image import preprocess_image
from .video import load_video, preprocess_video

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
# The template's whole video triple is replaced (reference Qwen3-VL format, spec 8.8), or a bare pad (as vLLM
# sends it) by the same frame blocks.
PLACEHOLDER = re.compile(re.escape(VISION_START + VIDEO_PAD + VISION_END) + "|" + re.escape(VIDEO_PAD) + "|"
                         + re.escape(IMAGE_PAD))

# Qwen3.5 values (spec 4.2); the video budget is Qwen3-VL's (unverified for 3.5): both are read from the
# checkpoint when it ships preprocessor_config.json / video_preprocessor_config.json.
IMAGE_DEFAULTS = dict(patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=65536,
                      max_pixels=16777216, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
VIDEO_DEFAULTS = dict(IMAGE_DEFAULTS, min_pixels=4096, max_pixels=25165824, fps=2.0, min_frames=4,
                      max_frames=768)


def _settings(config: dict | None, defaults: dict) -> dict:
    config = dict(config or {})
    size = config.get("size") or {}
    renamed = {"min_pixels": size.get("shortest_edge", config.get("min_pixels")),
               "max_pixels": size.get("longest_edge", config.get("max_pixels")),
               "mean": config.get("image_mean"), "std": config.get("image_std")}
    settings = dict(defaults)
    for key in defaults:
        value = renamed[key] if key in renamed else config.get(key)
        if value is not None:
            settings[key] = tuple(value) if isinstance(value, list) else value
    return settings


class Processor:
    def __init__(self, tokenizer, preprocessor_config: dict | None = None, video_config: dict | None = None,
                 feature_cache_size: int = 8, **overrides):
        """`preprocessor_config` / `video_config`: the checkpoint's preprocessor_config.json and
        video_preprocessor_config.json contents (the video one falls back to the Qwen3-VL budget). Keyword
        overrides (min_pixels, max_pixels, fps, min_frames, max_frames, ...) apply to images and videos."""
        self.tokenizer = tokenizer
        self.image_settings = {**_settings(preprocessor_config, IMAGE_DEFAULTS),
                               **{k: v for k, v in overrides.items() if k in IMAGE_DEFAULTS}}
        self.video_settings = {**_settings(video_config, VIDEO_DEFAULTS),
                               **{k: v for k, v in overrides.items() if k in VIDEO_DEFAULTS}}
        unknown = set(overrides) - set(VIDEO_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown processor settings: {sorted(unknown)}")
        self.feature_cache = VisionFeatureCache(feature_cache_size)

    @classmethod
    def from_path(cls, path, tokenizer, **overrides):
        path = Path(path)
        configs = []
        for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
            file = path / name
            configs.append(json.loads(file.read_text()) if file.exists() else None)
        return cls(tokenizer, *configs, **overrides)

    def __getattr__(self, name):
        if name == "tokenizer":  # not set yet (unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __call__(self, text, images=None, videos=None, return_tensors: str = "np") -> dict:
        """text: a str or a list of str holding `<|image_pad|>` (and `<|vision_start|><|video_pad|>
        <|vision_end|>`) placeholders, one per image / video in order. Returns input_ids and attention_mask
        [B, L] (left-padded), mm_token_type_ids, and pixel_values / image_grid_thw and pixel_values_videos /
        video_grid_thw when there are images / videos; numpy arrays, or MLX ones with return_tensors="mlx"."""
        items = self.prepare(images, videos)
        out = self.encode_expanded([text] if isinstance(text, str) else list(text), items)
        for kind, pixel_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                          ("video", "pixel_values_videos", "video_grid_thw")):
            if items[kind]:
                out[pixel_key] = np.concatenate([item[0] for item in items[kind]])
                out[grid_key] = np.array([item[1] for item in items[kind]], np.int64)
        if return_tensors == "mlx":
            return {k: mx.array(v) for k, v in out.items()}
        if return_tensors not in ("np", None):
            raise ValueError(f"return_tensors must be 'np' or 'mlx', got {return_tensors!r}")
        return out

    def prepare(self, images=None, videos=None) -> dict:
        """{"image": [(pixels, grid_thw)], "video": [(pixels, grid_thw, timestamps)]}, one entry per input."""
        return {"image": [preprocess_image(image, **self.image_settings) for image in _as_list(images)],
                "video": [self._video(video) for video in _as_list(videos)]}

    def encode_expanded(self, texts, items: dict) -> dict:
        """input_ids, attention_mask (left-padded) and mm_token_type_ids [B, L] of texts whose placeholders
        are expanded for `items` (from prepare)."""
        expanded = self._expand(texts, items["image"], items["video"])
        rows = [self.tokenizer.encode(t, add_special_tokens=False) for t in expanded]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.tokenizer.convert_tokens_to_ids("<|endoftext|>"), np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
        image_id, video_id = (self.tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_PAD, VIDEO_PAD))
        return {"input_ids": ids, "attention_mask": mask,
                "mm_token_type_ids": np.where(ids == image_id, 1, np.where(ids == video_id, 2, 0))}

    def _video(self, video):
        s = self.video_settings
        clip = load_video(video, fps=s["fps"], min_frames=s["min_frames"], max_frames=s["max_frames"])
        options = {k: v for k, v in s.items() if k not in ("fps", "min_frames", "max_frames")}
        try:
            return preprocess_video(clip, **options)
        except ValueError as error:
            raise ValueError(f"video {video if isinstance(video, (str, Path)) else 'frames'}: {error}") from None

    def _expand(self, texts, image_items, video_items) -> list[str]:
        merge = self.image_settings["merge_size"] ** 2
        found = {"image": 0, "video": 0}
        iterators = {"image": iter(image_items), "video": iter(video_items)}

        def replace(match):
            kind = "image" if match.group(0) == IMAGE_PAD else "video"
            found[kind] += 1
            item = next(iterators[kind], None)
            if item is None:
                return match.group(0)
            if kind == "image":
                t, h, w = item[1]
                return IMAGE_PAD * (t * h * w // merge)
            _, (t, h, w), stamps = item
            frame = VISION_START + VIDEO_PAD * (h * w // merge) + VISION_END
            return "".join(f"<{s:.1f} seconds>" + frame for s in stamps)

        expanded = [PLACEHOLDER.sub(replace, t) for t in texts]
        for kind, given in (("image", len(image_items)), ("video", len(video_items))):
            if found[kind] != given:
                raise ValueError(f"the text has {found[kind]} {kind} placeholder(s) but {given} {kind}(s) were "
                                 f"given; use one {IMAGE_PAD if kind == 'image' else VIDEO_PAD} per {kind} (the "
                                 f"chat template writes them for {{'type': '{kind}'}} content parts)")
        return expanded


def _as_list(items) -> list:
    if items is None:
        return []
    if isinstance(items, (str, Path)) or not isinstance(items, (list, tuple)):
        return [items]
    return list(items)


def media_from_messages(messages) -> tuple[list, list]:
    """The images and videos of chat messages' content parts, in the order the template writes them."""
    images, videos = [], []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, (list, tuple)):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            if "image" in part or "image_url" in part or part.get("type") == "image":
                image = part.get("image", part.get("image_url"))
                if isinstance(image, dict):  # OpenAI style {"image_url": {"url": ...}}
                    image = image.get("url")
                images.append(image)
            elif "video" in part or part.get("type") == "video":
                videos.append(part.get("video"))
    return images, videos
