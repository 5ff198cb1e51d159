"""Which side keeps the default model from picking the asked shape (docs/default-model.md, "Which side fails to
bind"): a fresh decoder of the default architecture trained on "What color is the {shape}?" about the world's
pictures alone, with the vision tower's output replaced or altered by --features; then 150 held-out colour
questions answered greedily through `evaluate.ask`, split by how many shapes the picture holds. Exploratory:
one run is one noisy measurement.

    --question color           the question trained and asked: color (the default), any of the world's picture
                               questions (shape, count, left_right, describe), side
                               (a probe's own: "Is the {color} {shape} on the left or the right?" about a
                               unique shape in the left or right third: one lookup, where left_right needs two)
                               or left_right_of_two (the world's left/right about pictures of two shapes only)
                               or left_right_reasoned (the world's left/right answered after a thinking block
                               with each named shape's place across, 0 to --places - 1; trained and asked
                               thinking-on)
                               or left_right_stated (the world's left/right with both places stated before it
                               in words, "The {color} {shape} is at {place}.": the comparison alone)
                               or left_right_stated_kinds (left_right_stated with the shapes named by kind
                               alone, pairs of two kinds)
                               or compare_digits ("Is {a} left or right of {b}?" about two digits: the
                               comparison without the names)
                               or left_right_one_fact (one shape's place stated, compared with a digit:
                               "The {color} {shape} is at {p}. Is the {color} {shape} left or right of {q}?")
                               or left_right_one_of_two (the same with the other shape's place stated too)
                               or multi_image (the world's "Which picture has the {color} {shape}?", split
                               by the number of pictures)
                               or multi_image_lone (the same with every other picture blank: naming the
                               picture that holds a shape, with finding it left out)
                               or multi_image_distinct (one shape in each picture, the others sharing
                               neither colour nor kind with the asked one: a one-word lookup across pictures)
                               or multi_image_shared (one shape in each picture, each of the others sharing
                               the colour or the kind: only both words find it)
                               or multi_image_kind (multi_image_distinct asked by kind alone: "Which
                               picture has the circle?")
                               or multi_image_kind_digit (multi_image_kind answered by the digit alone,
                               "2.": the number as the first answer token)
                               or multi_image_color (the colour question across 2-4 pictures of one shape
                               each, the asked kind in one of them)
                               or multi_image_kind_by_colour (multi_image_kind_digit with each picture's
                               shape in its picture's colour, red first: the number carried by the colour)
                               or multi_image_color_number (multi_image_color answered by the colour's
                               number, 1 for red: "3." for blue)
                               or left_right_one_of_two_distinct (left_right_one_of_two about pairs that
                               share neither colour nor kind)
                               or left_right_one_of_two_kinds (left_right_one_of_two with shapes named by
                               kind alone, pairs of two kinds)
                               or left_right_one_of_two_kinds_either (the same, the named shape before or
                               after the digit: "Is 5 left or right of the square?" half the time)
                               or left_right_kinds (the world's left/right about two shapes named by kind
                               alone, "Is the circle left or right of the square?", each kind unique in the
                               picture)
                               or count_balanced (the recipe's counting rows, `count_example`: the world's
                               count question, each answer 0-4 equally often; as --also beside count)
    --features oracle          the word embeddings (the fresh decoder's first, kept fixed) of each shape-centre
                               token's colour and kind, summed; zeros elsewhere
               spread          oracle, with the colour word also on every other token the shape's disc reaches
               spread-all      the colour and kind words on every token the shape's disc reaches
               tower           the shipped model's tower, or --tower's (trained on at a tenth of the decoder's
                               learning rate)
               tower:S         the tower's output times S
               kind+tower:S    the tower's output times S, plus the kind word at shape centres
               colour+tower:S  the tower's output times S, plus the colour word at shape centres
               oracle+tower:S  the tower's output times S, plus both words at shape centres
               oracle+noise:S  oracle, plus fresh Gaussian noise of standard deviation S on every token
               means[:S]       the tower's own mean output at shape centres plus its kind's and colour's offsets
                               from it (over 400 world pictures; times S), on centre tokens, zeros elsewhere:
                               the oracle in the tower's directions
    --places N                 the places across a picture that the left_right_reasoned, _stated, _one_fact
                               and _one_of_two questions give (100: hundredths; 10: tenths)
    --position                 with means: also the tower's position directions at each shape centre, times
                               the centre's place in the picture (-1 to 1 across and down; fit_positions)
    --position-scale S         those position directions times S
    --only-centres             zeros on every token that holds no shape's centre
    --layers N                 a decoder of N layers instead of the default's 4 (every second one attention)
    --tower-lr-scale F         the tower's learning rate as a share of the decoder's (0: frozen)
    --aux-kind W               also train each shape-centre token's logits toward its kind's word, weight W
    --switch-at N --switch-to F  from step N on, the features F instead (a scaffold: bind on one, go on with another)
    --first QUESTION --switch-at N  train QUESTION before step N, --question from then on (a curriculum)
    --also QUESTION:SHARE      training rows also ask QUESTION (any --question choice), that share of them; the
                               held-out questions stay --question's (side:0.5 beside left_right: one lookup
                               of a place learned beside the question that needs two)
    --also-after-switch        the --also rows only from --switch-at on (with --first: the first question alone,
                               then the asked one beside --also's)
    --from-shipped             start from the shipped default model (its decoder, tower and tokenizer) instead of
                               a fresh decoder: what stages late in a recipe would meet
    --schedule-steps N         the learning rate's cosine ends at step N and stays at its final rate after it
                               (default: --steps), so a longer probe repeats a shorter one's steps exactly
    --also-from N              the --also rows only from step N on (a third stage: --first alone, the question
                               alone from --switch-at, then a mix from N, as the recipe's mix follows its stages)
    --lone-first               before --switch-at, each picture holds one large shape (world growth 0), as in
                               the recipe's first stage (the rows already pooled for batching finish as drawn)
    --sums-first ROWS          the world's sums alone before any picture, as the recipe's sum stage
    --vision-ids               the chat template's picture labels ("Picture 1: " before each picture, its
                               `add_vision_id`) in training rows and held-out prompts alike
    --picture-index S          each picture's digit ("1" for the first; its word embedding scaled to norm S)
                               added at its shape-centre tokens: the picture a token is in, given
    --distractor-ramp A:B      several-picture training rows with the other pictures' features (all but the
                               asked one) times a weight: 0 before step A (they read as blank: the lone form),
                               rising linearly to 1 at step B (the asked form); held-out questions always at 1
    --sum-share F              then each row a sum with probability F (a stage of sums and colour questions mixed);
                               with sums in the stream the held-out line also gives 64 held-out sums (teacher-forced)

    .venv/bin/python scripts/probe_binding.py --features oracle --steps 600
"""

import argparse
import itertools
import random
import re
import time
from collections import Counter
from functools import partial
from pathlib import Path

import mlx_qwen35.platform  # noqa: F401  (OpenBLAS before MLX runs anything)
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

import mlx_qwen35
from mlx_qwen35.generation.parsing import THINK_END
from mlx_qwen35.train import default_model as dm
from mlx_qwen35.train import evaluate, world
from mlx_qwen35.train import trainer as training
from mlx_qwen35.train.data import collate
from mlx_qwen35.train.vision_pretrain import (COLOR_IDS, KIND_IDS, beyond_class_means, centre_outputs, means_of,
                                              position_directions, token_labels)

HELD_OUT_SEED = 7_000_003  # the questions of docs/default-model.md's "Picking the shape" tables


def word_ids(tokenizer, names) -> np.ndarray:
    """Index 0 (no shape) then each name's one-token id as it follows a space ("What color is the circle?")."""
    return np.array([0] + [tokenizer.encode(" " + name, add_special_tokens=False)[0] for name in names])


WORD_MODES = ("oracle", "spread", "spread-all", "oracle+noise")
MEANS = "means"
TOWER_MODES = {"tower": (), "kind+tower": ("kind",), "colour+tower": ("colour",), "oracle+tower": ("kind", "colour")}


def parse_features(text: str) -> tuple[str, float | None]:
    """--features (or --switch-to) -> (mode, scale); ValueError naming what is wrong."""
    name, _, scale = text.partition(":")
    if name not in WORD_MODES + tuple(TOWER_MODES) + (MEANS,):
        raise ValueError(f"{text!r}: choose oracle, spread, spread-all, oracle+noise:S, tower[:S], kind+tower:S, "
                         "colour+tower:S, oracle+tower:S or means[:S]")
    if (scale and name in WORD_MODES[:3]) or (name == "oracle+noise" and not scale):
        raise ValueError(f"{text!r}: only oracle+noise (which needs it) and the tower modes take a scale")
    try:
        return name, float(scale) if scale else None
    except ValueError:
        raise ValueError(f"{text!r}: the scale after ':' must be a number") from None


class Features:
    """What the decoder reads at each merged image token, per --features, from the row's scenes."""

    def __init__(self, kind: str, tokenizer, embeddings, only_centres: bool = False, use_positions: bool = False,
                 position_scale: float = 1.0):
        # the words' embeddings as the fresh decoder starts: fixed keys, whatever training does to the table
        self.mode, self.table, self.only_centres = parse_features(kind), mx.array(embeddings.weight), only_centres
        self.use_positions, self.position_scale = use_positions, position_scale
        self.kind_words, self.colour_words = word_ids(tokenizer, world.SHAPES), word_ids(tokenizer, world.COLORS)
        self._current, self.cursor = None, 0
        self.means = None  # (mean, kind offsets by word id, colour offsets by word id): fit_means
        self.positions = None  # [2, hidden]: the tower's directions for a centre's place across and down
        self.picture_words = None  # --picture-index: each picture's digit ("1" for the first) at its centre tokens

    @property
    def current(self):
        """(kind word ids, colour word ids, places) of the images being encoded, -1: none; generation encodes
        one picture at a time, so each call takes the next picture's share (`cursor`)."""
        return self._current

    @current.setter
    def current(self, words):
        """`words` of one picture, or `words_of` several (which adds each token's picture)."""
        if len(words) == 3:
            words = (*words, np.ones(len(words[0]), int))
        if len(words) == 4:  # each token's weight (--distractor-ramp): 1 unless a training row says otherwise
            words = (*words, np.ones(len(words[0]), np.float32))
        self._current, self.cursor = words, 0

    def fit_means(self, tower, processor, pictures: int = 400, seed: int = 11):
        """`class_means` of the tower over `pictures` world pictures, as tables indexed by the word ids `words`
        gives; with positions, also their directions (`fit_positions`) from the same pictures' tokens."""
        centres = centre_outputs(tower, processor, pictures, seed)
        means = means_of(centres)
        tables = []
        for name, word_of in (("kind", self.kind_words), ("colour", self.colour_words)):
            table = np.zeros((self.table.shape[0], means["mean"].shape[0]), np.float32)
            table[word_of] = means[name]
            tables.append(mx.array(table))
        self.means = (mx.array(means["mean"]), *tables)
        if self.use_positions:
            self.positions = mx.array(fit_positions(centres, means))

    def words_of(self, scenes, grids) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`words` of several pictures, their tokens one after another as the tower returns them, and each
        token's picture (1 for the first)."""
        parts = [self.words(scene, tuple(int(v) for v in grid)) for scene, grid in zip(scenes, grids)]
        pictures = [np.full(len(part[0]), n) for n, part in enumerate(parts, 1)]
        return (*(np.concatenate([part[j] for part in parts]) for j in range(3)), np.concatenate(pictures))

    def words(self, scene, grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(kind word ids, colour word ids, centre places [tokens, 2]) of one picture's tokens (-1: none)."""
        labels = token_labels([scene], grid)
        centre = labels["kind"] > 0
        kinds = np.where(centre, self.kind_words[np.maximum(labels["kind"], 0)], -1)
        colours = np.where(centre, self.colour_words[np.maximum(labels["colour"], 0)], -1)
        if self.mode[0] in ("spread", "spread-all"):
            rows, cols = grid[1] // 2, grid[2] // 2
            height, width = scene.height / rows, scene.width / cols
            for i in np.flatnonzero(~centre):
                r, c = divmod(int(i), cols)
                for shape in scene.shapes:
                    dx = max(c * width - shape.cx, 0, shape.cx - (c + 1) * width)
                    dy = max(r * height - shape.cy, 0, shape.cy - (r + 1) * height)
                    if dx * dx + dy * dy < shape.r * shape.r:
                        colours[i] = self.colour_words[COLOR_IDS[shape.color]]
                        if self.mode[0] == "spread-all":
                            kinds[i] = self.kind_words[KIND_IDS[shape.kind]]
        return kinds, colours, labels["centre"]

    def embed(self, ids: np.ndarray) -> mx.array:
        return self.table[mx.array(np.maximum(ids, 0))] * present(ids)

    def __call__(self, tower, pixels, grid):
        tokens = int(np.asarray(grid).reshape(-1, 3).prod(axis=1).sum()) // 4
        if self.cursor + tokens > len(self._current[0]):
            self.cursor = 0
        kinds, colours, places, pictures, weights = (part[self.cursor:self.cursor + tokens] for part in self._current)
        self.cursor += tokens
        words = {"kind": self.embed(kinds), "colour": self.embed(colours)}
        name, scale = self.mode
        if name == MEANS:
            mean, kind_offsets, colour_offsets = self.means
            out = (mean + kind_offsets[mx.array(np.maximum(kinds, 0))] + colour_offsets[
                mx.array(np.maximum(colours, 0))]) * present(kinds) * (1.0 if scale is None else scale)
            if self.use_positions:
                out = out + self.position_scale * (mx.array(places) @ self.positions) * present(kinds)
        elif name in TOWER_MODES:
            out = tower(pixels, grid) * (1.0 if scale is None else scale)
            for word in TOWER_MODES[name]:
                out = out + words[word]
        else:
            out = words["kind"] + words["colour"]
            if name == "oracle+noise":  # fresh each call: nothing in it to learn
                out = out + scale * mx.random.normal(out.shape)
        if self.picture_words is not None:
            out = out + self.picture_words[mx.array(pictures)] * present(kinds)
        out = out * mx.array(weights)[:, None]
        return out * present(kinds) if self.only_centres else out


def fit_positions(centres: dict, means: dict) -> np.ndarray:
    """`vision_pretrain.position_directions`, printing the share of the centre tokens' remainder beyond their
    class means that they explain."""
    directions = position_directions(centres, means)
    rest = beyond_class_means(centres, means)
    explained = 1 - ((rest - centres["centre"] @ directions) ** 2).sum() / (rest ** 2).sum()
    print(f"# position directions: {explained:.1%} of the centre tokens' remainder (beyond class means); norms "
          f"{np.linalg.norm(directions.astype(np.float64), axis=1).round(2).tolist()} against kind offsets' "
          f"{np.linalg.norm(means['kind'][1:], axis=1).round(2).tolist()}", flush=True)
    return directions


ask_side = dm.ask_side  # the recipe's curriculum question ("side" in --binding-questions)


def ask_left_right_of_two(rng, scene):
    """The world's left/right, asked only about pictures of two shapes: one lookup and the other's place."""
    return world.ask_left_right(rng, scene) if len(scene.shapes) == 2 else None


PLACES = [100]  # --places: how many places across a picture the probe's stated and reasoned places tell apart


def places_across(scene, *shapes) -> list[int]:
    """Each shape's place across the picture, 0 to PLACES - 1 (its centre's share of the width)."""
    return [min(PLACES[0] - 1, int(PLACES[0] * s.cx / scene.width)) for s in shapes]


def placed_pair(rng, scene):
    """`world.left_right_pair` and the two shapes' places (`places_across`), or None where there is no pair or
    both share a place (stated places would not decide the answer)."""
    pair = world.left_right_pair(rng, scene)
    if pair is None or len(set(places := places_across(scene, *pair))) == 1:
        return None
    return pair, places


def ask_left_right_reasoned(rng, scene):
    """The world's left/right question, answered after a thinking block that gives each named shape's place across
    the picture (0 to PLACES - 1): two one-place lookups, then comparing two numbers, where the bare answer needs
    both at once. Pairs whose places are equal are not asked (`placed_pair`)."""
    if (placed := placed_pair(rng, scene)) is None:
        return None
    (a, b), places = placed
    answer = "Left." if world.horizontal_order(a, b) == "left" else "Right."
    return (f"Is the {a.name} left or right of the {b.name}?",
            f"<think>\nThe {a.name} is at {places[0]}. The {b.name} is at {places[1]}.\n</think>\n\n{answer}")


def ask_left_right_stated(rng, scene):
    """The world's left/right question with both places stated before it in words (as left_right_reasoned's
    thinking gives them): the comparison and which named shape is which, with no place to read from the picture."""
    if (placed := placed_pair(rng, scene)) is None:
        return None
    return both_stated(rng, *placed, lambda shape: shape.name)


def ask_left_right_stated_kinds(rng, scene):
    """left_right_stated with each shape named by its kind alone ("The circle is at 1. The square is at 8. Is the
    circle left or right of the square?"), pairs of two kinds only: two one-word bindings, then the comparison."""
    if (placed := placed_pair(rng, scene)) is None or placed[0][0].kind == placed[0][1].kind:
        return None
    return both_stated(rng, *placed, lambda shape: shape.kind)


def both_stated(rng, pair, places, name):
    """Both places stated ("The {name} is at {place}.", in either order), then the world's question about the
    pair by those names."""
    a, b = pair
    told = [f"The {name(a)} is at {places[0]}.", f"The {name(b)} is at {places[1]}."]
    rng.shuffle(told)
    return (f"{' '.join(told)} Is the {name(a)} left or right of the {name(b)}?",
            "Left." if world.horizontal_order(a, b) == "left" else "Right.")


def ask_left_right_one_fact(rng, scene):
    """Between compare_digits and left_right_stated: one shape's place stated, compared with a bare digit ("The
    {color} {shape} is at {p}. Is the {color} {shape} left or right of {q}?"): one binding to read back."""
    pair = world.left_right_pair(rng, scene)
    if pair is None:
        return None
    shape = pair[0]
    [place] = places_across(scene, shape)
    other = rng.choice([q for q in range(PLACES[0]) if q != place])
    return (f"The {shape.name} is at {place}. Is the {shape.name} left or right of {other}?",
            "Left." if place < other else "Right.")


def ask_left_right_one_of_two(rng, scene):
    """left_right_one_fact with the other shape's place stated too, in either order: the asked shape's place must
    be found among two before the comparison with the digit."""
    if (placed := placed_pair(rng, scene)) is None:
        return None
    return one_of_two(rng, *placed, lambda shape: shape.name)


def ask_left_right_one_of_two_kinds(rng, scene):
    """left_right_one_of_two with each shape named by its kind alone ("The circle is at 3. The square is at 8. Is
    the circle left or right of 5?"), pairs of two kinds only: a one-word name, as in the colour form that binds."""
    if (placed := placed_pair(rng, scene)) is None or placed[0][0].kind == placed[0][1].kind:
        return None
    return one_of_two(rng, *placed, lambda shape: shape.kind)


def ask_left_right_one_of_two_kinds_either(rng, scene):
    """left_right_one_of_two_kinds with the named shape on either side of the question, half the time after the
    digit ("Is 5 left or right of the square?"): the lookup that left_right_stated_kinds needs in each of its two
    places, one at a time."""
    if (placed := placed_pair(rng, scene)) is None or placed[0][0].kind == placed[0][1].kind:
        return None
    return one_of_two(rng, *placed, lambda shape: shape.kind, either_side=True)


def ask_left_right_one_of_two_distinct(rng, scene):
    """left_right_one_of_two about pairs that share neither colour nor kind: either word of the two-word name
    alone finds the asked fact."""
    if (placed := placed_pair(rng, scene)) is None or {placed[0][0].kind, placed[0][0].color} & {
            placed[0][1].kind, placed[0][1].color}:
        return None
    return one_of_two(rng, *placed, lambda shape: shape.name)


def one_of_two(rng, pair, places, name, either_side: bool = False):
    """Both places stated ("The {name} is at {place}.", in either order), the first shape asked against a digit;
    `either_side`: half the time the digit asked against the shape ("Is 5 left or right of the square?")."""
    told = [f"The {name(shape)} is at {place}." for shape, place in zip(pair, places)]
    rng.shuffle(told)
    other = rng.choice([q for q in range(PLACES[0]) if q != places[0]])
    left = places[0] < other
    if either_side and rng.random() >= 0.5:
        return f"{' '.join(told)} Is {other} left or right of the {name(pair[0])}?", "Right." if left else "Left."
    return f"{' '.join(told)} Is the {name(pair[0])} left or right of {other}?", "Left." if left else "Right."


def ask_left_right_kinds(rng, scene):
    """The world's left/right with each shape named by its kind alone ("Is the circle left or right of the
    square?"), about two shapes whose kinds are each unique in the picture: the one-word name that the stated
    form binds with, places read from the picture."""
    if (pair := world.left_right_pair(rng, scene, name_by=("kind",))) is None:
        return None
    a, b = pair
    return (f"Is the {a.kind} left or right of the {b.kind}?",
            "Left." if world.horizontal_order(a, b) == "left" else "Right.")


def ask_compare_digits(rng, scene):
    """left_right_stated's comparison alone: "Is {a} left or right of {b}?" about two different digits, "Left."
    when a is the smaller (the picture is there but says nothing)."""
    a, b = rng.sample(range(10), 2)
    return f"Is {a} left or right of {b}?", "Left." if a < b else "Right."


def ask_multi_image(rng, scene):
    """A marker, not a scene question: `draw_example` draws the world's several-picture question instead."""
    raise NotImplementedError


def ask_multi_image_lone(rng, scene):
    """A marker: `draw_example` draws `multi_image_lone_example` (the several-picture question, the other
    pictures blank)."""
    raise NotImplementedError


def multi_image_lone_example(rng) -> dict:
    """The world's several-picture question where only the asked picture holds shapes (1-3, the asked one among
    them) and the others are blank: finding the picture is a lookup of any shape, so what is left to learn is
    naming the picture the shape is in."""
    example = world.multi_image_example(rng)
    target = int(example["messages"][-1]["content"].split()[-1].rstrip(".")) - 1
    scenes = [scene if i == target else world.Scene(scene.width, scene.height, scene.background, [])
              for i, scene in enumerate(example["scenes"])]
    images = iter(scenes)
    for part in example["messages"][0]["content"]:
        if part.get("type") == "image":
            part["image"] = world.draw(next(images))
    example["scenes"] = scenes
    return example


def ask_multi_image_distinct(rng, scene):
    """A marker: `draw_example` draws `multi_image_one_each(rng, shared=False)`."""
    raise NotImplementedError


def ask_multi_image_shared(rng, scene):
    """A marker: `draw_example` draws `multi_image_one_each(rng, shared=True)`."""
    raise NotImplementedError


def ask_multi_image_color(rng, scene):
    """A marker: `draw_example` draws `multi_image_color_example`."""
    raise NotImplementedError


def multi_image_color_example(rng) -> dict:
    """The world's colour question across 2-4 pictures of one shape each, the asked kind in one picture only:
    the single picture's lookup (by kind, reading the colour) with the candidates spread over pictures."""
    count = rng.randint(2, 4)
    kind = rng.choice(world.SHAPES)
    target = rng.randrange(count)
    pairs = [(kind if i == target else rng.choice([k for k in world.SHAPES if k != kind]),
              rng.choice(list(world.COLORS))) for i in range(count)]
    return one_shape_pictures(rng, pairs, f"What color is the {kind}?", f"{pairs[target][1]}.")


def ask_multi_image_color_number(rng, scene):
    """A marker: `draw_example` draws `multi_image_color_number_example`."""
    raise NotImplementedError


def multi_image_color_number_example(rng) -> dict:
    """multi_image_color's pictures and question with the colour answered by its number in world.COLORS, 1 for
    red ("What color is the circle?" -> "3."): the same lookup, a digit to write."""
    example = multi_image_color_example(rng)
    answer = example["messages"][-1]
    answer["content"] = f"{list(world.COLORS).index(answer['content'].removesuffix('.')) + 1}."
    return example


def ask_multi_image_kind(rng, scene):
    """A marker: `draw_example` draws `multi_image_kind_example`."""
    raise NotImplementedError


def multi_image_kind_example(rng) -> dict:
    """multi_image_distinct's pictures asked about by kind alone ("Which picture has the circle?"): a one-word name,
    the asked kind in one picture only."""
    example = multi_image_one_each(rng, shared=False)
    question = example["messages"][0]["content"][-1]
    question["text"] = re.sub(r"the \w+ (\w+)\?$", r"the \1?", question["text"])
    return example


def ask_multi_image_kind_digit(rng, scene):
    """A marker: `draw_example` draws `multi_image_kind_digit_example`."""
    raise NotImplementedError


def multi_image_kind_digit_example(rng) -> dict:
    """multi_image_kind's question answered by the picture's digit alone ("2." for "Picture 2."): the number
    written at the first answer token, where colour's word is, instead of two tokens in."""
    example = multi_image_kind_example(rng)
    answer = example["messages"][-1]
    answer["content"] = answer["content"].removeprefix("Picture ")
    return example


def ask_multi_image_kind_by_colour(rng, scene):
    """A marker: `draw_example` draws `multi_image_kind_by_colour_example`."""
    raise NotImplementedError


def multi_image_kind_by_colour_example(rng) -> dict:
    """multi_image_kind_digit's question ("Which picture has the circle?" -> "2.") with each picture's shape in
    its picture's own colour (the first red, then green, blue, yellow): the number to write is then carried by
    the found shape's colour, which multi_image_color shows the decoder copies across pictures."""
    count = rng.randint(2, 4)
    kind = rng.choice(world.SHAPES)
    target = rng.randrange(count)
    colours = list(world.COLORS)[:4]
    pairs = [(kind if i == target else rng.choice([k for k in world.SHAPES if k != kind]), colours[i])
             for i in range(count)]
    return one_shape_pictures(rng, pairs, f"Which picture has the {kind}?", f"{target + 1}.")


def ask_multi_image_by_label(rng, scene):
    """A marker: `draw_example` draws `multi_image_by_label_example`."""
    raise NotImplementedError


def multi_image_by_label_example(rng) -> dict:
    """The several-picture lookup the other way round: 2-4 pictures of one shape each, in colours of their own,
    asked about by number ("What color is the shape in picture 2?" -> "green."). With --vision-ids the number is
    in the picture's label only, so this asks whether the decoder can find a picture by its label at all, where
    the world's question asks it to write the label of a picture it found."""
    count = rng.randint(2, 4)
    colours = rng.sample(list(world.COLORS), count)
    pairs = [(rng.choice(world.SHAPES), colour) for colour in colours]
    target = rng.randrange(count)
    return one_shape_pictures(rng, pairs, f"What color is the shape in picture {target + 1}?", f"{colours[target]}.")


def multi_image_one_each(rng, shared: bool) -> dict:
    """The world's several-picture question with one shape in each picture. The other pictures' shapes share
    neither colour nor kind with the asked one (shared=False: either word alone finds it), or each exactly one of
    the two (shared=True: only both words together find it)."""
    count = rng.randint(2, 4)
    kind, color = rng.choice(world.SHAPES), rng.choice(list(world.COLORS))
    target = rng.randrange(count)
    pairs = []
    for i in range(count):
        other_kind = rng.choice([k for k in world.SHAPES if k != kind])
        other_color = rng.choice([c for c in world.COLORS if c != color])
        if i == target:
            pairs.append((kind, color))
        elif shared:
            pairs.append(rng.choice([(kind, other_color), (other_kind, color)]))
        else:
            pairs.append((other_kind, other_color))
    return one_shape_pictures(rng, pairs, f"Which picture has the {color} {kind}?", f"Picture {target + 1}.")


def one_shape_pictures(rng, pairs, question: str, answer: str) -> dict:
    """A conversation of one picture per (kind, color) pair, each holding only that shape, then `question`."""
    scenes = [world.random_scene(rng, count=1, fixed=[pair]) for pair in pairs]
    parts = [{"type": "image", "image": world.draw(s)} for s in scenes]
    example = world._chat(world._user(parts, question), answer)
    example["scenes"] = scenes
    return example


def ask_count_balanced(rng, scene):
    """A marker: `draw_example` draws the recipe's counting rows (`count_example`: each count 0-4 equally often)."""
    raise NotImplementedError


QUESTIONS = dict(world.SCENE_QUESTIONS, side=ask_side, left_right_of_two=ask_left_right_of_two,
                 left_right_reasoned=ask_left_right_reasoned, left_right_stated=ask_left_right_stated,
                 left_right_stated_kinds=ask_left_right_stated_kinds,
                 compare_digits=ask_compare_digits, left_right_one_fact=ask_left_right_one_fact,
                 left_right_one_of_two=ask_left_right_one_of_two,
                 left_right_one_of_two_kinds=ask_left_right_one_of_two_kinds,
                 left_right_one_of_two_distinct=ask_left_right_one_of_two_distinct,
                 left_right_one_of_two_kinds_either=ask_left_right_one_of_two_kinds_either,
                 left_right_kinds=ask_left_right_kinds,
                 multi_image=ask_multi_image, multi_image_lone=ask_multi_image_lone,
                 multi_image_distinct=ask_multi_image_distinct, multi_image_shared=ask_multi_image_shared,
                 multi_image_color=ask_multi_image_color, multi_image_kind=ask_multi_image_kind,
                 multi_image_kind_digit=ask_multi_image_kind_digit,
                 multi_image_kind_by_colour=ask_multi_image_kind_by_colour,
                 multi_image_color_number=ask_multi_image_color_number,
                 multi_image_by_label=ask_multi_image_by_label, count_balanced=ask_count_balanced)
REASONED = ("left_right_reasoned",)  # their answers open with a thinking block: trained and asked thinking-on
# Several-picture questions whose answer names the asked picture by its number ("Picture 2." or "2.")
PICTURE_ANSWERS = ("multi_image", "multi_image_distinct", "multi_image_shared", "multi_image_kind",
                   "multi_image_kind_digit", "multi_image_kind_by_colour")


# The marker questions' own example makers: their rows are not one scene's question.
OWN_EXAMPLES = {ask_multi_image: world.multi_image_example, ask_multi_image_lone: multi_image_lone_example,
                ask_multi_image_distinct: partial(multi_image_one_each, shared=False),
                ask_multi_image_shared: partial(multi_image_one_each, shared=True),
                ask_multi_image_kind: multi_image_kind_example, ask_multi_image_color: multi_image_color_example,
                ask_multi_image_kind_digit: multi_image_kind_digit_example,
                ask_multi_image_kind_by_colour: multi_image_kind_by_colour_example,
                ask_multi_image_color_number: multi_image_color_number_example,
                ask_multi_image_by_label: multi_image_by_label_example,
                ask_count_balanced: dm.count_example}


def half_decides(example) -> bool | None:
    """For a left/right question about one picture ("Is the {a} left or right of the {b}?", a named by colour and
    kind or by kind alone): whether the half of the picture that a's centre is in gives the right answer (left half:
    "Left."), the one-lookup reading that is right about 90 % of the time over the world's questions; else None."""
    question = evaluate._prompt(example)[-1]["content"]
    question = question[-1]["text"] if isinstance(question, list) else question
    named = re.search(r"Is the ([a-z ]+) left or right of the [a-z ]+\?$", question)
    if named is None or len(example.get("scenes", [])) != 1:
        return None
    scene = example["scenes"][0]
    shapes = [s for s in scene.shapes if s.name == named.group(1)] or [
        s for s in scene.shapes if s.kind == named.group(1)]
    if len(shapes) != 1:
        return None  # a stated form's kind that the picture holds twice: its place is the stated one's
    [shape] = shapes
    return (shape.cx < scene.width / 2) == (evaluate._answer(example).strip() == "Left.")


def draw_example(rng, ask, growth: float = 1.0) -> dict:
    """One training or held-out example of question `ask` (growth as in `world.image_example`; the several-picture
    questions draw their own pictures, `OWN_EXAMPLES`)."""
    if ask in OWN_EXAMPLES:
        return OWN_EXAMPLES[ask](rng)
    return world.image_example(rng, ask, growth=growth)


def label_pictures(processor):
    """The chat template's picture labels ("Picture 1: " before each picture, `add_vision_id`) in the prompts
    generation renders (the processor's `apply_chat_template`); training rows take `encode_example`'s
    `add_vision_id`."""
    processor.apply_chat_template = partial(processor.apply_chat_template, add_vision_id=True)


def picture_weights(rows, weight: float) -> np.ndarray:
    """Each token's feature weight over `rows` (their `words`, one after another): `weight` on the tokens of every
    picture but the one a row's answer names (`asked_picture`, --distractor-ramp's rows), 1 everywhere else."""
    return np.concatenate([np.where(row.words[3] == row.asked_picture, 1.0, weight)
                           if getattr(row, "asked_picture", None) else np.ones(len(row.words[0]))
                           for row in rows]).astype(np.float32)


def ramp_weight(step: int, first: int, last: int) -> float:
    """--distractor-ramp first:last's weight at `step`: 0 up to `first`, rising linearly to 1 at `last`."""
    return min(1.0, max(0.0, (step - first) / (last - first)))


def present(ids: np.ndarray) -> mx.array:
    """[tokens, 1]: 1 where a word id is given, 0 where it is -1."""
    return mx.array((ids >= 0)[:, None].astype(np.float32))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", default="oracle")
    parser.add_argument("--from-shipped", action="store_true")
    parser.add_argument("--tower", type=Path, help="a vision tower's weights (safetensors) instead of the shipped one's")
    parser.add_argument("--tower-lr-scale", type=float, default=dm.VISION_LR_SCALE,
                        help="the tower's learning rate as a share of the decoder's; 0 freezes it")
    parser.add_argument("--question", choices=sorted(QUESTIONS), default="color")
    parser.add_argument("--places", type=int, default=PLACES[0])
    parser.add_argument("--position", action="store_true")
    parser.add_argument("--position-scale", type=float, default=1.0)
    parser.add_argument("--layers", type=int, default=dm.TEXT_CONFIG["num_hidden_layers"])
    parser.add_argument("--only-centres", action="store_true")
    parser.add_argument("--aux-kind", type=float, default=0.0)
    parser.add_argument("--switch-at", type=int, default=0)
    parser.add_argument("--switch-to", default=None)
    parser.add_argument("--first", choices=sorted(QUESTIONS), help="the question trained before --switch-at")
    parser.add_argument("--also", help="QUESTION:SHARE, a second question for that share of the training rows")
    parser.add_argument("--also-after-switch", action="store_true")
    parser.add_argument("--also-from", type=int, default=0)
    parser.add_argument("--lone-first", action="store_true")
    parser.add_argument("--sums-first", type=int, default=0)
    parser.add_argument("--sum-share", type=float, default=0.0)
    parser.add_argument("--vision-ids", action="store_true")
    parser.add_argument("--picture-index", type=float, default=0.0)
    parser.add_argument("--distractor-ramp", help="A:B, steps")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--schedule-steps", type=int)
    parser.add_argument("--tokens-per-batch", type=int, default=1024)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--held-out", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    modes = []
    for flag, text in (("--features", args.features), ("--switch-to", args.switch_to)):
        try:
            modes.append(parse_features(text)[0] if text else None)
        except ValueError as error:
            parser.error(f"{flag} {error}")
    if bool(args.switch_to or args.first) != bool(args.switch_at):
        parser.error("--switch-at goes with --switch-to or --first")
    if args.also_after_switch and not (args.also and args.first):
        parser.error("--also-after-switch goes with --also and --first (the --also rows join after the switch)")
    if args.also_from and not (args.also and 0 < args.also_from <= args.steps):
        parser.error(f"--also-from {args.also_from}: a step within --steps, with --also (the rows that join there)")
    if args.also_from and args.also_after_switch:
        parser.error("--also-from and --also-after-switch both say where the --also rows join: give one")
    if args.schedule_steps is not None and not 30 < args.schedule_steps <= args.steps:
        parser.error(f"--schedule-steps {args.schedule_steps}: past the 30 warm-up steps, at most --steps")
    ramp = None
    if args.distractor_ramp:
        bounds = args.distractor_ramp.split(":")
        if len(bounds) != 2 or not all(b.isdigit() for b in bounds) or int(bounds[0]) >= int(bounds[1]):
            parser.error(f"--distractor-ramp {args.distractor_ramp}: A:B, two steps with 0 <= A < B")
        if args.question not in PICTURE_ANSWERS:
            parser.error(f"--distractor-ramp: a question answered by a picture's number, one of {PICTURE_ANSWERS}")
        ramp = (int(bounds[0]), int(bounds[1]))
    if args.lone_first and not args.switch_at:
        parser.error("--lone-first needs --switch-at (where the world's pictures begin)")
    if args.sums_first < 0:
        parser.error(f"--sums-first {args.sums_first}: a number of rows, 0 or more")
    if not 0 <= args.sum_share < 1:
        parser.error(f"--sum-share {args.sum_share}: a share from 0 up to (not including) 1")
    if args.position and MEANS not in modes:
        parser.error("--position adds to means: give --features means (or --switch-to means)")
    if not 2 <= args.places <= 100:
        parser.error(f"--places {args.places}: from 2 to 100 places across a picture")
    PLACES[0] = args.places
    if args.layers < 1:
        parser.error(f"--layers {args.layers}: at least one layer")
    also, also_share = None, 0.0
    if args.also:
        name, _, share = args.also.partition(":")
        try:
            also, also_share = QUESTIONS[name], float(share)
        except (KeyError, ValueError):
            parser.error(f"--also {args.also}: QUESTION:SHARE, QUESTION one of {sorted(QUESTIONS)}, SHARE a number")
        if not 0 < also_share < 1 or name in REASONED:
            parser.error(f"--also {args.also}: a share between 0 and 1, of a question answered without thinking")
    if args.from_shipped and (args.tower or args.layers != dm.TEXT_CONFIG["num_hidden_layers"]):
        parser.error("--from-shipped: the shipped model as it is, not with --tower or --layers")
    if args.tower and not args.tower.is_file():
        parser.error(f"--tower {args.tower}: no such file")

    skeleton = Path("/tmp/probe-binding-skeleton")
    dm.TEXT_CONFIG["num_hidden_layers"] = args.layers
    if args.from_shipped:
        model, processor = mlx_qwen35.load()
        processor = dm.training_processor(processor.tokenizer)
    else:
        _, processor = dm.write_skeleton(skeleton, seed=args.seed)
        model = dm.build_model(skeleton, seed=args.seed)
        if args.tower:
            model.model.visual.load_weights(str(args.tower))
        elif any(mode in TOWER_MODES or mode == MEANS for mode in modes):
            shipped, _ = mlx_qwen35.load()
            model.model.visual.load_weights(list(tree_flatten(shipped.model.visual.parameters())))
            del shipped
    if args.vision_ids:
        label_pictures(processor)
    features = Features(args.features, processor.tokenizer, model.model.language_model.embed_tokens,
                        args.only_centres, use_positions=args.position, position_scale=args.position_scale)
    if args.picture_index:
        digits = word_ids(processor.tokenizer, []).tolist() + [
            processor.tokenizer.encode(str(n), add_special_tokens=False)[0] for n in range(1, 5)]
        words = features.table[mx.array(digits)]
        features.picture_words = args.picture_index * words / mx.linalg.norm(words[1:], axis=-1).mean()
        print(f"# picture digits at centre tokens, norm {args.picture_index}", flush=True)
    question = QUESTIONS[args.question]
    tower = model.model.visual.__call__
    if MEANS in modes:
        features.fit_means(tower, processor)
        mean, kind_offsets, colour_offsets = features.means
        print(f"# class means: the mean's norm {float(mx.linalg.norm(mean)):.2f}, kind offsets' "
              f"{float(mx.linalg.norm(kind_offsets, axis=-1).max()):.2f}, colour offsets' "
              f"{float(mx.linalg.norm(colour_offsets, axis=-1).max()):.2f} (largest)", flush=True)
    visual_class = type(model.model.visual)
    model.model.visual.__class__ = type(visual_class.__name__, (visual_class,),
                                        {"__call__": lambda self, pixels, grid: features(tower, pixels, grid)})
    image_token = model.config.image_token_id

    lone = [args.lone_first]
    distractor_weight = [1.0]
    first = [QUESTIONS[args.first] if args.first else None]
    mixing = [not args.also_from]

    def rows():
        rng, thinking_rng = random.Random(args.seed + 123), random.Random(args.seed + 124)
        no_words = (np.zeros(0, int), np.zeros(0, int), np.zeros((0, 2), np.float32), np.zeros(0, int))
        for drawn in itertools.count():
            if drawn < args.sums_first or (args.sum_share and rng.random() < args.sum_share):
                row = dm.encode_example(world.sum_example(rng), processor, thinking_rng)
                row.words = no_words
            else:
                beside = also and mixing[0] and not (args.also_after_switch and first[0] is not None)
                asked = also if beside and rng.random() < also_share else (first[0] or question)
                example = draw_example(rng, asked, growth=0.0 if lone[0] else 1.0)
                if asked is question and args.question in REASONED:
                    example["thinking"] = True
                row = dm.encode_example(example, processor, thinking_rng, add_vision_id=args.vision_ids)
                row.words = features.words_of(example["scenes"], row.image_grid_thw)
                if ramp and asked is question:  # the picture its answer names, kept at full weight
                    row.asked_picture = int(re.search(r"(\d+)\.$", evaluate._answer(example)).group(1))
            yield row

    def with_aux(batch_rows):
        batch = collate(batch_rows, pad_id=0)
        targets = np.zeros(batch["input_ids"].shape, np.int32)
        weight = np.zeros(batch["input_ids"].shape, np.float32)
        for i, row in enumerate(batch_rows):
            at = np.flatnonzero(row.input_ids == image_token)
            kinds = row.words[0]
            targets[i, at[kinds >= 0]], weight[i, at[kinds >= 0]] = kinds[kinds >= 0], args.aux_kind
        batch["aux_targets"], batch["aux_weight"] = mx.array(targets), mx.array(weight)
        features.current = (*(np.concatenate([row.words[j] for row in batch_rows]) for j in range(4)),
                            picture_weights(batch_rows, distractor_weight[0]))
        return batch

    next_token_losses = training.token_losses

    def token_losses(model, batch, prompt_weight=0.0):
        total, count, hidden = next_token_losses(model, batch, prompt_weight)
        if args.aux_kind:
            total = total + training.weighted_cross_entropy(model.logits, hidden, batch["aux_targets"],
                                                            batch["aux_weight"])
            count = count + batch["aux_weight"].sum()
        return total, count, hidden

    training.token_losses = token_losses

    sum_rng = random.Random(HELD_OUT_SEED + 1)
    held_out_sums = [dm.encode_example(world.sum_example(sum_rng, thinking=False), processor, sum_rng)
                     for _ in range(64)]

    several = question in OWN_EXAMPLES and question is not ask_count_balanced  # held-out answers split by pictures

    def held_out_accuracy(step):
        model.eval()
        rng, right, asked = random.Random(HELD_OUT_SEED), Counter(), Counter()
        right_by_answer, asked_by_answer = Counter(), Counter()
        right_by_half, asked_by_half = Counter(), Counter()
        for _ in range(args.held_out):
            example = draw_example(rng, question)
            answer = evaluate._answer(example).split(THINK_END)[-1].strip()
            case = evaluate.Case(evaluate._prompt(example), answer,
                                 thinking=args.question in REASONED)
            scenes = example["scenes"]
            grids = [grid for _, grid in processor.prepare(images=[world.draw(s) for s in scenes])["image"]]
            features.current = features.words_of(scenes, grids)
            got, raw = evaluate.ask(model, processor, case)
            if case.thinking and not asked["all"]:
                print(f"  first held-out: {evaluate._answer(example)!r} -> {raw!r}", flush=True)
            for key in (len(scenes) if several else len(scenes[0].shapes), "all"):
                right[key] += got == case.expected
                asked[key] += 1
            right_by_answer[case.expected] += got == case.expected
            asked_by_answer[case.expected] += 1
            if (half := half_decides(example)) is not None:
                right_by_half[half] += got == case.expected
                asked_by_half[half] += 1
        sums = ""
        if args.sums_first or args.sum_share:
            sums = f"  sums {dm.answer_accuracy(dm.teacher_forced(model), held_out_sums):.0%}"
        split = "pictures" if several else "shapes in the picture"
        print(f"step {step}  held-out {args.question} right by {split}: "
              + "  ".join(f"{k}: {right[k]}/{asked[k]}" for k in (1, 2, 3, 4, "all")) + sums, flush=True)
        if len(asked_by_answer) <= 6:
            print("  by the right answer: " + "  ".join(f"{k!r} {right_by_answer[k]}/{asked_by_answer[k]}"
                                                       for k in sorted(asked_by_answer)), flush=True)
        if asked_by_half:
            print("  where the first-named shape's half of the picture gives the answer: "
                  + "  ".join(f"{'yes' if k else 'no'} {right_by_half[k]}/{asked_by_half[k]}"
                              for k in (True, False)), flush=True)
        model.train()

    trainer = training.Trainer(model, None, training.TrainConfig(
        steps=args.steps, learning_rate=args.learning_rate, moe_aux_weight=0.01, mtp_weight=0.3, progress=False,
        grad_clip=1.0, weight_decay=0.01, experts="segmented"))

    def schedule(peak):
        return training.warmup_cosine(peak, 30, args.schedule_steps or args.steps, start=peak * 0.01, final=peak * 0.1)

    if args.tower_lr_scale == 0:
        model.model.visual.freeze()
        trainer.optimizer = optim.AdamW(learning_rate=schedule(args.learning_rate), betas=dm.ADAM_BETAS,
                                        weight_decay=0.01)
    else:
        trainer.optimizer = dm.tower_and_decoder_optimizer(schedule, args.learning_rate, args.tower_lr_scale)
    batches = dm.length_batches(rows(), args.tokens_per_batch, seed=args.seed)
    start, seen = time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        batch_rows = next(batches)
        seen += len(batch_rows)
        if args.first and step == args.switch_at:
            first[0] = None
            print(f"step {step}  training rows now ask {args.question}", flush=True)
        if args.switch_to and step == args.switch_at:
            features.mode = parse_features(args.switch_to)
            lone[0] = False
            print(f"step {step}  features now {args.switch_to}", flush=True)
        if args.also_from and step == args.also_from:
            mixing[0] = True
            print(f"step {step}  training rows now also ask {args.also}", flush=True)
        if ramp:
            distractor_weight[0] = ramp_weight(step, *ramp)
        record = trainer.train_step(with_aux(batch_rows))
        if step % args.every == 0 or step == args.steps:
            print(f"step {step}  rows {seen}  loss {record['loss']:.3f}  {time.perf_counter() - start:.0f} s"
                  + (f"  other pictures at {distractor_weight[0]:.2f}" if ramp else ""), flush=True)
            held_out_accuracy(step)


if __name__ == "__main__":
    main()
