"""scripts/probe_binding.py (docs/default-model.md, "Which side fails to bind"): the oracle tokens it feeds the
decoder are the words of the shape each token holds, placed where the scene says, and a short run trains and
answers through the patched tower."""

import importlib.util
import random
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_qwen35.train import default_model as dm
from mlx_qwen35.train import world
from mlx_qwen35.train.vision_pretrain import class_means, scaffold_features

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("probe_binding", ROOT / "scripts" / "probe_binding.py")
probe = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(probe)


def test_oracle_words_sit_on_the_centre_token_and_spread_on_every_token_the_disc_reaches(tmp_path):
    """A square of half-side 36 px centred in a 128 px picture (4x4 tokens of 32 px): its centre (64, 64) lies
    in the third row and column; its bounding circle reaches every token but the four corners (a corner
    token's nearest point is 32 px away on both axes, 45 px > 36)."""
    _, processor = dm.write_skeleton(tmp_path, seed=0)
    table = mx.random.normal((1024, 8))
    embeddings = type("Table", (), {"weight": table})()
    scene = world.Scene(128, 128, (255, 255, 255), [world.Shape("square", "blue", 64, 64, 36)])
    square = processor.tokenizer.encode(" square", add_special_tokens=False)[0]
    blue = processor.tokenizer.encode(" blue", add_special_tokens=False)[0]

    oracle = probe.Features("oracle", processor.tokenizer, embeddings)
    kinds, colours, places = oracle.words(scene, (1, 8, 8))
    expected = np.full(16, -1)
    expected[2 * 4 + 2] = 0
    assert (kinds == np.where(expected == 0, square, -1)).all()
    assert (colours == np.where(expected == 0, blue, -1)).all()
    oracle.current = (kinds, colours, places)
    features = np.array(oracle(None, None, [(1, 8, 8)]))
    assert np.allclose(features[10], np.array(table[square] + table[blue]))
    assert not np.delete(features, 10, axis=0).any()

    reached = np.ones((4, 4), bool)
    reached[[0, 0, 3, 3], [0, 3, 0, 3]] = False
    kinds, colours, _ = probe.Features("spread-all", processor.tokenizer, embeddings).words(scene, (1, 8, 8))
    assert (kinds == np.where(reached.ravel(), square, -1)).all()
    assert (colours == np.where(reached.ravel(), blue, -1)).all()
    kinds, colours, _ = probe.Features("spread", processor.tokenizer, embeddings).words(scene, (1, 8, 8))
    assert (kinds >= 0).sum() == 1 and (colours == np.where(reached.ravel(), blue, -1)).all()


def test_tower_modes_add_the_named_words_at_centres_and_noise_has_its_scale(tmp_path):
    _, processor = dm.write_skeleton(tmp_path, seed=0)
    table = mx.random.normal((1024, 8), key=mx.random.key(1))
    embeddings = type("Table", (), {"weight": table})()
    scene = world.Scene(64, 64, (255, 255, 255), [world.Shape("circle", "red", 20, 20, 10)])
    circle = processor.tokenizer.encode(" circle", add_special_tokens=False)[0]
    red = processor.tokenizer.encode(" red", add_special_tokens=False)[0]
    tower_out = mx.full((4, 8), 0.5)  # 2x2 tokens of 32 px; the centre (20, 20) is in the first
    expected = {"tower:2": 0, "kind+tower": table[circle], "colour+tower": table[red],
                "oracle+tower": table[circle] + table[red]}
    for mode, words in expected.items():
        features = probe.Features(mode, processor.tokenizer, embeddings)
        features.current = features.words(scene, (1, 4, 4))
        out = np.array(features(lambda pixels, grid: tower_out, None, [(1, 4, 4)]))
        base = 1.0 if mode == "tower:2" else 0.5
        assert np.allclose(out[0], np.array(words + base), atol=1e-6), mode
        assert np.allclose(out[1:], base), mode
    noisy = probe.Features("oracle+noise:0.3", processor.tokenizer, embeddings)
    noisy.current = noisy.words(scene, (1, 8, 8))
    clean = probe.Features("oracle", processor.tokenizer, embeddings)
    clean.current = noisy.current
    grid = [(1, 8, 8)]
    noise = np.array(mx.concatenate([noisy(None, None, grid) - clean(None, None, grid) for _ in range(200)]))
    assert abs(noise.std() - 0.3) < 0.02 and abs(noise.mean()) < 0.02


def test_a_short_oracle_run_trains_and_answers():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "probe_binding.py"), "--features", "oracle",
                          "--steps", "2", "--every", "2", "--held-out", "3", "--aux-kind", "1", "--only-centres",
                          "--lone-first", "--switch-at", "2", "--switch-to", "oracle"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    line = [l for l in run.stdout.splitlines() if "held-out color right" in l][-1]
    assert line.endswith("/3") and "step 2" in line


def test_a_short_run_with_sums_first_and_mixed_answers_colour_and_sums():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "probe_binding.py"), "--features", "oracle",
                          "--steps", "3", "--every", "3", "--held-out", "2", "--sums-first", "40", "--sum-share", "0.5"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    line = [l for l in run.stdout.splitlines() if "held-out color right" in l][-1]
    assert re.search(r"all: \d/2  sums \d+%$", line), line


def test_a_second_question_trains_beside_the_asked_one():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "probe_binding.py"), "--features", "oracle",
                          "--question", "left_right", "--also", "side:0.5", "--steps", "2", "--every", "2",
                          "--held-out", "3"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    line = [l for l in run.stdout.splitlines() if "held-out left_right right" in l][-1]
    assert line.endswith("/3") and "step 2" in line


def test_the_several_picture_question_reads_every_pictures_tokens_in_order():
    """A run of the world's several-picture question trains and answers; its training rows' words are each
    picture's own, one picture after another, as many as the rows' image tokens."""
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "probe_binding.py"), "--features", "oracle",
                          "--question", "multi_image", "--steps", "2", "--every", "2", "--held-out", "3"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    line = [l for l in run.stdout.splitlines() if "held-out multi_image right by pictures" in l][-1]
    assert line.endswith("/3") and "step 2" in line


def test_the_lone_several_picture_question_leaves_only_the_asked_picture_with_shapes():
    """multi_image_lone: the world's several-picture question and answer, the asked picture as drawn, every other
    picture blank (its background alone, in its own size), and the scenes the features read say the same."""
    rng = random.Random(4)
    for _ in range(20):
        example = probe.multi_image_lone_example(rng)
        question, answer = example["messages"][0]["content"][-1]["text"], example["messages"][-1]["content"]
        assert re.fullmatch(r"Which picture has the (\w+) (\w+)\?", question) and re.fullmatch(r"Picture \d\.", answer)
        color, kind = question[len("Which picture has the "):-1].split()
        images = [part["image"] for part in example["messages"][0]["content"] if part.get("type") == "image"]
        target = int(answer[8]) - 1
        assert 2 <= len(images) == len(example["scenes"]) <= 4
        for i, (image, scene) in enumerate(zip(images, example["scenes"])):
            pixels = np.asarray(image)
            assert pixels.shape[:2] == (scene.height, scene.width)
            if i == target:
                assert (color, kind) in {(s.color, s.kind) for s in scene.shapes}
                assert (pixels == np.array(world.COLORS[color])).all(-1).any()
            else:
                assert scene.shapes == [] and (pixels == np.array(scene.background)).all()


def test_picture_labels_reach_training_rows_and_prompts_alike(tmp_path):
    """--vision-ids: "Picture n: " before each picture both in what the decoder trains on and in what it is
    asked; without it, in neither (the world's own rows)."""
    from mlx_qwen35.generation.api import encode_prompt_with_media
    from mlx_qwen35.train import evaluate

    _, processor = dm.write_skeleton(tmp_path, seed=0)
    example = world.multi_image_example(random.Random(3))
    count = len(example["scenes"])

    def texts(labelled):
        row = dm.encode_example(example, processor, random.Random(0), add_vision_id=labelled)
        ids, _ = encode_prompt_with_media(processor, evaluate._prompt(example), enable_thinking=False)
        return processor.tokenizer.decode(row.input_ids.tolist()), processor.tokenizer.decode(ids)

    assert not any("Picture 1: " in text for text in texts(False))
    probe.label_pictures(processor)
    for text in texts(True):
        assert all(f"Picture {n}: <|vision_start|>" in text for n in range(1, count + 1)), text
        assert f"Picture {count + 1}: " not in text


def test_words_of_several_pictures_are_each_pictures_words_in_turn(tmp_path):
    _, processor = dm.write_skeleton(tmp_path, seed=0)
    embeddings = type("Table", (), {"weight": mx.zeros((1024, 4))})()
    oracle = probe.Features("oracle", processor.tokenizer, embeddings)
    example = probe.draw_example(random.Random(5), probe.ask_multi_image)
    scenes = example["scenes"]
    assert 2 <= len(scenes) <= 4
    grids = [(1, 2 * (s.height // 28 + 1), 2 * (s.width // 28 + 1)) for s in scenes]  # any grids of whole tokens
    kinds, colours, places, pictures = oracle.words_of(scenes, grids)
    at = 0
    for number, (scene, grid) in enumerate(zip(scenes, grids), 1):
        n = grid[1] * grid[2] // 4
        assert (pictures[at:at + n] == number).all()
        assert (kinds[at:at + n] >= 0).sum() == len(scene.shapes)
        assert sorted(colours[at:at + n][colours[at:at + n] >= 0].tolist()) == sorted(
            processor.tokenizer.encode(" " + shape.color, add_special_tokens=False)[0] for shape in scene.shapes)
        at += n
    assert at == len(kinds) == len(colours) == len(places) == len(pictures)


def test_bad_arguments_are_named_before_anything_runs():
    for args, named in ((["--features", "kind+tower:abc"], "kind+tower:abc"), (["--features", "spread:2"], "spread:2"),
                        (["--tower", "/no/such/tower.safetensors"], "/no/such/tower.safetensors"),
                        (["--features", "oracle+noise"], "oracle+noise"), (["--switch-to", "towr"], "towr"),
                        (["--switch-to", "tower"], "--switch-at"), (["--lone-first"], "--lone-first"),
                        (["--sums-first", "-5"], "--sums-first -5"), (["--sum-share", "1"], "--sum-share 1.0"),
                        (["--position"], "--position"), (["--question", "sides"], "sides"),
                        (["--layers", "0"], "--layers 0"), (["--also", "sides:0.5"], "--also sides:0.5"),
                        (["--also", "side:1"], "--also side:1"), (["--places", "1"], "--places 1"),
                        (["--also", "left_right_reasoned:0.5"], "--also left_right_reasoned:0.5"),
                        (["--also", "color:0.5", "--also-after-switch"], "--also-after-switch"),
                        (["--also-from", "300"], "--also-from 300"),
                        (["--schedule-steps", "900"], "--schedule-steps 900"),
                        (["--from-shipped", "--layers", "2"], "--from-shipped"),
                        (["--also", "color:0.5", "--also-from", "700", "--steps", "600"], "--also-from 700"),
                        (["--question", "multi_image", "--distractor-ramp", "300:200"], "--distractor-ramp 300:200"),
                        (["--question", "multi_image", "--distractor-ramp", "200"], "--distractor-ramp 200"),
                        (["--question", "color", "--distractor-ramp", "1:2"], "a question answered by a picture's")):
        run = subprocess.run([sys.executable, str(ROOT / "scripts" / "probe_binding.py"), *args],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and named in run.stderr and not run.stdout


def test_means_mode_is_the_scaffold_of_the_towers_class_means(tmp_path):
    """`--features means:2` reads twice `vision_pretrain.scaffold_features` of the picture (a stand-in tower:
    each merged token's mean RGB)."""
    _, processor = dm.write_skeleton(tmp_path, seed=0)
    embeddings = type("Table", (), {"weight": mx.zeros((1024, 3))})()

    def rgb_tower(pixels, grid):
        return pixels.reshape(pixels.shape[0], 3, -1).mean(-1).reshape(-1, 4, 3).mean(1)

    features = probe.Features("means:2", processor.tokenizer, embeddings)
    features.fit_means(rgb_tower, processor, pictures=40)
    scene = world.Scene(96, 64, (255, 255, 255), [world.Shape("circle", "red", 20, 20, 10),
                                                  world.Shape("square", "blue", 70, 40, 10)])
    features.current = features.words(scene, (1, 4, 6))
    expected = 2 * scaffold_features(class_means(rgb_tower, processor, pictures=40, seed=11), scene, (1, 4, 6))
    np.testing.assert_allclose(np.array(features(None, None, [(1, 4, 6)])), expected, rtol=1e-5, atol=1e-6)
    assert (np.abs(expected).sum(1) > 0).sum() == 2


def test_position_adds_each_centres_place_along_the_fitted_directions(tmp_path):
    """A stand-in tower whose merged tokens hold their own place (-1 to 1 across and down) and nothing else: the
    fitted directions are about the first two axes, and --position adds place times direction at the centres."""
    _, processor = dm.write_skeleton(tmp_path, seed=0)
    embeddings = type("Table", (), {"weight": mx.zeros((1024, 3))})()

    def place_tower(pixels, grid):
        rows, cols = int(grid[0][1]) // 2, int(grid[0][2]) // 2
        r, c = np.divmod(np.arange(rows * cols), cols)
        return mx.array(np.stack([2 * (c + 0.5) / cols - 1, 2 * (r + 0.5) / rows - 1, np.zeros(rows * cols)], 1),
                        mx.float32)

    features = probe.Features("means", processor.tokenizer, embeddings, use_positions=True, position_scale=3.0)
    features.fit_means(place_tower, processor, pictures=60)
    directions = np.array(features.positions)
    assert np.allclose(directions[:, :2], np.eye(2), atol=0.25) and np.allclose(directions[:, 2], 0, atol=1e-6)

    features.positions = mx.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    scene = world.Scene(96, 64, (255, 255, 255), [world.Shape("circle", "red", 20, 20, 10),
                                                  world.Shape("square", "blue", 70, 40, 10)])
    features.current = features.words(scene, (1, 4, 6))
    features.use_positions = False
    without = np.array(features(None, None, [(1, 4, 6)]))
    features.use_positions = True
    added = np.array(features(None, None, [(1, 4, 6)])) - without
    expected = np.zeros((6, 3))  # 2x3 tokens of 32 px: the circle's centre in token 0, the square's in token 5
    expected[0, :2] = 3 * np.array([2 * 20 / 96 - 1, 2 * 20 / 64 - 1])
    expected[5, :2] = 3 * np.array([2 * 70 / 96 - 1, 2 * 40 / 64 - 1])
    np.testing.assert_allclose(added, expected, atol=1e-5)


def test_the_probes_own_questions_ask_what_they_say():
    rng = random.Random(3)
    scene = world.Scene(120, 60, (255, 255, 255), [world.Shape("circle", "red", 15, 30, 8),
                                                   world.Shape("square", "blue", 100, 30, 8)])
    assert probe.ask_side(rng, scene) in (("Is the red circle on the left or the right?", "Left."),
                                          ("Is the blue square on the left or the right?", "Right."))
    middle = world.Scene(120, 60, (255, 255, 255), [world.Shape("circle", "red", 60, 30, 8)])
    assert probe.ask_side(rng, middle) is None
    assert probe.ask_left_right_of_two(rng, scene) in (
        ("Is the red circle left or right of the blue square?", "Left."),
        ("Is the blue square left or right of the red circle?", "Right."))
    three = world.Scene(120, 60, (255, 255, 255), [*scene.shapes, world.Shape("triangle", "green", 60, 30, 8)])
    assert probe.ask_left_right_of_two(rng, three) is None
    # the reasoned form gives each named shape's place across the picture (its centre, in hundredths of the width)
    assert probe.ask_left_right_reasoned(rng, scene) in (
        ("Is the red circle left or right of the blue square?",
         "<think>\nThe red circle is at 12. The blue square is at 83.\n</think>\n\nLeft."),
        ("Is the blue square left or right of the red circle?",
         "<think>\nThe blue square is at 83. The red circle is at 12.\n</think>\n\nRight."))
    assert probe.ask_left_right_reasoned(rng, middle) is None
    compared = [probe.ask_compare_digits(random.Random(seed), scene) for seed in range(60)]
    for question, answer in compared:
        a, b = map(int, re.fullmatch(r"Is (\d) left or right of (\d)\?", question).groups())
        assert a != b and answer == ("Left." if a < b else "Right.")
    assert {answer for _, answer in compared} == {"Left.", "Right."}
    for seed in range(40):  # one fact: a named shape's place (hundredths: 12 or 83) against another number
        question, answer = probe.ask_left_right_one_fact(random.Random(seed), scene)
        name, place, again, other = re.fullmatch(r"The (\w+ \w+) is at (\d+)\. Is the (\w+ \w+) left or right of "
                                                 r"(\d+)\?", question).groups()
        assert name == again and int(place) == {"red circle": 12, "blue square": 83}[name] and place != other
        assert answer == ("Left." if int(place) < int(other) else "Right.")
    for seed in range(40):  # one of two: both places told, in either order, one of them asked against a number
        question, answer = probe.ask_left_right_one_of_two(random.Random(seed), scene)
        told, asked, other = re.fullmatch(r"(.*) Is the (\w+ \w+) left or right of (\d+)\?", question).groups()
        assert told in ("The red circle is at 12. The blue square is at 83.",
                        "The blue square is at 83. The red circle is at 12.")
        place = {"red circle": 12, "blue square": 83}[asked]
        assert int(other) != place and answer == ("Left." if place < int(other) else "Right.")
    # --places 10: tenths of the width (15/120 -> 1, 100/120 -> 8); the stated form tells both, in either order,
    # before the world's question; a pair in the same tenth is not asked (its places would not decide it)
    probe.PLACES[0] = 10
    try:
        thinking = probe.ask_left_right_reasoned(rng, scene)[1]
        assert "The red circle is at 1. The blue square is at 8." in thinking \
            or "The blue square is at 8. The red circle is at 1." in thinking
        stated = {probe.ask_left_right_stated(random.Random(seed), scene) for seed in range(40)}
        told = ("The red circle is at 1. The blue square is at 8.", "The blue square is at 8. The red circle is at 1.")
        assert stated == {(f"{t} Is the {a} left or right of the {b}?", answer) for t in told
                          for a, b, answer in (("red circle", "blue square", "Left."),
                                               ("blue square", "red circle", "Right."))}
        near = world.Scene(120, 60, (255, 255, 255), [world.Shape("circle", "red", 61, 30, 1),
                                                      world.Shape("square", "blue", 71, 30, 1)])
        assert world.left_right_pair(rng, near) is not None
        assert probe.ask_left_right_stated(rng, near) is None and probe.ask_left_right_reasoned(rng, near) is None
    finally:
        probe.PLACES[0] = 100


def test_one_of_two_variants_name_by_kind_or_only_pairs_sharing_nothing():
    distinct = world.Scene(120, 60, (255, 255, 255), [world.Shape("circle", "red", 15, 30, 8),
                                                      world.Shape("square", "blue", 100, 30, 8)])
    same_kind = world.Scene(120, 60, (255, 255, 255), [world.Shape("circle", "red", 15, 30, 8),
                                                       world.Shape("circle", "blue", 100, 30, 8)])
    same_colour = world.Scene(120, 60, (255, 255, 255), [world.Shape("circle", "red", 15, 30, 8),
                                                         world.Shape("square", "red", 100, 30, 8)])
    for seed in range(20):
        question, answer = probe.ask_left_right_one_of_two_kinds(random.Random(seed), distinct)
        told, asked, other = re.fullmatch(r"(.*) Is the (\w+) left or right of (\d+)\?", question).groups()
        assert told in ("The circle is at 12. The square is at 83.", "The square is at 83. The circle is at 12.")
        place = {"circle": 12, "square": 83}[asked]
        assert answer == ("Left." if place < int(other) else "Right.")
        assert probe.ask_left_right_one_of_two_distinct(random.Random(seed), distinct)[0].count(" is at ") == 2
        assert probe.ask_left_right_one_of_two_kinds(random.Random(seed), same_kind) is None
        assert probe.ask_left_right_one_of_two_distinct(random.Random(seed), same_kind) is None
        assert probe.ask_left_right_one_of_two_distinct(random.Random(seed), same_colour) is None
        assert probe.ask_left_right_one_of_two_kinds(random.Random(seed), same_colour) is not None


def test_the_kind_named_left_right_asks_only_about_kinds_unique_in_the_picture():
    circle, square = world.Shape("circle", "red", 15, 30, 8), world.Shape("square", "blue", 100, 30, 8)
    two = world.Scene(120, 60, (255, 255, 255), [circle, square])
    asked = {probe.ask_left_right_kinds(random.Random(seed), two) for seed in range(20)}
    assert asked == {("Is the circle left or right of the square?", "Left."),
                     ("Is the square left or right of the circle?", "Right.")}
    # a second circle leaves no circle to name by kind; the square has no other unique kind to be compared with
    doubled = world.Scene(120, 60, (255, 255, 255), [circle, square, world.Shape("circle", "green", 60, 30, 8)])
    assert probe.ask_left_right_kinds(random.Random(0), doubled) is None
    # two kinds on top of each other have no clear horizontal order
    stacked = world.Scene(60, 120, (255, 255, 255), [world.Shape("circle", "red", 30, 15, 8),
                                                     world.Shape("square", "blue", 32, 100, 8)])
    assert probe.ask_left_right_kinds(random.Random(0), stacked) is None


def test_one_shape_pictures_share_what_the_question_says():
    for seed in range(30):
        for shared in (False, True):
            example = probe.multi_image_one_each(random.Random(seed), shared)
            color, kind = re.fullmatch(r"Which picture has the (\w+) (\w+)\?",
                                       example["messages"][0]["content"][-1]["text"]).groups()
            target = int(re.fullmatch(r"Picture (\d)\.", example["messages"][-1]["content"]).group(1)) - 1
            for i, scene in enumerate(example["scenes"]):
                [shape] = scene.shapes
                same = (shape.kind == kind) + (shape.color == color)
                assert same == (2 if i == target else 1 if shared else 0)
        example = probe.multi_image_kind_example(random.Random(seed))
        kind = re.fullmatch(r"Which picture has the (\w+)\?", example["messages"][0]["content"][-1]["text"]).group(1)
        target = int(re.fullmatch(r"Picture (\d)\.", example["messages"][-1]["content"]).group(1)) - 1
        assert [scene.shapes[0].kind == kind for scene in example["scenes"]] == [
            i == target for i in range(len(example["scenes"]))]
        example = probe.multi_image_color_example(random.Random(seed))
        kind = re.fullmatch(r"What color is the (\w+)\?", example["messages"][0]["content"][-1]["text"]).group(1)
        holders = [scene.shapes[0] for scene in example["scenes"] if scene.shapes[0].kind == kind]
        assert len(holders) == 1 and example["messages"][-1]["content"] == f"{holders[0].color}."


def test_picture_index_puts_each_pictures_digit_at_its_centres(tmp_path):
    _, processor = dm.write_skeleton(tmp_path, seed=0)
    table = mx.random.normal((1024, 8), key=mx.random.key(2))
    embeddings = type("Table", (), {"weight": table})()
    scenes = [world.Scene(64, 64, (255, 255, 255), [world.Shape("circle", "red", 20, 20, 10)]),
              world.Scene(64, 64, (255, 255, 255), [world.Shape("square", "blue", 40, 40, 10)])]
    features = probe.Features("oracle", processor.tokenizer, embeddings)
    features.picture_words = mx.array(np.arange(5 * 8, dtype=np.float32).reshape(5, 8))
    features.current = features.words_of(scenes, [(1, 4, 4), (1, 4, 4)])
    out = np.array(features(None, None, np.array([(1, 4, 4), (1, 4, 4)])))
    plain = probe.Features("oracle", processor.tokenizer, embeddings)
    plain.current = features.current
    extra = out - np.array(plain(None, None, np.array([(1, 4, 4), (1, 4, 4)])))
    # the first picture's centre is its first token, the second's its last (of 2x2 tokens each)
    assert np.allclose(extra[0], np.arange(8, 16)) and np.allclose(extra[7], np.arange(16, 24))
    assert not np.delete(extra, [0, 7], axis=0).any()


def test_the_thirty_eighth_sessions_questions_ask_what_they_say():
    """The kind-named stated form, the lookup on either side of a digit, the several-picture question answered
    by its digit, and the split by the first-named shape's half, on hand-placed scenes (places in hundredths:
    the circle at 12, the square at 83)."""
    distinct = world.Scene(120, 60, (255, 255, 255), [world.Shape("circle", "red", 15, 30, 8),
                                                      world.Shape("square", "blue", 100, 30, 8)])
    same_kind = world.Scene(120, 60, (255, 255, 255), [world.Shape("circle", "red", 15, 30, 8),
                                                       world.Shape("circle", "blue", 100, 30, 8)])
    sides = set()
    for seed in range(30):
        question, answer = probe.ask_left_right_stated_kinds(random.Random(seed), distinct)
        told, a, b = re.fullmatch(r"(.*) Is the (\w+) left or right of the (\w+)\?", question).groups()
        assert told in ("The circle is at 12. The square is at 83.", "The square is at 83. The circle is at 12.")
        assert answer == ("Left." if a == "circle" else "Right.") and {a, b} == {"circle", "square"}
        assert probe.ask_left_right_stated_kinds(random.Random(seed), same_kind) is None
        question, answer = probe.ask_left_right_one_of_two_kinds_either(random.Random(seed), distinct)
        places = {"circle": 12, "square": 83}
        if before := re.fullmatch(r".* Is the (\w+) left or right of (\d+)\?", question):
            assert answer == ("Left." if places[before[1]] < int(before[2]) else "Right.")
            sides.add("named first")
        else:
            digit, kind = re.fullmatch(r".* Is (\d+) left or right of the (\w+)\?", question).groups()
            assert answer == ("Left." if int(digit) < places[kind] else "Right.")
            sides.add("digit first")
        example = probe.multi_image_kind_digit_example(random.Random(seed))
        kind = re.fullmatch(r"Which picture has the (\w+)\?", example["messages"][0]["content"][-1]["text"]).group(1)
        target = int(re.fullmatch(r"(\d)\.", example["messages"][-1]["content"]).group(1)) - 1
        assert [scene.shapes[0].kind == kind for scene in example["scenes"]] == [
            i == target for i in range(len(example["scenes"]))]
    assert sides == {"named first", "digit first"}
    # the red circle (left half) left of the blue square: its half gives the answer; a circle right of a square
    # that lies further right still, both in the right half: it does not
    ask = world.ask_left_right
    not_left_right = world._chat(world._user([{"type": "text", "text": "What is 2 + 3?"}], "5."), "5.")
    for scene, expected in ((distinct, {True}),
                            (world.Scene(120, 60, (255, 255, 255), [world.Shape("circle", "red", 70, 30, 5),
                                                                   world.Shape("square", "blue", 110, 30, 5)]),
                             {True, False})):
        seen = set()
        for seed in range(20):
            question, answer = ask(random.Random(seed), scene)
            example = world._chat(world._user([{"type": "image", "image": None}], question), answer)
            example["scenes"] = [scene]
            seen.add(probe.half_decides(example))
        assert seen == expected
    assert probe.half_decides(not_left_right) is None


def test_the_fortieth_sessions_questions_ask_what_they_say():
    """Colour answered by its number in the world's colour list (1 for red); the picture asked by kind, each
    picture's shape in its picture's own colour, answered by the picture's digit."""
    numbers = {"red": 1, "green": 2, "blue": 3, "yellow": 4, "purple": 5, "orange": 6}
    assert list(world.COLORS)[:6] == list(numbers)
    for seed in range(30):
        example = probe.multi_image_color_number_example(random.Random(seed))
        kind = re.fullmatch(r"What color is the (\w+)\?", example["messages"][0]["content"][-1]["text"]).group(1)
        [holder] = [scene.shapes[0] for scene in example["scenes"] if scene.shapes[0].kind == kind]
        assert example["messages"][-1]["content"] == f"{numbers[holder.color]}."
        example = probe.multi_image_kind_by_colour_example(random.Random(seed))
        kind = re.fullmatch(r"Which picture has the (\w+)\?", example["messages"][0]["content"][-1]["text"]).group(1)
        target = int(re.fullmatch(r"(\d)\.", example["messages"][-1]["content"]).group(1))
        assert 2 <= len(example["scenes"]) <= 4
        assert [scene.shapes[0].kind == kind for scene in example["scenes"]] == [
            n == target for n in range(1, len(example["scenes"]) + 1)]
        assert [numbers[scene.shapes[0].color] for scene in example["scenes"]] == list(
            range(1, len(example["scenes"]) + 1))


def test_the_picture_asked_by_its_number_is_that_picture():
    """"What color is the shape in picture n?" answers the colour of the shape in the n-th picture, each picture's
    colour its own (so the colour names the picture), 2-4 pictures of one shape each."""
    for seed in range(30):
        example = probe.multi_image_by_label_example(random.Random(seed))
        asked = int(re.fullmatch(r"What color is the shape in picture (\d)\?",
                                 example["messages"][0]["content"][-1]["text"]).group(1))
        colours = [scene.shapes[0].color for scene in example["scenes"]]
        assert 2 <= len(colours) <= 4 and len(set(colours)) == len(colours)
        assert all(len(scene.shapes) == 1 for scene in example["scenes"])
        assert example["messages"][-1]["content"] == f"{colours[asked - 1]}."
        assert sum(part["type"] == "image" for part in example["messages"][0]["content"]) == len(colours)


def test_a_distractor_ramp_weights_the_other_pictures_tokens_and_leaves_the_asked_ones(tmp_path):
    """--distractor-ramp: the weight is 0 up to the ramp's first step and 1 from its last, linear between; a
    several-picture row's tokens outside its asked picture take the weight, its asked picture's and other rows'
    keep 1; and the features of a weighted token are the unweighted ones times its weight."""
    assert [probe.ramp_weight(step, 100, 300) for step in (0, 100, 150, 200, 300, 400)] == [0, 0, 0.25, 0.5, 1, 1]
    several = type("Row", (), {"words": (None, None, None, np.array([1, 1, 2, 2, 3])), "asked_picture": 2})()
    single = type("Row", (), {"words": (np.array([4, 5]), None, None, np.array([1, 1]))})()
    assert probe.picture_weights([several, single], 0.25).tolist() == [0.25, 0.25, 1, 1, 0.25, 1, 1]

    _, processor = dm.write_skeleton(tmp_path, seed=0)
    embeddings = type("Table", (), {"weight": mx.random.normal((1024, 8), key=mx.random.key(3))})()
    scenes = [world.Scene(64, 64, (255, 255, 255), [world.Shape("circle", "red", 20, 20, 10)]),
              world.Scene(64, 64, (255, 255, 255), [world.Shape("square", "blue", 40, 40, 10)])]
    grids = np.array([(1, 4, 4), (1, 4, 4)])
    features = probe.Features("oracle", processor.tokenizer, embeddings)
    features.current = features.words_of(scenes, [(1, 4, 4), (1, 4, 4)])
    plain = np.array(features(None, None, grids))
    weights = np.array([1, 1, 1, 1, 0.25, 0.25, 0.25, 0.25], np.float32)
    features.current = (*features.current[:4], weights)
    assert plain[[0, 7]].any(axis=1).all()  # both centres carry words
    assert np.allclose(np.array(features(None, None, grids)), plain * weights[:, None])
