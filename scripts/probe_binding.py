"""Which side keeps the default model from picking the asked shape (docs/default-model.md, "Which side fails to
bind"): a fresh decoder of the default architecture trained on "What color is the {shape}?" about the world's
pictures alone, with the vision tower's output replaced or altered by --features; then 150 held-out colour
questions answered greedily through `evaluate.ask`, split by how many shapes the picture holds. Exploratory:
one run is one noisy measurement.

    --features oracle          the word embeddings (the fresh decoder's first, kept fixed) of each shape-centre
                               token's colour and kind, summed; zeros elsewhere
               spread          oracle, with the colour word also on every other token the shape's disc reaches
               spread-all      the colour and kind words on every token the shape's disc reaches
               tower           the shipped model's tower, or --tower's (trained on at a tenth of the decoder's
                               learning rate)
               tower:S         the tower's output times S
               kind+tower:S    the tower's output times S, plus the kind word at shape centres
    --only-centres             zeros on every token that holds no shape's centre
    --tower-lr-scale F         the tower's learning rate as a share of the decoder's (0: frozen)
    --aux-kind W               also train each shape-centre token's logits toward its kind's word, weight W

    .venv/bin/python scripts/probe_binding.py --features oracle --steps 600
"""

import argparse
import random
import time
from collections import Counter
from pathlib import Path

import mlx_qwen35.platform  # noqa: F401  (OpenBLAS before MLX runs anything)
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

import mlx_qwen35
from mlx_qwen35.train import default_model as dm
from mlx_qwen35.train import evaluate, world
from mlx_qwen35.train import trainer as training
from mlx_qwen35.train.data import collate
from mlx_qwen35.train.vision_pretrain import COLOR_IDS, KIND_IDS, token_labels

HELD_OUT_SEED = 7_000_003  # the questions of docs/default-model.md's "Picking the shape" tables


def word_ids(tokenizer, names) -> np.ndarray:
    """Index 0 (no shape) then each name's one-token id as it follows a space ("What color is the circle?")."""
    return np.array([0] + [tokenizer.encode(" " + name, add_special_tokens=False)[0] for name in names])


class Features:
    """What the decoder reads at each merged image token, per --features, from the row's scenes."""

    def __init__(self, kind: str, tokenizer, embeddings, only_centres: bool = False):
        # the words' embeddings as the fresh decoder starts: fixed keys, whatever training does to the table
        self.kind, self.table, self.only_centres = kind, mx.array(embeddings.weight), only_centres
        self.kind_words, self.colour_words = word_ids(tokenizer, world.SHAPES), word_ids(tokenizer, world.COLORS)
        self.current = None  # (kind word ids, colour word ids) of the images being encoded, -1: none

    def words(self, scene, grid) -> tuple[np.ndarray, np.ndarray]:
        labels = token_labels([scene], grid)
        centre = labels["kind"] > 0
        kinds = np.where(centre, self.kind_words[np.maximum(labels["kind"], 0)], -1)
        colours = np.where(centre, self.colour_words[np.maximum(labels["colour"], 0)], -1)
        if self.kind in ("spread", "spread-all"):
            rows, cols = grid[1] // 2, grid[2] // 2
            height, width = scene.height / rows, scene.width / cols
            for i in np.flatnonzero(~centre):
                r, c = divmod(int(i), cols)
                for shape in scene.shapes:
                    dx = max(c * width - shape.cx, 0, shape.cx - (c + 1) * width)
                    dy = max(r * height - shape.cy, 0, shape.cy - (r + 1) * height)
                    if dx * dx + dy * dy < shape.r * shape.r:
                        colours[i] = self.colour_words[COLOR_IDS[shape.color]]
                        if self.kind == "spread-all":
                            kinds[i] = self.kind_words[KIND_IDS[shape.kind]]
        return kinds, colours

    def embed(self, ids: np.ndarray) -> mx.array:
        return self.table[mx.array(np.maximum(ids, 0))] * present(ids)

    def __call__(self, tower, pixels, grid):
        kinds, colours = self.current
        if self.kind in ("oracle", "spread", "spread-all"):
            out = self.embed(kinds) + self.embed(colours)
        else:
            name, _, scale = self.kind.partition(":")
            out = tower(pixels, grid) * float(scale or 1.0)
            out = out + self.embed(kinds) if name == "kind+tower" else out
        return out * present(kinds) if self.only_centres else out


def present(ids: np.ndarray) -> mx.array:
    """[tokens, 1]: 1 where a word id is given, 0 where it is -1."""
    return mx.array((ids >= 0)[:, None].astype(np.float32))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", default="oracle")
    parser.add_argument("--tower", type=Path, help="a vision tower's weights (safetensors) instead of the shipped one's")
    parser.add_argument("--tower-lr-scale", type=float, default=dm.VISION_LR_SCALE,
                        help="the tower's learning rate as a share of the decoder's; 0 freezes it")
    parser.add_argument("--only-centres", action="store_true")
    parser.add_argument("--aux-kind", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--tokens-per-batch", type=int, default=1024)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--held-out", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    name, _, scale = args.features.partition(":")
    if name not in ("oracle", "spread", "spread-all", "tower", "kind+tower") or (scale and name not in (
            "tower", "kind+tower")):
        parser.error(f"--features {args.features!r}: choose oracle, spread, spread-all, tower[:S] or kind+tower:S")
    try:
        float(scale or 1.0)
    except ValueError:
        parser.error(f"--features {args.features!r}: the scale after ':' must be a number")
    if args.tower and not args.tower.is_file():
        parser.error(f"--tower {args.tower}: no such file")

    skeleton = Path("/tmp/probe-binding-skeleton")
    _, processor = dm.write_skeleton(skeleton, seed=args.seed)
    model = dm.build_model(skeleton, seed=args.seed)
    if args.tower:
        model.model.visual.load_weights(str(args.tower))
    elif args.features.startswith(("tower", "kind+tower")):
        shipped, _ = mlx_qwen35.load()
        model.model.visual.load_weights(list(tree_flatten(shipped.model.visual.parameters())))
        del shipped
    features = Features(args.features, processor.tokenizer, model.model.language_model.embed_tokens,
                        args.only_centres)
    tower = model.model.visual.__call__
    visual_class = type(model.model.visual)
    model.model.visual.__class__ = type(visual_class.__name__, (visual_class,),
                                        {"__call__": lambda self, pixels, grid: features(tower, pixels, grid)})
    image_token = model.config.image_token_id

    def rows():
        rng, thinking_rng = random.Random(args.seed + 123), random.Random(args.seed + 124)
        while True:
            example = world.image_example(rng, world.ask_color)
            row = dm.encode_example(example, processor, thinking_rng)
            row.words = features.words(example["scenes"][0], tuple(int(v) for v in row.image_grid_thw[0]))
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
        features.current = tuple(np.concatenate([row.words[j] for row in batch_rows]) for j in (0, 1))
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

    def held_out_accuracy(step):
        model.eval()
        rng, right, asked = random.Random(HELD_OUT_SEED), Counter(), Counter()
        for _ in range(args.held_out):
            example = world.image_example(rng, world.ask_color)
            case = evaluate.Case(evaluate._prompt(example), evaluate._answer(example))
            scene = example["scenes"][0]
            [(_, grid)] = processor.prepare(images=[world.draw(scene)])["image"]
            features.current = features.words(scene, tuple(int(v) for v in grid))
            got, _ = evaluate.ask(model, processor, case)
            for key in (len(scene.shapes), "all"):
                right[key] += got == case.expected
                asked[key] += 1
        print(f"step {step}  held-out colour right by shapes in the picture: "
              + "  ".join(f"{k}: {right[k]}/{asked[k]}" for k in (1, 2, 3, 4, "all")), flush=True)
        model.train()

    trainer = training.Trainer(model, None, training.TrainConfig(
        steps=args.steps, learning_rate=args.learning_rate, moe_aux_weight=0.01, mtp_weight=0.3, progress=False,
        grad_clip=1.0, weight_decay=0.01, dense_experts=True))

    def schedule(peak):
        return training.warmup_cosine(peak, 30, args.steps, start=peak * 0.01, final=peak * 0.1)

    if args.tower_lr_scale == 0:
        model.model.visual.freeze()
        trainer.optimizer = optim.AdamW(learning_rate=schedule(args.learning_rate), betas=dm.ADAM_BETAS,
                                        weight_decay=0.01)
    else:
        trainer.optimizer = optim.MultiOptimizer(
            [optim.AdamW(learning_rate=schedule(args.learning_rate * args.tower_lr_scale), betas=dm.ADAM_BETAS,
                         weight_decay=0.01),
             optim.AdamW(learning_rate=schedule(args.learning_rate), betas=dm.ADAM_BETAS, weight_decay=0.01)],
            [lambda path, _: path.startswith("model.visual")])
    batches = dm.length_batches(rows(), args.tokens_per_batch, seed=args.seed)
    start, seen = time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        batch_rows = next(batches)
        seen += len(batch_rows)
        record = trainer.train_step(with_aux(batch_rows))
        if step % args.every == 0 or step == args.steps:
            print(f"step {step}  rows {seen}  loss {record['loss']:.3f}  {time.perf_counter() - start:.0f} s",
                  flush=True)
            held_out_accuracy(step)


if __name__ == "__main__":
    main()
