"""platform.py's CPU settings. The matrix-vector forwarding under MLX's CPU matmul (gemv_forward.c): every
layout MLX can hand to cblas_sgemm with one row or one column, against float64 NumPy. The malloc setting:
large outputs are not page-faulted in again op after op."""

import os
import resource
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen35 import platform

forwarding = pytest.mark.skipif(platform.gemv_forward_status() != "on",
                                reason=f"forwarding not loaded: {platform.gemv_forward_status()}")


def _check(got, want):
    got = np.array(got, dtype=np.float64)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 2e-6 * max(1.0, np.abs(want).max())


@forwarding
@pytest.mark.parametrize("m,k,n", [(1, 300, 257), (257, 300, 1), (1, 1, 5), (1, 7, 1)])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_one_row_or_column_products_match_float64(m, k, n, transpose_a, transpose_b):
    rng = np.random.default_rng(m * 1000 + n)
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    # a transposed view reaches cblas_sgemm as the other operand layout with a transpose flag
    a_mx = mx.array(np.ascontiguousarray(a.T)).T if transpose_a else mx.array(a)
    b_mx = mx.array(np.ascontiguousarray(b.T)).T if transpose_b else mx.array(b)
    mx.eval(a_mx, b_mx)
    calls = platform.gemv_forwarded_calls()
    product = a_mx @ b_mx
    mx.eval(product)
    assert platform.gemv_forwarded_calls() == calls + 1
    _check(product, a.astype(np.float64) @ b.astype(np.float64))


@forwarding
def test_batched_vectors_and_addmm_with_beta():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((3, 1, 64)).astype(np.float32), rng.standard_normal((96, 64)).astype(np.float32)
    _check(mx.array(x) @ mx.array(w).T, x.astype(np.float64) @ w.T.astype(np.float64))
    c = rng.standard_normal((1, 96)).astype(np.float32)
    got = mx.addmm(mx.array(c), mx.array(x[0]), mx.array(w).T, alpha=0.5, beta=2.0)
    _check(got, 2.0 * c.astype(np.float64) + 0.5 * (x[0].astype(np.float64) @ w.T.astype(np.float64)))


@forwarding
def test_uninitialised_output_memory_does_not_leak_into_results():
    # MLX reuses freed buffers for outputs; fill the allocator's cache with NaN first
    for _ in range(3):
        mx.eval(mx.full((1, 4096), float("nan")))
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((1, 32)).astype(np.float32), rng.standard_normal((4096, 32)).astype(np.float32)
    got = np.array(mx.array(x) @ mx.array(w).T)
    assert np.isfinite(got).all()
    _check(got, x.astype(np.float64) @ w.T.astype(np.float64))


def _status_in_fresh_process(env):
    code = "import mlx_qwen35.platform as p, mlx.core as mx; print(p.gemv_forward_status()); print(p.cpu_setup()); " \
           "x = mx.ones((1, 8)); w = mx.ones((5, 8)); print((x @ w.T).tolist())"
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@forwarding
def test_disabled_by_environment_variable():
    status, setup, product = _status_in_fresh_process({"MLX_QWEN35_NO_GEMV_FORWARD": "1"})
    assert status == "off: disabled by MLX_QWEN35_NO_GEMV_FORWARD"
    assert setup.startswith("BLAS OpenBLAS") and "sgemv: off" in setup
    assert product == str([[8.0] * 5])


@forwarding
def test_without_a_compiler_mlx_still_runs_on_openblas(tmp_path):
    status, setup, product = _status_in_fresh_process({"XDG_CACHE_HOME": str(tmp_path), "CC": "no-such-compiler"})
    assert status == "off: no C compiler (no-such-compiler) found"
    assert setup.startswith("BLAS OpenBLAS")
    assert product == str([[8.0] * 5])
    assert not list(tmp_path.rglob("*.partial"))


@pytest.mark.skipif(platform.malloc_status() != "on", reason=f"malloc setting: {platform.malloc_status()}")
def test_large_outputs_reuse_freed_memory():
    x = mx.random.normal((2048, 6144))  # 50 MB: above glibc's largest default mmap threshold (32 MB)
    mx.eval(x)
    mx.eval(x * 2.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        mx.eval(x * 2.0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    assert faults < 1000, f"{faults:.0f} page faults per 50 MB output (12,288 pages if each is mapped afresh)"


def test_cpu_setup_names_the_processor_its_vector_width_and_cores():
    import mlx_qwen35.platform as platform
    model = platform.cpu_model()
    assert platform.cpu_setup().endswith(f"CPU {model}")
    assert model.endswith(f", {os.cpu_count()} cores")
    if Path("/proc/cpuinfo").is_file():
        cpuinfo = Path("/proc/cpuinfo").read_text()
        first_flags = next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split()
        assert ("AVX-512" in model) == ("avx512f" in first_flags)
        name = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
        assert model.startswith(name)


@pytest.mark.skipif(platform._openblas is None, reason="OpenBLAS is not loaded here")
def test_blas_threads_sets_openblas_thread_count_inside_the_block_and_restores_it():
    count = platform._openblas.openblas_get_num_threads
    before = count()
    with pytest.raises(KeyError), platform.blas_threads(1):
        assert count() == 1
        raise KeyError("left by an error")
    assert count() == before
