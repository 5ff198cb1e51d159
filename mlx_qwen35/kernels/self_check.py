"""A device kernel is used only after it has matched the plain reference on that device.

The Metal and CUDA kernels pass their tests on these machines in CPU emulation (metal_emulation/). On a real
device each one is run once per shape class (head sizes, dtypes, masked or not) on small random inputs next
to the MLX-ops reference: a few milliseconds on first use. A kernel that fails to build or disagrees is not
used again in the process, with a warning naming it, so a device the tests never ran on costs speed, never
tokens. `MLX_QWEN35_NO_DEVICE_KERNELS=1` keeps every kernel off."""

import os
import warnings

import mlx.core as mx

# The kernels hold 1e-5 in the tests; this only has to tell a wrong kernel from rounding. In half precision the
# kernel (float32 inside) and the reference's half-precision ops round apart by a few steps of 2^-8 (bfloat16:
# 7e-3 on a real CUDA device and in emulation; a float32 state built from bfloat16 inputs, 1.4e-3), so a check
# is held to the tolerance of the least precise dtype among its inputs and outputs.
TOLERANCE = {mx.float32: 1e-3, mx.float16: 1e-2, mx.bfloat16: 3e-2}
_verdicts: dict = {}


def device_kernels_allowed() -> bool:
    return not os.environ.get("MLX_QWEN35_NO_DEVICE_KERNELS")


def passes(name: str, key: tuple, kernel, reference, make_inputs) -> bool:
    """Whether `kernel(*inputs)` matches `reference(*inputs)` (tuples of arrays) on inputs from
    `make_inputs()`; decided once per (name, key) and remembered."""
    if not device_kernels_allowed():
        return False
    verdict = _verdicts.get((name, key))
    if verdict is None:
        try:
            inputs = make_inputs()
            want = reference(*inputs)
            dtypes = {x.dtype for x in (*inputs, *want) if isinstance(x, mx.array)}
            problem = mismatch(kernel(*inputs), want, max(TOLERANCE.get(d, TOLERANCE[mx.float32]) for d in dtypes))
        except Exception as error:  # a kernel that does not build or launch on this device
            problem = f"{type(error).__name__}: {error}"
        verdict = problem is None
        if not verdict:
            warnings.warn(f"mlx-qwen35: the {name} kernel failed its first-use check on this device ({problem}) "
                          f"for {key}; using the MLX-ops path instead", RuntimeWarning, stacklevel=3)
        _verdicts[(name, key)] = verdict
    return verdict


def mismatch(got, want, tolerance: float = TOLERANCE[mx.float32]) -> str | None:
    """None if every output of `got` has the shape and dtype of `want`'s and is within `tolerance` of it
    (relative, in norm); else what differs."""
    for index, (a, b) in enumerate(zip(got, want, strict=True)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"output {index} is {a.shape} {a.dtype}, expected {b.shape} {b.dtype}"
        a, b = a.astype(mx.float32), b.astype(mx.float32)
        error = (mx.linalg.norm(a - b) / mx.maximum(mx.linalg.norm(b), 1e-30)).item()
        if not error <= tolerance:  # also catches NaN
            return f"output {index} relative error {error:.2e}"
    return None


def scan_inputs(Dk: int, Dv: int, key_dtype, value_dtype, steps: int, masked: bool):
    """Random (q, k, v, g, beta, state, mask) for a scan check: 2 sequences, 1 key head, 2 value heads, the
    first sequence left-padded when `masked`."""
    keys = mx.random.split(mx.random.key(0), 6)
    B, Hk, Hv = 2, 1, 2

    def unit(x):
        return x * mx.rsqrt((x * x).sum(-1, keepdims=True) + 1e-6)

    q = (unit(mx.random.normal((B, steps, Hk, Dk), key=keys[0])) * Dk**-0.5).astype(key_dtype)
    k = unit(mx.random.normal((B, steps, Hk, Dk), key=keys[1])).astype(key_dtype)
    v = mx.random.normal((B, steps, Hv, Dv), key=keys[2]).astype(value_dtype)
    g = mx.exp(-mx.random.uniform(0.0, 1.0, (B, steps, Hv), key=keys[3]))
    beta = mx.random.uniform(shape=(B, steps, Hv), key=keys[4])
    state = mx.random.normal((B, Hv, Dv, Dk), key=keys[5]) * 0.5
    mask = (mx.arange(steps)[None, :] >= mx.array([[steps // 3], [0]])) if masked else None
    return q, k, v, g, beta, state, mask


def decode_inputs(Dk: int, Dv: int, kernel_size: int, dtypes: tuple):
    """Random inputs of one fused decode step (fused_decode_step_reference's order) with 1 key head, 2 value
    heads and 2 sequences; `dtypes`: those of qkv, conv_weight, z, a, b, A_log, dt_bias and norm_weight."""
    keys = mx.random.split(mx.random.key(1), 10)
    B, Hk, Hv = 2, 1, 2
    C = 2 * Hk * Dk + Hv * Dv
    qkv = mx.random.normal((B, C), key=keys[0])
    conv_weight = mx.random.normal((C, 1, kernel_size), key=keys[1]) * 0.5
    z = mx.random.normal((B, Hv * Dv), key=keys[2])
    a, b = mx.random.normal((B, Hv), key=keys[3]) * 2, mx.random.normal((B, Hv), key=keys[4]) * 2
    A_log = mx.random.uniform(-2.0, 1.0, (Hv,), key=keys[5])
    dt_bias = mx.random.normal((Hv,), key=keys[6])
    norm_weight = 1 + 0.1 * mx.random.normal((Dv,), key=keys[7])
    qkv, conv_weight, z, a, b, A_log, dt_bias, norm_weight = (
        x.astype(dtype) for x, dtype in zip((qkv, conv_weight, z, a, b, A_log, dt_bias, norm_weight), dtypes))
    conv_state = mx.random.normal((B, kernel_size - 1, C), key=keys[8]).astype(qkv.dtype)
    state = mx.random.normal((B, Hv, Dv, Dk), key=keys[9]) * 0.5
    return qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state, norm_weight, 1e-6, Hk
