"""`mlx-qwen35 ...`: thin subcommands over the Python API."""

import argparse
import sys

from . import platform
from .demo import DEFAULT_PATH, ensure_random_checkpoint

DIM, RESET = "\033[2m", "\033[0m"


def print_stream(responses, thinking: bool):
    """Print streamed responses as they come; with `thinking` (the prompt ends in the template's open
    `<think>`), the reasoning first, dimmed on a terminal, then the answer on a line of its own, without the
    `</think>` marker or the blank lines around it. Returns the last response."""
    dim, reset = (DIM, RESET) if sys.stdout.isatty() else ("", "")
    last, pending, thought_shown, answering = None, "", False, not thinking
    print(dim if thinking else "", end="")
    for last in responses:
        text = last.text
        if thinking:
            pending += text
            if "</think>" not in pending:
                if len(pending) > 8:  # hold back what could be the start of "</think>"
                    thought_shown = thought_shown or bool(pending[:-8].strip())
                    print(pending[:-8], end="", flush=True)
                    pending = pending[-8:]
                continue
            before, text = pending.split("</think>", 1)
            thought_shown = thought_shown or bool(before.strip())
            print(before.rstrip("\n") + reset, end="")
            thinking, pending = False, ""
        if not answering:
            text = text.lstrip("\n")
            if not text:
                continue
            print("\n" if thought_shown else "", end="")
            answering = True
        print(text, end="", flush=True)
    print((pending + reset) if thinking else "")
    return last


def _model_path(args):
    """--model, else the trained default model when it is built, else a tiny random checkpoint (said so)."""
    from .loading import default_model_path

    if args.model:
        return args.model
    try:
        return default_model_path()
    except FileNotFoundError:
        print(f"NOTE: no --model given and the trained default model is not built (mlx-qwen35 train-default); "
              f"using a tiny RANDOM-weight Qwen 3.5 checkpoint at {DEFAULT_PATH} (built on first use). Its output "
              f"is meaningless: it shows the loading and generation path working.", file=sys.stderr)
        return ensure_random_checkpoint()


def _sampling(args) -> dict:
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


def _load(args):
    from .loading import load

    return load(_model_path(args), args.dtype, expert_cache_gb=args.expert_cache_gb)


def _expert_stats(model) -> str:
    cache = getattr(model, "expert_cache", None)
    if cache is None:
        return ""
    o = cache.summary()["overall"]
    return (f"expert cache: hit rate {o['hit_rate']:.1%}, {o['misses']} misses, {o['bytes_read'] / 2**20:.1f} MiB read "
            f"in {o['read_seconds']:.2f} s, stalled {o['stall_seconds']:.2f} s, prefetch accuracy "
            f"{o['prefetch_accuracy']:.1%}")


def _stats(response) -> str:
    return (f"prompt {response.prompt_tokens} tokens ({response.prompt_tokens_processed} processed), "
            f"{response.prefill_tps:.1f} tok/s; generated {response.generation_tokens} tokens, "
            f"{response.decode_tps:.1f} tok/s; time to first token {response.time_to_first_token:.3f} s; "
            f"peak memory {response.peak_memory_gb:.2f} GB")


def cmd_info(args):
    import mlx.core as mx

    print(f"device: {platform.device_name()} (default dtype {platform.default_dtype()})")
    print(f"CPU: {platform.cpu_setup()}")
    print(f"MLX: {mx.__version__}")
    if not args.model:
        return
    from mlx.utils import tree_flatten

    from .loading import load_model

    model = load_model(args.model, args.dtype)
    text = model.config.text_config
    params = tree_flatten(model.parameters())
    nbytes = sum(p.nbytes for _, p in params)
    kinds = {t: text.layer_types.count(t) for t in sorted(set(text.layer_types))}
    print(f"model: {model.config.model_type}, {text.num_hidden_layers} layers {kinds}, hidden {text.hidden_size}")
    if text.is_moe:
        print(f"experts: {text.num_experts}, {text.num_experts_per_tok} routed per token")
    quantization = model.config.raw.get("quantization")
    if quantization:
        print(f"quantization: {quantization.get('bits')} bit, group size {quantization.get('group_size')}")
    print(f"weights in memory: {nbytes / 2**30:.2f} GiB")
    itemsize = (mx.float32 if model.model.language_model.embed_tokens.weight.dtype == mx.float32
                else mx.bfloat16).size
    attention_layers = text.layer_types.count("full_attention")
    linear_layers = text.num_hidden_layers - attention_layers
    per_token = attention_layers * 2 * text.num_key_value_heads * text.head_dim * itemsize
    conv_dim = 2 * text.linear_num_key_heads * text.linear_key_head_dim + \
        text.linear_num_value_heads * text.linear_value_head_dim
    fixed = linear_layers * (text.linear_num_value_heads * text.linear_value_head_dim * text.linear_key_head_dim * 4
                             + (text.linear_conv_kernel_dim - 1) * conv_dim * itemsize)
    print(f"cache: {fixed / 2**20:.1f} MiB of DeltaNet state + {per_token / 2**10:.1f} KiB per token of context "
          f"({(fixed + 32768 * per_token) / 2**30:.2f} GiB at 32K tokens)")
    print(f"kept for later features: {len(model.extra_weights)} tensors (vision tower, MTP head)")


def _read_tools(path):
    """--tools: the tool schemas in a JSON file, or a clear exit naming the file and what is wrong."""
    from pathlib import Path

    from .generation.parsing import tool_schemas

    if path is None:
        return None
    if not Path(path).is_file():
        raise SystemExit(f"error: --tools: no such file {path}")
    try:
        return tool_schemas(Path(path).read_text())
    except ValueError as error:
        raise SystemExit(f"error: --tools {path}: {error}") from None


def _noting_tool_calls(responses, calls: list):
    for response in responses:
        calls += [event.tool_call for event in response.events if event.kind == "tool_call"]
        yield response


def cmd_generate(args):
    from .generation import stream_generate

    tools = _read_tools(args.tools)
    if args.raw and tools:
        raise SystemExit("error: --tools are declared through the chat template; leave out --raw")
    model, processor = _load(args)
    prompt = args.prompt
    media = [{"type": "image", "image": path} for path in args.image] + \
        [{"type": "video", "video": path} for path in args.video]
    if args.raw and media:
        raise SystemExit("error: --image/--video go through the chat template; leave out --raw "
                         "(or put the placeholders in the prompt through the Python API)")
    if not args.raw:
        prompt = [{"role": "user", "content": media + [{"type": "text", "text": args.prompt}] if media
                   else args.prompt}]
    responses = stream_generate(model, processor, prompt, max_tokens=args.max_tokens, stop=args.stop,
                                enable_thinking=not args.no_thinking, speculative=args.speculative, tools=tools,
                                **_sampling(args))
    calls = []
    last = print_stream(_noting_tool_calls(responses, calls), thinking=not args.raw and not args.no_thinking)
    _print_tool_calls(calls)
    print(_stats(last), file=sys.stderr)
    if args.stats and args.speculative:
        print(f"speculative decoding: {last.accepted} of {last.drafted} drafted tokens accepted "
              f"({last.acceptance_rate:.1%}), {last.forward_passes} main-model passes", file=sys.stderr)
    if args.stats and _expert_stats(model):
        print(_expert_stats(model), file=sys.stderr)


def _print_tool_calls(calls):
    from .generation.parsing import call_text

    for call in calls:
        print(f"tool call: {call_text(call)}", file=sys.stderr)


def cmd_chat(args):
    from .generation import Chat

    tools = _read_tools(args.tools)
    model, processor = _load(args)
    chat = Chat(model, processor, system=args.system, tools=tools, enable_thinking=not args.no_thinking,
                max_tokens=args.max_tokens, **_sampling(args))
    print("Type a message; " + ("/tool TEXT answers a tool call with its result; " if tools else "")
          + "/reset clears the conversation, /quit or Ctrl-D leaves.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            break
        if line.strip() in ("/quit", "/exit"):
            break
        if line.strip() == "/reset":
            chat.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        role = "user"
        command, *result = line.split(maxsplit=1)
        if command == "/tool":
            if not tools:
                print("(no tools are declared: start the chat with --tools FILE)", file=sys.stderr)
                continue
            if not result:
                print("(/tool needs the tool's result: /tool RESULT)", file=sys.stderr)
                continue
            role, line = "tool", result[0].strip()
        calls = []
        print_stream(_noting_tool_calls(chat.stream(line, role=role), calls), thinking=chat.enable_thinking)
        _print_tool_calls(calls)
        print(_stats(chat.last_response), file=sys.stderr)
        if args.stats and _expert_stats(model):
            print(_expert_stats(model), file=sys.stderr)


def cmd_convert(args):
    from convert.convert import main as convert_main

    status = convert_main(args.convert_args)
    if status:
        raise SystemExit(status)


def cmd_bench(args):
    from .bench import (attention_memory, bench, cpu_bench, kernels_bench, speculative_bench, tower_bench, train_bench,
                        vision_bench)

    if args.tower_workers:
        return tower_bench(tuple(args.tower_workers), steps=args.tower_steps, repeats=args.repeats)
    if args.train:
        return train_bench(tuple(args.train_setups), rows=args.train_rows, repeats=args.repeats)
    if args.speculative:
        return speculative_bench(args.model, tuple(args.speculative), repeats=args.repeats)
    if args.attention_memory:
        return attention_memory(tuple(args.prompt_lengths))
    if args.cpu:
        return cpu_bench(repeats=args.repeats)
    if args.kernels:
        return kernels_bench(tuple(args.prompt_lengths), repeats=args.repeats,
                             peers=[p for p in args.compare if p in ("mlx-lm", "mlx-vlm")] or None)
    if args.vision:
        return vision_bench(tuple(args.prompt_lengths), repeats=args.repeats, compare=args.compare,
                            depth=args.vision_depth)
    from .demo import QWEN35_0_8B_TEXT_CONFIG, build_random_checkpoint

    path = args.model
    if not path:
        path = DEFAULT_PATH.with_name("random-qwen3_5-0.8b-shaped")
        print(f"NOTE: benchmarking a RANDOM-weight checkpoint with Qwen3.5-0.8B shapes at {path}",
              file=sys.stderr)
        if not (path / "model.safetensors").exists():
            build_random_checkpoint(path, text_config=QWEN35_0_8B_TEXT_CONFIG)
    bench(path, args.prompt_lengths, args.max_tokens, args.repeats, args.dtype, args.compare)


def _add_model_options(parser, sampling=True):
    parser.add_argument("--model", help="checkpoint directory (default: the built-in model)")
    parser.add_argument("--dtype", choices=sorted(platform.DTYPES))
    if not sampling:
        return
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-thinking", action="store_true", help="enable_thinking=False in the template")
    parser.add_argument("--expert-cache-gb", type=float,
                        help="MoE: stream routed experts through a cache of this many GB instead of loading them")
    parser.add_argument("--stats", action="store_true",
                        help="also print expert-cache and speculative-decoding statistics")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:  # the converter owns its own options (see `python -m convert --help`)
        return cmd_convert(argparse.Namespace(convert_args=argv[1:]))
    if argv[:1] == ["app"]:  # the Gradio app (needs the `app` extra: pip install 'mlx-qwen35[app]')
        from app.ui import main as app_main

        return app_main(argv[1:])
    if argv[:1] in (["train-default"], ["eval-default"]):  # the default model's training and evaluation
        from .train import default_model, evaluate

        return (default_model if argv[0] == "train-default" else evaluate).main(argv[1:])
    if argv[:1] == ["train"]:  # so does the trainer (`mlx-qwen35 train --help`)
        from .train.cli import train_main

        status = train_main(argv[1:])
        if status:
            raise SystemExit(status)
        return None
    parser = argparse.ArgumentParser(prog="mlx-qwen35", description="Qwen 3.5 in MLX")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="device, BLAS in use, and a model's size")
    _add_model_options(info, sampling=False)
    info.set_defaults(run=cmd_info)

    gen = sub.add_parser("generate", help="generate a reply to a prompt")
    _add_model_options(gen)
    gen.add_argument("--prompt", default="Hello, Qwen 3.5!")
    gen.add_argument("--raw", action="store_true", help="feed the prompt as raw text, without the chat template")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--image", action="append", default=[], help="image file or URL, shown before the prompt "
                     "(repeatable)")
    gen.add_argument("--video", action="append", default=[], help="video file, shown after the images "
                     "(repeatable)")
    gen.add_argument("--tools", metavar="JSON_FILE", help="declare these tools (a JSON list of function schemas, "
                     "e.g. examples/tools.json); the calls the model makes are printed to stderr, parsed")
    gen.add_argument("--speculative", type=int, default=0, metavar="K", help="draft K tokens per step with the "
                     "checkpoint's MTP head and check them in one pass (greedy only; same output, maybe faster)")
    gen.set_defaults(run=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat in the terminal")
    _add_model_options(chat)
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--tools", metavar="JSON_FILE", help="declare these tools (a JSON list of function schemas); "
                      "the calls are printed to stderr, parsed, and `/tool RESULT` sends a tool's result")
    chat.set_defaults(run=cmd_chat)

    sub.add_parser("convert", help="convert a Hugging Face checkpoint (options: `mlx-qwen35 convert --help`)")
    sub.add_parser("train", help="fine-tune, full or LoRA (options: `mlx-qwen35 train --help`)")
    sub.add_parser("train-default", help="train the shipped default model from a seed (`--help` for options)")
    sub.add_parser("eval-default", help="held-out accuracy of the default model on its world (`--help`)")
    sub.add_parser("app", help="the Gradio chat app on 127.0.0.1 (options: `mlx-qwen35 app --help`)")

    bench = sub.add_parser("bench", help="prefill/decode tok/s and peak memory, optionally against mlx-lm")
    _add_model_options(bench, sampling=False)
    bench.add_argument("--prompt-lengths", type=int, nargs="+", default=[512])
    bench.add_argument("--max-tokens", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--compare", nargs="*", default=[],
                       choices=["mlx-lm", "mlx-vlm", "exact-activations", "plain-cpu", "mlx-lm-our-cpu"],
                       help="peers (on OpenBLAS without our other CPU settings, as their users run them); ours "
                       "with MLX's exp-based activations (exact-activations) or without our CPU settings "
                       "(plain-cpu); mlx-lm with them (mlx-lm-our-cpu)")
    bench.add_argument("--speculative", type=int, nargs="+", metavar="K", help="MTP speculative decoding with K "
                       "drafts per step against plain greedy decoding on the world's text questions (default "
                       "model: the shipped one)")
    bench.add_argument("--cpu", action="store_true", help="what each of our CPU settings (platform.py) is worth "
                       "on its own: matrix-vector bandwidth and a large elementwise op, each in a fresh process")
    bench.add_argument("--attention-memory", action="store_true",
                       help="peak memory of prompt attention at --prompt-lengths instead of generation speed")
    bench.add_argument("--kernels", action="store_true",
                       help="the delta-rule scan at --prompt-lengths against mlx-lm, mlx-vlm and mx.fast (with "
                       "--compare mlx-lm / mlx-vlm: only those peers)")
    bench.add_argument("--vision", action="store_true",
                       help="image encode time at --prompt-lengths pixels per side against mlx-vlm's tower")
    bench.add_argument("--train", action="store_true", help="the default model's training step in each of "
                       "--train-setups, interleaved")
    bench.add_argument("--train-setups", nargs="+", default=["dense", "segmented", "gathered"],
                       metavar="PATH[:WORKERS[:POOL]]", help="with --train: the routed experts' path (train-default "
                       "--experts), each step's rows in WORKERS parts, each in a process of its own (--workers, "
                       "default 1), batches "
                       "cut from pools of POOL rows (default the recipe's BATCH_POOL); the first is the baseline")
    bench.add_argument("--train-rows", type=int, default=192, help="with --train: rows of the mixed stream timed")
    bench.add_argument("--tower-workers", type=int, nargs="+", metavar="WORKERS", help="the default model's tower "
                       "pretraining (run 45's batches: 24 pictures and 12 clips, motion head on) in each of these "
                       "numbers of processes, interleaved; the first is the baseline")
    bench.add_argument("--tower-steps", type=int, default=30, help="with --tower-workers: steps timed")
    bench.add_argument("--vision-depth", type=int, help="with --vision: fewer blocks (memory runs at large sizes)")
    bench.set_defaults(run=cmd_bench)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
