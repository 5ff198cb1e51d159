"""One DeltaNet decode step (T = 1) as a single Metal kernel: the conv-state update, conv + SiLU, q/k l2
norms, the gates g and beta, one delta-rule step and the SiLU-gated RMSNorm of the output. Same signature
and math as `fused_decode_step_reference` (kernels/reference.py), which is models/deltanet.py's T = 1 path.

`DECODE` is the `mx.fast.metal_kernel` source and `decode_launch` the launch; the wrapper runs it on Metal
and tests/test_metal_decode.py runs the same launch through metal_emulation/. Layout: docs/kernels.md.
"""

import mlx.core as mx

from .metal import INPUT_DTYPES, KernelSource
from .validation import decode_shapes

MAX_DK = 512  # Dk / 32 floats of state per lane
MAX_DV = 1024  # threadgroup memory holds 2 Dk + 2 Dv floats
MAX_SIMDGROUPS = 16  # 512 threads per threadgroup

# One threadgroup per (batch, value head) so the output norm over Dv needs no second launch.
#   1. thread j < 2 Dk + Dv: conv + SiLU of this head's j-th channel (q | k of key head hk, v of value
#      head hv) into threadgroup memory, and the shifted conv state for it (q/k channels are written by
#      the first value head of each key head only).
#   2. simdgroup s: q, k (lane l holds element l + 32 i) l2-normalised by simd_sum; the delta-rule step
#      for value rows s, s + R, ... (the state row read and written once); y rounded to OutT as
#      gated_delta_update returns it.
#   3. every simdgroup sums y^2 itself (Dv values, no third barrier), then RMSNorm * weight * silu(z).
DECODE = KernelSource(
    name="qwen35_deltanet_decode",
    input_names=["qkv", "conv_state", "conv_weight", "z", "a", "b", "A_log", "dt_bias", "state_in",
                 "norm_weight", "eps"],
    output_names=["out", "conv_state_out", "state_out"],
    source="""
    constexpr int n_per_lane = Dk / 32;
    constexpr int NC = 2 * Dk + Dv;
    const int C = qkv_shape[1];
    const int K = conv_weight_shape[2];
    const int Hv = a_shape[1];
    const int key_dim = (C - Hv * Dv) / 2;
    const int Hk = key_dim / Dk;
    const uint tid = thread_index_in_threadgroup;
    const uint lane = thread_index_in_simdgroup;
    const uint sg = simdgroup_index_in_threadgroup;
    const uint R = simdgroups_per_threadgroup;
    const uint bh = threadgroup_position_in_grid.z;
    const uint bi = bh / Hv;
    const uint hv = bh % Hv;
    const uint hk = hv / (Hv / Hk);
    const bool writes_qk = hv % (Hv / Hk) == 0;

    threadgroup float qkv_s[NC];
    threadgroup float y_s[Dv];
    for (uint j = tid; j < NC; j += R * 32) {
      const int c = j < 2 * Dk ? (j < Dk ? 0 : key_dim - Dk) + int(hk * Dk + j)
                               : 2 * key_dim + int(hv * Dv + j - 2 * Dk);
      auto w = conv_weight + size_t(c) * K;
      auto hist = conv_state + size_t(bi) * (K - 1) * C + c;
      auto hist_out = conv_state_out + size_t(bi) * (K - 1) * C + c;
      const float x = static_cast<float>(qkv[size_t(bi) * C + c]);
      float acc = x * static_cast<float>(w[K - 1]);
      for (int i = 0; i < K - 1; ++i) {
        acc += static_cast<float>(hist[size_t(i) * C]) * static_cast<float>(w[i]);
      }
      qkv_s[j] = static_cast<float>(static_cast<OutT>(acc / (1.0f + metal::exp(-acc))));
      if (j >= 2 * Dk || writes_qk) {
        for (int i = 0; i + 1 < K - 1; ++i) {
          hist_out[size_t(i) * C] = hist[size_t(i + 1) * C];
        }
        hist_out[size_t(K - 2) * C] = qkv[size_t(bi) * C + c];
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    float q_reg[n_per_lane], k_reg[n_per_lane];
    float qq = 0.0f, kk = 0.0f;
    for (int i = 0; i < n_per_lane; ++i) {
      q_reg[i] = qkv_s[lane + 32 * i];
      k_reg[i] = qkv_s[Dk + lane + 32 * i];
      qq += q_reg[i] * q_reg[i];
      kk += k_reg[i] * k_reg[i];
    }
    const float q_norm = metal::rsqrt(simd_sum(qq) + 1e-6f);
    const float k_norm = metal::rsqrt(simd_sum(kk) + 1e-6f);
    const float q_scale = metal::rsqrt(float(Dk));
    for (int i = 0; i < n_per_lane; ++i) {
      q_reg[i] = q_reg[i] * q_norm * q_scale;
      k_reg[i] = k_reg[i] * k_norm;
    }

    const float a_t = static_cast<float>(a[bi * Hv + hv]) + static_cast<float>(dt_bias[hv]);
    const float softplus = metal::max(a_t, 0.0f) + metal::log(1.0f + metal::exp(-metal::abs(a_t)));
    const float decay = metal::exp(-metal::exp(static_cast<float>(A_log[hv])) * softplus);
    const float beta = 1.0f / (1.0f + metal::exp(-static_cast<float>(b[bi * Hv + hv])));

    for (uint dv = sg; dv < Dv; dv += R) {
      const size_t row = (size_t(bh) * Dv + dv) * Dk + lane;
      float s[n_per_lane];
      float predicted = 0.0f;
      for (int i = 0; i < n_per_lane; ++i) {
        s[i] = state_in[row + 32 * i] * decay;
        predicted += s[i] * k_reg[i];
      }
      predicted = simd_sum(predicted);
      const float delta = (qkv_s[2 * Dk + dv] - predicted) * beta;
      float y = 0.0f;
      for (int i = 0; i < n_per_lane; ++i) {
        s[i] += k_reg[i] * delta;
        y += s[i] * q_reg[i];
        state_out[row + 32 * i] = s[i];
      }
      y = simd_sum(y);
      if (lane == 0) {
        y_s[dv] = static_cast<float>(static_cast<OutT>(y));
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    float ss = 0.0f;
    for (uint j = lane; j < Dv; j += 32) {
      ss += y_s[j] * y_s[j];
    }
    const float inv_rms = metal::rsqrt(simd_sum(ss) / float(Dv) + eps);
    for (uint dv = tid; dv < Dv; dv += R * 32) {
      const size_t e = (size_t(bi) * Hv + hv) * Dv + dv;
      const float normed = static_cast<float>(static_cast<OutT>(y_s[dv] * inv_rms))
                           * static_cast<float>(norm_weight[dv]);
      const float gate = static_cast<float>(z[e]);
      out[e] = static_cast<OutT>(normed * (gate / (1.0f + metal::exp(-gate))));
    }
""",
)


def decode_kernel_fits(Dk, Dv):
    return Dk % 32 == 0 and 32 <= Dk <= MAX_DK and 1 <= Dv <= MAX_DV


def decode_launch(qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state, norm_weight, eps,
                  num_k_heads):
    """Keyword arguments for calling the DECODE kernel (real or emulated) on these inputs."""
    B, C, K, _, Hv, Dk, Dv = decode_shapes(qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state,
                                           norm_weight, num_k_heads)
    if not decode_kernel_fits(Dk, Dv):
        raise ValueError(f"the decode kernel needs Dk a multiple of 32 in [32, {MAX_DK}] and Dv <= {MAX_DV}; "
                         f"got Dk = {Dk}, Dv = {Dv}")
    for name, x in (("qkv", qkv), ("z", z), ("a", a), ("b", b)):
        if x.dtype not in INPUT_DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} not supported; use one of {INPUT_DTYPES}")
    if conv_state is None:
        conv_state = mx.zeros((B, K - 1, C), qkv.dtype)
    state = mx.zeros((B, Hv, Dv, Dk), mx.float32) if state is None else state.astype(mx.float32)
    simdgroups = min(MAX_SIMDGROUPS, Dv)
    return {
        "inputs": [qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state, norm_weight, float(eps)],
        "template": [("Dk", Dk), ("Dv", Dv), ("OutT", qkv.dtype)],
        "grid": (32 * simdgroups, 1, B * Hv),
        "threadgroup": (32 * simdgroups, 1, 1),
        "output_shapes": [(B, Hv * Dv), (B, K - 1, C), (B, Hv, Dv, Dk)],
        "output_dtypes": [qkv.dtype, qkv.dtype, mx.float32],
    }


_kernel = mx.fast.metal_kernel(**DECODE._asdict()) if mx.metal.is_available() else None


def fused_decode_step_metal(qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state, norm_weight, eps,
                            num_k_heads):
    """One DeltaNet token in one Metal launch; shapes and conventions as `fused_decode_step_reference`.
    Needs Dk a multiple of 32 (at most 512) and Dv at most 1024."""
    launch = decode_launch(qkv, conv_state, conv_weight, z, a, b, A_log, dt_bias, state, norm_weight, eps,
                           num_k_heads)
    if not mx.metal.is_available():
        raise RuntimeError("fused_decode_step_metal needs a Metal device; use fused_decode_step_reference")
    out, conv_state, state = _kernel(**launch)
    return out, conv_state, state
