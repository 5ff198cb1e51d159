"""Quantised matrix-vector products on MLX's CPU backend through cpu_qmv.c (8-lane bit-planes, threads over
output rows), for the few rows of a decode step; `quantized_matvec_reference` is the same product in MLX ops.
MLX's own CPU `gather_qmm` reads packed 4-bit weights at about 0.55 GB/s here, so a MoE decode step on the CPU
spends most of its time in it. MLX_QWEN35_NO_CPU_QMV=1 keeps MLX's."""

import ctypes
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import platform

SOURCE = Path(__file__).with_name("cpu_qmv.c")
MAX_ROWS = 64  # beyond this a prompt's rows share weights better in MLX's matmul
_library = None
_status = None


def _load():
    global _library, _status
    if _status is None:
        if os.environ.get("MLX_QWEN35_NO_CPU_QMV"):
            _status = "off: disabled by MLX_QWEN35_NO_CPU_QMV"
        else:
            try:
                library = ctypes.CDLL(str(platform.build_library(SOURCE, ("-O3", "-march=native", "-fopenmp"),
                                                                 ("-fopenmp",))))
                library.cpu_qmv.restype = ctypes.c_int
                _library, _status = library, "on"
            except OSError as error:
                _status = f"off: {error}"
    return _library


def status() -> str:
    _load()
    return _status


def applies(x, weights, scales, biases, group_size, bits, mode) -> bool:
    """Whether `quantized_matvec` takes these: CPU, float32 rows and scales, affine 4 or 8 bits, a group
    size that is a multiple of 8 packed words, and few rows."""
    return (mx.default_device() == mx.cpu and mode == "affine" and bits in (4, 8) and biases is not None
            and x.dtype == mx.float32 and scales.dtype == mx.float32 and biases.dtype == mx.float32
            and group_size % (8 * 32 // bits) == 0 and x.shape[-1] % group_size == 0
            and x.size // x.shape[-1] <= MAX_ROWS and _load() is not None)


def quantized_matvec(x, weights, scales, biases, expert_indices, group_size: int, bits: int):
    """Rows x [N, 1, in] float32 times the dequantised weights[expert_indices[n]] ([E, out, in] as MLX packs
    them, transposed) -> [N, 1, out] float32. Evaluates its inputs (a sync, as a decode step's MoE layer has
    anyway for routing)."""
    mx.eval(x, weights, scales, biases, expert_indices)
    rows = np.ascontiguousarray(np.array(x, copy=False).reshape(-1, x.shape[-1]))
    packed, scale, bias = (np.array(a, copy=False) for a in (weights, scales, biases))
    if not all(a.flags.c_contiguous for a in (packed, scale, bias)):
        packed, scale, bias = (np.ascontiguousarray(a) for a in (packed, scale, bias))
    experts = np.array(expert_indices, copy=False).reshape(-1).astype(np.int64)
    N, inputs = rows.shape
    out = packed.shape[1]
    if len(experts) != N or (N and not 0 <= experts.min() <= experts.max() < packed.shape[0]):
        raise ValueError(f"expert indices {experts.tolist()} for {N} rows and {packed.shape[0]} experts")
    y = np.empty((N, out), np.float32)

    def pointers(array, kind):
        base, stride = array.ctypes.data, array.strides[0]
        return (ctypes.POINTER(kind) * N)(*(ctypes.cast(base + int(e) * stride, ctypes.POINTER(kind))
                                            for e in experts))

    code = _library.cpu_qmv(rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), N, inputs, out,
                            pointers(packed, ctypes.c_uint32), pointers(scale, ctypes.c_float),
                            pointers(bias, ctypes.c_float), bits, group_size,
                            y.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
    if code != 0:
        raise ValueError(f"cpu_qmv refused bits {bits}, group size {group_size}, {inputs} inputs (an unsupported "
                         f"layout, or no memory for {N} reordered rows)")
    return mx.array(y)[:, None, :]


def quantized_matvec_reference(x, weights, scales, biases, expert_indices, group_size: int, bits: int):
    """The same product in MLX ops (gather_qmm)."""
    return mx.gather_qmm(x, weights, scales, biases, rhs_indices=expert_indices, transpose=True,
                         group_size=group_size, bits=bits)
