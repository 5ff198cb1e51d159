// The subset of the Metal Shading Language and execution model that the kernels in
// mlx_qwen35/kernels/metal.py and metal_chunked.py use, as plain C++20, so their exact source strings run on a CPU.
// Each thread of a threadgroup is a cooperative fiber; threadgroup_barrier and the simd_* ops
// are real synchronisation points, so a kernel that relies on an order they do not give fails here.
// Supported subset: docs/kernels.md.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <source_location>
#include <type_traits>
#include <vector>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned long ulong;
struct uint3 { uint x, y, z; };
struct uint2 { uint x, y; };
struct ulong2 {
  ulong x, y;
  ulong2(ulong v = 0) : x(v), y(v) {}
  ulong2(ulong x_, ulong y_) : x(x_), y(y_) {}
};

struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { bits = uint16_t((u >> 16) | 0x40); return; }  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even, as Metal's float -> bfloat
    bits = uint16_t(u >> 16);
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
typedef bfloat16_t bfloat;
#if defined(__FLT16_MAX__)
typedef _Float16 half;
typedef _Float16 float16_t;
#endif

namespace mtl_emu {
[[noreturn]] inline void fail(const char* what, std::source_location loc) {
  std::fprintf(stderr, "metal emulation error: %s (kernel line %u)\n", what, unsigned(loc.line()));
  std::fflush(stderr);
  std::_Exit(3);
}

constexpr int kSimd = 32;
constexpr size_t kStack = 128 * 1024;

struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
  bool done = false;
  uint simd_gen = 0, bar_gen = 0;
  int sg = 0, lane = 0;
};

struct SimdGroup {
  struct alignas(16) Slot { unsigned char bytes[16]; };
  Slot slot[2][kSimd];
  uint deposited[2];  // bit mask of lanes that wrote this parity's generation
  uint line[2];
  int arrived[2];
  int active;
  uint released;  // generations below this one have been reached by every active lane
};

struct Runtime {
  std::vector<Fiber> fibers;
  std::vector<SimdGroup> sgs;
  int n = 0, cur = 0;
  void* sched_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t sched_ctx;
#endif
  int bar_arrived = 0, bar_active = 0;
  uint bar_released = 0, bar_line = 0;
  uint64_t progress = 0, epoch = 0;
  void (*body)(void*, int) = nullptr;
  void* body_ctx = nullptr;
  std::map<void*, uint64_t> tg_epochs;
  size_t tg_bytes = 0;  // threadgroup memory declared by the current threadgroup
};
constexpr size_t kMaxThreadgroupBytes = 32768;  // Apple GPUs' threadgroup memory limit
inline Runtime rt;

// Identifies a call site (line and column), so lanes at different simd ops or barriers are caught.
inline uint site(std::source_location loc) { return loc.line() * 4096u + loc.column(); }

#if defined(__x86_64__)
extern "C" void mtl_emu_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl mtl_emu_switch
.type mtl_emu_switch,@function
mtl_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
)");
#endif

inline void fiber_exit();
inline void fiber_main() {
  rt.body(rt.body_ctx, rt.cur);
  fiber_exit();
}

inline void yield() {
  Fiber& f = rt.fibers[rt.cur];
#if defined(__x86_64__)
  mtl_emu_switch(&f.sp, rt.sched_sp);
#else
  swapcontext(&f.ctx, &rt.sched_ctx);
#endif
}

inline void release_simd_if_complete(SimdGroup& sg) {
  int par = sg.released & 1;
  if (sg.active > 0 && sg.arrived[par] > 0 && sg.arrived[par] >= sg.active) {
    sg.arrived[par] = 0;
    ++sg.released;
    ++rt.progress;
  }
}

inline void release_barrier_if_complete() {
  if (rt.bar_active > 0 && rt.bar_arrived > 0 && rt.bar_arrived >= rt.bar_active) {
    rt.bar_arrived = 0;
    ++rt.bar_released;
    ++rt.progress;
  }
}

inline void fiber_exit() {
  Fiber& f = rt.fibers[rt.cur];
  f.done = true;
  ++rt.progress;
  SimdGroup& sg = rt.sgs[f.sg];
  --sg.active;
  release_simd_if_complete(sg);
  --rt.bar_active;
  release_barrier_if_complete();
  for (;;) yield();
}

inline void start_fiber(int i) {
  Fiber& f = rt.fibers[i];
  if (!f.stack) f.stack = static_cast<char*>(std::malloc(kStack));
#if defined(__x86_64__)
  // Stack as mtl_emu_switch pops it: six callee-saved registers, then fiber_main as the return
  // address, then a dummy return slot so fiber_main starts with the ABI's 16-byte alignment.
  auto top = reinterpret_cast<uintptr_t>(f.stack + kStack) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(&fiber_main);
  for (int r = 0; r < 6; ++r) *--sp = nullptr;
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStack;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, &fiber_main, 0);
#endif
}

inline void resume(int i) {
  rt.cur = i;
#if defined(__x86_64__)
  mtl_emu_switch(&rt.sched_sp, rt.fibers[i].sp);
#else
  swapcontext(&rt.sched_ctx, &rt.fibers[i].ctx);
#endif
}

// Runs one threadgroup of n threads to completion, round-robin between synchronisation points.
inline void run_threadgroup(int n) {
  rt.n = n;
  if ((int)rt.fibers.size() < n) rt.fibers.resize(n);
  int nsg = (n + kSimd - 1) / kSimd;
  rt.sgs.assign(nsg, SimdGroup{});
  for (int s = 0; s < nsg; ++s) rt.sgs[s].active = std::min(kSimd, n - s * kSimd);
  rt.bar_arrived = 0;
  rt.bar_active = n;
  rt.bar_released = 0;
  rt.tg_bytes = 0;
  ++rt.epoch;
  for (int i = 0; i < n; ++i) {
    Fiber& f = rt.fibers[i];
    f.done = false;
    f.simd_gen = f.bar_gen = 0;
    f.sg = i / kSimd;
    f.lane = i % kSimd;
    start_fiber(i);
  }
  for (;;) {
    uint64_t before = rt.progress;
    int alive = 0;
    for (int i = 0; i < n; ++i) {
      if (rt.fibers[i].done) continue;
      resume(i);
      alive += !rt.fibers[i].done;
    }
    if (!alive) return;
    if (rt.progress == before)
      fail("deadlock: a threadgroup_barrier or simd op is not reached by every thread",
           std::source_location::current());
  }
}
}  // namespace mtl_emu

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

inline void threadgroup_barrier(mem_flags = mem_flags::mem_none,
                                std::source_location loc = std::source_location::current()) {
  using namespace mtl_emu;
  Fiber& f = rt.fibers[rt.cur];
  uint gen = f.bar_gen++;
  if (rt.bar_arrived == 0) rt.bar_line = site(loc);
  else if (rt.bar_line != site(loc)) fail("threads wait at different threadgroup_barrier calls", loc);
  ++rt.bar_arrived;
  ++rt.progress;
  release_barrier_if_complete();
  while (rt.bar_released <= gen) yield();
}

namespace mtl_emu {
// Lock-step exchange: every active lane of the simdgroup deposits v, waits until all have, then
// combines the 32 slots with f. Two parities suffice: a lane can run at most one op ahead.
template <class T, class F>
auto simd_exchange(T v, std::source_location loc, F f) {
  static_assert(sizeof(T) <= sizeof(SimdGroup::Slot), "simd ops exchange at most 16 bytes per lane");
  Fiber& me = rt.fibers[rt.cur];
  SimdGroup& sg = rt.sgs[me.sg];
  uint gen = me.simd_gen++;
  int par = gen & 1;
  if (sg.arrived[par] == 0) {
    sg.deposited[par] = 0;
    sg.line[par] = site(loc);
  } else if (sg.line[par] != site(loc)) {
    fail("lanes of a simdgroup run different simd ops (divergent control flow)", loc);
  }
  std::memcpy(&sg.slot[par][me.lane], &v, sizeof(T));
  sg.deposited[par] |= 1u << me.lane;
  ++sg.arrived[par];
  ++rt.progress;
  release_simd_if_complete(sg);
  while (sg.released <= gen) yield();
  auto get = [&](int lane) {
    if (lane < 0 || lane >= kSimd || !(sg.deposited[par] >> lane & 1u))
      fail("simd op reads a lane that is inactive or out of range", loc);
    T x;
    std::memcpy(&x, &sg.slot[par][lane], sizeof(T));
    return x;
  };
  return f(me.lane, sg.deposited[par], get);
}

inline void tg_poison(void* p, size_t n) {
  auto& e = rt.tg_epochs[p];
  if (e != rt.epoch) {
    std::memset(p, 0xff, n);  // fresh threadgroup memory reads as NaN / all ones, never as zeros
    e = rt.epoch;
    rt.tg_bytes += n;
    if (rt.tg_bytes > kMaxThreadgroupBytes)
      fail("threadgroup memory over 32 KiB (Apple GPUs' limit)", std::source_location::current());
  }
}
}  // namespace mtl_emu

#define MTL_LOC std::source_location loc = std::source_location::current()
template <class T> T simd_sum(T v, MTL_LOC) {
  return mtl_emu::simd_exchange(v, loc, [](int, uint act, auto get) {
    // Butterfly order (xor 1, 2, 4, 8, 16): every lane gets the bitwise-same sum.
    T part[mtl_emu::kSimd];
    for (int l = 0; l < mtl_emu::kSimd; ++l) part[l] = (act >> l & 1u) ? get(l) : T(0);
    for (int w = 1; w < mtl_emu::kSimd; w *= 2)
      for (int l = 0; l < mtl_emu::kSimd; l += 2 * w)
        for (int j = l; j < l + w; ++j) part[j] = part[j] + part[j + w];
    return part[0];
  });
}
template <class T> T simd_max(T v, MTL_LOC) {
  return mtl_emu::simd_exchange(v, loc, [](int, uint act, auto get) {
    T m = get(__builtin_ctz(act));
    for (int l = 0; l < mtl_emu::kSimd; ++l) if (act >> l & 1u) m = get(l) > m ? get(l) : m;
    return m;
  });
}
template <class T> T simd_min(T v, MTL_LOC) {
  return mtl_emu::simd_exchange(v, loc, [](int, uint act, auto get) {
    T m = get(__builtin_ctz(act));
    for (int l = 0; l < mtl_emu::kSimd; ++l) if (act >> l & 1u) m = get(l) < m ? get(l) : m;
    return m;
  });
}
template <class T> T simd_shuffle_xor(T v, ushort mask, MTL_LOC) {
  return mtl_emu::simd_exchange(v, loc, [mask](int lane, uint, auto get) { return get(lane ^ mask); });
}
template <class T> T simd_shuffle(T v, ushort src, MTL_LOC) {
  return mtl_emu::simd_exchange(v, loc, [src](int, uint, auto get) { return get(src); });
}
template <class T> T simd_broadcast(T v, ushort src, MTL_LOC) {
  return mtl_emu::simd_exchange(v, loc, [src](int, uint, auto get) { return get(src); });
}
template <class T> T simd_shuffle_down(T v, ushort d, MTL_LOC) {
  return mtl_emu::simd_exchange(v, loc, [d](int lane, uint, auto get) {
    return lane + d < mtl_emu::kSimd ? get(lane + d) : get(lane);
  });
}
template <class T> T simd_shuffle_up(T v, ushort d, MTL_LOC) {
  return mtl_emu::simd_exchange(v, loc, [d](int lane, uint, auto get) {
    return lane >= d ? get(lane - d) : get(lane);
  });
}
inline void simdgroup_barrier(mem_flags = mem_flags::mem_none, MTL_LOC) {
  mtl_emu::simd_exchange(0, loc, [](int, uint, auto) { return 0; });
}

// simdgroup matrices: an 8x8 matrix spread over the 32 lanes of a simdgroup, two elements per lane,
// in the layout Apple GPUs use (lane l holds row (l/4 & 4) + (l/2) % 4, columns (l/4 & 2) * 2 +
// (l % 2) * 2 and +1). Every op is a lock-step exchange that all 32 lanes must enter at the same
// call site; the loads and stores touch memory before the exchange, so a value stored by one lane
// is visible to every lane after the op.
namespace mtl_emu {
inline int mat_row(int lane) { return ((lane / 4) & 4) + (lane / 2) % 4; }
inline int mat_col(int lane) { return ((lane / 4) & 2) * 2 + (lane % 2) * 2; }
inline int my_lane() { return rt.fibers[rt.cur].lane; }
inline void need_full_simdgroup(uint act, std::source_location loc) {
  if (act != 0xffffffffu) fail("simdgroup matrix op run by fewer than 32 lanes", loc);
}
}  // namespace mtl_emu

template <class T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "the shim supports 8x8 simdgroup matrices only");
  T e[2];  // this lane's elements: (row, col) and (row, col + 1)
  simdgroup_matrix() = default;
  // Metal: a diagonal matrix with dval on the diagonal.
  explicit simdgroup_matrix(T dval) {
    int l = mtl_emu::my_lane(), r = mtl_emu::mat_row(l), c = mtl_emu::mat_col(l);
    e[0] = r == c ? dval : T(0);
    e[1] = r == c + 1 ? dval : T(0);
  }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;

template <class T, int Cols, int Rows>
simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(T value, MTL_LOC) {
  mtl_emu::simd_exchange(0, loc, [loc](int, uint act, auto) { mtl_emu::need_full_simdgroup(act, loc); return 0; });
  simdgroup_matrix<T, Cols, Rows> m;
  m.e[0] = m.e[1] = value;
  return m;
}

// Element (r, c) of the matrix is src[(origin.y + r) * elements_per_row + origin.x + c], or with
// transpose_matrix the element (c, r) of that block (origin and stride address the memory side).
template <class T, int Cols, int Rows>
void simdgroup_load(simdgroup_matrix<T, Cols, Rows>& d, const T* src, ulong elements_per_row = Cols,
                    ulong2 origin = ulong2(0), bool transpose_matrix = false, MTL_LOC) {
  int l = mtl_emu::my_lane(), r = mtl_emu::mat_row(l), c = mtl_emu::mat_col(l);
  for (int i = 0; i < 2; ++i) {
    ulong mr = transpose_matrix ? c + i : r, mc = transpose_matrix ? r : c + i;
    d.e[i] = src[(origin.y + mr) * elements_per_row + origin.x + mc];
  }
  mtl_emu::simd_exchange(0, loc, [loc](int, uint act, auto) { mtl_emu::need_full_simdgroup(act, loc); return 0; });
}

template <class T, int Cols, int Rows>
void simdgroup_store(const simdgroup_matrix<T, Cols, Rows>& a, T* dst, ulong elements_per_row = Cols,
                     ulong2 origin = ulong2(0), bool transpose_matrix = false, MTL_LOC) {
  int l = mtl_emu::my_lane(), r = mtl_emu::mat_row(l), c = mtl_emu::mat_col(l);
  for (int i = 0; i < 2; ++i) {
    ulong mr = transpose_matrix ? c + i : r, mc = transpose_matrix ? r : c + i;
    dst[(origin.y + mr) * elements_per_row + origin.x + mc] = a.e[i];
  }
  mtl_emu::simd_exchange(0, loc, [loc](int, uint act, auto) { mtl_emu::need_full_simdgroup(act, loc); return 0; });
}

namespace mtl_emu {
// d = a * b + c for this lane's two elements of d; every lane deposits its elements of a and b.
template <class T>
void mat_fma(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<T, 8, 8>& a,
             const simdgroup_matrix<T, 8, 8>& b, const T* c, std::source_location loc) {
  struct Pair { T a[2], b[2]; };
  Pair mine{{a.e[0], a.e[1]}, {b.e[0], b.e[1]}};
  T acc[2] = {c ? c[0] : T(0), c ? c[1] : T(0)};
  auto out = simd_exchange(mine, loc, [&](int lane, uint act, auto get) {
    need_full_simdgroup(act, loc);
    float A[8][8], B[8][8];
    for (int l = 0; l < kSimd; ++l) {
      Pair p = get(l);
      for (int i = 0; i < 2; ++i) {
        A[mat_row(l)][mat_col(l) + i] = float(p.a[i]);
        B[mat_row(l)][mat_col(l) + i] = float(p.b[i]);
      }
    }
    int r = mat_row(lane), c0 = mat_col(lane);
    struct Out { T v[2]; } o;
    for (int i = 0; i < 2; ++i) {
      float s = float(acc[i]);
      for (int k = 0; k < 8; ++k) s = std::fma(A[r][k], B[k][c0 + i], s);
      o.v[i] = T(s);
    }
    return o;
  });
  d.e[0] = out.v[0];
  d.e[1] = out.v[1];
}
}  // namespace mtl_emu

template <class T>
void simdgroup_multiply_accumulate(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<T, 8, 8>& a,
                                   const simdgroup_matrix<T, 8, 8>& b, const simdgroup_matrix<T, 8, 8>& c,
                                   MTL_LOC) {
  T cc[2] = {c.e[0], c.e[1]};
  mtl_emu::mat_fma(d, a, b, cc, loc);
}
template <class T>
void simdgroup_multiply(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<T, 8, 8>& a,
                        const simdgroup_matrix<T, 8, 8>& b, MTL_LOC) {
  mtl_emu::mat_fma(d, a, b, static_cast<const T*>(nullptr), loc);
}
#undef MTL_LOC

// The Metal language's names. cuda_shim.h leaves them out: there the kernel's dialect header defines them.
#ifndef MTL_EMU_NO_METAL_NAMES
namespace metal {
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
inline float log(float x) { return std::log(x); }
inline float log1p(float x) { return std::log1p(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float abs(float x) { return std::fabs(x); }
inline float fabs(float x) { return std::fabs(x); }
inline float tanh(float x) { return std::tanh(x); }
inline float pow(float x, float y) { return std::pow(x, y); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
template <class T> inline T max(T a, T b) { return a > b ? a : b; }
template <class T> inline T min(T a, T b) { return a < b ? a : b; }
inline float fmax(float a, float b) { return std::fmax(a, b); }
inline float fmin(float a, float b) { return std::fmin(a, b); }
template <class T> inline T clamp(T x, T lo, T hi) { return x < lo ? lo : (x > hi ? hi : x); }
namespace fast { using metal::exp; using metal::log; using metal::sqrt; using metal::rsqrt; using metal::tanh; }
namespace precise { using metal::exp; using metal::log; using metal::sqrt; using metal::rsqrt; using metal::tanh; }
}  // namespace metal
using namespace metal;

// Address-space qualifiers carry no meaning on a CPU; threadgroup arrays are rewritten by the
// harness into function statics (one threadgroup runs at a time), see harness.py.
#define device
#define constant
#define thread
#define threadgroup
#endif  // MTL_EMU_NO_METAL_NAMES
