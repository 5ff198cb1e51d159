"""`mlx-qwen35 bench`: prefill and decode speed and peak memory, optionally beside mlx-lm and mlx-vlm on the
same weights. Each engine runs through its own generation loop (ours: generate_tokens; mlx-lm and mlx-vlm:
their generate_step) in a fresh process per round, engines interleaved, and the medians are reported."""

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

from . import platform
from .generation import generate_tokens

# What a peer's user has: OpenBLAS loaded (the setting for every engine), but none of our other
# CPU settings (platform.py, kernels/cpu_qmv.py).
PLAIN_CPU = {"MLX_QWEN35_NO_GEMV_FORWARD": "1", "MLX_QWEN35_NO_MALLOC_TUNING": "1", "MLX_QWEN35_NO_CPU_QMV": "1"}
# --compare name -> (label, runner, environment); "mlx-qwen35" always runs.
ENGINES = {
    "mlx-qwen35": ("mlx-qwen35", "ours", {}),
    "exact-activations": ("ours, MLX exp", "ours-exact", {}),
    "plain-cpu": ("ours, plain CPU", "ours", PLAIN_CPU),
    "mlx-lm": ("mlx-lm", "mlx-lm", PLAIN_CPU),
    "mlx-lm-our-cpu": ("mlx-lm, our CPU", "mlx-lm", {}),
    "mlx-vlm": ("mlx-vlm", "mlx-vlm", PLAIN_CPU),
}


def run_ours(model, prompt, max_tokens):
    last = None
    for last in generate_tokens(model, prompt, max_tokens):
        pass
    return last.prefill_tps, last.decode_tps


def run_ours_exact(model, prompt, max_tokens):
    """Ours with MLX's own SiLU and sigmoid instead of kernels/activations.py's CPU polynomial."""
    from .kernels.activations import exact

    with exact():
        return run_ours(model, prompt, max_tokens)


def _timed(tokens, prompt_length):
    """(prefill tok/s, decode tok/s) of a peer's token generator: time to its first token, then the rest."""
    start = time.perf_counter()
    decode_start = None
    n = 0
    for n, _ in enumerate(tokens, start=1):
        if n == 1:
            decode_start = time.perf_counter()
            prefill_tps = prompt_length / (decode_start - start)
    return prefill_tps, (n - 1) / (time.perf_counter() - decode_start)


def run_mlx_lm(model, prompt, max_tokens):
    from mlx_lm.generate import generate_step

    return _timed(generate_step(mx.array(prompt), model, max_tokens=max_tokens), len(prompt))


def run_mlx_vlm(model, prompt, max_tokens):
    """mlx-vlm's own text-only loop (its generate_step with no pixels), greedy."""
    from mlx_vlm.generate.ar import generate_step

    return _timed(generate_step(mx.array(prompt)[None], model, None, None, max_tokens=max_tokens,
                                temperature=0.0), len(prompt))


def load_mlx_vlm(path, dtype):
    from mlx_vlm.utils import load_model

    model = load_model(Path(path))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def load_mlx_lm(path, dtype):
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(path))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def _load_ours(path, dtype):
    from .loading import load_model

    return load_model(path, dtype)


RUNNERS = {"ours": (_load_ours, run_ours), "ours-exact": (_load_ours, run_ours_exact),
           "mlx-lm": (load_mlx_lm, run_mlx_lm), "mlx-vlm": (load_mlx_vlm, run_mlx_vlm)}


def run_engine(runner, path, prompt_lengths, max_tokens, dtype):
    """One engine in this process: load, then per prompt length a warm-up and a timed run. Prints one JSON line
    per length (what `bench` reads from the child process)."""
    loader, run = RUNNERS[runner]
    model = loader(path, platform.parse_dtype(dtype) or platform.default_dtype())
    for length in prompt_lengths:
        prompt = mx.random.randint(0, 240000, (length,), key=mx.random.key(length)).tolist()
        run(model, prompt[:16], 4)  # warm-up
        mx.reset_peak_memory()
        prefill, decode = run(model, prompt, max_tokens)
        print(json.dumps({"length": length, "prefill": prefill, "decode": decode,
                          "peak_gib": mx.get_peak_memory() / 2**30, "cpu": platform.cpu_setup()}), flush=True)
    del model
    gc.collect()


def bench(path, prompt_lengths=(512,), max_tokens=64, repeats=3, dtype=None, compare=()):
    dtype = platform.parse_dtype(dtype) or platform.default_dtype()
    dtype_name = next(name for name, value in platform.DTYPES.items() if value == dtype)
    engines = {name: ENGINES[name] for name in ["mlx-qwen35", *compare] if name in ENGINES}
    print(f"# device {platform.device_name()}, dtype {dtype}, {max_tokens} new tokens, median of {repeats}, "
          f"engines interleaved round by round, each in a fresh process")
    # Each round runs every engine in turn, so a slow or fast spell of this shared machine lands on all engines
    # alike; a fresh process each time gives every engine exactly its own CPU settings (platform.py).
    samples = {(name, length): [] for name in engines for length in prompt_lengths}
    setups = {}
    for _ in range(repeats):
        for name, (label, runner, environment) in engines.items():
            command = [sys.executable, "-m", "mlx_qwen35.bench", runner, str(path), dtype_name, str(max_tokens),
                       *map(str, prompt_lengths)]
            result = subprocess.run(command, env={**os.environ, **environment}, capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"{label} failed:\n{result.stderr[-2000:]}")
            for line in result.stdout.splitlines():
                if line.startswith("{"):
                    record = json.loads(line)
                    samples[(name, record["length"])].append(record)
                    setups[name] = record["cpu"]
    for name, (label, _, _) in engines.items():
        print(f"# {label}: {setups.get(name)}")
    rows = {}
    for (name, length), runs in samples.items():
        label = engines[name][0]
        prefill = statistics.median(r["prefill"] for r in runs)
        decode = statistics.median(r["decode"] for r in runs)
        rows[(label, length)] = (prefill, decode)
        prefill_runs = ", ".join(f"{r['prefill']:.1f}" for r in runs)
        decode_runs = ", ".join(f"{r['decode']:.2f}" for r in runs)
        print(f"{label:16s} prompt {length:5d}: prefill {prefill:8.1f} tok/s  decode {decode:6.2f} tok/s  "
              f"peak {max(r['peak_gib'] for r in runs):.2f} GiB  (prefill runs {prefill_runs}; decode runs "
              f"{decode_runs})", flush=True)
    for other in engines:
        if other == "mlx-qwen35":
            continue
        for length in prompt_lengths:
            ours, theirs = samples[("mlx-qwen35", length)], samples[(other, length)]
            prefill = statistics.median(a["prefill"] / b["prefill"] for a, b in zip(ours, theirs))
            decode = statistics.median(a["decode"] / b["decode"] for a, b in zip(ours, theirs))
            print(f"ratio vs {engines[other][0]}, prompt {length}: prefill {prefill:.2f}x, decode {decode:.2f}x "
                  f"(medians of the per-round ratios)")
    return rows


def cpu_probe(repeats=5):
    """In this process: matrix-vector bandwidth (1.2 GB of 6,144 x 1,024 float32 matrices, read cold, as a decode
    step reads its weights) and the time of one elementwise op with a 50 MB output. Prints one JSON line."""
    def median_seconds(fn):
        mx.eval(fn())
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    from .kernels import expert_matmul

    weights = [mx.random.normal((6144, 1024), key=mx.random.key(i)) for i in range(47)]
    x = mx.random.normal((1, 1024))
    a, b = mx.random.normal((2048, 6144)), mx.random.normal((2048, 6144))
    mx.eval(weights, x, a, b)
    gigabytes = sum(w.nbytes for w in weights) / 1e9
    # A decode step's routed experts: 10 of 16 4-bit experts at Qwen3.5-397B's gate_up shape [2048, 4096].
    packed, scales, biases = mx.quantize(mx.random.normal((16, 2048, 4096)) * 0.02, group_size=64, bits=4)
    rows, experts = mx.random.normal((10, 1, 4096)), mx.arange(10).astype(mx.uint32)
    mx.eval(packed, scales, biases, rows)
    experts_seconds = median_seconds(lambda: expert_matmul(rows, packed, experts, scales=scales, biases=biases,
                                                           group_size=64, bits=4))
    print(json.dumps({"matvec_gb_s": gigabytes / median_seconds(lambda: [x @ w.T for w in weights]),
                      "multiply_ms": 1000 * median_seconds(lambda: a * b),
                      "experts_gb_s": 10 * packed[0].nbytes / 1e9 / experts_seconds, "cpu": platform.cpu_setup()}))


def cpu_bench(repeats=5):
    """Our CPU settings one at a time (platform.py), each in a fresh process: what each is worth on its own."""
    def alone(variable):
        return {k: v for k, v in PLAIN_CPU.items() if k != variable}

    settings = {"OpenBLAS only (what the peers get)": PLAIN_CPU,
                "+ matrix-vector forwarding": alone("MLX_QWEN35_NO_GEMV_FORWARD"),
                "+ malloc keeps freed blocks": alone("MLX_QWEN35_NO_MALLOC_TUNING"),
                "+ quantised matrix-vector": alone("MLX_QWEN35_NO_CPU_QMV"),
                "all (ours)": {}}
    print(f"# CPU settings, median of {repeats}; matrix-vector: 47 float32 6144x1024 matrices (1.2 GB) times one "
          f"row, cold; multiply: two [2048, 6144] float32 arrays; experts: 10 of 16 4-bit [2048, 4096] experts "
          f"(group 64) times one row each, as expert_matmul runs them")
    for label, environment in settings.items():
        result = subprocess.run([sys.executable, "-m", "mlx_qwen35.bench", "cpu-probe", str(repeats)],
                                env={**os.environ, **environment}, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{label} failed:\n{result.stderr[-2000:]}")
        record = json.loads(result.stdout.splitlines()[-1])
        print(f"{label:36s} matrix-vector {record['matvec_gb_s']:5.1f} GB/s   multiply {record['multiply_ms']:6.1f} ms   "
              f"experts {record['experts_gb_s']:5.2f} GB/s of packed weights", flush=True)


def attention_memory(lengths=(4096, 8192, 16384), heads=8, kv_heads=2, head_dim=256):
    """Peak memory of one causal attention call over a whole prompt: ours (query blocks) against a single
    mx.fast.scaled_dot_product_attention call, at Qwen3.5-0.8B attention shapes."""
    from .models.attention import causal_attention

    print(f"# attention peak memory above inputs, {heads}/{kv_heads} heads, head_dim {head_dim}, "
          f"device {platform.device_name()}, float32")
    for length in lengths:
        q = mx.random.normal((1, heads, length, head_dim))
        k = mx.random.normal((1, kv_heads, length, head_dim))
        mx.eval(q, k)
        attends = [lambda: causal_attention(q, k, k, head_dim**-0.5)]
        # The single call holds the L x L scores (and as much again for the mask and softmax): run it only
        # where that fits in half of this machine's memory.
        single_bytes = 2 * heads * length * length * 4
        if single_bytes < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2:
            attends.append(lambda: mx.fast.scaled_dot_product_attention(q, k, k, scale=head_dim**-0.5,
                                                                         mask="causal"))
        peaks = []
        for attend in attends:
            mx.clear_cache()
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            mx.eval(attend())
            peaks.append((mx.get_peak_memory() - base) / 2**20)
        single = (f"{peaks[1]:8.0f} MiB" if len(peaks) > 1
                  else f"not run (its scores alone: {single_bytes / 2 / 2**30:.0f} GiB)")
        print(f"length {length:6d}: blocked {peaks[0]:8.0f} MiB   single call {single}", flush=True)


def _load_peer_scans():
    """The peers' delta-rule scans, each with our signature (q, k, v, g, beta, state) -> (y, state)."""
    peers = {}
    try:
        from mlx_lm.models.gated_delta import gated_delta_ops

        peers["mlx-lm gated_delta_ops (its CPU path)"] = gated_delta_ops
    except ImportError:
        pass
    peers["mx.fast.gated_delta_update"] = lambda q, k, v, g, beta, state: tuple(
        mx.fast.gated_delta_update(q, k, v, g, beta, state))
    try:
        import importlib.util
        from pathlib import Path

        # Loaded by file: the mlx_vlm package __init__ pulls in Pillow, OpenCV and an HTTP server.
        spec = importlib.util.find_spec("mlx_vlm")
        if spec is not None:
            file = Path(spec.origin).parent / "models" / "qwen3_5" / "gated_delta.py"
            module_spec = importlib.util.spec_from_file_location("_mlx_vlm_gated_delta", file)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            peers["mlx-vlm gated_delta_chunked"] = module.gated_delta_chunked
    except (ImportError, FileNotFoundError, AttributeError):
        pass
    return peers


def kernels_bench(lengths=(512, 2048, 8192), heads=32, key_heads=16, dim=128, repeats=3, peers=None):
    """Our delta-rule entry against the peers' scans, float32, one process. Work counted as the
    recurrence's 6 * Dk * Dv FLOPs per token and head (S k, k u^T, S q). `peers`: names ("mlx-lm", "mlx-vlm",
    "mx.fast") to keep, e.g. for more rounds against the fastest peer alone; None keeps them all."""
    from .kernels import gated_delta_recurrent, gated_delta_update

    scans = {name: scan for name, scan in _load_peer_scans().items()
             if peers is None or any(name.startswith(peer + " ") for peer in peers)}
    engines = {"mlx-qwen35 gated_delta_update": gated_delta_update, **scans}
    print(f"# delta-rule scan, B=1, Hv={heads}, Hk={key_heads}, Dk=Dv={dim}, float32, device "
          f"{platform.device_name()}, {platform.cpu_setup()}, median of {repeats}")
    for length in lengths:
        keys = mx.random.split(mx.random.key(length), 5)
        q = mx.random.normal((1, length, key_heads, dim), key=keys[0])
        k = mx.random.normal((1, length, key_heads, dim), key=keys[1])
        q = q * mx.rsqrt((q * q).sum(-1, keepdims=True)) * dim**-0.5
        k = k * mx.rsqrt((k * k).sum(-1, keepdims=True))
        v = mx.random.normal((1, length, heads, dim), key=keys[2])
        g = mx.exp(-mx.random.uniform(0.0, 0.5, (1, length, heads), key=keys[3]))
        beta = mx.random.uniform(shape=(1, length, heads), key=keys[4])
        state = mx.zeros((1, heads, dim, dim))
        mx.eval(q, k, v, g, beta)
        reference = gated_delta_recurrent(q[:, :256], k[:, :256], v[:, :256], g[:, :256], beta[:, :256], state)
        flops = 6 * dim * dim * heads * length
        errors = {}
        for name, scan in engines.items():  # also the warm-up
            check = scan(q[:, :256], k[:, :256], v[:, :256], g[:, :256], beta[:, :256], state)
            errors[name] = (mx.linalg.norm(check[0] - reference[0]) / mx.linalg.norm(reference[0])).item()
        # Rounds visit every engine once, so a slow spell of this shared machine hits all of them alike; a
        # ratio is the median of the per-round ratios.
        samples = {name: [] for name in engines}
        for _ in range(repeats):
            for name, scan in engines.items():
                start = time.perf_counter()
                mx.eval(scan(q, k, v, g, beta, state))
                samples[name].append(time.perf_counter() - start)
        ours_name = "mlx-qwen35 gated_delta_update"
        for name, runs in samples.items():
            median = statistics.median(runs)
            print(f"T={length:5d}  {name:40s} {median:8.3f} s  {flops / median / 1e9:7.1f} GFLOP/s  "
                  f"(rel. error vs recurrence on 256 steps {errors[name]:.1e}; runs "
                  f"{', '.join(f'{t:.3f}' for t in runs)})", flush=True)
        ratios = {name: statistics.median(t / o for t, o in zip(runs, samples[ours_name]))
                  for name, runs in samples.items() if name != ours_name}
        print("          " + ", ".join(f"{ratio:.2f}x faster than {name}" for name, ratio in ratios.items())
              + " (median of per-round ratios)", flush=True)


QWEN35_0_8B_VISION = dict(depth=12, hidden_size=768, intermediate_size=3072, num_heads=12, out_hidden_size=1024,
                          patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                          in_channels=3, hidden_act="gelu_pytorch_tanh")


def vision_bench(sizes=(448, 896), repeats=3, compare=("mlx-vlm",), depth=None):
    """Image encode time and peak memory of our vision tower and mlx-vlm's on the same random weights with
    the Qwen3.5-0.8B vision shapes (optionally fewer blocks: activations are freed block by block, so the peak
    above the weights is a one-block quantity), float32, one process."""
    shapes = dict(QWEN35_0_8B_VISION, depth=depth or QWEN35_0_8B_VISION["depth"])
    from mlx.utils import tree_flatten, tree_map

    from .models.vision import VisionConfig, VisionModel

    ours = VisionModel(VisionConfig.from_dict(shapes))
    ours.update(tree_map(lambda p: mx.random.normal(p.shape) * (p.shape[-1] ** -0.5 if p.ndim > 1 else 0.1)
                         + (1.0 if p.ndim == 1 else 0.0), ours.parameters()))
    mx.eval(ours.parameters())
    engines = {"mlx-qwen35": lambda pixels, grid: ours(pixels, grid)}
    try:
        if "mlx-vlm" not in compare:
            raise ImportError("not asked for (--compare mlx-vlm)")
        from mlx_vlm.models.qwen3_5.config import VisionConfig as PeerConfig
        from mlx_vlm.models.qwen3_5.vision import VisionModel as PeerModel

        peer = PeerModel(PeerConfig.from_dict({**shapes, "model_type": "qwen3_5"}))
        peer.load_weights(list(peer.sanitize(dict(tree_flatten(ours.parameters()))).items()))
        mx.eval(peer.parameters())
        engines["mlx-vlm"] = lambda pixels, grid: peer(pixels, grid)[0]
    except ImportError as error:
        print(f"# mlx-vlm not available ({error}); timing ours only")
    weights_mib = sum(p.nbytes for _, p in tree_flatten(ours.parameters())) / 2**20
    print(f"# vision tower, Qwen3.5-0.8B shapes (depth {shapes['depth']}, width 768; weights {weights_mib:.0f} MiB), "
          f"float32, device {platform.device_name()}, {platform.cpu_setup()}, median of {repeats}")
    for size in sizes:
        grid = mx.array([[1, size // 16, size // 16]])
        pixels = mx.random.normal(((size // 16) ** 2, 3 * 2 * 16 * 16))
        mx.eval(pixels)
        outputs, times = {}, {}
        for name, encode in engines.items():
            mx.eval(encode(pixels, grid))  # warm-up
            samples, peak = [], 0.0
            for _ in range(repeats):
                mx.clear_cache()
                mx.reset_peak_memory()
                start = time.perf_counter()
                outputs[name] = encode(pixels, grid)
                mx.eval(outputs[name])
                samples.append(time.perf_counter() - start)
                peak = max(peak, mx.get_peak_memory() / 2**20)
            times[name] = statistics.median(samples)
            print(f"{size}x{size} ({(size // 16) ** 2} patches)  {name:11s} {times[name]:7.3f} s  peak {peak:7.0f} MiB",
                  flush=True)
        if "mlx-vlm" in outputs:
            a, b = outputs["mlx-qwen35"], outputs["mlx-vlm"]
            agreement = (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()
            print(f"          ours {times['mlx-vlm'] / times['mlx-qwen35']:.2f}x the speed of mlx-vlm; "
                  f"outputs agree to {agreement:.1e} relative", flush=True)


def speculative_prompts(count: int, seed: int = 31):
    """Text questions of the default model's world with their generation settings: sums answered with a
    thinking block, tool calls (the XML call is most of the answer) and codes recalled from 300-token
    passages, `count` of each."""
    import random

    from .train import world

    rng, prompts = random.Random(seed), []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        prompts.append(("sum, thinking", [{"role": "user", "content": f"What is {a} + {b}?"}], None, True))
        tool = world.tool_example(rng)
        prompts.append(("tool call", tool["messages"][:1], tool["tools"], False))
        recall = world.recall_example(rng, 300, 300)
        prompts.append(("recall", recall["messages"][:1], None, False))
    return prompts


def speculative_bench(path=None, drafts=(1, 2), count=10, repeats=3, max_tokens=64):
    """Speculative decoding with the checkpoint's MTP head (default: the shipped default model) against plain
    greedy decoding, on the same prompts in one process: prints whether the tokens are identical, the share of
    drafts accepted and the decode speed (tokens after the first, over their time), median of `repeats`."""
    from .generation import stream_generate
    from .generation.speculative import require_mtp
    from .loading import load

    if not drafts or min(drafts) < 1:
        raise ValueError(f"--speculative takes draft counts of at least 1; got {list(drafts)}")
    model, processor = load(path)
    require_mtp(model)  # before timing the plain run
    prompts = speculative_prompts(count)
    print(f"# speculative decoding, {path or 'the default model'}, device {platform.device_name()}, "
          f"{len(prompts)} prompts ({count} per kind), greedy, at most {max_tokens} new tokens, median of {repeats}")
    baseline = None
    for k in (0, *drafts):
        runs = []
        for _ in range(repeats):
            tokens, decode_tokens, decode_time, drafted, accepted, by_kind = [], 0, 0.0, 0, 0, {}
            for kind, messages, tools, thinking in prompts:
                out = []
                for last in stream_generate(model, processor, messages, max_tokens=max_tokens, tools=tools,
                                            enable_thinking=thinking, speculative=k):
                    out.append(last.token)
                tokens.append(out)
                if last.generation_tokens > 1 and last.decode_tps > 0:
                    decode_tokens += last.generation_tokens - 1
                    decode_time += (last.generation_tokens - 1) / last.decode_tps
                if k:
                    drafted, accepted = drafted + last.drafted, accepted + last.accepted
                    d, a = by_kind.get(kind, (0, 0))
                    by_kind[kind] = (d + last.drafted, a + last.accepted)
            runs.append((decode_tokens / decode_time, tokens, drafted, accepted, by_kind))
        speed = statistics.median(r[0] for r in runs)
        _, tokens, drafted, accepted, by_kind = runs[0]
        if k == 0:
            baseline = (speed, tokens)
            print(f"plain greedy        decode {speed:7.1f} tok/s  ({sum(map(len, tokens))} tokens)")
            continue
        # In float32 on the CPU the replies are identical (the tests hold that). In bfloat16 a check of several
        # tokens at once rounds apart from one-token steps, and a near-tie can flip: counted, not hidden.
        differ = [i for i, (got, want) in enumerate(zip(tokens, baseline[1])) if got != want]
        same = "same tokens"
        if differ:
            got, want = tokens[differ[0]], baseline[1][differ[0]]
            at = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            same = (f"{len(differ)} of {len(tokens)} replies differ from plain greedy (the first: reply {differ[0]} "
                    f"from token {at})")
        kinds = ", ".join(f"{kind} {a / d:.0%}" for kind, (d, a) in by_kind.items() if d)
        print(f"MTP, {k} draft{'s' if k > 1 else ' '}      decode {speed:7.1f} tok/s  {speed / baseline[0]:.2f}x  "
              f"accepted {accepted}/{drafted} = {accepted / max(drafted, 1):.0%} ({kinds}); {same}")


def train_bench(setups=("dense", "segmented", "gathered"), rows=192, repeats=5, seed=0):
    """The default model's training step, loss and gradients (AdamW is the same for every setup), for each setup
    "PATH[:WORKERS[:POOL]]" (the routed experts' path, trainer.EXPERT_PATHS; each step's rows in WORKERS parts,
    each in a process of its own, TrainConfig.workers, default 1; rows sorted into batches by length in pools of
    POOL, default BATCH_POOL) on the same weights and the same `rows` rows of the recipe's full-grown mixed
    stream (train-default's TRAIN_MIX) in batches of at most 2,048 padded tokens. Each setup runs in fresh
    processes (`parallel.run_in_processes`, one or WORKERS) once a round, setups interleaved in each of `repeats`
    rounds: the rows' own tokens a second (padding not counted) and each round's ratio to the first setup,
    medians."""
    from .train import default_model as recipe
    from .train.parallel import run_in_processes
    from .train.trainer import EXPERT_PATHS

    parsed = []
    for setup in setups:
        path, *numbers = setup.split(":")
        numbers += ["1", str(recipe.BATCH_POOL)][len(numbers):]
        if path not in EXPERT_PATHS or len(numbers) > 2 or not all(n.isdigit() and int(n) >= 1 for n in numbers):
            raise ValueError(f"--train-setups {setup!r}: PATH[:WORKERS[:POOL]], PATH one of "
                             f"{', '.join(EXPERT_PATHS)}, WORKERS and POOL whole numbers from 1")
        parsed.append((setup, path, *map(int, numbers)))
    rounds, shapes = [], {}
    for _ in range(repeats):
        timings = {}
        for setup, path, workers, pool in parsed:
            timings[setup], real, shapes[setup] = run_in_processes(train_pass_seconds, workers, path, workers, pool,
                                                                   rows, seed)
        rounds.append(timings)
    first = parsed[0][0]
    print(f"# training step (loss and gradients) of the default model, {rows} rows of the mixed stream ({real} "
          f"tokens) in batches of at most 2,048 padded tokens, {repeats} rounds, setups interleaved, each setup in "
          f"fresh processes; {platform.cpu_setup()}")
    for setup, *_ in parsed:
        batches, padded = shapes[setup]
        ratio = statistics.median(r[first] / r[setup] for r in rounds)
        print(f"{setup:16s} {real / statistics.median(r[setup] for r in rounds):7.0f} tok/s   "
              f"{batches} batches, padding {1 - real / padded:.1%}   "
              f"{ratio:.2f}x {first} (median of per-round ratios)", flush=True)
    return rounds


def fresh_default_model(seed: int):
    """(model, training processor) of train-default's recipe at its initial weights for `seed`."""
    import tempfile

    from .train import default_model as recipe

    with tempfile.TemporaryDirectory() as directory:
        _, processor = recipe.write_skeleton(Path(directory) / "model", seed)
        return recipe.build_model(Path(directory) / "model", seed), processor


def train_pass_seconds(path: str, workers: int, pool: int, rows: int, seed: int):
    """(seconds, the rows' own tokens, (batches, padded tokens)) of the second pass of `train_bench`'s setup over
    its batches in this process's group: the first takes the first calls' costs (memory first touched)."""
    from itertools import islice

    from .train import default_model as recipe
    from .train.data import collate
    from .train.trainer import TrainConfig, Trainer, split_rows

    model, processor = fresh_default_model(seed)
    drawn = list(islice(recipe.grown_rows(seed, processor), rows))
    trainer = Trainer(model, None, TrainConfig(moe_aux_weight=0.01, mtp_weight=0.3, experts=path, workers=workers,
                                               progress=False))
    batches = [[collate(part, 0, trainer.spatial_merge) for part in split_rows(batch, workers)]
               for batch in recipe.length_batches(iter(drawn), 2048, pool=pool, seed=seed)]
    model.train()
    for batch in batches:
        mx.eval(trainer.gradients(batch))
    start = time.perf_counter()
    for batch in batches:
        mx.eval(trainer.gradients(batch))
    seconds = time.perf_counter() - start
    padded = sum(p["input_ids"].size for batch in batches for p in batch)
    return seconds, sum(len(r) for r in drawn), (len(batches), padded)


def tower_bench(workers=(1, 2), steps=30, repeats=3, seed=0):
    """The default model's tower pretraining (`pretrain_vision` with run 45's batches: 24 pictures and 12 clips,
    the motion head on) in each number of processes of `workers`, each in fresh processes once a round, rounds
    interleaved: seconds a step and each round's ratio to the first, medians."""
    from .train.parallel import run_in_processes

    if not workers or any(w < 1 for w in workers) or steps < 1:
        raise ValueError(f"--tower-workers {' '.join(map(str, workers))} --tower-steps {steps}: whole numbers from 1")
    rounds = [{w: run_in_processes(tower_pass_seconds, w, steps, seed) for w in workers} for _ in range(repeats)]
    print(f"# tower pretraining step of the default model (24 pictures and 12 clips, motion head on), {steps} steps "
          f"after 5 untimed, {repeats} rounds, each in fresh processes; {platform.cpu_setup()}")
    for w in workers:
        ratio = statistics.median(r[workers[0]] / r[w] for r in rounds)
        seconds = statistics.median(r[w] for r in rounds) / steps
        print(f"{w} process{'es' if w > 1 else '  '}  {seconds:6.3f} s a step   {ratio:.2f}x {workers[0]} (median of "
              "per-round ratios)", flush=True)
    return rounds


def tower_pass_seconds(steps: int, seed: int) -> float:
    """Seconds of `pretrain_vision` over `steps` steps (and its one held-out check) in this process's group, after
    a first call of 5 steps."""
    from .train import default_model as recipe
    from .train.vision_pretrain import pretrain_vision

    model, processor = fresh_default_model(seed)
    settings = dict(seed=seed, log=lambda line: None, max_shapes=recipe.VISION_MAX_SHAPES, pictures=24, videos=12,
                    motion_weight=1.0)
    pretrain_vision(model.model.visual, processor, 5, **settings)
    start = time.perf_counter()
    pretrain_vision(model.model.visual, processor, steps, log_every=steps, **settings)
    return time.perf_counter() - start


if __name__ == "__main__":  # the child processes of `bench` and `cpu_bench`
    if sys.argv[1] == "cpu-probe":
        cpu_probe(int(sys.argv[2]))
    else:  # runner, path, dtype, max_tokens, prompt lengths
        runner, path, dtype, max_tokens, *lengths = sys.argv[1:]
        run_engine(runner, path, [int(n) for n in lengths], int(max_tokens), dtype)
