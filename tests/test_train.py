"""Training: the synthetic world's answers read back from the drawn pixels, the assistant-token mask, LoRA
gradients and fusing, loss going down, exact resume, and clear errors for bad rows and foreign adapters."""

import itertools
import math
import random
import re
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_qwen35.config import ModelConfig
from mlx_qwen35.models.qwen35 import Model
from mlx_qwen35.processing.processor import Processor
from mlx_qwen35.train import world
from mlx_qwen35.train.data import DataError, collate, encode, encode_all
from mlx_qwen35.train.lora import AdapterError, apply_lora, fuse_lora, load_adapter
from mlx_qwen35.train.trainer import (TrainConfig, Trainer, dense_experts_forward, hidden_states, loss_fn,
                                      segmented_experts_forward, split_rows)

ndimage = pytest.importorskip("scipy.ndimage")

SPECIALS = {"<|im_start|>": 256, "<|im_end|>": 257, "<|endoftext|>": 258, "<think>": 259, "</think>": 260,
            "<tool_call>": 261, "</tool_call>": 262, "<tool_response>": 263, "</tool_response>": 264,
            "<|image_pad|>": 300, "<|video_pad|>": 301, "<|vision_start|>": 302, "<|vision_end|>": 303}
SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")
TEXT = dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, intermediate_size=48, max_position_embeddings=4096, linear_key_head_dim=8,
            linear_value_head_dim=8, linear_num_key_heads=1, linear_num_value_heads=2,
            layer_types=["linear_attention", "full_attention"],
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                 mrope_section=[2, 1, 1], mrope_interleaved=True))
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24)
VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=16,
              spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)


class ByteTokenizer:
    """Bytes 0-255 plus the chat markers: a vocabulary small enough for a 320-row test model."""

    def encode(self, text, add_special_tokens=False):
        return [t for piece in SPLIT.split(text) if piece
                for t in ([SPECIALS[piece]] if piece in SPECIALS else list(piece.encode()))]

    def convert_tokens_to_ids(self, token):
        return SPECIALS[token]


def tiny_model(moe=False, vision=True, seed=0, mtp_layers=0, **text):
    config = dict(model_type="qwen3_5_moe" if moe else "qwen3_5", text_config={**TEXT, **(MOE if moe else {}), **text},
                  tie_word_embeddings=False, image_token_id=300, video_token_id=301, vision_start_token_id=302,
                  vision_end_token_id=303)
    if moe:
        config["text_config"].pop("intermediate_size")
    if vision:
        config["vision_config"] = VISION
    mx.random.seed(seed)
    model = Model(ModelConfig.from_dict(config), mtp_layers=mtp_layers)
    params = [(k, mx.random.normal(v.shape) * (0.3 if v.ndim == 1 else v.shape[-1] ** -0.5))
              for k, v in tree_flatten(model.parameters())]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def processor():
    return Processor(ByteTokenizer(), min_pixels=32 * 32, max_pixels=64 * 64, fps=24.0)


# --- the world, read back from pixels -------------------------------------------------------------------------

def components(image):
    """[(color name, kind guessed from fill ratio, x centre)] of every drawn shape, from the pixels alone."""
    pixels = np.asarray(image).astype(int)
    found = []
    for name, rgb in world.COLORS.items():
        labels, count = ndimage.label((np.abs(pixels - rgb).sum(-1) == 0))
        for i in range(1, count + 1):
            ys, xs = np.nonzero(labels == i)
            area = (np.ptp(xs) + 1) * (np.ptp(ys) + 1)
            fill = len(xs) / area
            kind = "square" if fill > 0.92 else "circle" if fill > 0.65 else "triangle"
            found.append((name, kind, (xs.min() + xs.max()) / 2, xs.min(), xs.max()))
    return found


def assert_answer_matches(question, answer, seen):
    """`answer` is right for `question` about a picture whose shapes (components) are `seen`."""
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        assert [c for c, k, *_ in seen if k == m[1]] == [answer[:-1]]
    elif m := re.fullmatch(r"What shape is (\w+)\?", question):
        assert [f"A {k}." for c, k, *_ in seen if c == m[1]] == [answer]
    elif m := re.fullmatch(r"How many (\w+)s are there\?", question):
        assert answer == f"{sum(k == m[1] for _, k, *_ in seen)}."
    elif m := re.fullmatch(r"Is the (\w+) (\w+) left or right of the (\w+) (\w+)\?", question):
        (a,) = [s for s in seen if s[:2] == (m[1], m[2])]
        (b,) = [s for s in seen if s[:2] == (m[3], m[4])]
        assert answer == ("Left." if a[4] < b[3] else "Right.") and (a[4] < b[3] or b[4] < a[3])
    elif question == "Describe the image.":
        ordered = sorted(seen, key=lambda s: s[2])
        assert answer == world.describe([world.Shape(k, c, x, 0, 1) for c, k, x, *_ in ordered])
    else:
        raise AssertionError(question)


def test_world_answers_match_the_pixels():
    rng = random.Random(7)
    for _ in range(60):
        example = world.image_example(rng)
        image = example["messages"][0]["content"][0]["image"]
        question, answer = example["messages"][0]["content"][-1]["text"], example["messages"][1]["content"]
        w, h = image.size
        assert world.MIN_SIDE <= w <= world.MAX_SIDE and world.MIN_SIDE <= h <= world.MAX_SIDE
        seen = components(image)
        assert 1 <= len(seen) <= 4
        assert_answer_matches(question, answer, seen)


def test_image_conversation_asks_different_questions_about_one_image():
    rng = random.Random(8)
    for turns in (1, 2, 4, 4, 4, 4):
        messages = world.image_conversation(rng, turns=turns)["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert 1 <= len(messages) // 2 <= turns
        image = messages[0]["content"][0]["image"]
        questions = [messages[0]["content"][-1]["text"]] + [m["content"] for m in messages[2::2]]
        assert len({" ".join(q.split()[:2]) for q in questions}) == len(questions)  # five kinds of question
        for question, reply in zip(questions, messages[1::2]):
            assert_answer_matches(question, reply["content"], components(image))
    with pytest.raises(ValueError, match="turns=0"):
        world.image_conversation(rng, turns=0)


def test_curriculum_scenes_start_with_one_large_shape_and_end_as_the_world():
    """Training's early image rows (growth 0) hold one shape spanning at least half the shorter side, answered
    correctly from the pixels; from growth 1 on (after `curriculum` examples) shapes have the world's sizes."""
    from mlx_qwen35.train.default_model import training_examples

    rng = random.Random(11)
    for _ in range(20):
        example = world.image_example(rng, question=world.ask_color, growth=0.0)
        image = example["messages"][0]["content"][0]["image"]
        (color, kind, _, x0, x1), = components(image)
        assert x1 - x0 + 1 >= min(image.size) / 2 - 1
        assert example["messages"][0]["content"][-1]["text"] == f"What color is the {kind}?"
        assert example["messages"][1]["content"] == f"{color}."
    late = 0
    for drawn, example in enumerate(training_examples(seed=3, first_stage=10, curriculum=20, sum_stage=0)):
        if drawn >= 200:
            break
        if drawn < 30 or not (example.get("scenes") and "?" in example["messages"][0]["content"][-1]["text"]):
            continue
        for scene in example["scenes"]:
            side = min(scene.width, scene.height)
            for *_, x0, x1 in components(world.draw(scene)):
                # a drawn extent is 2r + 1 px with r between the world's bounds (and Pillow's 5 px floor)
                assert 2 * max(5, round(side / 14)) - 1 <= x1 - x0 <= 2 * max(6, round(side / 6)) + 1
                late += 1
    assert late > 20


def test_picture_curriculum_grows_single_pictures_apart_from_the_rest():
    """`picture_curriculum` 0 gives single pictures the world's scenes (up to four shapes of the world's sizes)
    from the first mixed row, while videos keep `curriculum`'s growth (one large mover); without it pictures
    follow `curriculum` (one shape a picture while growth is under 1/3)."""
    from mlx_qwen35.train.default_model import training_examples

    def single_pictures(**kwargs):
        stream = training_examples(seed=4, first_stage=0, curriculum=10**6, sum_stage=0, **kwargs)
        examples = list(itertools.islice(stream, 300))
        pictures = [e["scenes"][0] for e in examples if len(e.get("scenes") or []) == 1]
        videos = [e for e in examples if any(part.get("type") == "video" for part in e["messages"][0]["content"]
                                             if isinstance(part, dict))]
        return pictures, videos

    grown, videos = single_pictures(picture_curriculum=0)
    assert len(grown) > 50 and videos
    assert max(len(scene.shapes) for scene in grown) == world.MAX_SHAPES
    for scene in grown:
        low, high = world.radius_range(min(scene.width, scene.height))
        assert all(low - 1 <= shape.r <= high + 1 for shape in scene.shapes)
    for video in videos:  # still growth 0: the mover alone
        frames = video["messages"][0]["content"][0]["video"]
        assert len(components(frames[0])) == 1
    early, _ = single_pictures()
    assert len(early) > 50 and all(len(scene.shapes) == 1 for scene in early)


def test_curriculum_videos_start_with_one_large_shape_crossing_the_picture():
    """Training's early videos (growth 0) show one shape alone, at least a third of the shorter side across,
    travelling most of the free room, and the answer is the direction its pixels move."""
    rng = random.Random(12)
    for _ in range(12):
        example = world.video_example(rng, growth=0.0)
        frames = example["messages"][0]["content"][0]["video"]
        (color, kind, *_), = components(frames[0])
        assert example["messages"][0]["content"][-1]["text"] == f"Which way does the {color} {kind} move?"
        boxes = []
        for frame in frames:
            assert len(components(frame)) == 1
            ys, xs = np.nonzero((np.abs(np.asarray(frame).astype(int) - world.COLORS[color]).sum(-1) == 0))
            boxes.append((xs.min(), xs.max(), ys.min(), ys.max()))
        width, height = frames[0].size
        (x0, x1, y0, y1), (u0, u1, v0, v1) = boxes[0], boxes[-1]
        dx, dy = u0 - x0, v0 - y0
        horizontal = abs(dx) > abs(dy)
        extent, side = (x1 - x0 + 1, width) if horizontal else (y1 - y0 + 1, height)
        assert extent >= min(width, height) / 3 - 1
        assert max(abs(dx), abs(dy)) >= 0.7 * (side - extent - 5)
        expected = ("Right." if dx > 0 else "Left.") if horizontal else ("Down." if dy > 0 else "Up.")
        assert example["messages"][1]["content"] == expected


def test_world_multi_image_video_and_text_answers():
    rng = random.Random(3)
    for _ in range(8):
        ex = world.multi_image_example(rng)
        question = ex["messages"][0]["content"][-1]["text"]
        color, kind = re.fullmatch(r"Which picture has the (\w+) (\w+)\?", question).groups()
        images = [p["image"] for p in ex["messages"][0]["content"] if p["type"] == "image"]
        holders = [i + 1 for i, im in enumerate(images) if (color, kind) in [s[:2] for s in components(im)]]
        assert ex["messages"][1]["content"] == f"Picture {holders[0]}." and len(holders) == 1
    for _ in range(8):
        ex = world.video_example(rng)
        frames = ex["messages"][0]["content"][0]["video"]
        assert 4 <= len(frames) <= 8
        question = ex["messages"][0]["content"][-1]["text"]
        color, kind = re.fullmatch(r"Which way does the (\w+) (\w+) move\?", question).groups()
        centres = []
        for frame in frames:
            ys, xs = np.nonzero((np.abs(np.asarray(frame).astype(int) - world.COLORS[color]).sum(-1) == 0))
            centres.append((xs.mean(), ys.mean()))
        dx, dy = np.subtract(centres[-1], centres[0])
        expected = ("Right." if dx > 0 else "Left.") if abs(dx) > abs(dy) else ("Down." if dy > 0 else "Up.")
        assert ex["messages"][1]["content"] == expected and max(abs(dx), abs(dy)) >= 4
    on, off = world.sum_example(random.Random(1), thinking=True), world.sum_example(random.Random(1), thinking=False)
    a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", on["messages"][0]["content"]).groups())
    assert on["messages"][1]["content"] == f"<think>\n{a} plus {b} is {a + b}.\n</think>\n\n{a + b}."
    assert off["messages"][1]["content"] == f"{a + b}."
    rec = world.recall_example(random.Random(2))
    text = rec["messages"][0]["content"]
    name = re.search(r"What is the code for (\w+)\?$", text)[1]
    assert rec["messages"][1]["content"] == re.search(rf"The code for {name} is (\d{{4}})\.", text)[1] + "."
    tool = world.tool_example(random.Random(5))
    call = tool["messages"][1]["tool_calls"][0]["function"]
    assert tool["tools"] == world.TOOLS and tool["messages"][2]["content"] in tool["messages"][3]["content"]
    if call["name"] == "add":
        assert tool["messages"][2]["content"] == str(call["arguments"]["a"] + call["arguments"]["b"])


def test_training_rows_with_several_recall_questions_and_tool_uses():
    """The training forms that read a long prompt once: follow-up questions about other names of one passage,
    and several tool uses under one tool declaration, each answer right for its own question."""
    for seed in range(6):
        rec = world.recall_example(random.Random(seed), 100, 300, questions=4)
        passage = rec["messages"][0]["content"]
        facts = dict(re.findall(r"The code for (\w+) is (\d{4})\.", passage))
        asked = [re.search(r"What is the code for (\w+)\?$", m["content"])[1] for m in rec["messages"][::2]]
        assert len(asked) == len(set(asked)) == len(facts) and set(asked) == set(facts)
        assert [m["content"] for m in rec["messages"][1::2]] == [facts[name] + "." for name in asked]
    tool = world.tool_example(random.Random(7), turns=3)
    assert tool["tools"] == world.TOOLS and len(tool["messages"]) == 12
    for question, call, response, answer in zip(*[tool["messages"][i::4] for i in range(4)]):
        function = call["tool_calls"][0]["function"]
        assert (question["role"], call["role"], response["role"], answer["role"]) == ("user", "assistant", "tool", "assistant")
        assert all(str(v) in question["content"] for v in function["arguments"].values())
        assert response["content"] in answer["content"]


def test_evaluation_recall_is_one_code_and_several_codes_is_its_own_row():
    """The issue's recall (`recall_1000`) hides one code in a 1,000-token passage; `recall_1000_several` hides
    2-4, and the asked name's code is the answer in both."""
    from mlx_qwen35.train.evaluate import TARGETS, cases

    assert TARGETS["recall_1000"] == 0.90 and TARGETS["recall_1000_several"] is None
    counts = {}
    for kind in ("recall_1000", "recall_1000_several"):
        rng = random.Random(11)
        for _ in range(40):
            case = cases(kind, rng)
            passage = case.messages[-1]["content"]
            facts = dict(re.findall(r"The code for (\w+) is (\d{4})\.", passage))
            asked = re.search(r"What is the code for (\w+)\?$", passage)[1]
            assert case.expected == facts[asked] + "."
            assert 900 <= len(passage.split()) * 1.4 <= 1100
            counts.setdefault(kind, set()).add(len(facts))
    assert counts == {"recall_1000": {1}, "recall_1000_several": {2, 3, 4}}
    for least, most in ((3, 2), (0, 2), (1, len(world.NAMES) + 1)):
        with pytest.raises(ValueError, match="least_facts"):
            world.recall_example(random.Random(0), facts=most, least_facts=least)


def test_curriculum_text_rows_copy_then_recall_growing_from_one_fact():
    """The first stage cycles large-shape colour rows, codes to repeat (answered with that code), sums and
    large-shape videos; the
    recall passages after it start with one fact in at most ~150 tokens and grow to 1-4 facts and longer
    passages, every answer the asked name's code."""
    from mlx_qwen35.train.default_model import copy_example, training_examples

    copy = copy_example(random.Random(4))
    code = re.fullmatch(r"Repeat: (\d{4})", copy["messages"][0]["content"])[1]
    assert copy["messages"][1]["content"] == f"{code}."
    def recalls(curriculum):
        rows = list(itertools.islice(training_examples(seed=5, first_stage=6, curriculum=curriculum, sum_stage=0), 1000))
        return rows, [r for r in rows[6:] if isinstance(r["messages"][0]["content"], str) and passage_facts(r)]

    rows, early = recalls(curriculum=10**9)
    assert "video" in [part["type"] for part in rows[3]["messages"][0]["content"]]
    _, late = recalls(curriculum=1)
    firsts = [r["messages"][0]["content"] for r in rows[:6]]
    assert [type(c) for c in firsts[:3]] == [list, str, str] and firsts[1].startswith("Repeat: ")
    assert re.fullmatch(r"What is \d+ \+ \d+\?", firsts[2]) and firsts[4:6] != firsts[:2]
    assert len(early) > 10 and len(late) > 10
    for row in early + late:
        passage = row["messages"][0]["content"]
        facts = dict(re.findall(r"The code for (\w+) is (\d{4})\.", passage))
        asked = [re.search(r"What is the code for (\w+)\?$", m["content"])[1] for m in row["messages"][::2]]
        assert [m["content"] for m in row["messages"][1::2]] == [facts[name] + "." for name in asked]
    assert all(passage_facts(r) == 1 and len(r["messages"][0]["content"].split()) < 150 / 1.4 + 25 for r in early)
    assert max(passage_facts(r) for r in late) >= 3
    assert max(len(r["messages"][0]["content"].split()) for r in late) > 300


def test_curriculum_starts_with_the_sum_stage_alone():
    """The curriculum opens with `sum_stage` sums and nothing else, each answer the true sum; then the first
    stage's rows in their cycle (a large shape's colour, a code to repeat, a sum, a large shape crossing a
    video); then the mix, whose scenes start at growth 0 (the curriculum counts from the mix's first row)."""
    from mlx_qwen35.train.default_model import training_examples

    stage = 20_000
    rows = list(itertools.islice(training_examples(seed=7, first_stage=8, curriculum=stage, sum_stage=stage),
                                 stage + 8 + 350))
    for row in rows[:stage]:
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", row["messages"][0]["content"]).groups())
        assert row["messages"][1]["content"].endswith(f"{a + b}.")
    first = rows[stage:stage + 8]
    for cycle in (first[:4], first[4:]):
        colour, repeat, add, video = (r["messages"][0]["content"] for r in cycle)
        assert any(part.get("text", "").startswith("What color is the") for part in colour)
        assert repeat.startswith("Repeat: ")
        assert re.fullmatch(r"What is \d+ \+ \d+\?", add)
        assert any(part["type"] == "video" for part in video)
    mix = rows[stage + 8:]
    questions = [r["messages"][0]["content"] for r in mix]
    assert sum(isinstance(q, str) and q.startswith("What is ") and "+" in q for q in questions) < len(mix) / 2
    single_image = [r for r in mix if r.get("scenes") and len(r["scenes"]) == 1
                    and not any(part["type"] == "video" for part in r["messages"][0]["content"])]
    scenes = [r["scenes"][0] for r in single_image]
    assert len(scenes) > 20
    for scene in scenes:
        # growth near 0: one shape wider than the world's largest (2 x side/6 + 1 px)
        (*_, x0, x1), = components(world.draw(scene))
        assert x1 - x0 > min(scene.width, scene.height) / 3 + 2
    with pytest.raises(ValueError, match="largest=-1"):
        world.sum_example(random.Random(0), largest=-1)


def passage_facts(row) -> int:
    return row["messages"][0]["content"].count("The code for ")


# --- rows and the assistant mask -----------------------------------------------------------------------------

def test_mask_covers_exactly_the_assistant_tokens(processor):
    from mlx_qwen35.tokenizer import render_chat

    rng = random.Random(0)
    for example in [world.tool_example(rng), world.sum_example(rng, thinking=True), world.image_example(rng),
                    world.image_conversation(rng, turns=3)]:
        row = encode(example, processor)
        text = render_chat(example["messages"], tools=example.get("tools"), add_generation_prompt=False)
        # Whole-text encoding (placeholders expanded) equals the piecewise one.
        expanded = text.replace("<|image_pad|>", "<|image_pad|>" * (0 if row.image_grid_thw is None else
                                int(row.image_grid_thw.prod(1).sum()) // 4))
        assert row.input_ids.tolist() == ByteTokenizer().encode(expanded)
        decoded = bytes(t for t in np.where(row.mask, row.input_ids, 0).tolist() if t < 256).decode()
        targets = [m["content"] for m in example["messages"] if m["role"] == "assistant"]
        spans = re.findall(r"<\|im_start\|>assistant\n(.*?)<\|im_end\|>", text, re.S)
        assert len(spans) == len(targets) and all(t.split("</think>")[-1].strip() in s for t, s in zip(targets, spans))
        # Masked tokens are, in order, the span tokens plus one <|im_end|> per turn, and nothing else.
        expected = [t for s in spans for t in ByteTokenizer().encode(s) + [SPECIALS["<|im_end|>"]]]
        assert row.input_ids[row.mask].tolist() == expected
        assert "user" not in decoded and "system" not in decoded


def test_prompt_mask_and_prompt_loss_weight(processor):
    """Row.prompt marks the prompt's text (not answers, not image placeholders, not padding); the loss with
    `prompt_loss_weight` w is (sum of answer-token CE + w x sum of prompt-token CE) / (answers + w x prompt
    tokens), for the next token and through the MTP head for the one after, checked against float64 NumPy on
    the full logits of every position (training projects only the weighted positions to the vocabulary)."""
    from mlx_qwen35.train.trainer import token_losses

    rng = random.Random(2)
    examples = [world.image_conversation(rng, turns=2), world.sum_example(rng, thinking=False)]
    rows = [encode(example, processor) for example in examples]
    for row in rows:
        placeholder = row.input_ids == SPECIALS["<|image_pad|>"]
        assert placeholder.any() == (row.pixel_values is not None)
        assert np.array_equal(row.prompt, ~row.mask & ~placeholder)
    batch = collate(rows, pad_id=258)
    prompt = np.array(batch["prompt"])
    assert not prompt[1, len(rows[1]):].any() and prompt[1, :len(rows[1])].sum() == rows[1].prompt.sum()
    model = tiny_model(moe=True, mtp_layers=1)
    h = hidden_states(model, batch)
    ids = np.array(batch["input_ids"])
    answers = np.array(batch["mask"])

    def numpy_ce(logits, targets):
        logits = np.array(logits, np.float64)
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        return -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]

    ce = numpy_ce(model.logits(h[:, :-1]), ids[:, 1:])
    mtp_ce = numpy_ce(model.mtp(h[:, :-2], batch["input_ids"][:, 1:-1]), ids[:, 2:])
    for w in (0.0, 0.25):
        total, count, _ = token_losses(model, batch, prompt_weight=w)
        weight = answers + w * prompt
        assert abs(count.item() - weight[:, 1:].sum()) < 1e-6
        np.testing.assert_allclose(total.item(), (ce * weight[:, 1:]).sum(), rtol=1e-5)
        _, (_, parts) = loss_fn(model, batch, TrainConfig(mtp_weight=0.5, prompt_loss_weight=w))
        np.testing.assert_allclose(parts["mtp"].item(), (mtp_ce * weight[:, 2:]).sum() / weight[:, 2:].sum(),
                                   rtol=1e-5)


def test_rows_tokenise_as_generation_sees_them_with_the_real_tokenizer(tmp_path):
    """The tokens before an assistant turn are exactly the generation prompt's tokens (thinking on: it ends in
    `<think>\\n`; off: it holds the empty think block, which is then no target), and a row decodes to the
    rendered text. (Earlier turns inside the context of later ones keep this generation-time tokenisation.)"""
    from mlx_qwen35.tokenizer import load_tokenizer, render_chat, write_tokenizer_files

    tokenizer = load_tokenizer(write_tokenizer_files(tmp_path / "tok"))
    rng = random.Random(4)
    for example, turn in ((world.tool_example(rng), 1), (world.sum_example(rng, thinking=True), 1),
                          (world.sum_example(rng, thinking=False), 1)):
        example = {k: v for k, v in example.items() if k != "thinking"}
        reasoned = "</think>" in (example["messages"][turn]["content"] or "")
        for thinking in (True,) if reasoned else (True, False):  # a reasoned reply is a thinking-on one
            row = encode(example, tokenizer, enable_thinking=thinking)
            text = render_chat(example["messages"], tools=example.get("tools"), add_generation_prompt=False)
            assert tokenizer.decode(row.input_ids.tolist()) == text
            prompt = tokenizer.encode(render_chat(example["messages"][:turn], tools=example.get("tools"),
                                                  enable_thinking=thinking), add_special_tokens=False)
            assert row.input_ids[:len(prompt)].tolist() == prompt
            assert not row.mask[:len(prompt) - (2 if thinking else 0)].any()  # thinking on: <think>, \n are targets
            first = tokenizer.decode(row.input_ids[len(prompt):][row.mask[len(prompt):]].tolist())
            reply = example["messages"][turn]
            expected = reply["content"].split("</think>")[-1].strip() if reply["content"] else "<tool_call>"
            assert expected in first


def test_bad_rows_name_the_row(processor):
    image = world.draw(world.random_scene(random.Random(0)))
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    unreferenced = {**good, "images": [image]}
    missing = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
                            {"role": "assistant", "content": "A circle."}]}
    no_assistant = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(DataError, match=r"row 1: 1 image\(s\) in the row are not referenced"):
        encode_all([good, unreferenced], processor)
    with pytest.raises(DataError, match=r"row 2, message 0: a \{'type': 'image'\} part references an image"):
        encode_all([good, good, missing], processor)
    with pytest.raises(DataError, match="row 0: the conversation has no assistant turn"):
        encode_all([no_assistant], processor)
    missing["images"] = [image]  # the row supplies it: fine
    assert encode(missing, processor).image_grid_thw.shape == (1, 3)


# --- gradients, LoRA, training ----------------------------------------------------------------------------------

def batch_of(processor, examples):
    return collate(encode_all(examples, processor), pad_id=258)


def test_lora_gradient_matches_finite_differences(processor):
    """Gradient of the loss w.r.t. a LoRA matrix, through the chunked DeltaNet path (T >= 16), the vision tower
    and the MoE block, against central differences in float64-ish float32 steps."""
    model = tiny_model(moe=True)
    apply_lora(model, rank=2, alpha=4.0)
    for _, layer in model.named_modules():
        if hasattr(layer, "lora_b"):
            layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    batch = batch_of(processor, [world.image_example(random.Random(1))])
    assert batch["input_ids"].shape[1] >= 16
    config = TrainConfig()
    grad_fn = nn.value_and_grad(model, lambda m, b: loss_fn(m, b, config)[0])
    _, grads = grad_fn(model, batch)
    name = "model.language_model.layers.0.linear_attn.in_proj_qkv.lora_a"
    g = dict(tree_flatten(grads))[name]
    layer = model.model.language_model.layers[0].linear_attn.in_proj_qkv
    base = np.array(layer.lora_a)
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(base.shape).astype(np.float32)
    eps = 1e-3  # larger steps flip top-2 routing choices

    def loss_at(value):
        layer.lora_a = mx.array(value)
        return loss_fn(model, batch, config)[0].item()

    numeric = (loss_at(base + eps * direction) - loss_at(base - eps * direction)) / (2 * eps)
    analytic = float((np.array(g) * direction).sum())
    assert abs(numeric - analytic) <= 1e-2 * abs(analytic) + 1e-4 and abs(analytic) > 1e-3


def test_full_gradient_reaches_the_vision_tower(processor):
    """The vision tower evaluates its attention step by step (mx.eval inside the forward): gradients must
    still flow through it to the patch embedding."""
    model = tiny_model()
    batch = batch_of(processor, [world.image_example(random.Random(2))])
    config = TrainConfig()
    _, grads = nn.value_and_grad(model, lambda m, b: loss_fn(m, b, config)[0])(model, batch)
    g = np.array(dict(tree_flatten(grads))["model.visual.patch_embed.proj.weight"])
    proj = model.model.visual.patch_embed.proj
    base = np.array(proj.weight)
    # A random direction moves this loss by only tens of float32 ulps over steps small enough for a near-linear
    # loss, so one central difference is at the mercy of rounding: the slope of a least-squares quintic
    # through 17 points averages the rounding out and takes the curvature, and four directions together keep
    # one nearly orthogonal to the gradient from deciding the result.
    rng = np.random.default_rng(1)
    directions = [rng.standard_normal(base.shape).astype(np.float32) for _ in range(4)]

    def loss_at(value):
        proj.weight = mx.array(value)
        return loss_fn(model, batch, config)[0].item()

    steps = np.linspace(-0.04, 0.04, 17)
    numeric = np.array([np.polyfit(steps, [loss_at(base + h * d) for h in steps], 5)[4] for d in directions])
    analytic = np.array([float((g * d).sum()) for d in directions])
    assert np.linalg.norm(numeric - analytic) <= 0.02 * np.linalg.norm(analytic)
    assert np.linalg.norm(analytic) > 1e-4


@pytest.mark.parametrize("path", ["dense", "segmented"])
def test_expert_paths_give_the_gathered_loss_and_gradients(processor, path):
    """TrainConfig.experts "dense" computes every expert and weights the unchosen ones by 0, "segmented" runs each
    expert on its own chosen rows: the loss and every gradient must equal the gathered top-K path (which the
    model tests check against transformers), and an expert no token chose must get a gradient of exactly 0."""
    model = tiny_model(moe=True)
    batch = batch_of(processor, [world.image_example(random.Random(3)), world.sum_example(random.Random(4))])
    results = {}
    for experts in ("gathered", path):
        config = TrainConfig(moe_aux_weight=0.01, experts=experts)
        loss, grads = nn.value_and_grad(model, lambda m, b: loss_fn(m, b, config)[0])(model, batch)
        results[experts] = (loss.item(), dict(tree_flatten(grads)))
    assert abs(results[path][0] - results["gathered"][0]) <= 1e-5 * abs(results["gathered"][0])
    for name, gathered in results["gathered"][1].items():
        np.testing.assert_allclose(np.array(results[path][1][name]), np.array(gathered), rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    block = model.model.language_model.layers[0].mlp
    original = block.experts.gate_up_proj
    x = mx.random.normal((3, original.shape[-1]))
    indices = mx.array([[0, 1]] * 3)  # experts 2 and 3 unchosen
    forward = {"dense": dense_experts_forward, "segmented": segmented_experts_forward}[path]

    def routed_sum(gate_up):
        block.experts.gate_up_proj = gate_up
        return forward(block, x, indices, mx.full((3, 2), 0.5)).sum()

    grad = mx.grad(routed_sum)(original)
    block.experts.gate_up_proj = original
    assert float(mx.abs(grad[2:]).max()) == 0.0 and float(mx.abs(grad[:2]).max()) > 0


def test_segmented_experts_match_float64_numpy():
    """segmented_experts_forward against the routed sum written out in float64 NumPy, token by token: each
    token's chosen experts' down(silu(gate) * up), weighted; with experts chosen by no token and a token whose
    two choices are in reverse order."""
    from mlx_qwen35.models.moe import Experts

    rng = np.random.default_rng(5)
    E, H, I, N = 4, 6, 5, 7
    block = SimpleNamespace(experts=Experts(E, H, I))
    block.experts.gate_up_proj = mx.array(rng.normal(size=(E, 2 * I, H)).astype(np.float32))
    block.experts.down_proj = mx.array(rng.normal(size=(E, H, I)).astype(np.float32))
    x = rng.normal(size=(N, H)).astype(np.float32)
    indices = np.array([[2, 0], [0, 2], [2, 0], [0, 2], [2, 0], [0, 2], [2, 0]])  # experts 1 and 3 unchosen
    weights = rng.uniform(size=(N, 2)).astype(np.float32)
    ours = np.array(segmented_experts_forward(block, mx.array(x), mx.array(indices), mx.array(weights)))
    gate_up = np.array(block.experts.gate_up_proj).astype(np.float64)
    down = np.array(block.experts.down_proj).astype(np.float64)
    expected = np.zeros((N, H))
    for n in range(N):
        for k in range(2):
            e = indices[n, k]
            projected = gate_up[e] @ x[n].astype(np.float64)
            gate, up = projected[:I], projected[I:]
            expected[n] += weights[n, k] * (down[e] @ (gate / (1 + np.exp(-gate)) * up))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_an_unknown_expert_path_is_refused_by_name():
    with pytest.raises(ValueError, match="experts 'sparse'"):
        Trainer(tiny_model(moe=True), None, TrainConfig(experts="sparse"))


@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_split_rows_keeps_every_row_and_cuts_at_the_smallest_largest_padded_part(parts):
    """Every row in exactly one part; the parts runs of rows in length order; the largest part's padded size
    (rows x longest row) the least any cut of the length-ordered rows into that many runs gives (all cuts tried);
    one part: the rows as given, in their order."""
    rng = random.Random(parts)
    for _ in range(20):
        rows = [list(range(rng.randint(1, 60))) for _ in range(rng.randint(1, 9))]
        groups = split_rows(rows, parts)
        assert sorted(id(r) for g in groups for r in g) == sorted(id(r) for r in rows)
        if parts == 1:
            assert groups == [rows] and all(a is b for a, b in zip(groups[0], rows))
            continue
        assert len(groups) == min(parts, len(rows)) and all(groups)
        lengths = [len(r) for g in groups for r in g]
        assert lengths == sorted(lengths)
        ordered = sorted(len(r) for r in rows)
        best = min(max((b - a) * ordered[b - 1] for a, b in zip((0, *cuts), (*cuts, len(rows))))
                   for cuts in itertools.combinations(range(1, len(rows)), len(groups) - 1))
        assert max(len(g) * max(len(r) for r in g) for g in groups) == best


def test_a_step_in_parts_trains_as_the_whole_batch(processor):
    """TrainConfig.workers: a step's rows in parts, each part's loss and gradients summed. With the load-balancing
    loss off, the parts' cross-entropy and MTP losses and their gradients are the whole batch's (token means over
    the whole step), and three optimizer steps leave the same weights; with it on, every step still runs and its
    loss is finite. Rows of different lengths, pictures among them."""
    rng = random.Random(21)
    rows = encode_all([world.image_example(rng), world.sum_example(rng), world.image_example(rng),
                       world.recall_example(rng, max_tokens=120), world.sum_example(rng)], processor)
    assert len({len(r) for r in rows}) > 2

    def trainer(workers, aux=0.0):
        config = TrainConfig(learning_rate=3e-3, moe_aux_weight=aux, mtp_weight=0.3, progress=False, pad_id=258,
                             workers=workers)
        return Trainer(tiny_model(moe=True, mtp_layers=1), None, config)

    whole, parts = trainer(1), trainer(3)
    loss, count, terms, grads = whole.gradients(collate(rows, pad_id=258))
    part_loss, part_count, part_terms, part_grads = parts.gradients(
        [collate(p, pad_id=258) for p in split_rows(rows, 3)])
    assert len(split_rows(rows, 3)) == 3
    assert float(part_count) == float(count)
    for name in ("ce", "mtp"):
        assert abs(part_terms[name].item() - terms[name].item()) <= 1e-5 * terms[name].item()
    assert abs(part_loss.item() - loss.item()) <= 1e-5 * loss.item()
    for (name, a), (_, b) in zip(tree_flatten(grads), tree_flatten(part_grads)):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-6, err_msg=name)
    for _ in range(3):
        whole.train_step(collate(rows, pad_id=258))
        parts.train_step(rows)
    for (name, a), (_, b) in zip(tree_flatten(whole.model.parameters()), tree_flatten(parts.model.parameters())):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-5, err_msg=name)
    balanced = trainer(2, aux=0.01)
    records = [balanced.train_step(rows) for _ in range(2)]
    assert all(math.isfinite(r["loss"]) and r["aux"] > 0 for r in records)


def steps_in_a_group(rows, workers, aux=0.0):
    """Steps of a tiny MoE model on `rows` in `workers` parts, then on its first row alone: (the weights as NumPy,
    the step records, whether every process of the group holds the same weights, the group's size)."""
    config = TrainConfig(learning_rate=3e-3, moe_aux_weight=aux, mtp_weight=0.3, progress=False, pad_id=258,
                         workers=workers)
    trainer = Trainer(tiny_model(moe=True, mtp_layers=1), None, config)
    records = [trainer.train_step(batch) for batch in (rows, rows, rows[:1])]
    weights = tree_flatten(trainer.model.parameters())
    flat = mx.concatenate([v.reshape(-1) for _, v in weights])
    everyone = mx.distributed.all_gather(flat[None], group=trainer.group)
    return ({k: np.array(v) for k, v in weights}, records, bool((everyone == flat).all()), trainer.group.size())


@pytest.mark.parametrize("workers", [2, 3])
def test_a_group_of_processes_trains_as_one_process_with_the_parts_in_turn(processor, workers):
    """`parallel.run_in_processes`: two processes, each with its share of a step's parts (2 or 3), the sums added
    across them, reach the weights and losses of one process taking the parts in turn (which the test above holds
    to the whole batch), every process holding the same weights; a step of one row leaves one process nothing to
    add."""
    from mlx_qwen35.train.parallel import run_in_processes

    rng = random.Random(23)
    rows = encode_all([world.image_example(rng), world.sum_example(rng), world.recall_example(rng, max_tokens=120),
                       world.image_example(rng), world.sum_example(rng)], processor)
    alone, alone_records, _, size = steps_in_a_group(rows, workers)
    weights, records, same, group_size = run_in_processes(steps_in_a_group, 2, rows, workers)
    assert (size, group_size) == (1, 2) and same
    for a, b in zip(alone_records, records):
        assert a.keys() == b.keys() and a["tokens"] == b["tokens"]
        for name in ("loss", "ce", "mtp"):
            assert abs(a[name] - b[name]) <= 1e-5 * abs(a[name]), name
    for name, value in alone.items():
        np.testing.assert_allclose(weights[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_an_error_or_a_death_in_a_training_process_is_raised_where_the_group_was_started():
    import os

    from mlx_qwen35.train.parallel import run_in_processes

    with pytest.raises(ValueError, match="workers 0: 1 or more"):
        run_in_processes(Trainer, 2, None, None, TrainConfig(workers=0))
    with pytest.raises(RuntimeError, match="ended with exit code 3 and no result"):
        run_in_processes(os._exit, 2, 3)


def weights_by_rank(offset: float):
    """Checks a group's weights after adding `offset` times the rank to them: the same only when offset is 0."""
    from mlx_qwen35.train.parallel import check_in_step, rank

    check_in_step({"w": mx.arange(6.0) + offset * rank()}, "weights")
    return "same"


def test_processes_that_no_longer_hold_the_same_weights_are_stopped_by_name():
    from mlx_qwen35.train.parallel import run_in_processes

    assert run_in_processes(weights_by_rank, 2, 0.0) == "same"
    with pytest.raises(RuntimeError, match="the training processes hold different weights"):
        run_in_processes(weights_by_rank, 2, 1e-6)


def test_training_processes_end_when_the_process_that_started_them_is_killed(tmp_path):
    """A group of training processes whose starting process is SIGKILLed (a killed `train-default --workers 2`)
    leaves no process behind to wait on the others for ever."""
    import os
    import signal
    import subprocess
    import sys
    import time

    starter = tmp_path / "starter.py"  # a script file: spawned processes import their function from it
    starter.write_text("import os, sys, time\n"
                       "from pathlib import Path\n"
                       "from mlx_qwen35.train.parallel import run_in_processes\n\n"
                       "def hold(folder):\n"
                       "    Path(folder, str(os.getpid())).touch()\n"
                       "    time.sleep(600)\n\n"
                       "if __name__ == '__main__':\n"
                       "    run_in_processes(hold, 2, sys.argv[1])\n")
    (tmp_path / "ranks").mkdir()
    process = subprocess.Popen([sys.executable, str(starter), str(tmp_path / "ranks")], start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((tmp_path / "ranks").iterdir())) < 2:
        time.sleep(0.2)
    ranks = [int(p.name) for p in (tmp_path / "ranks").iterdir()]
    assert len(ranks) == 2
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    def alive(pid):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False

    deadline = time.time() + 10
    while time.time() < deadline and any(map(alive, ranks)):
        time.sleep(0.2)
    assert not any(map(alive, ranks))


def test_train_command_fine_tunes_in_parts_and_refuses_workers_below_one(tmp_path, capsys):
    """`mlx-qwen35 train --workers 2` on the shipped default model: a LoRA fine-tune whose steps run in two parts
    writes its adapter; --workers 0 is refused by name before anything is loaded."""
    import json

    from mlx_qwen35.loading import DEFAULT_MODEL_PATH
    from mlx_qwen35.train.cli import train_main

    rng = random.Random(8)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(world.sum_example(rng)) + "\n" for _ in range(8)))
    command = [str(DEFAULT_MODEL_PATH), "--data", str(data), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        train_main(command + ["--workers", "0"])
    assert "--workers 0: 1 or more" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert train_main(command + ["--lora", "--steps", "2", "--batch-size", "4", "--workers", "2"]) == 0
    assert (tmp_path / "out" / "adapters.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "state.json").read_text())["config"]["workers"] == 2


def test_workers_below_one_are_refused_by_name():
    with pytest.raises(ValueError, match="workers 0: 1 or more"):
        Trainer(tiny_model(), None, TrainConfig(workers=0))


def test_training_lowers_loss_and_resumes_exactly(processor, tmp_path):
    rng = random.Random(11)
    rows = encode_all([world.image_example(rng) for _ in range(2)] + [world.sum_example(rng) for _ in range(2)],
                      processor)
    config = TrainConfig(steps=6, batch_size=2, learning_rate=3e-3, moe_aux_weight=0.01, progress=False,
                         pad_id=258, grad_checkpoint=True)
    first = Trainer(tiny_model(moe=True), rows, config, val_rows=rows)
    before = first.evaluate()
    first.fit(3)
    first.save(tmp_path / "ckpt")
    first.fit(3)
    assert first.evaluate() < 0.9 * before
    assert all("aux" in r for r in first.history)

    second = Trainer(tiny_model(moe=True), rows, config).resume(tmp_path / "ckpt")
    assert second.step == 3
    second.fit(3)
    for (k, a), (_, b) in zip(tree_flatten(first.model.parameters()), tree_flatten(second.model.parameters())):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6, err_msg=k)


def test_lora_adapter_save_load_fuse_and_refuse(processor, tmp_path):
    rows = encode_all([world.image_example(random.Random(5)), world.sum_example(random.Random(6))], processor)
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8.0)
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)
    trainer = Trainer(model, rows, TrainConfig(batch_size=2, learning_rate=1e-2, progress=False, pad_id=258))
    trainer.fit(3)
    trainer.save(tmp_path / "adapter")
    batch = collate(rows, 258)
    model.eval()
    adapted = model.logits(hidden_states(model, batch))

    fresh = tiny_model()  # same seed: the same base weights
    base = fresh.logits(hidden_states(fresh, batch))
    assert float(mx.abs(adapted - base).max()) > 1e-3  # the adapter changed something
    load_adapter(fresh, tmp_path / "adapter")
    np.testing.assert_allclose(np.array(fresh.logits(hidden_states(fresh, batch))), np.array(adapted), atol=1e-5)
    fuse_lora(fresh)
    assert not any("lora" in k for k, _ in tree_flatten(fresh.parameters()))
    np.testing.assert_allclose(np.array(fresh.logits(hidden_states(fresh, batch))), np.array(adapted), atol=1e-4)

    other = tiny_model(hidden_size=48, intermediate_size=64)
    with pytest.raises(AdapterError, match=r"adapter_config.json was made for another architecture.*hidden_size"):
        load_adapter(other, tmp_path / "adapter")
    with pytest.raises(AdapterError, match="adapter_config.json was made for another architecture"):
        load_adapter(tiny_model(moe=True), tmp_path / "adapter")


def test_lora_seed_fixes_the_adapters_starting_weights():
    """`apply_lora(seed=)`: the adapters' A matrices depend on the seed alone, not on MLX's global random
    state (so `mlx-qwen35 train --lora --seed S` repeats); another seed draws others."""
    starts = []
    for before, seed in ((1, 0), (2, 0), (1, 3)):
        model = tiny_model()
        mx.random.seed(before)
        apply_lora(model, rank=2, alpha=4.0, seed=seed)
        starts.append({k: np.array(v) for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_a")})
    assert starts[0] and all(np.array_equal(starts[0][k], starts[1][k]) for k in starts[0])
    assert not all(np.array_equal(starts[0][k], starts[2][k]) for k in starts[0])


def test_given_image_features_replace_the_towers_output_only_in_their_rows(processor):
    """A batch where one picture row gives its image features (the default model's binding scaffold) and
    another does not: each row's hidden states equal that row's alone, the first with the tower replaced by
    the given features, the second through the tower."""
    rng = random.Random(5)
    rows = [encode(world.image_conversation(rng, turns=1), processor) for _ in range(2)]
    rows.append(encode(world.sum_example(rng, thinking=False), processor))
    tokens = int(np.prod(rows[0].image_grid_thw, axis=1).sum()) // 4
    given = np.random.default_rng(0).normal(size=(tokens, VISION["out_hidden_size"])).astype(np.float32)
    rows[0].image_features = given
    model = tiny_model()
    batch = collate(rows, pad_id=258)
    assert batch["image_features"].shape[0] == int((np.array(batch["input_ids"]) == 300).sum())
    together = np.array(hidden_states(model, batch))
    for i, row in enumerate(rows):
        alone = collate([row], pad_id=258)
        ids = alone["input_ids"]
        if row.image_grid_thw is None:
            expected = hidden_states(model, alone)
        else:
            encode_with = (lambda pixels, grid: mx.array(given)) if i == 0 else None
            embeddings, positions, _ = model.embed_multimodal(ids, alone["pixel_values"], alone["image_grid_thw"],
                                                              encode=encode_with)
            expected = model.model.language_model(None, None, embeddings, positions)
        np.testing.assert_allclose(together[i, :len(row)], np.array(expected)[0], atol=2e-5)
    first = collate([rows[0]])
    only_given = np.array(hidden_states(model, first))  # every picture of the batch given
    np.testing.assert_allclose(only_given[0], together[0, :len(rows[0])], atol=2e-5)
    towered = np.array(model.model.visual(first["pixel_values"], first["image_grid_thw"]))
    assert np.abs(towered - given).max() > 0.1  # what the first row reads did change


def test_the_tool_heavy_tail_draws_tool_rows_at_its_share_from_full_grown_scenes():
    """`mix` sets the mixed stage's kinds: with TOOL_TAIL_MIX (no stages, curriculum 0, as the tail draws it)
    about 0.4/1.3 of the rows are tool conversations with the tools declared, where TRAIN_MIX gives about
    0.1; picture rows are the world's full-size scenes from the first row."""
    from mlx_qwen35.train.default_model import TOOL_TAIL_MIX, TRAIN_MIX, training_examples

    def tool_share(mix):
        rows = list(itertools.islice(training_examples(seed=9, first_stage=0, curriculum=0, sum_stage=0, mix=mix),
                                     1500))
        tools = [r for r in rows if r.get("tools")]
        assert all(any(m.get("tool_calls") for m in r["messages"]) for r in tools)
        return len(tools) / len(rows), rows

    tail, rows = tool_share(TOOL_TAIL_MIX)
    plain, _ = tool_share(TRAIN_MIX)
    expected = TOOL_TAIL_MIX["tool"] / sum(TOOL_TAIL_MIX.values())
    assert abs(tail - expected) < 4 * (expected * (1 - expected) / 1500) ** 0.5  # four standard deviations
    assert abs(plain - TRAIN_MIX["tool"]) < 0.04
    for row in rows[:40]:
        for scene in row.get("scenes") or []:
            side = min(scene.width, scene.height)
            for *_, x0, x1 in components(world.draw(scene)):
                assert x1 - x0 <= 2 * max(6, round(side / 6)) + 1


def test_prefetched_keeps_order_raises_errors_and_stops_when_closed():
    import threading

    from mlx_qwen35.train.data import prefetched

    assert list(prefetched(range(200))) == list(range(200))

    def failing():
        yield from range(3)
        raise ValueError("row 3 is broken")

    got = []
    with pytest.raises(ValueError, match="row 3 is broken"):
        for item in prefetched(failing()):
            got.append(item)
    assert got == [0, 1, 2]

    made = []

    def endless():
        while True:
            made.append(len(made))
            yield made[-1]

    stream = prefetched(endless(), depth=2)
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(made) <= 5 + 2 + 1  # the items taken, the queue's depth, and the one waiting to be put
