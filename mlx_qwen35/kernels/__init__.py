"""The one entry the model calls for the delta-rule scan. It validates inputs and picks a path for the
device and sequence length; each path sits beside a plain reference with the same signature."""

import mlx.core as mx

from . import cpu_qmv
from .chunked import gated_delta_chunked
from .cuda import fused_decode_step_cuda, gated_delta_step_cuda
from .metal import gated_delta_step_metal
from .metal_chunked import CHUNK, gated_delta_chunked_metal
from .metal_decode import decode_kernel_fits, fused_decode_step_metal
from .reference import fused_decode_step_reference, gated_delta_recurrent
from .self_check import decode_inputs, device_kernels_allowed, passes, scan_inputs
from .validation import check_inputs, decode_shapes

__all__ = ["gated_delta_update", "gated_delta_recurrent", "gated_delta_chunked", "fused_decode_step",
           "fused_decode_step_reference", "expert_matmul"]

# Below this many steps the per-step recurrence does less work than building 64x64 chunk matrices.
CHUNKED_MIN_STEPS = 16
# The device kernels pass their tests in CPU emulation; on a real device each is also checked against the
# reference on first use per shape class (self_check.py) and skipped if it disagrees. These switch them off.
METAL_STEP = True  # metal.py: the recurrence in one launch (decode-sized T, and prefill where chunks don't fit)
METAL_CHUNKED_PREFILL = True  # metal_chunked.py: simdgroup-matrix chunks for T >= CHUNKED_MIN_STEPS
METAL_FUSED_DECODE = True  # metal_decode.py: a DeltaNet layer's T = 1 step in one launch
CUDA_KERNELS = True  # cuda.py: the per-step scan for short sequences and the fused decode step


def fused_decode_enabled() -> bool:
    """Whether a DeltaNet layer's T = 1 step goes through `fused_decode_step` (one kernel launch where the
    kernel has passed its first-use check, the same math in MLX ops otherwise)."""
    return device_kernels_allowed() and ((METAL_FUSED_DECODE and mx.metal.is_available())
                                         or (CUDA_KERNELS and mx.cuda.is_available()))


def gated_delta_update(q, k, v, g, beta, state=None, mask=None):
    """Gated delta rule over a sequence; see `gated_delta_recurrent` for shapes and conventions."""
    check_inputs(q, k, v, g, beta, state, mask)
    T, Dk, Dv = q.shape[1], q.shape[-1], v.shape[-1]
    if mx.metal.is_available() and Dk % 32 == 0:
        if (METAL_CHUNKED_PREFILL and T >= CHUNKED_MIN_STEPS and Dk <= 256 and Dv in (32, 64, 128)
                and _scan_passes("Metal chunked", gated_delta_chunked_metal, q, v, mask, steps=2 * CHUNK + 5)):
            return _with_ops_gradient(gated_delta_chunked_metal, q, k, v, g, beta, state, mask)
        if METAL_STEP and _scan_passes("Metal step", gated_delta_step_metal, q, v, mask, steps=5):
            return _with_ops_gradient(gated_delta_step_metal, q, k, v, g, beta, state, mask)
    if (CUDA_KERNELS and mx.cuda.is_available() and T < CHUNKED_MIN_STEPS and Dk % 32 == 0
            and _scan_passes("CUDA step", gated_delta_step_cuda, q, v, mask, steps=5)):
        return _with_ops_gradient(gated_delta_step_cuda, q, k, v, g, beta, state, mask)
    return _ops_scan(q, k, v, g, beta, state, mask)


def _ops_scan(q, k, v, g, beta, state=None, mask=None):
    """The MLX-ops path (any device, differentiable): chunked from CHUNKED_MIN_STEPS steps, else per step."""
    if q.shape[1] >= CHUNKED_MIN_STEPS:
        return gated_delta_chunked(q, k, v, g, beta, state, mask)
    return gated_delta_recurrent(q, k, v, g, beta, state, mask)


def _with_ops_gradient(kernel, q, k, v, g, beta, state, mask):
    """`kernel`'s outputs with the MLX-ops path's gradients (a custom kernel has no vjp of its own), so
    training on a GPU runs the fast forward and still differentiates."""
    arrays = [q, k, v, g, beta] + ([] if state is None else [state])

    def call(scan, args):
        return scan(*args[:5], args[5] if state is not None else None, mask)

    @mx.custom_function
    def scan(*args):
        return call(kernel, args)

    @scan.vjp
    def scan_vjp(primals, cotangents, outputs):
        return mx.vjp(lambda *args: call(_ops_scan, args), list(primals), list(cotangents))[1]

    return scan(*arrays)


def _scan_passes(name, kernel, q, v, mask, steps):
    Dk, Dv = q.shape[-1], v.shape[-1]
    key = (Dk, Dv, q.dtype, v.dtype, mask is not None)
    return passes(name, key, kernel, gated_delta_recurrent,
                  lambda: scan_inputs(Dk, Dv, q.dtype, v.dtype, steps, mask is not None))


def fused_decode_step(qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state, norm_weight, eps,
                      num_k_heads):
    """One DeltaNet token from the projections to the gated norm (see `fused_decode_step_reference` for
    shapes): one kernel launch where the kernel applies and has passed its first-use check, else the same
    math in MLX ops."""
    *_, K, _, _, Dk, Dv = decode_shapes(qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state,
                                        norm_weight, num_k_heads)
    for name, kernel, enabled in (
            ("Metal fused decode", fused_decode_step_metal, METAL_FUSED_DECODE and mx.metal.is_available()),
            ("CUDA fused decode", fused_decode_step_cuda, CUDA_KERNELS and mx.cuda.is_available())):
        if enabled and decode_kernel_fits(Dk, Dv):
            dtypes = tuple(x.dtype for x in (qkv, conv_weight, z, a, b, A_log, dt_bias, norm_weight))
            if passes(name, (Dk, Dv, K) + dtypes, kernel, fused_decode_step_reference,
                      lambda: decode_inputs(Dk, Dv, K, dtypes)):
                return kernel(qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state, norm_weight, eps,
                              num_k_heads)
    return fused_decode_step_reference(qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state,
                                       norm_weight, eps, num_k_heads)


def expert_matmul(x, weights, expert_indices, scales=None, biases=None, group_size=None, bits=None,
                  mode="affine"):
    """Rows x [N, 1, in] times weights[expert_indices[n]] ([E, out, in], stored as the checkpoint has it)
    -> [N, 1, out]; expert_indices must be sorted so each expert's weights are read once. With `scales`
    (and `biases`), `weights` are MLX-quantised [E, out, in*bits/32] and gather_qmm dequantises on the fly."""
    if scales is not None:
        if cpu_qmv.applies(x, weights, scales, biases, group_size, bits, mode):
            return _cpu_quantized_matvec(x, weights, scales, biases, expert_indices, group_size, bits)
        return mx.gather_qmm(x, weights, scales, biases, rhs_indices=expert_indices, transpose=True,
                             group_size=group_size, bits=bits, mode=mode, sorted_indices=True)
    w = weights.swapaxes(-1, -2)
    if mx.default_device() == mx.cpu and x.dtype != mx.float32:
        # MLX's CPU gather_mm supports float32 only.
        return mx.gather_mm(x.astype(mx.float32), w.astype(mx.float32), rhs_indices=expert_indices,
                            sorted_indices=True).astype(x.dtype)
    return mx.gather_mm(x, w, rhs_indices=expert_indices, sorted_indices=True)


def _cpu_quantized_matvec(x, weights, scales, biases, expert_indices, group_size, bits):
    """cpu_qmv's product, differentiable in x through gather_qmm's gradient (the C code has none)."""

    @mx.custom_function
    def product(x):
        return cpu_qmv.quantized_matvec(x, weights, scales, biases, expert_indices, group_size, bits)

    @product.vjp
    def product_vjp(x, cotangent, output):  # one input: MLX passes the arrays themselves, not tuples
        return mx.vjp(lambda x: cpu_qmv.quantized_matvec_reference(x, weights, scales, biases, expert_indices,
                                                                   group_size, bits), [x], [cotangent])[1][0]

    return product(x)
