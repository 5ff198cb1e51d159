"""Peak memory of the converter on a synthetic checkpoint larger than the memory target (not a test).

Writes a random Hugging Face layout Qwen 3.5 MoE checkpoint (per-expert tensors, several shards, the real
248320-row vocabulary) of --size-gb or more, generated a block of rows at a time so that the generator stays
small, then converts it in child processes (bfloat16, then 4-bit) and prints each child's peak RSS and time.

    python -m convert.bench_memory [--size-gb 2.2] [--dir /tmp/qwen35-bench] [--keep]
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx_qwen35  # noqa: F401  (loads the BLAS before MLX)
import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_qwen35.config import ModelConfig
from mlx_qwen35.models.qwen35 import Model

from . import writer

REPO = Path(__file__).resolve().parents[1]


def synthetic_config(num_experts: int) -> dict:
    text = dict(vocab_size=248320, hidden_size=1024, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
                linear_key_head_dim=128, linear_value_head_dim=128, num_experts=num_experts, num_experts_per_tok=8,
                moe_intermediate_size=512, shared_expert_intermediate_size=512, max_position_embeddings=4096,
                rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                                     mrope_section=[11, 11, 10], mrope_interleaved=True))
    return {"model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
            "text_config": text, "tie_word_embeddings": False}


def write_checkpoint(path: Path, size_gb: float, shard_gb: float = 0.6) -> int:
    """Random bf16 weights in the per-expert layout; returns the bytes written."""
    H, I = 1024, 512
    # Each expert holds 3*I*H bf16 values; the rest of the model is about 1.1 GB.
    experts = max(8, int((size_gb * 1e9 - 1.1e9) / (4 * 3 * I * H * 2)) + 1)
    config = synthetic_config(experts)
    model = Model(ModelConfig.from_dict(config))
    specs = []
    for name, value in tree_flatten(model.parameters()):
        if name.endswith("experts.gate_up_proj"):
            prefix = name.removesuffix(".gate_up_proj")
            specs += [(f"{prefix}.{e}.{p}.weight", (I, H)) for e in range(experts) for p in ("gate_proj", "up_proj")]
        elif name.endswith("experts.down_proj"):
            prefix = name.removesuffix(".down_proj")
            specs += [(f"{prefix}.{e}.down_proj.weight", (H, I)) for e in range(experts)]
        else:
            specs.append((name, tuple(value.shape)))
    tensors = [writer.OutputTensor(name, "F32" if name.endswith(("A_log", "norm.weight")) else "BF16", shape)
               for name, shape in specs]
    path.mkdir(parents=True)
    shards = writer.ShardedWriter(path, [[t] for t in tensors], int(shard_gb * 1e9))
    shards.open()
    key = mx.random.key(0)
    for tensor in tensors:
        rows, row_len = (max(1, tensor.nbytes // tensor.row_bytes), tensor.shape[-1])
        step = max(1, (16 << 20) // (4 * row_len))
        for start in range(0, rows, step):
            key, sub = mx.random.split(key)
            block = mx.random.normal((min(step, rows - start), row_len), key=sub) * 0.02
            shards.write_rows(tensor.name, start, block.astype(mx.float32 if tensor.dtype == "F32" else mx.bfloat16))
    shards.close()
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return sum(t.nbytes for t in tensors)


def measure(command: list) -> tuple:
    """(peak RSS in bytes, seconds) of one child process, from its own rusage (os.wait4)."""
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{' '.join(command)} failed with exit code {child.returncode}")
    return maxrss_bytes(usage.ru_maxrss), time.perf_counter() - start


def maxrss_bytes(value: int) -> int:
    return value if sys.platform == "darwin" else value * 1024  # Linux reports KiB, macOS bytes


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.2)
    parser.add_argument("--dir", default="/tmp/qwen35-convert-bench")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    source = root / "source"
    start = time.perf_counter()
    size = write_checkpoint(source, args.size_gb)
    shards = len(list(source.glob("*.safetensors")))
    print(f"source: {size / 1e9:.2f} GB of bf16 tensors in {shards} shards, per-expert MoE layout "
          f"(written in {time.perf_counter() - start:.1f} s)")

    baseline, _ = measure([sys.executable, "-c", "import convert.convert"])
    print(f"{'run':<34}{'peak RSS':>12}{'time':>10}{'output':>12}")
    label = 'python -c "import convert.convert"'
    print(f"{label:<34}{baseline / 2**20:>9.0f} MiB")
    for label, extra in (("bfloat16", []), ("4-bit, group 64", ["--bits", "4"])):
        output = root / label.split(",")[0].replace("-", "")
        rss, seconds = measure([sys.executable, "-m", "convert", str(source), str(output), "--quiet", *extra])
        size = directory_bytes(output) / 1e9
        print(f"{'convert ' + label:<34}{rss / 2**20:>9.0f} MiB{seconds:>8.1f} s{size:>9.2f} GB")
    children = maxrss_bytes(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(f"max over all children (getrusage RUSAGE_CHILDREN ru_maxrss): {children / 2**20:.0f} MiB")
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
