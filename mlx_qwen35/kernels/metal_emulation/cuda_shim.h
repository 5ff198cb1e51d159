// The part of CUDA that kernels/cuda.py's kernels use (after its DIALECT header), on the Metal shim's fiber
// runtime: a CUDA block runs as a threadgroup, a warp as a 32-lane simdgroup, __syncthreads is the
// threadgroup barrier and __shfl_xor_sync the simdgroup shuffle. It stands in for MLX's default CUDA header.
#pragma once
#include <cmath>
#include <source_location>

#define MTL_EMU_NO_METAL_NAMES
#include "metal_shim.h"
#include "harness_main.h"  // before the kernel here: the thread indices below read its current ids

#define __global__
#define __device__
#define __forceinline__ inline
#define __grid_constant__
#define __shared__

#define threadIdx (mtl_emu::current_ids()->thread_position_in_threadgroup)
#define blockIdx (mtl_emu::current_ids()->threadgroup_position_in_grid)
#define blockDim (mtl_emu::current_ids()->dispatch_threads_per_threadgroup)
#define gridDim (mtl_emu::current_ids()->threadgroups_per_grid)
#define __syncthreads() threadgroup_barrier(mem_flags::mem_threadgroup)

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }  // CUDA device math; expf, logf, fabsf: libm
inline uint3 make_uint3(uint x, uint y, uint z) { return uint3{x, y, z}; }

template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, std::source_location loc = std::source_location::current()) {
  if (mask != 0xffffffffu) mtl_emu::fail("__shfl_xor_sync with a partial warp mask is outside the dialect", loc);
  return simd_shuffle_xor(value, static_cast<ushort>(lane_mask), loc);
}

typedef bfloat16_t __nv_bfloat16;
typedef float16_t __half;
typedef const int* Shape;  // MLX passes a Shape by value; indexing reads the same
