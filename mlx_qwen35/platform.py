"""Device and dtype policy, and a fast BLAS for MLX's CPU backend on Linux.

The `mlx[cpu]` wheel links a reference BLAS (about 7 GFLOP/s on a 512x4096x4096 matmul here). Loading a
system OpenBLAS with RTLD_GLOBAL *before* `mlx.core` is imported makes MLX resolve its BLAS symbols there
(about 220 GFLOP/s). This module must therefore be imported before anything imports MLX; the package's
`__init__` does so first.
"""

import ctypes
import os
import sys

OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

_openblas_status = "not attempted"


def _preload_openblas() -> str:
    if sys.platform != "linux":
        return "not needed (not Linux)"
    if os.environ.get("MLX_QWEN35_NO_OPENBLAS"):
        return "disabled by MLX_QWEN35_NO_OPENBLAS"
    if "mlx.core" in sys.modules:
        return "too late: mlx.core was imported before mlx_qwen35"
    for path in OPENBLAS_PATHS:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as error:
                return f"failed to load {path}: {error}"
            return f"loaded {path}"
    return "not found (apt-get install libopenblas0-pthread)"


_openblas_status = _preload_openblas()

import mlx.core as mx  # noqa: E402  (must follow the BLAS preload)


def blas_in_use() -> str:
    """Which BLAS MLX's CPU backend calls, read from the libraries mapped into this process."""
    if sys.platform == "darwin":
        return "Accelerate"
    try:
        with open("/proc/self/maps") as maps:
            mapped = maps.read()
    except OSError:
        mapped = ""
    if "libopenblas" in mapped and _openblas_status.startswith("loaded"):
        return f"OpenBLAS ({_openblas_status.removeprefix('loaded ')})"
    return f"reference BLAS bundled with mlx[cpu] (OpenBLAS: {_openblas_status})"


def device_name() -> str:
    device = mx.default_device()
    if device.type == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda"


def default_dtype() -> mx.Dtype:
    """bfloat16 on a GPU; float32 on the CPU, where MLX's bf16 matmul is about 6x slower than float32."""
    return mx.float32 if device_name() == "cpu" else mx.bfloat16


DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def parse_dtype(dtype) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]
