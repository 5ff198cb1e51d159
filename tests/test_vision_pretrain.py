"""Vision tower pretraining (train/vision_pretrain.py): its labels are read back from the pixels the tower sees,
in the tower's token order, and a pretraining step changes the tower and nothing else."""

import random

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_qwen35.processing.processor import Processor
from mlx_qwen35.train import default_model as dm
from mlx_qwen35.train import vision_pretrain as vp
from mlx_qwen35.train import world

# the default model's own preprocessing; labels need no tokenizer
PROCESSOR = Processor(None, dm.PREPROCESSOR, dm.VIDEO_PREPROCESSOR)
COLOR_OF_ID = {i: world.COLORS[name] for name, i in vp.COLOR_IDS.items()}


def token_pixels(pixels, temporal_slot=0):
    """[tokens, 4 patches * 16 * 16, 3] RGB in 0-255 of each merged token, from the tower's input rows."""
    rows = pixels.reshape(-1, 4, 3, 2, 16, 16)[:, :, :, temporal_slot]
    return np.round((rows.transpose(0, 1, 3, 4, 2).reshape(rows.shape[0], -1, 3) * 0.5 + 0.5) * 255)


def holds_colour(token, rgb):
    return bool((np.abs(token - np.array(rgb)).max(-1) <= 2).any())


@pytest.mark.parametrize("max_shapes", [4, 8])
def test_picture_labels_point_at_the_tokens_that_hold_each_shape(max_shapes):
    """Each labelled centre token holds pixels of its shape's colour; a token's label names the colour of
    the one shape whose centre lies in it; nothing is labelled where no shape is."""
    rng = random.Random(11)
    centres = 0
    for _ in range(60):
        pixels, grid, labels = vp.picture_item(rng, PROCESSOR, max_shapes)
        tokens = token_pixels(pixels)
        assert len(tokens) == len(labels["colour"]) == grid[1] * grid[2] // 4
        for i in np.nonzero(labels["has_centre"])[0]:
            assert holds_colour(tokens[i], COLOR_OF_ID[int(labels["colour"][i])])
            x, y = labels["centre"][i]
            row, col = divmod(int(i), grid[2] // 2)
            # the centre lies inside this token's cell of the picture (coordinates in [-1, 1])
            u, v = (x + 1) / 2 * (grid[2] // 2), (y + 1) / 2 * (grid[1] // 2)
            assert col - 1e-4 <= u < col + 1 + 1e-4 and row - 1e-4 <= v < row + 1 + 1e-4
            centres += 1
        assert (labels["kind"][labels["colour"] == 0] == 0).all()
    assert centres > 60


def test_denser_pictures_hold_more_shapes_and_more_labelled_centres():
    """max_shapes 8: world-size shapes, up to 8 but at most one per 3,000 px² (small pictures stay sparse),
    never overlapping; more labelled centres than the world's own 1-4 over the same number of pictures."""
    rng = random.Random(5)
    scenes = [vp.dense_scene(rng, 8, growth=1.0) for _ in range(200)]
    assert max(len(s.shapes) for s in scenes) == 8
    assert all(1 <= len(s.shapes) <= max(1, s.width * s.height // 3000) for s in scenes)
    for scene in scenes:
        boxes = [shape.box for shape in scene.shapes]
        for i, (ax0, ay0, ax1, ay1) in enumerate(boxes):
            for bx0, by0, bx1, by1 in boxes[i + 1:]:
                assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0
    centres = {n: sum(int(vp.picture_item(random.Random(7 + k), PROCESSOR, n)[2]["has_centre"].sum())
                      for k in range(40)) for n in (4, 8)}
    assert centres[8] > 1.2 * centres[4]


def test_fewer_shapes_than_the_world_keeps_to_that_many():
    """max_shapes below the world's 4 is a bound too: no picture has more labelled centres than that, at any
    growth (labels count the centres: a token with two says nothing, so it is counted through the ignored mark)."""
    rng = random.Random(9)
    counts = []
    for _ in range(60):
        labels = vp.picture_item(rng, PROCESSOR, 2)[2]
        counts.append(int(labels["has_centre"].sum()) + 2 * int((labels["kind"] == vp.IGNORE).sum()))
    assert max(counts) == 2 and min(counts) >= 1
    assert all(1 <= len(vp.dense_scene(rng, 2, growth=g / 10).shapes) <= 2 for g in range(11) for _ in range(5))


def test_video_labels_follow_the_moving_shape_frame_pair_by_frame_pair():
    rng = random.Random(5)
    for _ in range(10):
        pixels, grid, labels = vp.video_item(rng, PROCESSOR)
        per_slot = grid[1] * grid[2] // 4
        tokens = token_pixels(pixels)
        positions = []
        for slot in range(grid[0]):
            at = np.nonzero(labels["has_centre"][slot * per_slot:(slot + 1) * per_slot])[0]
            for i in at:
                assert holds_colour(tokens[slot * per_slot + i], COLOR_OF_ID[int(labels["colour"][slot * per_slot + i])])
            positions.append(labels["centre"][slot * per_slot:(slot + 1) * per_slot][at].tolist())
        assert grid[0] >= 2 and positions[0] != positions[-1]  # the mover's centre moved


def slot_pixels(pixels, grid, slot, frame):
    """[H, W, 3] RGB in 0-255 of one frame of one temporal slot, put back together from the tower's input rows."""
    per_slot, cols = grid[1] * grid[2] // 4, grid[2] // 2
    tokens = token_pixels(pixels, frame)[slot * per_slot:(slot + 1) * per_slot].reshape(-1, 2, 2, 16, 16, 3)
    rows = tokens.reshape(-1, cols, 2, 2, 16, 16, 3).transpose(0, 2, 4, 1, 3, 5, 6)
    return rows.reshape(grid[1] * 16, grid[2] * 16, 3)


def test_motion_labels_say_which_way_the_pixels_of_the_labelled_colour_move():
    """In a clip, each centre token of a slot whose two frames differ says which way its shape moves between
    them: where the labels say a shape moves, the pixels of its colour move that way between the slot's two
    frames (shapes of that colour that stay still do not shift their mean); every other labelled centre says
    still; pictures carry no motion labels."""
    rng = random.Random(8)
    moves = 0
    for _ in range(20):
        pixels, grid, labels = vp.video_item(rng, PROCESSOR)
        per_slot = grid[1] * grid[2] // 4
        motion = labels["motion"].reshape(grid[0], per_slot)
        assert set(np.unique(labels["motion"][labels["has_centre"]])) <= {vp.IGNORE, 0, *vp.MOTION_IDS.values()}
        assert (labels["motion"][~labels["has_centre"]] == vp.IGNORE).all()
        for slot in range(grid[0]):
            for token in np.nonzero(motion[slot] > 0)[0]:
                rgb = np.array(COLOR_OF_ID[int(labels["colour"][slot * per_slot + token])])
                means = []
                for frame in (0, 1):
                    ys, xs = np.nonzero((np.abs(slot_pixels(pixels, grid, slot, frame) - rgb).max(-1) <= 2))
                    means.append(np.array([xs.mean(), ys.mean(), len(xs)]))
                if min(means[0][2], means[1][2]) < 10:  # a shape that resizing left a few pixels of its colour
                    continue
                dx, dy, _ = means[1] - means[0]
                direction = {1: "left", 2: "right", 3: "up", 4: "down"}[int(motion[slot, token])]
                assert vp.MOTION_IDS[direction] == int(motion[slot, token])
                along, across = {"left": (-dx, dy), "right": (dx, dy), "up": (-dy, dx), "down": (dy, dx)}[direction]
                assert along > 0.5 and abs(across) < 0.5 * along
                moves += 1
            assert (motion[slot] > 0).sum() <= 1  # one shape moves
    assert moves >= 30
    for _ in range(10):
        assert (vp.picture_item(rng, PROCESSOR)[2]["motion"] == vp.IGNORE).all()


def test_sincos_position_table_is_linearly_readable():
    """The tower's initial position table: a least-squares line from its entries recovers row and column."""
    table = np.array(dm.sincos_positions(196, 128), np.float64)
    rows, cols = np.divmod(np.arange(196), 14)
    design = np.concatenate([table, np.ones((196, 1))], axis=1)
    for target in (rows, cols):
        fit, *_ = np.linalg.lstsq(design, target, rcond=None)
        assert np.abs(design @ fit - target).max() < 0.05


def test_pretraining_changes_the_tower_and_nothing_else():
    from mlx_qwen35.models.vision import VisionConfig, VisionModel

    tower = VisionModel(VisionConfig.from_dict(dict(dm.VISION_CONFIG, depth=1)))
    before = {k: np.array(v) for k, v in tree_flatten(tower.parameters())}
    scores = vp.pretrain_vision(tower, PROCESSOR, steps=2, pictures=2, videos=1, log=lambda line: None)
    after = dict(tree_flatten(tower.parameters()))
    assert set(after) == set(before)  # the label head is not left on the tower
    assert any(not np.array_equal(before[k], np.array(v)) for k, v in after.items())
    assert all(np.isfinite(v) for v in scores.values()) and 0 <= scores["colour"] <= 1
    with pytest.raises(ValueError, match="max_shapes=0"):
        vp.pretrain_vision(tower, PROCESSOR, steps=1, max_shapes=0, log=lambda line: None)
    lines = []
    scores = vp.pretrain_vision(tower, PROCESSOR, steps=2, pictures=2, videos=2, motion_weight=1.0, log=lines.append)
    assert set(dict(tree_flatten(tower.parameters()))) == set(before) and 0 <= scores["motion"] <= 1
    assert "moving shapes' direction" in lines[-1]
    with pytest.raises(ValueError, match="motion_weight=-1: a loss weight"):
        vp.pretrain_vision(tower, PROCESSOR, steps=1, motion_weight=-1, log=lambda line: None)
    for pictures, videos in ((-1, 4), (24, -2), (0, 0)):
        with pytest.raises(ValueError, match=f"pictures={pictures}, videos={videos}: counts"):
            vp.pretrain_vision(tower, PROCESSOR, steps=1, pictures=pictures, videos=videos, log=lambda line: None)


def test_a_batch_in_parts_with_the_whole_batchs_counts_adds_up_to_the_batchs_loss_and_gradients():
    """`batch_part` deals `batch_arrays`' batch out (the same draws from the rng, each part making only its own
    items); each part's `loss` with `loss_counts` added over the parts as its denominators, added, is the whole
    batch's loss, and so are the gradients."""
    from functools import partial

    from mlx.utils import tree_map

    from mlx_qwen35.models.vision import VisionConfig, VisionModel

    whole = vp.batch_arrays(random.Random(5), PROCESSOR, 5, 3)
    parts = [vp.batch_part(random.Random(5), PROCESSOR, 5, 3, part=i, parts=3) for i in range(3)]
    assert sorted(map(tuple, whole["grid"])) == sorted(tuple(g) for p in parts for g in p["grid"])
    assert sum(len(p["pixels"]) for p in parts) == len(whole["pixels"])
    mx.random.seed(3)
    probe = vp.Probe(VisionModel(VisionConfig.from_dict(dict(dm.VISION_CONFIG, depth=1))), motion=True)
    step = nn.value_and_grad(probe, partial(vp.loss, motion_weight=1.0))
    value, grads = step(probe, vp.as_mlx(whole))
    counts = mx.array(sum(vp.loss_counts(p) for p in parts))
    results = [step(probe, vp.as_mlx(p), counts=counts) for p in parts]
    part_value = sum(v for v, _ in results)
    part_grads = tree_map(lambda *g: sum(g[1:], g[0]), *[g for _, g in results])
    assert abs(part_value.item() - value.item()) <= 1e-5 * value.item()
    for (name, a), (_, b) in zip(tree_flatten(grads), tree_flatten(part_grads)):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-6, err_msg=name)


def pretrained_tower(steps: int, pictures: int = 3, videos: int = 2) -> tuple[np.ndarray, np.ndarray, list]:
    """A fresh one-block tower's weights before and after `steps` pretraining steps (flat), and its log."""
    from mlx_qwen35.models.vision import VisionConfig, VisionModel

    mx.random.seed(4)
    tower = VisionModel(VisionConfig.from_dict(dict(dm.VISION_CONFIG, depth=1)))

    def flat():
        return np.concatenate([np.array(v).reshape(-1) for _, v in tree_flatten(tower.parameters())])

    before, lines = flat(), []
    vp.pretrain_vision(tower, PROCESSOR, steps=steps, pictures=pictures, videos=videos, motion_weight=1.0,
                       log=lines.append, log_every=1)
    return before, flat(), lines


def test_pretraining_in_two_processes_trains_as_one_process():
    """The tower's pretraining in a group of two processes (train/parallel.py: each its part of every batch, the
    sums added) logs one process's losses (the whole batch's denominators), and its weights move as one process's
    do: the updates' difference a thousandth of their size at most (AdamW turns rounding-level gradients of a
    few weights into steps of any sign, so weights are compared as a whole, not one by one). Batches that cannot
    give each process a part are refused by name."""
    from mlx_qwen35.train.parallel import run_in_processes

    before, alone, alone_lines = pretrained_tower(3)
    before_too, grouped, lines = run_in_processes(pretrained_tower, 2, 3)
    losses = [[float(line.split("loss ")[1].split()[0]) for line in log] for log in (alone_lines, lines)]
    assert len(losses[0]) == 3 and np.allclose(losses[1], losses[0], rtol=0, atol=1.5e-3)  # logged to 3 places
    assert np.array_equal(before_too, before)
    update = alone - before
    assert np.linalg.norm(update) > 0
    assert np.linalg.norm((grouped - before) - update) <= 1e-3 * np.linalg.norm(update)
    with pytest.raises(ValueError, match="pictures=1, videos=1: the pictures or the clips at least as many as the 2"):
        run_in_processes(pretrained_tower, 2, 1, 1, 1)


def test_position_directions_recover_a_known_place_component():
    """Centre outputs built as mean + kind offset + colour offset + place @ D + small noise: the fitted directions
    are the D the outputs were generated with (the reference is that matrix, not a computation of ours)."""
    rng = np.random.default_rng(0)
    n, hidden = 2000, 6
    kinds, colours = rng.integers(1, 4, n), rng.integers(1, 7, n)
    places = rng.uniform(-1, 1, (n, 2))
    kind_table, colour_table = rng.normal(0, 3, (4, hidden)), rng.normal(0, 3, (7, hidden))
    directions = rng.normal(0, 2, (2, hidden))
    outputs = 1.5 + kind_table[kinds] + colour_table[colours] + places @ directions + rng.normal(0, 0.01, (n, hidden))
    means = vp.means_of({"outputs": outputs, "kind": kinds, "colour": colours, "centre": places}, position=True)
    np.testing.assert_allclose(means["position"], directions, atol=0.05)
    assert "position" not in vp.means_of({"outputs": outputs, "kind": kinds, "colour": colours, "centre": places})


def test_class_means_and_the_scaffold_built_from_them():
    """A stand-in tower whose output at a merged token is its mean RGB: the colour offsets follow the colours
    (red's has the most red over green, blue's the most blue over red; orange and yellow are redder than red
    on the red channel alone), and the scaffold puts the mean plus the shape's two offsets on
    its centre token and zeros on every other."""

    def rgb_tower(pixels, grid):
        return pixels.reshape(pixels.shape[0], 3, -1).mean(-1).reshape(-1, 4, 3).mean(1)

    means = vp.class_means(rgb_tower, PROCESSOR, pictures=60)
    red, blue = vp.COLOR_IDS["red"], vp.COLOR_IDS["blue"]
    offsets = means["colour"][1:]
    assert np.argmax(offsets[:, 0] - offsets[:, 1]) + 1 == red and np.argmax(offsets[:, 2] - offsets[:, 0]) + 1 == blue
    assert not means["kind"][0].any() and not means["colour"][0].any()
    scene = world.Scene(128, 64, (255, 255, 255), [world.Shape("triangle", "red", 80, 40, 12)])
    [(pixels, grid)] = PROCESSOR.prepare(images=[world.draw(scene)])["image"]
    features = vp.scaffold_features(means, scene, tuple(int(v) for v in grid))
    centre = 1 * 4 + 2  # 2x4 tokens of 32 px; (80, 40) lies in row 1, column 2
    assert features.shape == (8, 3)
    np.testing.assert_allclose(features[centre], means["mean"] + means["kind"][vp.KIND_IDS["triangle"]]
                               + means["colour"][red], rtol=1e-6)
    assert not np.delete(features, centre, axis=0).any()
    placed = dict(means, position=np.array([[1.0, 0.0, 0.0], [0.0, 10.0, 0.0]], np.float32))
    with_places = vp.scaffold_features(placed, scene, tuple(int(v) for v in grid))
    # (80, 40) in a 128 x 64 picture is at (0.25, 0.25) on the -1 to 1 scale across and down
    np.testing.assert_allclose(with_places[centre] - features[centre], [0.25, 2.5, 0.0], rtol=1e-5)
    assert not np.delete(with_places, centre, axis=0).any()
