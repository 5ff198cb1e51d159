"""Pretraining the default model's vision tower on the synthetic world's labels, before the decoder sees a picture.

A randomly initialised tower trained only through the decoder's answers learns shapes too slowly for the
default model's budget (docs/default-model.md); real vision-language models start from a pretrained encoder,
and this is ours. A linear head on the merged tokens (exactly what the decoder reads) predicts from each token
the colour and kind of the shape whose centre falls in it, and where that centre is, in pictures and in video
frames. Linear, so that what the tower learns is linearly readable by the decoder; the head is then dropped.
(Heads for a picture's counts and a video's direction, predicted from every token, learned nothing in 1,200
steps: a 2-block tower does not gather that far, and the decoder's layers can.)"""

import random
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from . import parallel, world
from .data import prefetched
from .trainer import warmup_cosine

COLOR_IDS = {name: i + 1 for i, name in enumerate(world.COLORS)}  # 0: no shape centre in this token
KIND_IDS = {name: i + 1 for i, name in enumerate(world.SHAPES)}
SPLITS = [len(COLOR_IDS) + 1, len(COLOR_IDS) + len(KIND_IDS) + 2]  # head columns: colour | kind | centre (x, y)
HEAD_SIZE = SPLITS[-1] + 2
MOTION_IDS = {name: i + 1 for i, name in enumerate(world.DIRECTIONS)}  # 0: a shape that stays still
IGNORE = -1
# Colour is read off the centre token at once (95 % after 300 steps); kind needs the shape's outline, gathered
# from neighbouring patches, and is what the picture questions lack. Weighting its loss 3x gave 57 % kind at
# shape centres after 600 steps against 52 %, and 79 % against 68 % at the end of run 11's pretraining (docs/
# default-model.md; runs 11-14).
KIND_WEIGHT = 3.0
# Denser pictures (picture_item's max_shapes) keep at most one shape per this many pixels: small pictures stay sparse.
DENSE_AREA_PER_SHAPE = 3000


def token_labels(scenes, grid, motion: tuple | None = None) -> dict:
    """Labels of one picture's (or video's) merged tokens in the tower's output order (temporal slot, then the
    2x2 blocks row by row); `scenes` holds the scene of each temporal slot (its first frame). `motion`, for a
    clip: (the moving shape's index, its direction, the slots whose two frames differ); the "motion" labels then
    give each centre token of those slots its shape's direction (MOTION_IDS; 0 for a shape that stays still),
    and IGNORE everywhere else and in pictures."""
    t, gh, gw = grid
    rows, cols = gh // 2, gw // 2
    colour = np.zeros((t, rows, cols), np.int32)
    kind = np.zeros((t, rows, cols), np.int32)
    centre = np.zeros((t, rows, cols, 2), np.float32)
    moving = np.full((t, rows, cols), IGNORE, np.int32)
    for slot, scene in enumerate(scenes):
        seen = np.zeros((rows, cols), np.int32)
        for index, shape in enumerate(scene.shapes):
            r, c = centre_cell(shape, scene, rows, cols)
            seen[r, c] += 1
            colour[slot, r, c], kind[slot, r, c] = COLOR_IDS[shape.color], KIND_IDS[shape.kind]
            centre[slot, r, c] = (2 * shape.cx / scene.width - 1, 2 * shape.cy / scene.height - 1)
            if motion is not None and slot in motion[2]:
                moving[slot, r, c] = MOTION_IDS[motion[1]] if index == motion[0] else 0
        colour[slot][seen > 1] = kind[slot][seen > 1] = moving[slot][seen > 1] = IGNORE  # two centres: say nothing
    n = t * rows * cols
    return {"colour": colour.reshape(n), "kind": kind.reshape(n), "centre": centre.reshape(n, 2),
            "has_centre": (colour > 0).reshape(n), "motion": moving.reshape(n)}


def centre_cell(shape, scene, rows: int, cols: int) -> tuple[int, int]:
    """The (row, column) of the merged token, in a `rows` x `cols` grid over `scene`, that holds `shape`'s centre."""
    return min(int(shape.cy / scene.height * rows), rows - 1), min(int(shape.cx / scene.width * cols), cols - 1)


def picture_item(rng: random.Random, processor, max_shapes: int = world.MAX_SHAPES):
    """A world scene (a quarter of the time with the curriculum's larger shapes) -> (pixels, grid, labels).
    Any other `max_shapes` than the world's MAX_SHAPES puts up to that many world-size shapes in a picture (at
    most one per DENSE_AREA_PER_SHAPE px²); 8 gives more labelled centres for the same tokens: 82 % kind at 3,000
    steps against 79 % (docs/default-model.md). The world's own count draws its own scenes, the stream the
    shipped tower was trained on."""
    return picture_of(picture_scene(rng, max_shapes), processor)


def picture_scene(rng: random.Random, max_shapes: int = world.MAX_SHAPES) -> world.Scene:
    """`picture_item`'s scene, drawn from `rng`."""
    growth = 1.0 if rng.random() < 0.75 else rng.random()
    if max_shapes == world.MAX_SHAPES:
        return world.random_scene(rng, growth=growth)
    return dense_scene(rng, max_shapes, growth)


def picture_of(scene: world.Scene, processor):
    """(pixels, grid, labels) of a picture's scene: no draws from any rng."""
    [(pixels, grid)] = processor.prepare(images=[world.draw(scene)])["image"]
    grid = tuple(int(v) for v in grid)
    return pixels, grid, token_labels([scene], grid)


def dense_scene(rng: random.Random, max_shapes: int, growth: float) -> world.Scene:
    """A scene of 1 to `max_shapes` shapes, as many as fit one per DENSE_AREA_PER_SHAPE px²; the curriculum's
    larger shapes (growth below 1) come as few as in the world's own scenes."""
    count = world.shape_count(rng, growth, max_shapes if growth == 1.0 else min(max_shapes, world.MAX_SHAPES))
    width, height = rng.randint(world.MIN_SIDE, world.MAX_SIDE), rng.randint(world.MIN_SIDE, world.MAX_SIDE)
    count = max(1, min(count, width * height // DENSE_AREA_PER_SHAPE))
    while True:
        try:
            return world.random_scene(rng, count=count, width=width, height=height, growth=growth)
        except RuntimeError:  # no room for them all: one fewer
            count -= 1


def video_item(rng: random.Random, processor):
    return video_of(world.video_scenes(rng), processor)


def video_of(clip: tuple, processor):
    """(pixels, grid, labels) of `world.video_scenes`' (scenes, mover, direction): no draws from any rng."""
    scenes, mover, direction = clip
    [(pixels, grid, _)] = processor.prepare(videos=[[world.draw(s) for s in scenes]])["video"]
    grid = tuple(int(v) for v in grid)
    paired = {slot for slot in range(grid[0]) if 2 * slot + 1 < len(scenes)}  # not a last frame padded by itself
    return pixels, grid, token_labels(scenes[::2][:grid[0]], grid, motion=(mover, direction, paired))


def batch(rng: random.Random, processor, pictures: int, videos: int, max_shapes: int = world.MAX_SHAPES) -> dict:
    return as_mlx(batch_arrays(rng, processor, pictures, videos, max_shapes))


def batch_arrays(rng: random.Random, processor, pictures: int, videos: int,
                 max_shapes: int = world.MAX_SHAPES) -> dict:
    """`batch` in NumPy arrays (no MLX: what a prefetching thread may make)."""
    return batch_part(rng, processor, pictures, videos, max_shapes)


def batch_part(rng: random.Random, processor, pictures: int, videos: int, max_shapes: int = world.MAX_SHAPES,
               part: int = 0, parts: int = 1) -> dict:
    """Part `part` of `parts` of `batch_arrays`' batch (the same draws from `rng`): every parts-th picture and clip
    from the part-th on, the others' scenes drawn but not made."""
    # (Pictures of one size sent as one (count, h, w) grid were no faster here: the time is in the blocks.)
    picture_scenes = [picture_scene(rng, max_shapes) for _ in range(pictures)]
    clips = [world.video_scenes(rng) for _ in range(videos)]
    items = ([picture_of(scene, processor) for scene in picture_scenes[part::parts]]
             + [video_of(clip, processor) for clip in clips[part::parts]])
    arrays = {"pixels": np.concatenate([p for p, _, _ in items]), "grid": [g for _, g, _ in items]}
    for key in items[0][2]:
        arrays[key] = np.concatenate([labels[key] for _, _, labels in items])
    return arrays


LOSS_COUNTS = ("centre", "colour_at", "colour_off", "kind_at", "kind_off", "motion")


def loss_counts(b: dict) -> np.ndarray:
    """The tokens of batch `b` (NumPy arrays) each of `loss`'s means averages over, in LOSS_COUNTS' order: added
    over a batch's parts, the denominators that make the parts' losses add up to the batch's."""
    at = b["has_centre"].astype(bool)
    counts = [at.sum()]
    for name in ("colour", "kind"):
        valid = b[name] != IGNORE
        counts += [(valid & at).sum(), (valid & ~at).sum()]
    counts.append((b["motion"] != IGNORE).sum() if "motion" in b else 0)
    return np.array(counts, np.float32)


def as_mlx(arrays: dict) -> dict:
    return {k: v if k == "grid" else mx.array(v) for k, v in arrays.items()}


class Probe(nn.Module):
    """The tower with the linear label head on its merged tokens (`motion`: with a head for each centre token's
    motion within its frame pair too)."""

    def __init__(self, visual, motion: bool = False):
        super().__init__()
        self.visual = visual
        self.splits = SPLITS + [HEAD_SIZE] if motion else SPLITS
        self.head = nn.Linear(visual.config.out_hidden_size, HEAD_SIZE + (len(MOTION_IDS) + 1 if motion else 0))

    def __call__(self, pixels, grid):
        parts = mx.split(self.head(self.visual(pixels, grid)), self.splits, axis=-1)
        return dict(zip(("colour", "kind", "centre", "motion"), parts))


def _ce(logits, labels, count=None):
    """Mean cross-entropy over the tokens with a label, or their sum over `count` when given."""
    valid = labels != IGNORE
    loss = nn.losses.cross_entropy(logits, mx.maximum(labels, 0), reduction="none")
    return (loss * valid).sum() / mx.maximum(valid.sum() if count is None else count, 1)


def _balanced_ce(logits, labels, at, counts=(None, None)):
    """Cross-entropy averaged over centre tokens and over the others separately: centres are rare."""
    return (_ce(logits, mx.where(at, labels, IGNORE), counts[0])
            + _ce(logits, mx.where(at | (labels == IGNORE), IGNORE, labels), counts[1]))


def loss(probe, b, kind_weight: float = KIND_WEIGHT, motion_weight: float = 0.0, counts=None):
    """The tower's loss on batch `b`; `counts` ([6] in LOSS_COUNTS' order), when `b` is one part of a batch: each
    mean's denominator the whole batch's (`loss_counts` added over the parts), so the parts' losses add up to the
    batch's."""
    out, at = probe(b["pixels"], b["grid"]), b["has_centre"]
    centre, colour_at, colour_off, kind_at, kind_off, motion = (None,) * 6 if counts is None else counts
    centre = (((out["centre"] - b["centre"]) ** 2).sum(-1) * at).sum() / mx.maximum(
        at.sum() if centre is None else centre, 1)
    total = (_balanced_ce(out["colour"], b["colour"], at, (colour_at, colour_off))
             + kind_weight * _balanced_ce(out["kind"], b["kind"], at, (kind_at, kind_off)) + centre)
    if motion_weight:
        total = total + motion_weight * _ce(out["motion"], b["motion"], motion)
    return total


def accuracy(probe, b) -> dict:
    """Over the tokens of batch `b` that hold a shape's centre: shares of colour and kind right, and the mean
    centre error (in halves of the picture's width and height)."""
    out, at = probe(b["pixels"], b["grid"]), b["has_centre"]
    centres = max(float(at.sum()), 1.0)
    scores = {"colour": float(((out["colour"].argmax(-1) == b["colour"]) & at).sum()) / centres,
              "kind": float(((out["kind"].argmax(-1) == b["kind"]) & at).sum()) / centres,
              "centre_error": float((mx.abs(out["centre"] - b["centre"]).mean(-1) * at).sum()) / centres}
    if "motion" in out:  # over the moving shapes' centre tokens alone: "still" is most of the rest
        movers = b["motion"] > 0
        scores["motion"] = float(((out["motion"].argmax(-1) == b["motion"]) & movers).sum()) / max(
            float(movers.sum()), 1.0)
    return scores


def pretrain_vision(visual, processor, steps: int, seed: int = 0,
                    pictures: int = 24, videos: int = 4, learning_rate: float = 1e-3, log=print,
                    log_every: int = 100, kind_weight: float = KIND_WEIGHT,
                    max_shapes: int = world.MAX_SHAPES, motion_weight: float = 0.0) -> dict:
    """Train `visual` in place on the world's labels for `steps` AdamW steps, pictures (of up to `max_shapes`
    shapes) and clips prepared by `processor` (the model's); returns the last held-out accuracy (`accuracy` on
    96 fresh pictures of the world and 16 clips). `motion_weight` above 0 also trains each clip's centre tokens
    to tell which way their shape moves within the token's frame pair, with that weight (0: no motion head)."""
    if max_shapes < 1:
        raise ValueError(f"max_shapes={max_shapes}: a picture holds at least one shape")
    if motion_weight < 0:
        raise ValueError(f"motion_weight={motion_weight}: a loss weight, 0 (off) or more")
    if pictures < 0 or videos < 0 or pictures + videos == 0:
        raise ValueError(f"pictures={pictures}, videos={videos}: counts of a batch's items, 0 or more, not both 0")
    group = parallel.group()  # in a group of processes, each takes its part of every batch and the sums are added
    rank, size = group.rank(), group.size()
    if max(pictures, videos) < size:
        raise ValueError(f"pictures={pictures}, videos={videos}: the pictures or the clips at least as many as the "
                         f"{size} processes (each takes its part of a batch)")
    rng = random.Random(seed + 5_000_011)
    probe = Probe(visual, motion=motion_weight > 0)
    probe.head.weight = 0.02 * mx.random.normal(probe.head.weight.shape, key=mx.random.key(seed))
    probe.head.bias = mx.zeros_like(probe.head.bias)
    warmup = min(50, steps)
    schedule = warmup_cosine(learning_rate, warmup, steps, start=1e-6, final=learning_rate * 0.1)
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    held_out = batch(random.Random(seed + 5_000_077), processor, 96, 16)
    step_fn = nn.value_and_grad(probe, partial(loss, kind_weight=kind_weight, motion_weight=motion_weight))
    start, scores = time.perf_counter(), {}
    batches = prefetched(batch_part(rng, processor, pictures, videos, max_shapes, rank, size) for _ in range(steps))
    for step, part in enumerate(batches, start=1):
        if size == 1:
            value, grads = step_fn(probe, as_mlx(part))
        else:
            counts = mx.distributed.all_sum(mx.array(loss_counts(part)), group=group)
            value, grads = parallel.all_sum(step_fn(probe, as_mlx(part), counts=counts), group)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(probe, grads)
        mx.eval(probe.parameters(), optimizer.state, value)
        if step % log_every == 0 or step == steps:
            scores = accuracy(probe, held_out)
            log(f"vision step {step:4d}  loss {float(value):.3f}  held-out shape centres: colour "
                f"{scores['colour']:.1%}  kind {scores['kind']:.1%}  centre error {scores['centre_error']:.3f}  "
                + (f"moving shapes' direction {scores['motion']:.1%}  " if "motion" in scores else "")
                + f"{time.perf_counter() - start:.0f} s")
    return scores


def centre_outputs(visual, processor, pictures: int = 400, seed: int = 5_000_101) -> dict:
    """The tower's output (float64) at the shape-centre tokens of `pictures` fresh world pictures, with each
    token's kind and colour labels and its centre's place (`token_labels`): what `class_means` averages."""
    rng, outs, kinds, colours, places = random.Random(seed), [], [], [], []
    for _ in range(pictures):
        scene = world.random_scene(rng)
        [(pixels, grid)] = processor.prepare(images=[world.draw(scene)])["image"]
        grid = tuple(int(v) for v in grid)
        labels = token_labels([scene], grid)
        centre = labels["kind"] > 0
        outs.append(np.array(visual(mx.array(pixels), [grid]), np.float64)[centre])
        kinds.append(labels["kind"][centre])
        colours.append(labels["colour"][centre])
        places.append(labels["centre"][centre])
    return {"outputs": np.concatenate(outs), "kind": np.concatenate(kinds), "colour": np.concatenate(colours),
            "centre": np.concatenate(places)}


def class_means(visual, processor, pictures: int = 400, seed: int = 5_000_101, position: bool = False) -> dict:
    """The tower's mean output over the shape-centre tokens of `pictures` fresh world pictures, and each kind's
    and each colour's mean offset from it (row 0, "no shape", zero): the oracle of the binding scaffold in the
    tower's own directions (`scaffold_features`; docs/default-model.md, "Forming the binding"). `position`: also
    the tower's directions for a centre's place across and down (`position_directions`)."""
    return means_of(centre_outputs(visual, processor, pictures, seed), position)


def means_of(centres: dict, position: bool = False) -> dict:
    """`class_means` of `centre_outputs`' tokens."""
    outs = centres["outputs"]
    mean = outs.mean(0)
    offsets = {}
    for name, count in (("kind", len(KIND_IDS)), ("colour", len(COLOR_IDS))):
        offsets[name] = np.zeros((count + 1, outs.shape[1]))
        for label in range(1, count + 1):
            offsets[name][label] = outs[centres[name] == label].mean(0) - mean
    means = {"mean": mean.astype(np.float32), "kind": offsets["kind"].astype(np.float32),
             "colour": offsets["colour"].astype(np.float32)}
    if position:
        means["position"] = position_directions(centres, means)
    return means


def beyond_class_means(centres: dict, means: dict) -> np.ndarray:
    """What each of `centre_outputs`' tokens holds beyond its class means (the mean, its kind's and its colour's
    offsets)."""
    return centres["outputs"] - means["mean"] - means["kind"][centres["kind"]] - means["colour"][centres["colour"]]


def position_directions(centres: dict, means: dict) -> np.ndarray:
    """[2, out_hidden]: least-squares directions of a shape-centre token's place across and down (-1 to 1,
    `token_labels`' "centre") in what the tower's output holds beyond its class means."""
    directions, *_ = np.linalg.lstsq(centres["centre"].astype(np.float64), beyond_class_means(centres, means),
                                     rcond=None)
    return directions.astype(np.float32)


def scaffold_features(means: dict, scene, grid) -> np.ndarray:
    """[tokens, out_hidden] for one picture's merged tokens: at each shape's centre token the tower's mean plus
    that shape's kind and colour offsets (`class_means`), and with `means["position"]` its place across and down
    along the tower's directions for them, zeros on every other token: clean keys on which the decoder forms
    choosing a shape by kind or colour (or reading its place), which it then keeps on the tower's own output."""
    labels = token_labels([scene], grid)
    centre = (labels["kind"] > 0)[:, None]
    kinds, colours = np.maximum(labels["kind"], 0), np.maximum(labels["colour"], 0)
    keys = means["mean"] + means["kind"][kinds] + means["colour"][colours]
    if "position" in means:
        keys = keys + labels["centre"] @ means["position"]
    return np.where(centre, keys, 0).astype(np.float32)
