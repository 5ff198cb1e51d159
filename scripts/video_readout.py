"""Does the shipped vision tower's clip output say which way the shape moves (docs/default-model.md, "Video's
errors are the axis")? 600 world clips through the frozen tower; at the mover's token in each temporal slot
(its centre's 32 px cell), ridge readouts of the four directions, fitted on 450 clips and scored on 150: from the
mean of those tokens (motion at the shape), from the last slot's minus the first's (the change of place), and
from both. Exploratory, one draw.

    .venv/bin/python scripts/video_readout.py
"""
import random, numpy as np
import mlx_qwen35, mlx.core as mx
from mlx_qwen35.loading import load
from mlx_qwen35.train import world
from mlx_qwen35.train.default_model import SHIPPED_PATH
model, processor = load(SHIPPED_PATH)
visual = model.model.visual
rng = random.Random(11)
X, Y, shapes = [], [], []
for i in range(600):
    scenes, idx, direction = world.video_scenes(rng)
    pixels, grid, _ = processor.prepare(videos=[[world.draw(s) for s in scenes]])["video"][0]
    t, h, w = (int(v) for v in grid)
    out = np.array(visual(mx.array(pixels), [grid]), np.float64).reshape(t, h // 2, w // 2, -1)
    feats = []
    for slot in range(t):
        s = scenes[min(2 * slot, len(scenes) - 1)]
        m = s.shapes[0]
        r = min(h // 2 - 1, int(m.cy / s.height * (h // 2))); c = min(w // 2 - 1, int(m.cx / s.width * (w // 2)))
        feats.append(out[slot, r, c])
    f = np.stack(feats)
    X.append(np.concatenate([f.mean(0), f[-1] - f[0]])); Y.append(world.DIRECTIONS.index(direction)); shapes.append(len(scenes[0].shapes))
X, Y = np.array(X), np.array(Y)
for name, cols in (("mean at mover", slice(0, X.shape[1] // 2)), ("last-first slot at mover", slice(X.shape[1] // 2, None)), ("both", slice(None))):
    A = np.c_[X[:, cols], np.ones(len(X))]
    tr, te = slice(0, 450), slice(450, None)
    onehot = np.eye(4)[Y[tr]]
    for lam in (1.0, 10.0):
        W = np.linalg.solve(A[tr].T @ A[tr] + lam * np.eye(A.shape[1]), A[tr].T @ onehot)
        pred = (A[te] @ W).argmax(1)
        print(f"{name:26s} ridge {lam:5.1f}: held-out {np.mean(pred == Y[te]):.0%} of {len(Y[te])}")
