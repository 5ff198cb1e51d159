"""`mlx-qwen35 train`: supervised fine-tuning from a JSONL file of chat rows (see train/data.py for the row
format; image and video parts hold file paths)."""

import argparse
import json
from pathlib import Path

from . import parallel


def train_main(argv=None) -> int:
    from .trainer import EXPERT_PATHS

    parser = argparse.ArgumentParser(prog="mlx-qwen35 train", description=__doc__)
    parser.add_argument("model", help="checkpoint directory to fine-tune")
    parser.add_argument("--data", required=True, help="training rows, JSONL")
    parser.add_argument("--val", help="validation rows, JSONL")
    parser.add_argument("--output", required=True, help="directory for checkpoints / the adapter")
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--targets", nargs="*", help="module path patterns to wrap (default: decoder projections)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--grad-checkpoint", action="store_true")
    parser.add_argument("--moe-aux-weight", type=float, default=0.0)
    parser.add_argument("--mtp-weight", type=float, default=0.0)
    parser.add_argument("--experts", choices=EXPERT_PATHS, default="gathered",
                        help="how the MoE's routed experts run in training (same results): the model's gather_mm, "
                             "every expert, or each expert's chosen rows (fastest on a CPU)")
    parser.add_argument("--workers", type=int, default=1, help="each step's rows in this many parts, each part's "
                        "loss and gradients in a process of its own (token means over the whole step)")
    parser.add_argument("--prompt-loss-weight", type=float, default=0.0,
                        help="also learn the prompts' text at this weight (answers: 1; images and videos: never)")
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--resume", help="training checkpoint directory to continue from")
    parser.add_argument("--no-thinking", action="store_true", help="render rows with enable_thinking=False")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: 1 or more")

    try:
        validation = fine_tune(args, workers=args.workers)
    except MissingTokenizer as error:
        parser.error(str(error))
    if validation is not None and parallel.rank() == 0:  # under mlx.launch every process returns it
        print(f"validation loss {validation:.4f}")
    return 0


class MissingTokenizer(ValueError):
    pass


@parallel.over_processes("workers")
def fine_tune(args, workers: int = 1):
    """The fine-tune `args` ask for, in `workers` processes (`parallel`); the validation loss when there are
    validation rows."""
    from ..loading import load
    from .data import encode_all
    from .lora import DEFAULT_TARGETS, apply_lora
    from .trainer import TrainConfig, Trainer

    model, processor = load(args.model, dtype=args.dtype)
    if processor is None:
        raise MissingTokenizer(f"{args.model} has no tokenizer files")

    def read(path):
        lines = Path(path).read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    thinking = not args.no_thinking
    rows = encode_all(read(args.data), processor, enable_thinking=thinking)
    val_rows = encode_all(read(args.val), processor, enable_thinking=thinking) if args.val else None
    if args.lora:
        apply_lora(model, args.targets or DEFAULT_TARGETS, args.rank, args.alpha, seed=args.seed)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                         dtype=args.dtype, grad_checkpoint=args.grad_checkpoint, moe_aux_weight=args.moe_aux_weight,
                         mtp_weight=args.mtp_weight, prompt_loss_weight=args.prompt_loss_weight, experts=args.experts,
                         workers=workers, eval_every=args.eval_every, save_every=args.save_every, seed=args.seed)
    trainer = Trainer(model, rows, config, val_rows=val_rows, output_dir=args.output)
    if args.resume:
        trainer.resume(args.resume)
    trainer.fit(max(0, args.steps - trainer.step))
    trainer.save(args.output)
    return trainer.evaluate() if val_rows else None
