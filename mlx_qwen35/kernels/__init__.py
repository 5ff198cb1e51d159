"""The one entry the model calls for the delta-rule scan. It validates inputs and picks a path for the
device and sequence length; each path sits beside a plain reference with the same signature."""

import mlx.core as mx

from .chunked import gated_delta_chunked
from .cuda import fused_decode_step_cuda, gated_delta_step_cuda
from .metal import gated_delta_step_metal
from .metal_chunked import gated_delta_chunked_metal
from .metal_decode import decode_kernel_fits, fused_decode_step_metal
from .reference import fused_decode_step_reference, gated_delta_recurrent
from .validation import check_inputs, decode_shapes

__all__ = ["gated_delta_update", "gated_delta_recurrent", "gated_delta_chunked", "fused_decode_step",
           "fused_decode_step_reference", "expert_matmul"]

# Below this many steps the per-step recurrence does less work than building 64x64 chunk matrices.
CHUNKED_MIN_STEPS = 16
# The chunked Metal kernel passes in CPU emulation only; switch it on once tests/test_metal_chunked.py
# has passed on a Mac.
METAL_CHUNKED_PREFILL = False
# The fused decode kernel (metal_decode.py) passes in CPU emulation only, like the chunked one: switch it on
# once tests/test_metal_decode.py has passed on a Mac.
METAL_FUSED_DECODE = False
# The CUDA kernels (cuda.py: the per-step scan for short sequences, the fused decode step) pass in CPU
# emulation only: switch them on once tests/test_cuda_kernels.py has passed on a GPU.
CUDA_KERNELS = False


def fused_decode_enabled() -> bool:
    """Whether a DeltaNet layer's T = 1 step goes through `fused_decode_step` (one kernel launch)."""
    return (METAL_FUSED_DECODE and mx.metal.is_available()) or (CUDA_KERNELS and mx.cuda.is_available())


def gated_delta_update(q, k, v, g, beta, state=None, mask=None):
    """Gated delta rule over a sequence; see `gated_delta_recurrent` for shapes and conventions."""
    check_inputs(q, k, v, g, beta, state, mask)
    if mx.metal.is_available() and q.shape[-1] % 32 == 0:
        Dk, Dv = q.shape[-1], v.shape[-1]
        if METAL_CHUNKED_PREFILL and q.shape[1] >= CHUNKED_MIN_STEPS and Dk <= 256 and Dv in (32, 64, 128):
            return gated_delta_chunked_metal(q, k, v, g, beta, state, mask)
        return gated_delta_step_metal(q, k, v, g, beta, state, mask)
    if CUDA_KERNELS and mx.cuda.is_available() and q.shape[1] < CHUNKED_MIN_STEPS and q.shape[-1] % 32 == 0:
        return gated_delta_step_cuda(q, k, v, g, beta, state, mask)
    if q.shape[1] >= CHUNKED_MIN_STEPS:
        return gated_delta_chunked(q, k, v, g, beta, state, mask)
    return gated_delta_recurrent(q, k, v, g, beta, state, mask)


def fused_decode_step(qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state, norm_weight, eps,
                      num_k_heads):
    """One DeltaNet token from the projections to the gated norm (see `fused_decode_step_reference` for
    shapes): one Metal launch where the kernel applies, else the same math in MLX ops."""
    *_, Dk, Dv = decode_shapes(qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state, norm_weight,
                               num_k_heads)
    if METAL_FUSED_DECODE and mx.metal.is_available() and decode_kernel_fits(Dk, Dv):
        return fused_decode_step_metal(qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state,
                                       norm_weight, eps, num_k_heads)
    if CUDA_KERNELS and mx.cuda.is_available() and decode_kernel_fits(Dk, Dv):
        return fused_decode_step_cuda(qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state,
                                      norm_weight, eps, num_k_heads)
    return fused_decode_step_reference(qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state,
                                       norm_weight, eps, num_k_heads)


def expert_matmul(x, weights, expert_indices, scales=None, biases=None, group_size=None, bits=None,
                  mode="affine"):
    """Rows x [N, 1, in] times weights[expert_indices[n]] ([E, out, in], stored as the checkpoint has it)
    -> [N, 1, out]; expert_indices must be sorted so each expert's weights are read once. With `scales`
    (and `biases`), `weights` are MLX-quantised [E, out, in*bits/32] and gather_qmm dequantises on the fly."""
    if scales is not None:
        return mx.gather_qmm(x, weights, scales, biases, rhs_indices=expert_indices, transpose=True,
                             group_size=group_size, bits=bits, mode=mode, sorted_indices=True)
    w = weights.swapaxes(-1, -2)
    if mx.default_device() == mx.cpu and x.dtype != mx.float32:
        # MLX's CPU gather_mm supports float32 only.
        return mx.gather_mm(x.astype(mx.float32), w.astype(mx.float32), rhs_indices=expert_indices,
                            sorted_indices=True).astype(x.dtype)
    return mx.gather_mm(x, w, rhs_indices=expert_indices, sorted_indices=True)
