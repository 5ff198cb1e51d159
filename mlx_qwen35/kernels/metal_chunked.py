"""Chunked gated delta rule (prefill) as one Metal kernel whose intra-chunk products run on simdgroup
8x8 matrices. Same math as kernels/chunked.py (shared/docs/qwen35_spec.md section 5), regrouped so no
C x Dk intermediate is kept: with X = K S and Y = Q S (S [Dk, Dv], the transposed state),

    v' = T diag(beta) (V - e^gamma * X),   T = (I + A)^-1,   A = strict_lower(diag(beta) K K^T * Gamma)
    O  = e^gamma * Y + ((Q K^T) * Gamma) v'
    S  <- e^gamma_C S + (K e^(gamma_C - gamma))^T v'

`CHUNKED` is the `mx.fast.metal_kernel` source and `chunked_launch` the launch; the wrapper runs it on
Metal and tests/test_metal_chunked.py runs the same launch through metal_emulation/. Layout and limits:
docs/kernels.md.
"""

import mlx.core as mx

from .metal import KernelSource, check_step_inputs

CHUNK = 32  # steps per chunk: the C x C matrices and staged K/Q slabs fit in 32 KiB of threadgroup memory
MIN_LOG_DECAY = -80.0  # as chunked.py: keeps the in-chunk log-decay sums finite when g = 0
DV_SIZES = (32, 64, 128)
VALUE_BLOCKS = (32, 64, 128)  # value columns per threadgroup: VB / 16 simdgroups of 16 columns each
MAX_DK = 256  # Dk / 2 floats of state per lane

# One threadgroup per (batch, value head, block of VB value columns), VB / 16 simdgroups. Everything but the
# C x C products is independent per value column, so blocks only repeat the K K^T / Q K^T work.
# Simdgroup s keeps S^T[:, c0 : c0 + 16] (c0 = VB * block + 16 s: the transposed state's value columns it
# owns) as Dk / 8 x 2 register tiles for the whole sequence.
# Per chunk of C steps:
#   A. for each 32-wide slab of Dk: stage K and Q rows in threadgroup memory; accumulate the shared
#      K K^T and Q K^T tiles (split over simdgroups) and each simdgroup's X = K S, Y = Q S columns.
#   B. scale to A and (Q K^T) * Gamma, invert (I + A) by forward substitution (one thread per column),
#      then per simdgroup: R = beta (V - e^gamma X), v' = T R, O = e^gamma Y + P v'.
#   C. for each slab: stage K e^(gamma_C - gamma), S^T <- e^gamma_C S^T + (K')^T v'.
# gb holds (log decay, beta) per step, already 0 / 0 on masked and padded steps.
CHUNKED = KernelSource(
    name="qwen35_gated_delta_chunked",
    input_names=["q", "k", "v", "gb", "state_in", "T"],
    output_names=["y", "state_out"],
    source="""
    constexpr int C = 32;
    constexpr int DS = 32;
    constexpr int NSG = VB / 16;
    constexpr int NT = NSG * 32;
    constexpr int CT = C / 8;
    constexpr int KT = Dk / 8;
    constexpr int PT = CT * CT / NSG;
    constexpr int POOL = (2 * C * DS > NSG * C * 16) ? 2 * C * DS : NSG * C * 16;
    const int Hk = q_shape[2];
    const int Hv = v_shape[2];
    const uint tid = thread_index_in_threadgroup;
    const uint lane = thread_index_in_simdgroup;
    const uint sg = simdgroup_index_in_threadgroup;
    const uint bh = threadgroup_position_in_grid.z;
    const uint b = bh / Hv;
    const uint hv = bh % Hv;
    const uint hk = hv / (Hv / Hk);
    const int col0 = threadgroup_position_in_grid.y * VB + sg * 16;

    threadgroup float pool[POOL];  // K | Q slab while staging, else 16 columns of scratch per simdgroup
    threadgroup float tri[C * C];  // A
    threadgroup float tinv[C * C];  // (I + A)^-1
    threadgroup float pqk[C * C];  // (Q K^T) * Gamma
    threadgroup float lgs[C];
    threadgroup float gam[C];
    threadgroup float bet[C];
    threadgroup float* kq = pool;
    threadgroup float* scr = pool + sg * (C * 16);

    const size_t qk_row = size_t(Hk) * Dk;
    const size_t v_row = size_t(Hv) * Dv;
    auto q_b = q + size_t(b) * T * qk_row + size_t(hk) * Dk;
    auto k_b = k + size_t(b) * T * qk_row + size_t(hk) * Dk;
    auto v_b = v + size_t(b) * T * v_row + size_t(hv) * Dv + col0;
    auto y_b = y + size_t(b) * T * v_row + size_t(hv) * Dv + col0;
    auto gb_b = gb + (size_t(b) * T * Hv + hv) * 2;
    const size_t s_off = size_t(bh) * Dv * Dk + size_t(col0) * Dk;

    simdgroup_float8x8 st[KT][2];  // S^T tile (kt, cc) = state[col0 + 8 cc + j, 8 kt + i]
    for (int kt = 0; kt < KT; ++kt) {
      for (int cc = 0; cc < 2; ++cc) {
        simdgroup_load(st[kt][cc], state_in + s_off + cc * 8 * Dk + kt * 8, Dk, ulong2(0, 0), true);
      }
    }

    for (int t0 = 0; t0 < T; t0 += C) {
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (tid < C) {
        const bool valid = t0 + int(tid) < T;
        lgs[tid] = valid ? gb_b[size_t(t0 + tid) * Hv * 2] : 0.0f;
        bet[tid] = valid ? gb_b[size_t(t0 + tid) * Hv * 2 + 1] : 0.0f;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (tid < C) {
        float s = 0.0f;
        for (uint j = 0; j <= tid; ++j) {
          s += lgs[j];
        }
        gam[tid] = s;
      }

      // A. K K^T and Q K^T tiles (tile m of simdgroup sg is sg + NSG m), X = K S and Y = Q S.
      simdgroup_float8x8 acc_a[PT], acc_p[PT], xs[CT][2], ys[CT][2];
      for (int m = 0; m < PT; ++m) {
        acc_a[m] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        acc_p[m] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      }
      for (int ct = 0; ct < CT; ++ct) {
        for (int cc = 0; cc < 2; ++cc) {
          xs[ct][cc] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
          ys[ct][cc] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        }
      }
      for (int h = 0; h < Dk / DS; ++h) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint e = tid; e < C * DS; e += NT) {
          const int r = e / DS;
          const int d = h * DS + e % DS;
          const bool valid = t0 + r < T;
          kq[e] = valid ? static_cast<float>(k_b[size_t(t0 + r) * qk_row + d]) : 0.0f;
          kq[C * DS + e] = valid ? static_cast<float>(q_b[size_t(t0 + r) * qk_row + d]) : 0.0f;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int m = 0; m < PT; ++m) {
          const int ti = (sg + NSG * m) / CT;
          const int tj = (sg + NSG * m) % CT;
          if (tj <= ti) {
            for (int d = 0; d < DS / 8; ++d) {
              simdgroup_float8x8 ka, qa, kb;
              simdgroup_load(ka, kq + ti * 8 * DS + d * 8, DS);
              simdgroup_load(qa, kq + C * DS + ti * 8 * DS + d * 8, DS);
              simdgroup_load(kb, kq + tj * 8 * DS + d * 8, DS, ulong2(0, 0), true);
              simdgroup_multiply_accumulate(acc_a[m], ka, kb, acc_a[m]);
              simdgroup_multiply_accumulate(acc_p[m], qa, kb, acc_p[m]);
            }
          }
        }
        for (int ct = 0; ct < CT; ++ct) {
          for (int d = 0; d < DS / 8; ++d) {
            simdgroup_float8x8 ka, qa;
            simdgroup_load(ka, kq + ct * 8 * DS + d * 8, DS);
            simdgroup_load(qa, kq + C * DS + ct * 8 * DS + d * 8, DS);
            for (int cc = 0; cc < 2; ++cc) {
              simdgroup_multiply_accumulate(xs[ct][cc], ka, st[h * (DS / 8) + d][cc], xs[ct][cc]);
              simdgroup_multiply_accumulate(ys[ct][cc], qa, st[h * (DS / 8) + d][cc], ys[ct][cc]);
            }
          }
        }
      }
      for (int m = 0; m < PT; ++m) {
        const int ti = (sg + NSG * m) / CT;
        const int tj = (sg + NSG * m) % CT;
        if (tj <= ti) {
          simdgroup_store(acc_a[m], tri + ti * 8 * C + tj * 8, C);
          simdgroup_store(acc_p[m], pqk + ti * 8 * C + tj * 8, C);
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);

      // B. Decay and beta on the C x C products, then (I + A)^-1 one column per thread.
      for (uint e = tid; e < C * C; e += NT) {
        const int i = e / C;
        const int j = e % C;
        const float decay = i >= j ? exp(gam[i] - gam[j]) : 0.0f;
        tri[e] = i > j ? bet[i] * tri[e] * decay : 0.0f;
        pqk[e] = i >= j ? pqk[e] * decay : 0.0f;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (tid < C) {
        const int c = tid;
        for (int i = 0; i <= c; ++i) {
          tinv[i * C + c] = i == c ? 1.0f : 0.0f;
        }
        for (int i = c + 1; i < C; ++i) {
          float s = 0.0f;
          for (int j = c; j < i; ++j) {
            s += tri[i * C + j] * tinv[j * C + c];
          }
          tinv[i * C + c] = -s;
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);

      // R = beta (V - e^gamma X) in this simdgroup's scratch [C, 16], then v' = T R.
      for (int ct = 0; ct < CT; ++ct) {
        for (int cc = 0; cc < 2; ++cc) {
          simdgroup_store(xs[ct][cc], scr + ct * 8 * 16 + cc * 8, 16);
        }
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);
      for (uint e = lane; e < C * 16; e += 32) {
        const int r = e / 16;
        const float vv = t0 + r < T ? static_cast<float>(v_b[size_t(t0 + r) * v_row + e % 16]) : 0.0f;
        scr[e] = bet[r] * (vv - exp(gam[r]) * scr[e]);
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);
      simdgroup_float8x8 vn[CT][2];
      for (int ct = 0; ct < CT; ++ct) {
        for (int cc = 0; cc < 2; ++cc) {
          vn[ct][cc] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
          for (int j = 0; j <= ct; ++j) {
            simdgroup_float8x8 ta, ra;
            simdgroup_load(ta, tinv + ct * 8 * C + j * 8, C);
            simdgroup_load(ra, scr + j * 8 * 16 + cc * 8, 16);
            simdgroup_multiply_accumulate(vn[ct][cc], ta, ra, vn[ct][cc]);
          }
        }
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);

      // O = e^gamma Y + P v', through the scratch for the row scaling and the cast to OutT.
      for (int ct = 0; ct < CT; ++ct) {
        for (int cc = 0; cc < 2; ++cc) {
          simdgroup_store(ys[ct][cc], scr + ct * 8 * 16 + cc * 8, 16);
        }
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);
      for (uint e = lane; e < C * 16; e += 32) {
        scr[e] *= exp(gam[e / 16]);
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);
      for (int ct = 0; ct < CT; ++ct) {
        for (int cc = 0; cc < 2; ++cc) {
          simdgroup_float8x8 o;
          simdgroup_load(o, scr + ct * 8 * 16 + cc * 8, 16);
          for (int j = 0; j <= ct; ++j) {
            simdgroup_float8x8 pa;
            simdgroup_load(pa, pqk + ct * 8 * C + j * 8, C);
            simdgroup_multiply_accumulate(o, pa, vn[j][cc], o);
          }
          simdgroup_store(o, scr + ct * 8 * 16 + cc * 8, 16);
        }
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);
      for (uint e = lane; e < C * 16; e += 32) {
        const int r = e / 16;
        if (t0 + r < T) {
          y_b[size_t(t0 + r) * v_row + e % 16] = static_cast<OutT>(scr[e]);
        }
      }

      // C. S^T <- e^gamma_C S^T + (K e^(gamma_C - gamma))^T v', one Dk slab of K' at a time.
      simdgroup_float8x8 chunk_decay(exp(gam[C - 1]));
      for (int h = 0; h < Dk / DS; ++h) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint e = tid; e < C * DS; e += NT) {
          const int r = e / DS;
          const float kv = t0 + r < T ? static_cast<float>(k_b[size_t(t0 + r) * qk_row + h * DS + e % DS]) : 0.0f;
          kq[e] = kv * exp(gam[C - 1] - gam[r]);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int d = 0; d < DS / 8; ++d) {
          for (int cc = 0; cc < 2; ++cc) {
            simdgroup_multiply(st[h * (DS / 8) + d][cc], st[h * (DS / 8) + d][cc], chunk_decay);
          }
          for (int j = 0; j < CT; ++j) {
            simdgroup_float8x8 kt;
            simdgroup_load(kt, kq + j * 8 * DS + d * 8, DS, ulong2(0, 0), true);
            for (int cc = 0; cc < 2; ++cc) {
              simdgroup_multiply_accumulate(st[h * (DS / 8) + d][cc], kt, vn[j][cc], st[h * (DS / 8) + d][cc]);
            }
          }
        }
      }
    }
    for (int kt = 0; kt < KT; ++kt) {
      for (int cc = 0; cc < 2; ++cc) {
        simdgroup_store(st[kt][cc], state_out + s_off + cc * 8 * Dk + kt * 8, Dk, ulong2(0, 0), true);
      }
    }
""",
)


def check_chunked_inputs(q, k, v, g, beta, state, mask):
    """ValueErrors for anything the kernel cannot take, raised before any launch."""
    check_step_inputs(q, k, v, g, beta, state, mask)
    Dk, Dv = q.shape[-1], v.shape[-1]
    if Dk > MAX_DK:
        raise ValueError(f"Dk ({Dk}) must be a multiple of 32 in [32, {MAX_DK}] for the chunked kernel")
    if Dv not in DV_SIZES:
        raise ValueError(f"Dv ({Dv}) must be one of {DV_SIZES} for the chunked kernel")


def chunked_launch(q, k, v, g, beta, state=None, mask=None, value_block=None):
    """Keyword arguments for calling the CHUNKED kernel (real or emulated) on these inputs. value_block:
    value columns per threadgroup (default min(Dv, 64): B * Hv * Dv / 64 threadgroups of 128 threads)."""
    check_chunked_inputs(q, k, v, g, beta, state, mask)
    B, T, _, Dk = q.shape
    Hv, Dv = v.shape[2:]
    vb = min(Dv, 64) if value_block is None else value_block
    if vb not in VALUE_BLOCKS or Dv % vb:
        raise ValueError(f"value_block ({vb}) must be one of {VALUE_BLOCKS} and divide Dv ({Dv})")
    state = mx.zeros((B, Hv, Dv, Dk), mx.float32) if state is None else state.astype(mx.float32)
    log_g = mx.maximum(mx.log(g.astype(mx.float32)), MIN_LOG_DECAY)
    beta = beta.astype(mx.float32)
    if mask is not None:  # masked steps: decay 1 (log 0) and beta 0, which leave the state unchanged
        keep = mask[..., None]
        log_g, beta = mx.where(keep, log_g, 0.0), mx.where(keep, beta, 0.0)
    gb = mx.stack([log_g, beta], axis=-1)  # [B, T, Hv, 2]
    threads = 32 * (vb // 16)
    return {
        "inputs": [q, k, v, gb, state, T],
        "template": [("Dk", Dk), ("Dv", Dv), ("VB", vb), ("OutT", v.dtype)],
        "grid": (threads, Dv // vb, B * Hv),
        "threadgroup": (threads, 1, 1),
        "output_shapes": [(B, T, Hv, Dv), (B, Hv, Dv, Dk)],
        "output_dtypes": [v.dtype, mx.float32],
    }


_kernel = None


def gated_delta_chunked_metal(q, k, v, g, beta, state=None, mask=None):
    """The chunked gated delta rule in one Metal launch (simdgroup-matrix products, chunks of 32 steps).

    Same signature, shapes and conventions as `gated_delta_chunked` / `gated_delta_recurrent`: q, k
    [B, T, Hk, Dk] (l2-normalised, q scaled by Dk^-0.5), v [B, T, Hv, Dv], g (linear decay) and beta
    [B, T, Hv], state [B, Hv, Dv, Dk] or None, mask [B, T] bool or None. q/k and v may each be float32,
    float16 or bfloat16; Dk a multiple of 32 up to 256, Dv in (32, 64, 128). Returns y [B, T, Hv, Dv] in
    v's dtype and the state [B, Hv, Dv, Dk] float32.
    """
    global _kernel
    launch = chunked_launch(q, k, v, g, beta, state, mask)
    if not mx.metal.is_available():
        raise RuntimeError("gated_delta_chunked_metal needs a Metal device; use gated_delta_chunked")
    if _kernel is None:
        _kernel = mx.fast.metal_kernel(**CHUNKED._asdict())
    y, state = _kernel(**launch)
    return y, state


__all__ = ["CHUNK", "CHUNKED", "chunked_launch", "gated_delta_chunked_metal"]
