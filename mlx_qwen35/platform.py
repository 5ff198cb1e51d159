"""Device and dtype policy, and MLX's CPU backend on Linux made fast. Three process-wide settings, made here
before `mlx.core` is imported (so this module must be imported before anything imports MLX; the package's
`__init__` does so first):

- OpenBLAS: the `mlx[cpu]` wheel links a reference BLAS (about 7 GFLOP/s on a 512x4096x4096 matmul here).
  Loading a system OpenBLAS with RTLD_GLOBAL makes MLX resolve its BLAS symbols there (about 220 GFLOP/s).
- Matrix-vector products: MLX sends them (every decode step) to sgemm, which OpenBLAS runs at a quarter of the
  memory bandwidth of its sgemv. `gemv_forward.c`, compiled once into the user cache with the system C
  compiler and loaded before OpenBLAS, gives MLX a `cblas_sgemm` that forwards those products to sgemv.
- malloc: MLX's CPU allocator keeps no cache of its own, and glibc returns every freed block above 32 MB to
  the kernel, so each large op's output is page-faulted in again (a [2048, 6144] float32 multiply: 40 ms
  instead of 8). glibc is told to keep freed memory for reuse.
Set MLX_QWEN35_NO_OPENBLAS, MLX_QWEN35_NO_GEMV_FORWARD or MLX_QWEN35_NO_MALLOC_TUNING to leave one out.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

GEMV_FORWARD_SOURCE = Path(__file__).with_name("gemv_forward.c")

_openblas_status = "not attempted"
_openblas = None  # the loaded OpenBLAS (ctypes.CDLL), for its thread count
_gemv_forward = None  # the loaded shim (ctypes.CDLL), once bound to OpenBLAS
_gemv_forward_status = "not attempted"


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-qwen35"


def build_library(source: Path, flags: tuple = ("-O2",), libraries: tuple = ()) -> Path:
    """A C source compiled on first use into the user cache, under a name that hashes the source, the flags and
    (for flags that tune to this CPU) the CPU's feature list."""
    key = source.read_bytes() + " ".join(flags + libraries).encode()
    if "-march=native" in flags:
        key += _cpu_features()
    library = _cache_dir() / f"{source.stem}-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if library.exists():
        return library
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        raise OSError(f"no C compiler ({os.environ.get('CC') or 'cc'}) found")
    library.parent.mkdir(parents=True, exist_ok=True)
    partial = library.with_name(f"{library.name}.{os.getpid()}.partial")
    try:
        subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", str(partial), str(source), *libraries],
                       check=True, capture_output=True, timeout=120)
        os.replace(partial, library)
    except subprocess.CalledProcessError as error:
        raise OSError(f"{compiler} failed: {error.stderr.decode(errors='replace').strip()[:300]}") from None
    finally:
        partial.unlink(missing_ok=True)
    return library


def _cpu_features() -> bytes:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_bytes().splitlines() if line.startswith(b"flags")),
                    b"")
    except OSError:
        return os.uname().machine.encode()


def _preload_openblas() -> str:
    global _gemv_forward, _gemv_forward_status
    if sys.platform != "linux":
        return "not needed (not Linux)"
    if os.environ.get("MLX_QWEN35_NO_OPENBLAS"):
        return "disabled by MLX_QWEN35_NO_OPENBLAS"
    if "mlx.core" in sys.modules:
        return "too late: mlx.core was imported before mlx_qwen35"
    for path in OPENBLAS_PATHS:
        if os.path.exists(path):
            try:
                blas = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
            except OSError as error:
                return f"failed to load {path}: {error}"
            if not (hasattr(blas, "cblas_sgemm") and hasattr(blas, "cblas_sgemv")):
                _gemv_forward_status = f"off: {path} lacks cblas_sgemm or cblas_sgemv"
            elif (shim := _load_gemv_forward()) is not None:
                # The shim joins the global scope first, so MLX binds its cblas_sgemm rather than OpenBLAS's;
                # binding it makes OpenBLAS global too, after the shim.
                if shim.gemv_forward_init(path.encode()) != 0:
                    raise ImportError(f"gemv_forward could not bind {path}; set MLX_QWEN35_NO_GEMV_FORWARD=1")
                _gemv_forward, _gemv_forward_status = shim, "on"
            global _openblas
            _openblas = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return f"loaded {path}"
    return "not found (apt-get install libopenblas0-pthread)"


def _load_gemv_forward():
    global _gemv_forward_status
    if os.environ.get("MLX_QWEN35_NO_GEMV_FORWARD"):
        _gemv_forward_status = "off: disabled by MLX_QWEN35_NO_GEMV_FORWARD"
        return None
    try:
        shim = ctypes.CDLL(str(build_library(GEMV_FORWARD_SOURCE, libraries=("-ldl",))), mode=ctypes.RTLD_GLOBAL)
        shim.gemv_forward_calls.restype = ctypes.c_long
        return shim
    except (OSError, subprocess.SubprocessError) as error:
        _gemv_forward_status = f"off: {error}"
        return None


_openblas_status = _preload_openblas()

import mlx.core as mx  # noqa: E402  (must follow the BLAS preload)


# glibc mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
KEEP_FREED_BYTES = 1 << 30


def _tune_malloc() -> str:
    if sys.platform != "linux":
        return "not needed (not Linux)"
    if os.environ.get("MLX_QWEN35_NO_MALLOC_TUNING"):
        return "off: disabled by MLX_QWEN35_NO_MALLOC_TUNING"
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "off: not glibc"
    # Blocks up to 1 GB come from the heap, up to 1 GB of free heap is kept, and one arena serves MLX's worker
    # thread too (a thread arena's heaps stop at 64 MB, beyond which glibc maps and unmaps every block again).
    if not (mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BYTES) and mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
            and mallopt(M_ARENA_MAX, 1)):
        return "off: mallopt refused"
    return "on"


_malloc_status = _tune_malloc()


@contextmanager
def blas_threads(count: int):
    """OpenBLAS's thread count `count` inside the block (nothing changes where OpenBLAS is not ours): while
    training's processes (train/parallel.py) share the cores, one process's OpenBLAS helper threads would only
    spin on the others'. Set from one thread while no other runs BLAS."""
    if _openblas is None or not hasattr(_openblas, "openblas_set_num_threads"):
        yield
        return
    before = _openblas.openblas_get_num_threads()
    _openblas.openblas_set_num_threads(count)
    try:
        yield
    finally:
        _openblas.openblas_set_num_threads(before)


def cpu_setup() -> str:
    """One line for logs and benchmark headers: the BLAS and our CPU settings in force."""
    if sys.platform == "darwin":
        return "Accelerate"
    from .kernels import cpu_qmv

    return (f"BLAS {blas_in_use()}; matrix-vector to sgemv: {gemv_forward_status()}; malloc keeps freed blocks: "
            f"{_malloc_status}; quantised matrix-vector: {cpu_qmv.status()}; CPU {cpu_model()}")


def cpu_model() -> str:
    """The processor's name, its widest vector extension and its core count: float sums follow the vector width,
    so a seeded run is bit-reproducible only on the same kind of CPU, and a log says which it ran on."""
    try:
        with open("/proc/cpuinfo") as info:
            fields = dict(line.split(":", 1) for line in info.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        fields = {}
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    import platform as host

    widest = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in
                   fields.get("flags", "").split()), None)
    return ", ".join(filter(None, [fields.get("model name") or host.processor() or "unknown", widest,
                                   f"{os.cpu_count()} cores"]))


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


def gemv_forward_status() -> str:
    """"on", or "off: why"."""
    return _gemv_forward_status


def gemv_forwarded_calls() -> int:
    """How many products the forwarding has sent to sgemv in this process (0 when it is not loaded)."""
    return 0 if _gemv_forward is None else _gemv_forward.gemv_forward_calls()


def malloc_status() -> str:
    return _malloc_status


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
