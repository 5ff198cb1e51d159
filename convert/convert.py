"""Convert a Hugging Face Qwen 3.5 checkpoint (float or block-FP8) into one that mlx_qwen35.load reads: the same
tensor names and layout (per-expert MoE tensors stacked into the fused HF tensors), float tensors in --dtype,
and optionally MLX affine quantisation with a mixed recipe. Source shards are read a block of rows at a time and
written straight into planned output shards, so memory stays near one block whatever the model size.

    python -m convert SOURCE OUTPUT [--bits 4|8] [--group-size 32|64|128] [--dtype bfloat16] [--check]
"""

import argparse
import errno
import json
import math
import os
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx_qwen35  # noqa: F401  (loads the BLAS before MLX; see mlx_qwen35.platform)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_qwen35.config import ConfigError, ModelConfig
from mlx_qwen35.loading import (EXTRA_PREFIXES, FLOAT32_SUFFIXES, PER_EXPERT_KEY, CheckpointError, resolve_path,
                                sanitize_key)
from mlx_qwen35.models.qwen35 import Model

from . import writer
from .source import FP8_ACTIVATION_SUFFIXES, SourceTensor, fp8_block_size, inventory

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
# The router and the shared-expert gate pick experts: 4-bit errors there flip choices, so they stay at 8 bits.
EIGHT_BIT_MODULES = ("mlp.gate", "mlp.shared_expert_gate")
# in_proj_a/b feed the DeltaNet decay and beta ([Hv, H], tiny): errors compound through the recurrence.
FLOAT_MODULES = ("linear_attn.in_proj_a", "linear_attn.in_proj_b")
COPIED_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "LICENSE*")
NOT_COPIED = {"config.json", writer.INDEX_NAME}
NORM_WEIGHT = re.compile(r"norm[^.]*\.weight$")
BLOCK_BYTES = 32 * 2**20  # float32 bytes per block of rows read, converted and written at once


class ConvertError(ValueError):
    pass


@dataclass
class Destination:
    """One tensor of the model (or a kept extra) and how it is written."""

    name: str
    shape: tuple
    dtype: mx.Dtype | None  # None: copied as stored (integer tensors)
    stored: str  # the source's safetensors dtype
    quant: dict | None = None  # {"group_size", "bits"} when quantised
    outputs: list = field(default_factory=list)
    rows_covered: list = field(default_factory=list)

    def output_names(self) -> tuple:
        if self.name.endswith(".weight"):
            module = self.name.removesuffix(".weight")
            return self.name, f"{module}.scales", f"{module}.biases"
        return self.name, f"{self.name}_scales", f"{self.name}_biases"


@dataclass
class Piece:
    """A source tensor and the first row it fills in its destination (rows = flattened leading dims)."""

    source: SourceTensor
    destination: Destination
    first_row: int


@dataclass
class ConversionReport:
    output: Path
    tensors: int
    bytes_written: int
    seconds: float
    quantization: dict | None
    notes: list
    check: object = None


def convert(source, output, bits: int | None = None, group_size: int = 64, dtype: str = "bfloat16",
            max_shard_size="5GB", force: bool = False, check: bool = False, progress: bool = True,
            log=print) -> ConversionReport:
    """Convert `source` (a local directory or a hub id) into a new directory `output`. See the module docstring."""
    start = time.perf_counter()
    if bits is not None and bits not in BITS:
        raise ConvertError(f"unsupported --bits {bits}: MLX affine quantisation here supports {list(BITS)}")
    if group_size not in GROUP_SIZES:
        raise ConvertError(f"unsupported --group-size {group_size}: choose one of {list(GROUP_SIZES)}")
    if dtype not in DTYPES:
        raise ConvertError(f"unsupported --dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    try:
        max_shard_size = writer.parse_size(max_shard_size)
    except ValueError as error:
        raise ConvertError(f"unreadable --max-shard-size {max_shard_size!r} (examples: 5GB, 500MB)") from error
    source = resolve_source(source)
    output = Path(output).expanduser().absolute()
    check_paths(source, output, force)

    try:
        config = ModelConfig.from_path(source)
        if config.raw.get("quantization"):
            raise ConvertError(f"{source} is already MLX-quantised; convert from the float or FP8 checkpoint")
        block = fp8_block_size(config.raw)
        tensors = inventory(source, block)
        destinations, pieces, quantization, notes = plan(config, tensors, DTYPES[dtype], bits, group_size)
    except (CheckpointError, ConfigError, FileNotFoundError) as error:
        raise ConvertError(str(error)) from error
    for note in notes:
        log(f"note: {note}")

    temporary = output.parent / f".{output.name}.partial-{os.getpid()}-{secrets.token_hex(3)}"
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary.mkdir()
    shards = None
    try:
        groups = [d.outputs for d in destinations]
        shards = writer.ShardedWriter(temporary, groups, max_shard_size)
        free = shutil.disk_usage(temporary).free
        if free < shards.total_bytes:
            raise ConvertError(f"not enough disk space at {output.parent}: the output needs "
                               f"{shards.total_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB are free")
        shards.open()
        written = write_tensors(shards, pieces, progress)
        shards.close()
        write_config(config.raw, temporary, quantization, block is not None)
        copy_side_files(source, temporary)
        commit(temporary, output)
    except BaseException as error:
        if shards is not None:
            shards.abort()
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, OSError):
            reason = "no space left on device" if error.errno == errno.ENOSPC else "writing failed"
            raise ConvertError(f"{reason} while converting into {output} ({error}); the partial output was "
                               f"removed and {output} was left as it was") from error
        raise

    report = ConversionReport(output, len(pieces), written, time.perf_counter() - start, quantization, notes)
    what = f"{bits}-bit (group {group_size})" if bits else dtype
    log(f"wrote {output} ({what}): {len(pieces)} source tensors, {written / 1e9:.3f} GB in {report.seconds:.1f} s")
    if check:
        from .check import check_conversion

        report.check = check_conversion(source, output)
        log(f"check: {report.check}")
    return report


def resolve_source(source) -> Path:
    try:
        return resolve_path(source)
    except FileNotFoundError as error:
        if "Hugging Face hub" in str(error):
            raise ConvertError(f"{source!r} is not a local directory and cannot be fetched from the Hugging Face "
                               f"hub (offline, unknown or gated repo); download it first and pass its directory. "
                               f"({error.__cause__})") from error
        raise ConvertError(str(error)) from error
    except CheckpointError as error:
        raise ConvertError(str(error)) from error


def check_paths(source: Path, output: Path, force: bool):
    source = source.resolve()
    resolved = output.resolve()
    if resolved == source or source in resolved.parents or resolved in source.parents:
        raise ConvertError(f"the output {output} must not be, contain or lie inside the source {source}")
    if output.exists() and not force:
        raise ConvertError(f"{output} already exists; pass --force to replace it")
    if output.exists() and not output.is_dir():
        raise ConvertError(f"{output} exists and is not a directory")


def plan(config: ModelConfig, tensors: list, dtype: mx.Dtype, bits: int | None, group_size: int):
    """Map every source tensor to rows of a destination; decide dtypes and quantisation. Fails on unknown,
    missing or misshapen tensors before anything is written."""
    text = config.text_config
    model = Model(config)  # never evaluated: only its parameter names and shapes are used
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    # The vision tower stays in float: its matmuls are a small share of the work, and quality first.
    quantizable = [path for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
                   if hasattr(module, "to_quantized") and not path.startswith("model.visual.")]
    destinations, pieces, unknown, wrong_shapes, notes = {}, [], [], [], []
    dropped_activation_scales = 0

    for tensor in tensors:
        if tensor.scale is None and tensor.name.endswith(FP8_ACTIVATION_SUFFIXES) and config.raw.get(
                "quantization_config"):
            dropped_activation_scales += 1
            continue
        name = sanitize_key(tensor.name, config)
        if name is None:
            notes.append(f"dropped {tensor.name} (tied to the embeddings)")
            continue
        expert = PER_EXPERT_KEY.match(name)
        if expert and int(expert.group(2)) < text.num_experts:
            prefix, index, projection = expert.group(1), int(expert.group(2)), expert.group(3)
            H, I = text.hidden_size, text.moe_intermediate_size
            if projection == "down_proj":
                dest_name, first_row, shape = f"{prefix}.down_proj", index * H, (H, I)
            else:
                dest_name, shape = f"{prefix}.gate_up_proj", (I, H)
                first_row = index * 2 * I + (I if projection == "up_proj" else 0)
        else:
            dest_name, first_row, shape = name, 0, expected.get(name, tensor.shape)
        is_extra = dest_name.startswith(EXTRA_PREFIXES)
        if dest_name not in expected and not is_extra:
            unknown.append(tensor.name)
            continue
        if tensor.shape != shape:
            wrong_shapes.append(f"{tensor.name} {tensor.shape} (expected {shape})")
            continue
        destination = destinations.get(dest_name)
        if destination is None:
            full_shape = tensor.shape if is_extra else expected[dest_name]
            destination = destinations[dest_name] = Destination(
                dest_name, full_shape, float_dtype(dest_name, dtype) if tensor.is_float else None, tensor.dtype)
        destination.rows_covered.append((first_row, tensor.rows, tensor.name))
        pieces.append(Piece(tensor, destination, first_row))

    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown tensors: {listed(unknown)}")
    if wrong_shapes:
        problems.append(f"tensors with wrong shapes: {listed(wrong_shapes)}")
    missing = [name for name in expected if name not in destinations]
    incomplete = [problem for d in destinations.values() for problem in coverage_problems(d, text)]
    if missing or incomplete:
        problems.append(f"missing {len(missing) + len(incomplete)} tensors: {listed(missing + incomplete)}")
    if problems:
        raise ConvertError(f"the source does not match its config ({config.model_type}): " + "; ".join(problems))
    if dropped_activation_scales:
        notes.append(f"dropped {dropped_activation_scales} FP8 activation scales")

    quantization = None
    if bits:
        quantization = {"group_size": group_size, "bits": bits, "mode": "affine"}
        for path in quantizable:
            owned = [destinations[f"{path}.{n}"] for n in ("weight", "gate_up_proj", "down_proj")
                     if f"{path}.{n}" in destinations]
            settings = module_quantization(path, owned, group_size, bits, notes)
            if settings is None:
                quantization[path] = False
                continue
            if settings["bits"] != bits:
                quantization[path] = {**settings, "mode": "affine"}
            for destination in owned:
                destination.quant = settings

    order = list(dict.fromkeys(piece.destination.name for piece in pieces))
    for name in order:
        plan_outputs(destinations[name])
    return [destinations[n] for n in order], pieces, quantization, notes


def module_quantization(path: str, destinations: list, group_size: int, bits: int, notes: list) -> dict | None:
    if path.endswith(FLOAT_MODULES):
        return None
    undivided = [d for d in destinations if d.shape[-1] % group_size]
    if undivided:
        notes.append(f"left {path} unquantised: group size {group_size} does not divide its input dim "
                     f"{undivided[0].shape[-1]}")
        return None
    return {"group_size": group_size, "bits": 8 if path.endswith(EIGHT_BIT_MODULES) else bits}


def float_dtype(name: str, dtype: mx.Dtype) -> mx.Dtype:
    # Norm weights (text, MTP and vision) and the DeltaNet decay parameters stay float32, as the model uses them.
    if name.endswith(FLOAT32_SUFFIXES) or NORM_WEIGHT.search(name):
        return mx.float32
    return dtype


def coverage_problems(destination: Destination, text) -> list:
    """Rows of a stacked expert tensor that no source tensor fills, or that two fill."""
    rows = math.prod(destination.shape[:-1])
    pieces = sorted(destination.rows_covered)
    position, problems = 0, []
    for first, count, name in pieces:
        if first < position:
            problems.append(f"{name} (given twice)")
        position = max(position, first + count)
    if sum(count for _, count, _ in pieces) != rows or problems:
        if destination.name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            prefix = destination.name.rsplit(".", 1)[0]
            given = {name for _, _, name in pieces}
            projections = ("down_proj",) if destination.name.endswith("down_proj") else ("gate_proj", "up_proj")
            lacking = [f"{prefix}.{e}.{p}.weight" for e in range(text.num_experts) for p in projections
                       if not any(n.endswith(f"experts.{e}.{p}.weight") for n in given)]
            problems.extend(lacking or [f"{destination.name} (rows incomplete)"])
        elif not problems:
            problems.append(f"{destination.name} (rows incomplete)")
    return problems


def plan_outputs(destination: Destination):
    shape, quant = destination.shape, destination.quant
    if quant:
        weight, scales, biases = destination.output_names()
        packed = (*shape[:-1], shape[-1] * quant["bits"] // 32)
        grouped = (*shape[:-1], shape[-1] // quant["group_size"])
        float_type = writer.SAFETENSORS_DTYPE[destination.dtype]
        destination.outputs = [writer.OutputTensor(weight, "U32", packed),
                               writer.OutputTensor(scales, float_type, grouped),
                               writer.OutputTensor(biases, float_type, grouped)]
    elif destination.dtype is None:
        destination.outputs = [writer.OutputTensor(destination.name, destination.stored, shape)]
    else:
        destination.outputs = [writer.OutputTensor(destination.name, writer.SAFETENSORS_DTYPE[destination.dtype],
                                                   shape)]


def write_tensors(shards: writer.ShardedWriter, pieces: list, progress: bool) -> int:
    from tqdm import tqdm

    total = sum(t.nbytes for t in shards.tensors.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting", disable=not progress,
               dynamic_ncols=True)
    written = 0
    previous_limit = mx.set_cache_limit(BLOCK_BYTES * 4)
    try:
        for count, piece in enumerate(pieces, 1):
            tensor, destination = piece.source, piece.destination
            step = max(1, BLOCK_BYTES // (4 * tensor.row_len))
            for start in range(0, tensor.rows, step):
                stop = min(start + step, tensor.rows)
                rows = tensor.read_rows(start, stop)
                row = piece.first_row + start
                if destination.quant:
                    quantized = mx.quantize(rows.astype(destination.dtype), destination.quant["group_size"],
                                            destination.quant["bits"])
                    parts = zip(destination.outputs, quantized)
                elif destination.dtype is not None:
                    parts = [(destination.outputs[0], rows.astype(destination.dtype))]
                else:
                    parts = [(destination.outputs[0], rows)]
                for output, array in parts:
                    n = shards.write_rows(output.name, row, array)
                    written += n
                    bar.update(n)
            bar.set_postfix_str(f"{count}/{len(pieces)} tensors", refresh=False)
    finally:
        mx.set_cache_limit(previous_limit)
        bar.close()
    return written


def write_config(raw: dict, directory: Path, quantization: dict | None, was_fp8: bool):
    config = dict(raw)
    if was_fp8:
        config.pop("quantization_config", None)  # the weights are dequantised now
    config.pop("quantization", None)
    if quantization:
        config["quantization"] = quantization
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def copy_side_files(source: Path, directory: Path):
    """Tokenizer, chat template, generation and (pre)processor configs: everything but weights and config."""
    for pattern in COPIED_PATTERNS:
        for file in source.glob(pattern):
            if file.is_file() and file.name not in NOT_COPIED and not file.name.endswith(".index.json"):
                shutil.copy2(file, directory / file.name)


def commit(temporary: Path, output: Path):
    """Rename the finished directory into place; an existing output (with --force) is replaced only now."""
    if output.exists():
        old = output.parent / f".{output.name}.replaced-{secrets.token_hex(3)}"
        os.rename(output, old)
        os.rename(temporary, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(temporary, output)


def listed(names, limit=8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convert", description="Convert a Hugging Face Qwen 3.5 checkpoint (float or FP8) for "
        "mlx_qwen35, optionally quantised (MLX affine; router and shared-expert gate at 8 bits, DeltaNet "
        "in_proj_a/b, conv1d, norms, A_log and dt_bias unquantised).")
    parser.add_argument("source", help="checkpoint directory, or a hub id to download")
    parser.add_argument("output", help="new directory to write (refused if it exists, unless --force)")
    parser.add_argument("--bits", type=int, default=None, help=f"quantise to {' or '.join(map(str, BITS))} bits")
    parser.add_argument("--group-size", type=int, default=64, help=f"one of {list(GROUP_SIZES)} (default 64)")
    parser.add_argument("--dtype", default="bfloat16", help=f"float tensors: {sorted(DTYPES)} (default bfloat16; "
                        "norms, A_log and dt_bias stay float32)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--check", action="store_true",
                        help="compare the converted model with the source in float32 on a fixed prompt")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--expert-store", action="store_true",
                        help="also write the per-layer expert store that `load(..., expert_cache_gb=X)` streams from")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = convert(args.source, args.output, bits=args.bits, group_size=args.group_size, dtype=args.dtype,
                         max_shard_size=args.max_shard_size, force=args.force, check=args.check,
                         progress=not args.quiet)
    except ConvertError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if report.check is not None and not report.check.finite:
        print("error: the converted model's logits are not finite", file=sys.stderr)
        return 1
    if args.expert_store:
        from mlx_qwen35.experts.store import write_expert_store

        write_expert_store(report.output, log=None if args.quiet else print)
    return 0
