"""Continue a trained default model through late stages of train-default's curriculum, to see what they give before
a whole run takes them: `--side-stage` side questions alone on the binding scaffold with places, then
`--left-right-stage` of the world's left/right questions alone through the tower, then `--count-stage` counting
rows alone (none unless asked; the tower frozen through them with `--count-frozen-tower`), then `--mix-steps`
steps of the settling mix (SETTLE_MIX), all at the schedule's final learning rate (the tower at `--tower-scale`
of it, a tenth unless asked) unless `--stage-rate` gives the stages their own, as train-default's `--late-rate`
does. The model goes to --output (its configs and tokenizer copied, the weights new), for
`mlx-qwen35 eval-default --model`.

    .venv/bin/python scripts/continue_default.py --output artifacts/continued --side-stage 7200 \\
        --left-right-stage 7200 --mix-steps 600 --mix-left-right 0.15 --stage-rate 4e-4
"""

import argparse
import itertools
import shutil
import sys
import time
from pathlib import Path

import mlx_qwen35.platform  # noqa: F401  (OpenBLAS before MLX runs anything)
import mlx.core as mx
import mlx.optimizers as optim

import mlx_qwen35
from mlx_qwen35.loading import DEFAULT_MODEL_PATH
from mlx_qwen35.train import default_model as dm
from mlx_qwen35.train import parallel
from mlx_qwen35.train.trainer import EXPERT_PATHS, TrainConfig, Trainer
from mlx_qwen35.train.vision_pretrain import class_means

FINAL_RATE = 2e-3 * 0.05  # train-default's peak times its schedule's final share


def with_conversations(rows, conversations, stages_rows: int, share: float):
    """`rows` with rows of `conversations` spread among its first `stages_rows` (`interleaved`), `share` of the
    stages' rows then, and the stages' new row count."""
    count = sum(1 for _ in dm.interleaved(range(stages_rows), itertools.repeat(None), share))  # the same spacing
    return itertools.chain(dm.interleaved(itertools.islice(rows, stages_rows), conversations, share), rows), count


def with_stage(rows, stage, after: int, count: int):
    """`rows`' first `after` rows, then `count` rows of `stage`, then the rest of `rows`."""
    return itertools.chain(itertools.islice(rows, after), itertools.islice(stage, count), rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH, help="the model to continue")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--side-stage", type=int, default=7200)
    parser.add_argument("--left-right-stage", type=int, default=7200)
    parser.add_argument("--count-stage", type=int, default=0,
                        help="after the left/right stage, this many counting rows alone (train-default's "
                             "count_example: each count 0-4 equally often), read through the tower")
    parser.add_argument("--count-frozen-tower", action="store_true",
                        help="the vision tower frozen while the count stage's rows train (from the first batch pool "
                             "wholly past the left/right stage's rows to the mix)")
    parser.add_argument("--mix-steps", type=int, default=600)
    parser.add_argument("--mix-left-right", type=float, default=0.0,
                        help="the mix also draws lone left/right questions at this weight beside SETTLE_MIX's")
    parser.add_argument("--mix-count", type=float, default=0.0,
                        help="counting rows (train-default's count_example, each count 0-4 equally often) in the mix "
                             "at this weight beside SETTLE_MIX's")
    parser.add_argument("--stage-images", type=float, default=0.0,
                        help="this share of the stages' rows are the mixed stage's image conversations (through the "
                             "tower, 1 to IMAGE_TURNS questions), added among the stages' own rows")
    parser.add_argument("--learning-rate", type=float, default=FINAL_RATE)
    parser.add_argument("--stage-rate", type=float, default=None,
                        help="the decoder's rate in the stages (the tower's --tower-scale of it); the mix keeps "
                             "--learning-rate")
    parser.add_argument("--tower-scale", type=float, default=dm.VISION_LR_SCALE,
                        help="the vision tower's rate as a share of the decoder's, in the stages and the mix")
    parser.add_argument("--reading-size", action="store_true",
                        help="training pictures under READING_SIDE px a side enlarged as they are read "
                             "(READING_PREPROCESSOR) instead of at the world's own sizes")
    parser.add_argument("--tokens-per-batch", type=int, default=2048)
    parser.add_argument("--experts", choices=EXPERT_PATHS, default="segmented",
                        help="how the routed experts run (train-default --experts; continuations so far: segmented)")
    parser.add_argument("--workers", type=int, default=1,
                        help="each step's rows in this many parts, each in a process of its own (train-default "
                        "--workers)")
    parser.add_argument("--seed", type=int, default=0, help="the stream's world seed is this plus SETTLE_SEED")
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args(argv)
    for flag, value in (("--side-stage", args.side_stage), ("--left-right-stage", args.left_right_stage),
                        ("--count-stage", args.count_stage), ("--mix-steps", args.mix_steps)):
        if value < 0:
            parser.error(f"{flag} {value}: 0 or more")
    if args.stage_rate is not None and args.stage_rate <= 0:
        parser.error(f"--stage-rate {args.stage_rate}: a rate above 0")
    for flag, weight in (("--mix-left-right", args.mix_left_right), ("--mix-count", args.mix_count)):
        if weight < 0:
            parser.error(f"{flag} {weight}: a weight, 0 or more")
    if args.count_frozen_tower and not args.count_stage:
        parser.error("--count-frozen-tower: only with --count-stage")
    if args.tower_scale < 0:
        parser.error(f"--tower-scale {args.tower_scale}: a share of the decoder's rate, 0 or more")
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: 1 or more")
    if not 0 <= args.stage_images < 1:
        parser.error(f"--stage-images {args.stage_images}: a share of the stages' rows, 0 or more and below 1")
    mix = dict(dm.SETTLE_MIX, **{name: weight for name, weight in (("left_right", args.mix_left_right),
                                                                    ("count", args.mix_count)) if weight})
    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there")
    if args.output.resolve() == args.model.resolve():
        parser.error("--output: a new directory, not the model being continued")

    continue_model(args, mix, workers=args.workers)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


@parallel.over_processes("workers")
def continue_model(args, mix: dict, workers: int = 1):
    """The continuation `args` ask for, in `workers` processes (`parallel`: only rank 0 writes and prints)."""
    writer = parallel.rank() == 0
    model, processor = mlx_qwen35.load(args.model)
    processor = dm.training_processor(processor.tokenizer,
                                      dm.READING_PREPROCESSOR if args.reading_size else dm.PREPROCESSOR)
    means = class_means(model.model.visual, processor, seed=args.seed + 5_000_101, position=True)
    rows = dm.world_rows(args.seed + dm.SETTLE_SEED, processor, means, sum_stage=0, first_stage=0, curriculum=0,
                         side_stage=args.side_stage, left_right_stage=args.left_right_stage, mix=mix)
    stages_rows = args.side_stage + args.left_right_stage
    if args.count_stage:
        counting = dm.grown_rows(args.seed + dm.SETTLE_SEED + 2, processor, {"count": 1.0})
        rows = with_stage(rows, counting, stages_rows, args.count_stage)
        stages_rows += args.count_stage
    count_from = args.side_stage + args.left_right_stage  # the count stage's first row among those drawn
    if args.stage_images:
        if args.count_stage:  # its place once the conversations are spread among the stages' rows
            spread = dm.interleaved(range(stages_rows), itertools.repeat(None), args.stage_images)
            count_from = next(i for i, row in enumerate(spread) if row == count_from)
        conversations = dm.grown_rows(args.seed + dm.SETTLE_SEED + 1, processor, {"image": 1.0})
        rows, stages_rows = with_conversations(rows, conversations, stages_rows, args.stage_images)
    batches = dm.length_batches(rows, args.tokens_per_batch, seed=args.seed)
    trainer = Trainer(model, None, TrainConfig(steps=1, learning_rate=args.learning_rate, moe_aux_weight=0.01,
                                               mtp_weight=0.3, progress=False, grad_clip=1.0, weight_decay=0.01,
                                               experts=args.experts, workers=workers))

    stage_share = (args.stage_rate or args.learning_rate) / args.learning_rate
    mixing_from = None if stages_rows else 1  # the mix's first step, once the stages' rows are spent

    def rate(peak):  # a fresh AdamW's first steps warmed, then the stages' rate held, then the mix's
        stages, mix_rate = optim.linear_schedule(peak * stage_share * 0.05, peak * stage_share, 20), \
            optim.linear_schedule(peak * 0.05, peak, 20)
        return lambda step: mix_rate(step) if mixing_from is not None else stages(step)  # read as it is then

    trainer.optimizer = dm.tower_and_decoder_optimizer(rate, args.learning_rate, args.tower_scale)
    partial = args.output.with_name(args.output.name + ".partial")
    if writer:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(args.model, partial, ignore=shutil.ignore_patterns("model.safetensors", "training_log.txt"))
    log = [f"# continue_default: {args.model}, {args.side_stage} side rows on the scaffold with places, "
           f"{args.left_right_stage} left/right rows through the tower"
           + (f", {args.count_stage} counting rows through the tower" if args.count_stage else "")
           + (" (frozen)" if args.count_frozen_tower else "")
           + (f", image conversations among them ({args.stage_images:.0%} of their rows)" if args.stage_images else "")
           + f", then {args.mix_steps} steps of SETTLE_MIX"
           + (f" with lone left/right questions at weight {args.mix_left_right}" if args.mix_left_right else "")
           + (f", counting rows at weight {args.mix_count}" if args.mix_count else "")
           + (f", pictures enlarged to {dm.READING_SIDE} px a side as read" if args.reading_size else "")
           + f"; learning rate {args.learning_rate}"
           + (f", in the stages {args.stage_rate}" if args.stage_rate is not None else "")
           + f" (tower {args.tower_scale}x), ~{args.tokens_per_batch} tokens a step"]
    say = print_now if writer else (lambda line: None)
    say(log[0])
    start, seen, step = time.perf_counter(), 0, 0
    frozen = False
    losses = []
    while mixing_from is None or step < mixing_from + args.mix_steps - 1:
        batch_rows = next(batches)
        seen += len(batch_rows)
        if mixing_from is None and seen >= stages_rows + dm.BATCH_POOL:  # the stages' last pool is spent
            if args.mix_steps == 0:
                break
            mixing_from = step + 1
            log.append(f"step {step + 1}  the stages' rows done ({seen} rows drawn): the mix from here")
            if frozen:
                model.model.visual.unfreeze()
                frozen = False
                log.append(f"step {step + 1}  the tower trains again")
        elif (args.count_frozen_tower and mixing_from is None and not frozen
              and seen - len(batch_rows) >= count_from + dm.BATCH_POOL):
            model.model.visual.freeze()
            frozen = True
            log.append(f"step {step + 1}  the tower frozen for the count stage ({seen} rows drawn)")
        step += 1
        record = trainer.train_step(batch_rows)
        losses.append(record["loss"])
        if step % args.log_every == 0:
            log.append(f"step {step:5d}  loss {sum(losses) / len(losses):.4f}  rows {seen}  "
                       f"lr {trainer.optimizer.optimizers[1].learning_rate.item():.2e}  "
                       f"tower {trainer.optimizer.optimizers[0].learning_rate.item():.2e}  "
                       f"{(time.perf_counter() - start) / 60:.1f} min")
            losses = []
            say(log[-1])
    log.append(f"# finished: {step} steps, {(time.perf_counter() - start) / 60:.1f} min")
    if writer:
        dm.save_weights(model, partial / "model.safetensors")
        (partial / "training_log.txt").write_text("\n".join(log) + "\n")
        shutil.rmtree(args.output, ignore_errors=True)
        partial.rename(args.output)


def print_now(line):
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
