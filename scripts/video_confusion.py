"""Where the default model's video answers go wrong (docs/default-model.md, "Video's errors are the axis"):
fresh world videos ("Which way does the {color} {shape} move?") answered greedily through `evaluate.ask`, the
accuracy split by how many shapes the clip holds and by direction, and the confusion of expected against given
answers. Exploratory: a few hundred clips are a noisy measurement.

    .venv/bin/python scripts/video_confusion.py [--model DIR] [--clips 300] [--seed 5]
"""

import argparse
import random
from collections import Counter
from pathlib import Path

import mlx_qwen35  # noqa: F401  (the platform's BLAS before MLX)
from mlx_qwen35.loading import load
from mlx_qwen35.train import evaluate, world
from mlx_qwen35.train.default_model import SHIPPED_PATH


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=SHIPPED_PATH)
    parser.add_argument("--clips", type=int, default=300)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    if args.clips < 1:
        parser.error(f"--clips {args.clips}: at least one clip")

    model, processor = load(args.model)
    rng = random.Random(args.seed)
    right, asked, confusion = Counter(), Counter(), Counter()
    for _ in range(args.clips):
        example = world.video_example(rng)
        case = evaluate.Case(evaluate._prompt(example), evaluate._answer(example))
        got, _ = evaluate.ask(model, processor, case)
        for group in ("all", f"{len(example['scenes'][0].shapes)} shapes", case.expected):
            asked[group] += 1
            right[group] += got == case.expected
        confusion[case.expected, got] += 1
    print(f"{args.model}: {args.clips} clips at seed {args.seed}")
    for group in sorted(asked, key=lambda g: (g != "all", g)):
        print(f"  {group:10s} {right[group]}/{asked[group]}  {right[group] / asked[group]:.0%}")
    answers = sorted({got for _, got in confusion} | set(w.capitalize() + "." for w in world.DIRECTIONS))
    print("  expected \\ given  " + "  ".join(f"{a:>6s}" for a in answers))
    for expected in (d.capitalize() + "." for d in world.DIRECTIONS):
        print(f"  {expected:16s} " + "  ".join(f"{confusion[expected, a]:6d}" for a in answers))


if __name__ == "__main__":
    main()
