"""CUDA kernels for the gated delta rule, generated from the Metal kernels' own source strings.

`mx.fast.cuda_kernel` takes a function body like `mx.fast.metal_kernel` does. The Metal bodies in metal.py
(the per-step scan) and metal_decode.py (the fused decode step) use a small part of the Metal language:
thread-position attributes, `simd_sum`, `threadgroup` arrays and barriers, `metal::` math, address-space
qualifiers. `DIALECT` defines exactly that part in CUDA, so the CUDA kernel is the Metal body unchanged, and
running either checks the other's logic. Two differences need more than a header: MLX passes a scalar input
to a CUDA kernel as a pointer (to Metal as a reference), so scalar inputs are renamed `<name>_scalar` and
`<name>` is defined as its value; and a CUDA block is always full (the launches here use whole blocks).

The chunked Metal prefill kernel (metal_chunked.py) is built on simdgroup matrices, which have no CUDA
counterpart in this dialect; on CUDA, prefill takes the chunked scan in MLX ops (chunked.py).

metal_emulation/ runs these CUDA sources on the CPU too (cuda_shim.h maps CUDA's thread indices, shuffles and
barriers onto the same fiber runtime that runs the Metal ones), so the dialect is tested here; on a machine
with MLX's CUDA backend, tests/test_cuda_kernels.py runs the real kernels.
"""

import mlx.core as mx

from .metal import STEP, KernelSource, step_launch
from .metal_decode import DECODE, decode_launch

DIALECT = """
typedef unsigned int uint;
namespace mlx_qwen35_dialect {
__device__ inline unsigned flat_thread() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
__device__ inline uint3 grid_position() {
  return make_uint3(blockIdx.x * blockDim.x + threadIdx.x, blockIdx.y * blockDim.y + threadIdx.y,
                    blockIdx.z * blockDim.z + threadIdx.z);
}
}  // namespace mlx_qwen35_dialect
// Metal's thread-position attributes; one 32-lane simdgroup is one warp
#define thread_position_in_grid (mlx_qwen35_dialect::grid_position())
#define threadgroup_position_in_grid (blockIdx)
#define thread_index_in_threadgroup (mlx_qwen35_dialect::flat_thread())
#define thread_index_in_simdgroup (mlx_qwen35_dialect::flat_thread() % 32)
#define simdgroup_index_in_threadgroup (mlx_qwen35_dialect::flat_thread() / 32)
#define simdgroups_per_threadgroup ((blockDim.x * blockDim.y * blockDim.z + 31) / 32)
// address spaces, barriers
#define device
#define thread
#define threadgroup __shared__
#define threadgroup_barrier(flags) __syncthreads()
// lane reductions: a butterfly leaves the sum in every lane, as simd_sum does
__device__ inline float simd_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}
namespace metal {
__device__ inline float exp(float x) { return ::expf(x); }
__device__ inline float log(float x) { return ::logf(x); }
__device__ inline float rsqrt(float x) { return ::rsqrtf(x); }
__device__ inline float abs(float x) { return ::fabsf(x); }
template <class T> __device__ inline T max(T a, T b) { return a > b ? a : b; }
}  // namespace metal
"""


def cuda_source(spec: KernelSource, scalars: tuple = ()) -> KernelSource:
    """The `mx.fast.cuda_kernel` arguments for a Metal `KernelSource`: the same body under DIALECT, with each
    scalar input passed as `<name>_scalar` and read through `<name>`."""
    for name in scalars:
        if name not in spec.input_names:
            raise ValueError(f"{spec.name}: {name} is not an input")
    inputs = [f"{name}_scalar" if name in scalars else name for name in spec.input_names]
    values = "".join(f"#define {name} (*{name}_scalar)\n" for name in scalars)
    return KernelSource(spec.name, inputs, spec.output_names, spec.source, DIALECT + spec.header + values)


STEP_CUDA = cuda_source(STEP, scalars=("T",))
DECODE_CUDA = cuda_source(DECODE, scalars=("eps",))

_kernels = {}


def _kernel(spec: KernelSource):
    if spec.name not in _kernels:
        _kernels[spec.name] = mx.fast.cuda_kernel(**spec._asdict())
    return _kernels[spec.name]


def _require_cuda(name, fallback):
    if not mx.cuda.is_available():
        raise RuntimeError(f"{name} needs MLX's CUDA backend; use {fallback}")


def gated_delta_step_cuda(q, k, v, g, beta, state=None, mask=None):
    """The gated delta recurrence over all T steps in one CUDA launch; signature, shapes and conventions as
    `gated_delta_step_metal` (and `gated_delta_recurrent`)."""
    launch = step_launch(q, k, v, g, beta, state, mask)
    _require_cuda("gated_delta_step_cuda", "gated_delta_recurrent")
    y, state = _kernel(STEP_CUDA)(**launch)
    return y, state


def fused_decode_step_cuda(qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state, norm_weight, eps,
                           num_k_heads):
    """One DeltaNet token in one CUDA launch; as `fused_decode_step_metal`."""
    launch = decode_launch(qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state, norm_weight, eps,
                           num_k_heads)
    _require_cuda("fused_decode_step_cuda", "fused_decode_step_reference")
    out, conv_state, state = _kernel(DECODE_CUDA)(**launch)
    return out, conv_state, state
