"""Chat examples -> training rows: token ids rendered with the Qwen 3.5 chat template, a mask that is True on
exactly the assistant tokens (each assistant turn's text after `<|im_start|>assistant\\n`, through its
`<|im_end|>`), and the pixel values and grids of the row's images and videos (Processor layout).

A row is a list of messages or a dict {"messages": [...], "tools": [...], "images": [...], "videos": [...]}.
Images and videos sit in content parts ({"type": "image", "image": PIL/path}), or the parts leave the data out
({"type": "image"}) and the row's "images" list supplies it, in order."""

import queue
import re
import threading
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..processing.processor import IMAGE_PAD, PLACEHOLDER, VIDEO_PAD
from ..tokenizer import render_chat

ASSISTANT_TURN = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.S)
THINK_OPEN, EMPTY_THINK = "<think>\n", "<think>\n\n</think>\n\n"
ROLES = {"system", "user", "assistant", "tool"}


class DataError(ValueError):
    pass


@dataclass
class Row:
    input_ids: np.ndarray  # [L] int32
    mask: np.ndarray  # [L] bool, True on assistant tokens
    prompt: np.ndarray | None = None  # [L] bool, True on the other text tokens (not image or video placeholders)
    pixel_values: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None
    pixel_values_videos: np.ndarray | None = None
    video_grid_thw: np.ndarray | None = None
    # [image tokens, hidden]: what the decoder reads at this row's image tokens instead of the tower's output
    # (the default model's binding scaffold: train-default --scaffold-rows)
    image_features: np.ndarray | None = None

    def __len__(self):
        return len(self.input_ids)


def _where(row) -> str:
    return "example" if row is None else f"row {row}"


def _is_media(part, kind) -> bool:
    return isinstance(part, dict) and (part.get("type") == kind or kind in part or
                                       (kind == "image" and "image_url" in part))


def _media_data(part, kind):
    value = part.get(kind, part.get("image_url") if kind == "image" else None)
    return value.get("url") if isinstance(value, dict) else value


def validate(example, row=None) -> tuple[list, list | None, list, list]:
    """Check one row; returns (messages, tools, images, videos) with the media in template order.
    Raises DataError naming the row for a malformed conversation, no assistant turn, or media and text that
    do not match (an image the text does not reference, or a reference with no image)."""
    where = _where(row)
    if isinstance(example, dict):
        if "messages" not in example:
            raise DataError(f"{where}: a dict row needs a 'messages' list; got keys {sorted(example)}")
        messages, tools = example["messages"], example.get("tools")
        supplied = {"image": list(example.get("images") or []), "video": list(example.get("videos") or [])}
    else:
        messages, tools, supplied = example, None, {"image": [], "video": []}
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of chat messages")
    media = {"image": [], "video": []}
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DataError(f"{where}, message {i}: expected a dict with role in {sorted(ROLES)}; got {message!r:.80}")
        content = message.get("content")
        if isinstance(content, str):
            for pad, kind in ((IMAGE_PAD, "image"), (VIDEO_PAD, "video")):
                if pad in content:
                    raise DataError(f"{where}, message {i}: the text holds a raw {pad}; reference the {kind} with "
                                    f"a {{'type': '{kind}'}} content part instead")
            continue
        for part in content or []:
            for kind in ("image", "video"):
                if not _is_media(part, kind):
                    continue
                if message["role"] != "user":
                    raise DataError(f"{where}, message {i}: {kind}s are only supported in user turns, not "
                                    f"{message['role']!r}")
                data = _media_data(part, kind)
                if data is None:
                    if not supplied[kind]:
                        raise DataError(f"{where}, message {i}: a {{'type': '{kind}'}} part references an {kind} "
                                        f"that the row does not provide")
                    data = supplied[kind].pop(0)
                media[kind].append(data)
    for kind in ("image", "video"):
        if supplied[kind]:
            raise DataError(f"{where}: {len(supplied[kind])} {kind}(s) in the row are not referenced by any "
                            f"{{'type': '{kind}'}} content part of the messages")
    if not any(m["role"] == "assistant" and (m.get("content") or m.get("tool_calls")) for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to train on")
    return list(messages), tools, media["image"], media["video"]


def encode(example, processor, row=None, enable_thinking: bool = True, add_vision_id: bool = False) -> Row:
    """One row -> Row. `processor` is the Processor (images and video) or a bare tokenizer (text only);
    either needs `encode(text, add_special_tokens=False)`. `add_vision_id`: the template's "Picture n: " labels."""
    messages, tools, images, videos = validate(example, row)
    where = _where(row)
    try:
        text = render_chat(messages, tools=tools, add_generation_prompt=False, enable_thinking=enable_thinking,
                           add_vision_id=add_vision_id)
    except ValueError as error:
        raise DataError(f"{where}: {error}") from None
    pieces, start = [], 0
    for match in ASSISTANT_TURN.finditer(text):
        pieces += [(text[start:match.start(1)], False), *_assistant_pieces(match.group(1), enable_thinking)]
        start = match.end(1)
    pieces.append((text[start:], False))

    multimodal = hasattr(processor, "prepare")
    if (images or videos) and not multimodal:
        raise DataError(f"{where}: has images or videos but a text-only tokenizer was given (use the Processor)")
    items = processor.prepare(images, videos) if multimodal else None
    ids, mask, used = [], [], {"image": 0, "video": 0}
    placeholder_ids = ({processor.tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_PAD, VIDEO_PAD)}
                       if multimodal else set())
    for piece, is_target in pieces:
        if not piece:
            continue
        if multimodal:
            counts = {"image": 0, "video": 0}
            for m in PLACEHOLDER.finditer(piece):
                counts["image" if m.group(0) == IMAGE_PAD else "video"] += 1
            part = {k: items[k][used[k]:used[k] + counts[k]] for k in counts}
            used = {k: used[k] + counts[k] for k in counts}
            tokens = processor.encode_expanded([piece], part)["input_ids"][0].tolist()
        else:
            tokens = processor.encode(piece, add_special_tokens=False)
        ids += tokens
        mask += [is_target] * len(tokens)
    ids, mask = np.array(ids, np.int32), np.array(mask, bool)
    out = Row(ids, mask, prompt=~mask & ~np.isin(ids, list(placeholder_ids)))
    if images:
        out.pixel_values = np.concatenate([p for p, _ in items["image"]])
        out.image_grid_thw = np.array([g for _, g in items["image"]], np.int64)
    if videos:
        out.pixel_values_videos = np.concatenate([v[0] for v in items["video"]])
        out.video_grid_thw = np.array([v[1] for v in items["video"]], np.int64)
    return out


def _assistant_pieces(turn: str, enable_thinking: bool) -> list:
    """An assistant turn as (text, is_target) pieces tokenised the way generation sees them: with thinking on
    the prompt ends in `<think>\n` and the model writes the rest; with thinking off the prompt already holds
    the empty think block, so it is context, not a target."""
    if not enable_thinking and turn.startswith(EMPTY_THINK):
        return [(EMPTY_THINK, False), (turn[len(EMPTY_THINK):], True)]
    if enable_thinking and turn.startswith(THINK_OPEN):
        return [(THINK_OPEN, True), (turn[len(THINK_OPEN):], True)]
    return [(turn, True)]


def encode_all(examples, processor, enable_thinking: bool = True, max_tokens: int | None = None) -> list[Row]:
    rows = []
    for i, example in enumerate(examples):
        row = encode(example, processor, row=i, enable_thinking=enable_thinking)
        if max_tokens and len(row) > max_tokens:
            raise DataError(f"row {i}: {len(row)} tokens exceed max_tokens={max_tokens}")
        rows.append(row)
    return rows


def collate(rows: list[Row], pad_id: int = 0, spatial_merge: int = 2) -> dict:
    """Right-padded batch (the pad id only needs to be in the vocabulary: padding follows every real token and
    carries no loss): input_ids [B, L], mask [B, L] (False on padding), prompt [B, L] (the rows' prompt text
    tokens, False on padding), plus the concatenated pixel values and grids in row order (the order the model's
    placeholder replacement expects); where a row gives image_features, those and a mask of which image tokens
    they cover (`spatial_merge`: the tower's merge, which turns a grid into its token count)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    prompt = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r.input_ids, r.mask
        if r.prompt is not None:
            prompt[i, :len(r)] = r.prompt
    batch = {"input_ids": mx.array(ids), "mask": mx.array(mask), "prompt": mx.array(prompt)}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [getattr(r, key) for r in rows if getattr(r, key) is not None]
        if parts:
            batch[key] = mx.array(np.concatenate(parts))
    if any(r.image_features is not None for r in rows):
        # image_features [image tokens, hidden] in row order, and which of them replace the tower's output
        with_images = [r for r in rows if r.image_grid_thw is not None]
        counts = [int(np.prod(r.image_grid_thw, axis=1).sum()) // spatial_merge**2 for r in with_images]
        width = next(r.image_features.shape[1] for r in rows if r.image_features is not None)
        batch["image_features"] = mx.array(np.concatenate(
            [r.image_features if r.image_features is not None else np.zeros((n, width), np.float32)
             for r, n in zip(with_images, counts)]))
        batch["image_features_mask"] = mx.array(np.concatenate(
            [np.full((n, 1), r.image_features is not None, np.float32) for r, n in zip(with_images, counts)]))
    return batch


def prefetched(items, depth: int = 2):
    """The items of the iterable `items`, in order, each made by a background thread while the caller works on
    the ones before: making the default model's rows and pictures (Python, NumPy, Pillow) overlaps MLX's
    evaluation, which leaves the GIL. The items must not touch MLX (its streams belong to the main thread).
    Closing the generator stops the thread and waits for it; an error in `items` is raised to the caller."""
    made = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                made.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as error:  # handed to the consumer, raised there
            put((end, error))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = made.get()
            if item is end:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()
