"""Metal kernels for the gated delta rule, as the source strings handed to `mx.fast.metal_kernel`.

Each kernel is a `KernelSource` (exactly the arguments of `mx.fast.metal_kernel`) plus a `*_launch`
function that turns the wrapper's arguments into the launch (inputs, template, grid, threadgroup,
output shapes/dtypes). The wrapper runs that launch on Metal; tests/test_metal_kernels.py runs the
same launch through metal_emulation/ on the CPU. Sources keep to the subset in docs/kernels.md.
"""

from typing import NamedTuple

import mlx.core as mx

from .validation import check_inputs


class KernelSource(NamedTuple):
    name: str
    input_names: list
    output_names: list
    source: str
    header: str = ""


# One simdgroup per value row dv of one (batch, value head): lane l holds state[dv, l + 32 i] in
# registers (strided, so a simdgroup's loads of k, q and the state rows are contiguous), and the
# two Dk dot products per step are simd_sums. Threadgroups stack ROWS such simdgroups.
# Masked steps run with decay 1 and beta 0, which leave the state bitwise unchanged.
STEP = KernelSource(
    name="qwen35_gated_delta_step",
    input_names=["q", "k", "v", "g", "beta", "state_in", "mask", "T"],
    output_names=["y", "state_out"],
    source="""
    constexpr int n_per_lane = Dk / 32;
    const int Hk = q_shape[2];
    const int Hv = v_shape[2];
    const int Dv = v_shape[3];
    const uint lane = thread_index_in_simdgroup;
    const uint dv = thread_position_in_grid.y;
    const uint bh = thread_position_in_grid.z;
    const uint b = bh / Hv;
    const uint hv = bh % Hv;
    const uint hk = hv / (Hv / Hk);

    auto q_t = q + (size_t(b) * T * Hk + hk) * Dk + lane;
    auto k_t = k + (size_t(b) * T * Hk + hk) * Dk + lane;
    auto v_t = v + (size_t(b) * T * Hv + hv) * Dv + dv;
    auto y_t = y + (size_t(b) * T * Hv + hv) * Dv + dv;
    auto g_t = g + size_t(b) * T * Hv + hv;
    auto beta_t = beta + size_t(b) * T * Hv + hv;
    auto mask_t = mask + size_t(b) * T;
    const size_t row = (size_t(bh) * Dv + dv) * Dk + lane;

    float s[n_per_lane];
    for (int i = 0; i < n_per_lane; ++i) {
      s[i] = state_in[row + 32 * i];
    }
    for (int t = 0; t < T; ++t) {
      const bool keep = mask_t[t];
      const float decay = keep ? static_cast<float>(g_t[0]) : 1.0f;
      const float b_t = keep ? static_cast<float>(beta_t[0]) : 0.0f;
      float k_reg[n_per_lane];
      float predicted = 0.0f;
      for (int i = 0; i < n_per_lane; ++i) {
        k_reg[i] = static_cast<float>(k_t[32 * i]);
        s[i] *= decay;
        predicted += s[i] * k_reg[i];
      }
      predicted = simd_sum(predicted);
      const float delta = (static_cast<float>(v_t[0]) - predicted) * b_t;
      float out = 0.0f;
      for (int i = 0; i < n_per_lane; ++i) {
        s[i] += k_reg[i] * delta;
        out += s[i] * static_cast<float>(q_t[32 * i]);
      }
      out = simd_sum(out);
      if (lane == 0) {
        y_t[0] = static_cast<OutT>(out);
      }
      q_t += Hk * Dk;
      k_t += Hk * Dk;
      v_t += Hv * Dv;
      y_t += Hv * Dv;
      g_t += Hv;
      beta_t += Hv;
    }
    for (int i = 0; i < n_per_lane; ++i) {
      state_out[row + 32 * i] = s[i];
    }
""",
)

INPUT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
MAX_DK = 512  # Dk / 32 floats of state per lane; beyond this the registers spill


def check_step_inputs(q, k, v, g, beta, state, mask):
    """ValueErrors for anything the kernel cannot take, raised before any launch."""
    check_inputs(q, k, v, g, beta, state, mask)
    Dk = q.shape[-1]
    if Dk % 32 or not 32 <= Dk <= MAX_DK:
        raise ValueError(f"Dk ({Dk}) must be a multiple of 32 in [32, {MAX_DK}] (one simdgroup per row)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in INPUT_DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} not supported; use one of {INPUT_DTYPES}")


def step_launch(q, k, v, g, beta, state=None, mask=None):
    """Keyword arguments for calling the STEP kernel (real or emulated) on these inputs."""
    check_step_inputs(q, k, v, g, beta, state, mask)
    B, T, _, Dk = q.shape
    Hv, Dv = v.shape[2:]
    state = mx.zeros((B, Hv, Dv, Dk), mx.float32) if state is None else state.astype(mx.float32)
    mask = mx.ones((B, T), mx.bool_) if mask is None else mask
    rows = next(r for r in (4, 2, 1) if Dv % r == 0)
    return {
        "inputs": [q, k, v, g.astype(mx.float32), beta.astype(mx.float32), state, mask, T],
        "template": [("Dk", Dk), ("OutT", v.dtype)],
        "grid": (32, Dv, B * Hv),
        "threadgroup": (32, rows, 1),
        "output_shapes": [(B, T, Hv, Dv), (B, Hv, Dv, Dk)],
        "output_dtypes": [v.dtype, mx.float32],
    }


_kernels = {}


def _kernel(spec: KernelSource):
    if spec.name not in _kernels:
        _kernels[spec.name] = mx.fast.metal_kernel(**spec._asdict())
    return _kernels[spec.name]


def gated_delta_step_metal(q, k, v, g, beta, state=None, mask=None):
    """The gated delta recurrence over all T steps in one Metal launch.

    Same signature, shapes and conventions as `gated_delta_recurrent`: q, k [B, T, Hk, Dk] (l2-normalised,
    q scaled by Dk^-0.5), v [B, T, Hv, Dv], g (linear decay) and beta [B, T, Hv], state [B, Hv, Dv, Dk]
    or None, mask [B, T] bool or None. q/k and v may each be float32, float16 or bfloat16; Dk must be
    a multiple of 32. Returns y [B, T, Hv, Dv] in v's dtype and the state [B, Hv, Dv, Dk] float32.
    """
    launch = step_launch(q, k, v, g, beta, state, mask)
    if not mx.metal.is_available():
        raise RuntimeError("gated_delta_step_metal needs a Metal device; use gated_delta_recurrent")
    y, state = _kernel(STEP)(**launch)
    return y, state


if mx.metal.is_available():
    _kernel(STEP)
