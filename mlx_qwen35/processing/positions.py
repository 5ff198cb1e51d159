"""3-D (t, h, w) rotary positions for token sequences holding image and video placeholders, as transformers'
Qwen3_5Model.get_rope_index computes them."""

import numpy as np


def rope_index(input_ids, image_grid_thw=None, video_grid_thw=None, *, image_token_id: int,
               video_token_id: int, spatial_merge_size: int = 2, start=0):
    """input_ids [B, L] -> (position_ids [3, B, L], rope_delta [B]), both int64 numpy; `start` (int or [B])
    is the position of the first token, for ids that continue a cache.

    Text counts up on all three axes. Each image, and each frame of a video (a video grid (t, h, w) is t
    grids (1, h, w): its frames are separated by timestamp text), is a run of h*w/merge**2 placeholders whose
    merged token (f, r, c) sits at (cur + f, cur + r, cur + c); the text after it starts at cur + max(h, w)/merge.
    Grids are consumed in order, row after row. rope_delta = max position + 1 - (start + L): with start 0,
    a token decoded at cache index p then takes position p + rope_delta on all three axes."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length]; got shape {ids.shape}")
    names = {image_token_id: "image", video_token_id: "video"}
    grids = {image_token_id: iter(_frames(image_grid_thw, split=False)),
             video_token_id: iter(_frames(video_grid_thw, split=True))}
    B, L = ids.shape
    positions = np.zeros((3, B, L), np.int64)
    deltas = np.zeros(B, np.int64)
    starts = np.broadcast_to(np.asarray(start, np.int64).reshape(-1), (B,))
    for b in range(B):
        row, cur, i = ids[b], int(starts[b]), 0
        while i < L:
            token = int(row[i])
            if token in grids:
                grid = next(grids[token], None)
                if grid is None:
                    raise ValueError(f"row {b} has more {names[token]} placeholder runs than grids")
                t, h, w = grid[0], grid[1] // spatial_merge_size, grid[2] // spatial_merge_size
                n = t * h * w
                if i + n > L or (row[i:i + n] != token).any():
                    raise ValueError(f"row {b}: the {names[token]} run at token {i} is shorter than the {n} "
                                     f"placeholders of its grid {list(grid)}")
                positions[:, b, i:i + n] = cur + np.stack(np.unravel_index(np.arange(n), (t, h, w)))
                cur, i = cur + max(h, w), i + n
            else:
                j = i + 1
                while j < L and int(row[j]) not in grids:
                    j += 1
                positions[:, b, i:j] = np.arange(cur, cur + j - i)
                cur, i = cur + j - i, j
        deltas[b] = positions[:, b].max() + 1 - starts[b] - L if L else 0
    for token, remaining in grids.items():
        left = sum(1 for _ in remaining)
        if left:
            raise ValueError(f"{left} {names[token]} grid(s) have no placeholders in input_ids")
    return positions, deltas


def _frames(grid_thw, split: bool) -> list:
    if grid_thw is None:
        return []
    grid = np.asarray(grid_thw).astype(np.int64).reshape(-1, 3)
    if split:
        return [(1, int(h), int(w)) for t, h, w in grid for _ in range(t)]
    return [tuple(int(v) for v in row) for row in grid]
