"""Does the shipped vision tower's clip output say which way the shape moves (docs/default-model.md, "Video's
errors are the axis")? 600 world clips through the frozen tower; at the mover's token in each temporal slot
(its centre's 32 px cell), ridge readouts of the four directions, fitted on 450 clips and scored on 150: from the
mean of those tokens (motion at the shape), from the last slot's minus the first's (the change of place), and
from both. Exploratory, one draw.

    .venv/bin/python scripts/video_readout.py
"""

import random

import numpy as np

import mlx_qwen35  # noqa: F401  (the platform's BLAS before MLX)
import mlx.core as mx
from mlx_qwen35.loading import load
from mlx_qwen35.train import world
from mlx_qwen35.train.default_model import SHIPPED_PATH
from mlx_qwen35.train.vision_pretrain import centre_cell

CLIPS, FITTED, SEED = 600, 450, 11


def mover_tokens(visual, processor, scenes, mover: int) -> np.ndarray:
    """[slots, hidden]: the tower's output at the mover's centre token in each temporal slot (a slot shows its
    first frame's place; the last frame, padded by itself, for an odd count)."""
    [(pixels, grid, _)] = processor.prepare(videos=[[world.draw(s) for s in scenes]])["video"]
    slots, rows, cols = int(grid[0]), int(grid[1]) // 2, int(grid[2]) // 2
    out = np.array(visual(mx.array(pixels), [grid]), np.float64).reshape(slots, rows, cols, -1)
    firsts = [scenes[min(2 * slot, len(scenes) - 1)] for slot in range(slots)]
    return np.stack([out[slot, *centre_cell(scene.shapes[mover], scene, rows, cols)]
                     for slot, scene in enumerate(firsts)])


def held_out_accuracy(features: np.ndarray, directions: np.ndarray, ridge: float) -> float:
    """A ridge regression onto the directions' one-hot codes, fitted on the first FITTED clips and scored (argmax)
    on the rest."""
    design = np.c_[features, np.ones(len(features))]
    fit, held = design[:FITTED], design[FITTED:]
    weights = np.linalg.solve(fit.T @ fit + ridge * np.eye(design.shape[1]), fit.T @ np.eye(4)[directions[:FITTED]])
    return float(np.mean((held @ weights).argmax(1) == directions[FITTED:]))


def main():
    model, processor = load(SHIPPED_PATH)
    rng = random.Random(SEED)
    means, changes, directions = [], [], []
    for _ in range(CLIPS):
        scenes, mover, direction = world.video_scenes(rng)
        tokens = mover_tokens(model.model.visual, processor, scenes, mover)
        means.append(tokens.mean(0))
        changes.append(tokens[-1] - tokens[0])
        directions.append(world.DIRECTIONS.index(direction))
    means, changes, directions = np.array(means), np.array(changes), np.array(directions)
    for name, features in (("mean at mover", means), ("last-first slot at mover", changes),
                           ("both", np.c_[means, changes])):
        for ridge in (1.0, 10.0):
            print(f"{name:26s} ridge {ridge:5.1f}: held-out {held_out_accuracy(features, directions, ridge):.0%} "
                  f"of {CLIPS - FITTED}")


if __name__ == "__main__":
    main()
