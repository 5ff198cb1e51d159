"""Reading a Hugging Face checkpoint one row block at a time: the safetensors headers say where every tensor's
bytes are, so a block of rows is read straight from the file (no mmap, so nothing stays resident) and decoded,
FP8 included.

FP8 checkpoints (Qwen/Qwen3.5-*-FP8, DeepSeek-V3 style) store `X.weight` as float8 e4m3fn with a companion
`X.weight_scale_inv` of shape [ceil(out/bm), ceil(in/bn)] for `weight_block_size` [bm, bn]; the weight is
fp8_value * scale_inv of its block, despite the name. Sources read for this convention: transformers 5.23
integrations/finegrained_fp8.py (`_dequantize_fp8_weight` and `Fp8Dequantize` multiply by `weight_scale_inv`; a
fused 3-D expert tensor's companion is `experts.gate_up_proj_scale_inv`, quantizers/base.py), vLLM
layers/quantization/utils/fp8_utils.py (`block_quant_to_tensor_quant` broadcasts the block scales over the
weight) and mlx-lm models/deepseek_v3.py (`dequant` pads to whole blocks, then multiplies). That Qwen's own FP8
releases use it: AI-Hypercomputer/maxtext PR #5076 (Qwen/Qwen3.5-35B-A3B-FP8 and -397B-A17B-FP8, 128x128 blocks;
embeddings, norms, router and shared-expert gates not converted), ml-explore/mlx-lm PR #1224 (Qwen3.6-35B-A3B-FP8,
same architecture: per-expert `experts.{e}.gate_proj.weight` + `weight_scale_inv`, plus `activation_scale`
tensors to drop), NVIDIA-NeMo/Automodel PR #3495 (split FP8 experts in Qwen3.5-MoE), and lablup/mlxcel issue
#1361 (quantization_config {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}, bf16 scales),
so bf16 and f32 scales are both read. Not checked against a downloaded Qwen FP8 file.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_qwen35.loading import CheckpointError, check_safetensors_file, safetensors_files

FP8_SCALE_SUFFIX = "_scale_inv"
# Static-activation FP8 exports carry these; with weights dequantised they mean nothing.
FP8_ACTIVATION_SUFFIXES = (".activation_scale", ".input_scale")
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3"}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
            "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
NUMPY_DTYPE = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F8_E4M3": np.uint8,
               "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
               "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
MLX_DTYPE = {"F64": mx.float32, "F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16,
             "F8_E4M3": mx.float32, "I64": mx.int64, "I32": mx.int32, "I16": mx.int16, "I8": mx.int8,
             "U64": mx.uint64, "U32": mx.uint32, "U16": mx.uint16, "U8": mx.uint8, "BOOL": mx.bool_}


def e4m3fn_table() -> np.ndarray:
    """float32 value of each of the 256 float8 e4m3fn codes: 1 sign, 4 exponent (bias 7), 3 mantissa bits;
    no infinities, and only S.1111.111 is NaN."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent, mantissa = (codes >> 3) & 0xF, codes & 0x7
    values = np.where(exponent == 0, mantissa / 8.0 * 2.0**-6, (1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7.0))
    values = sign * values
    values[(exponent == 15) & (mantissa == 7)] = np.nan
    return values.astype(np.float32)


E4M3FN = e4m3fn_table()


@dataclass
class SourceTensor:
    """One tensor of a source shard. Rows are over the flattened leading dims: [prod(shape[:-1]), shape[-1]]."""

    name: str
    file: Path
    dtype: str
    shape: tuple
    offset: int  # absolute byte offset of the data in `file`
    scale: "SourceTensor | None" = None  # FP8 block scales
    block: tuple | None = None

    @property
    def row_len(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1]) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    def read_rows(self, start: int, stop: int) -> mx.array:
        """Rows [start, stop) as an MLX array [stop - start, row_len]; FP8 is dequantised to float32."""
        raw = read_bytes(self.file, self.offset + start * self.row_len * ITEMSIZE[self.dtype],
                         (stop - start) * self.row_len, NUMPY_DTYPE[self.dtype]).reshape(stop - start, self.row_len)
        if self.dtype == "F8_E4M3":
            return mx.array(E4M3FN[raw] * self._block_scales(start, stop))
        if self.dtype == "BF16":
            return mx.array(raw).view(mx.bfloat16)
        return mx.array(raw).astype(MLX_DTYPE[self.dtype])

    def _block_scales(self, start, stop) -> np.ndarray:
        """The scale of every element of rows [start, stop): [stop - start, row_len] float32."""
        if self.scale is None:
            raise CheckpointError(f"{self.name} is float8 but has no {self.name}{FP8_SCALE_SUFFIX} block scales")
        scales = self.scale.read_all_numpy()
        block_rows, block_cols = self.block
        matrix_rows = self.shape[-2] if len(self.shape) >= 2 else 1
        scale_rows, scale_cols = scales.shape[-2:]
        rows = np.arange(start, stop)
        # Flattened row g is row g % R of matrix g // R; each matrix has its own grid of scale rows.
        scale_row = (rows // matrix_rows) * scale_rows + (rows % matrix_rows) // block_rows
        scale_col = np.arange(self.row_len) // block_cols
        return scales.reshape(-1, scale_cols)[scale_row][:, scale_col]

    def read_all_numpy(self) -> np.ndarray:
        raw = read_bytes(self.file, self.offset, math.prod(self.shape), NUMPY_DTYPE[self.dtype])
        if self.dtype == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32).reshape(self.shape)

    def read(self) -> mx.array:
        return self.read_rows(0, self.rows).reshape(self.shape)


def read_bytes(file: Path, offset: int, count: int, dtype) -> np.ndarray:
    out = np.empty(count, dtype=dtype)
    with open(file, "rb") as f:
        f.seek(offset)
        got = f.readinto(memoryview(out).cast("B"))
    if got != out.nbytes:
        raise CheckpointError(f"{file} is truncated: read {got} of {out.nbytes} bytes at offset {offset}")
    return out


def fp8_block_size(config_raw: dict) -> tuple | None:
    """(bm, bn) from an FP8 `quantization_config`, or None when the checkpoint is not FP8."""
    quant = config_raw.get("quantization_config") or {}
    if quant.get("quant_method") != "fp8":
        return None
    if quant.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"FP8 format {quant.get('fmt')!r} is not supported (only e4m3)")
    block = quant.get("weight_block_size")
    if not block or len(block) != 2:
        raise CheckpointError(f"FP8 checkpoint without a 2-D weight_block_size ({block!r}): only block-wise "
                              "scales are supported")
    return tuple(int(b) for b in block)


def inventory(path: Path, block: tuple | None) -> list[SourceTensor]:
    """Every tensor of the checkpoint in file order, FP8 scales attached to their weights (a weight and its scales
    may sit in different shards). Validates every shard's header and length before anything is read."""
    tensors, scales, seen = [], {}, {}
    for file in safetensors_files(path):
        header = check_safetensors_file(file)
        with open(file, "rb") as f:
            data_start = 8 + int.from_bytes(f.read(8), "little")
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][0])
        for name, entry in entries:
            if name in seen:
                raise CheckpointError(f"tensor {name} appears in both {seen[name].name} and {file.name}")
            seen[name] = file
            if entry["dtype"] not in ITEMSIZE or entry["dtype"] == "F8_E5M2":
                raise CheckpointError(f"{file.name}: {name} has unsupported dtype {entry['dtype']}")
            tensor = SourceTensor(name, file, entry["dtype"], tuple(entry["shape"]),
                                  data_start + entry["data_offsets"][0])
            if tensor.nbytes != entry["data_offsets"][1] - entry["data_offsets"][0]:
                raise CheckpointError(f"{file.name}: {name} has {tensor.shape} {tensor.dtype} but "
                                      f"{entry['data_offsets'][1] - entry['data_offsets'][0]} bytes")
            if block and name.endswith(FP8_SCALE_SUFFIX):
                scales[name] = tensor
            else:
                tensors.append(tensor)
    by_name = {t.name: t for t in tensors}
    for name, scale in scales.items():
        weight = by_name.get(name.removesuffix(FP8_SCALE_SUFFIX))
        if weight is None:
            raise CheckpointError(f"FP8 scales {name} have no weight {name.removesuffix(FP8_SCALE_SUFFIX)}")
        expected = (*weight.shape[:-2], *(-(-d // b) for d, b in zip(weight.shape[-2:], block)))
        if len(weight.shape) < 2 or scale.shape != expected:
            raise CheckpointError(f"FP8 scales {name} {scale.shape} do not match weight {weight.shape} with "
                                  f"block {list(block)} (expected {expected})")
        weight.scale, weight.block = scale, block
    unscaled = [t.name for t in tensors if t.dtype == "F8_E4M3" and t.scale is None]
    if unscaled:
        raise CheckpointError(f"float8 tensors without {FP8_SCALE_SUFFIX} block scales: {', '.join(unscaled[:8])}")
    return tensors
