"""Does the vision tower's clip output say which way the shape moves (docs/default-model.md, "Video's errors
are the axis")? 600 world clips (`--readout-clips`) through the frozen shipped tower; at the mover's token in
each temporal slot (its centre's 32 px cell), ridge readouts of the four directions, fitted on three quarters of
the clips and scored on the rest: from the mean of those tokens (motion at the shape), from the last slot's
minus the first's (the change of place), and from both. Exploratory, one draw. `--pretrain STEPS` reads a fresh
tower instead, pretrained for STEPS steps as train-default's is (seed 0, its skeleton, VISION_MAX_SHAPES) with
the given batch and motion weight.

    .venv/bin/python scripts/video_readout.py
    .venv/bin/python scripts/video_readout.py --pretrain 1500 --pictures 16 --clips 12 --motion 1
"""

import argparse
import random
import tempfile
from pathlib import Path

import numpy as np

import mlx_qwen35  # noqa: F401  (the platform's BLAS before MLX)
import mlx.core as mx
from mlx_qwen35.loading import load
from mlx_qwen35.train import world
from mlx_qwen35.train import default_model
from mlx_qwen35.train.vision_pretrain import centre_cell, pretrain_vision

CLIPS, SEED = 600, 11


def mover_tokens(visual, processor, scenes, mover: int) -> np.ndarray:
    """[slots, hidden]: the tower's output at the mover's centre token in each temporal slot (a slot shows its
    first frame's place; the last frame, padded by itself, for an odd count)."""
    [(pixels, grid, _)] = processor.prepare(videos=[[world.draw(s) for s in scenes]])["video"]
    slots, rows, cols = int(grid[0]), int(grid[1]) // 2, int(grid[2]) // 2
    out = np.array(visual(mx.array(pixels), [grid]), np.float64).reshape(slots, rows, cols, -1)
    firsts = [scenes[min(2 * slot, len(scenes) - 1)] for slot in range(slots)]
    return np.stack([out[slot, *centre_cell(scene.shapes[mover], scene, rows, cols)]
                     for slot, scene in enumerate(firsts)])


def held_out_accuracy(features: np.ndarray, directions: np.ndarray, ridge: float) -> tuple[float, int]:
    """A ridge regression onto the directions' one-hot codes, fitted on the first three quarters of the clips and
    scored (argmax) on the rest: (the share right, how many were scored)."""
    fitted = len(features) * 3 // 4
    design = np.c_[features, np.ones(len(features))]
    fit, held = design[:fitted], design[fitted:]
    weights = np.linalg.solve(fit.T @ fit + ridge * np.eye(design.shape[1]), fit.T @ np.eye(4)[directions[:fitted]])
    return float(np.mean((held @ weights).argmax(1) == directions[fitted:])), len(held)


def fresh_tower(steps: int, pictures: int, clips: int, motion: float):
    """train-default's tower (seed 0) after `steps` pretraining steps of `pictures` pictures and `clips` clips a
    batch, the motion head at weight `motion`."""
    with tempfile.TemporaryDirectory() as skeleton:
        _, processor = default_model.write_skeleton(Path(skeleton), seed=0)
        visual = default_model.build_model(Path(skeleton), seed=0).model.visual
    pretrain_vision(visual, processor, steps, seed=0, pictures=pictures, videos=clips,
                    max_shapes=default_model.VISION_MAX_SHAPES, motion_weight=motion)
    return visual, processor


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain", type=int, default=0, metavar="STEPS",
                        help="read a freshly pretrained tower (0: the shipped model's)")
    parser.add_argument("--pictures", type=int, default=default_model.VISION_PICTURES)
    parser.add_argument("--clips", type=int, default=default_model.VISION_CLIPS)
    parser.add_argument("--motion", type=float, default=default_model.VISION_MOTION_WEIGHT)
    parser.add_argument("--readout-clips", type=int, default=CLIPS, help="clips read, a quarter of them scored")
    args = parser.parse_args()
    if args.pretrain < 0:
        parser.error(f"--pretrain {args.pretrain}: a number of steps, 0 (the shipped tower) or more")
    if not args.pretrain and (args.pictures, args.clips, args.motion) != (
            default_model.VISION_PICTURES, default_model.VISION_CLIPS, default_model.VISION_MOTION_WEIGHT):
        parser.error("--pictures, --clips and --motion set a fresh tower's pretraining: only with --pretrain STEPS")
    if args.readout_clips < 8:
        parser.error(f"--readout-clips {args.readout_clips}: at least 8, a quarter of them scored")
    if args.pretrain:
        visual, processor = fresh_tower(args.pretrain, args.pictures, args.clips, args.motion)
    else:
        model, processor = load(default_model.SHIPPED_PATH)
        visual = model.model.visual
    rng = random.Random(SEED)
    means, changes, directions = [], [], []
    for _ in range(args.readout_clips):
        scenes, mover, direction = world.video_scenes(rng)
        tokens = mover_tokens(visual, processor, scenes, mover)
        means.append(tokens.mean(0))
        changes.append(tokens[-1] - tokens[0])
        directions.append(world.DIRECTIONS.index(direction))
    means, changes, directions = np.array(means), np.array(changes), np.array(directions)
    for name, features in (("mean at mover", means), ("last-first slot at mover", changes),
                           ("both", np.c_[means, changes])):
        for ridge in (1.0, 10.0):
            right, scored = held_out_accuracy(features, directions, ridge)
            print(f"{name:26s} ridge {ridge:5.1f}: held-out {right:.0%} of {scored}")


if __name__ == "__main__":
    main()
