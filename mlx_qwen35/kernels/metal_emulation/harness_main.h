// Host side of an emulated launch: read the buffers, walk the grid threadgroup by threadgroup as
// Metal's dispatchThreads does (edge threadgroups are cut to the grid), write the outputs back.
#pragma once
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace mtl_emu {
struct Ids {
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_threadgroup, threadgroups_per_grid, threads_per_grid, grid_size, grid_origin;
  uint3 dispatch_threads_per_threadgroup;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup;
  uint simdgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup, threads_per_simdgroup;
  uint thread_execution_width, thread_index_in_quadgroup, quadgroup_index_in_threadgroup;
  uint quadgroups_per_threadgroup, dispatch_quadgroups_per_threadgroup;
};
inline std::vector<Ids> ids;
inline Ids* current_ids() { return &ids[rt.cur]; }

struct Launch {
  void (*fn)(void*, int);
  void** buf;
};
inline void trampoline(void* ctx, int i) {
  auto* l = static_cast<Launch*>(ctx);
  (void)i;
  l->fn(l->buf, i);
}

inline int harness_main(int argc, char** argv, void (*fn)(void*, int)) {
  if (argc != 10) { std::fprintf(stderr, "usage: in out gx gy gz tx ty tz n_inputs\n"); return 2; }
  FILE* f = std::fopen(argv[1], "rb");
  if (!f) { std::perror(argv[1]); return 2; }
  uint64_t n = 0;
  if (std::fread(&n, 8, 1, f) != 1) return 2;
  std::vector<uint64_t> sizes(n);
  if (std::fread(sizes.data(), 8, n, f) != n) return 2;
  std::vector<void*> buf(n);
  for (uint64_t i = 0; i < n; ++i) {
    buf[i] = std::aligned_alloc(64, (sizes[i] + 63) / 64 * 64 + 64);
    if (sizes[i] && std::fread(buf[i], 1, sizes[i], f) != sizes[i]) return 2;
  }
  std::fclose(f);
  uint g[3], t[3];
  for (int d = 0; d < 3; ++d) { g[d] = std::atoi(argv[3 + d]); t[d] = std::min<uint>(std::atoi(argv[6 + d]), g[d]); }
  int n_inputs = std::atoi(argv[9]);
  uint ng[3] = {(g[0] + t[0] - 1) / t[0], (g[1] + t[1] - 1) / t[1], (g[2] + t[2] - 1) / t[2]};
  Launch launch{fn, buf.data()};
  rt.body = &trampoline;
  rt.body_ctx = &launch;
  for (uint gz = 0; gz < ng[2]; ++gz)
    for (uint gy = 0; gy < ng[1]; ++gy)
      for (uint gx = 0; gx < ng[0]; ++gx) {
        uint tg[3] = {std::min(t[0], g[0] - gx * t[0]), std::min(t[1], g[1] - gy * t[1]),
                      std::min(t[2], g[2] - gz * t[2])};
        int nt = tg[0] * tg[1] * tg[2];
        ids.resize(nt);
        for (int i = 0; i < nt; ++i) {
          Ids& id = ids[i];
          uint lx = i % tg[0], ly = (i / tg[0]) % tg[1], lz = i / (tg[0] * tg[1]);
          id.thread_position_in_threadgroup = {lx, ly, lz};
          id.threadgroup_position_in_grid = {gx, gy, gz};
          id.thread_position_in_grid = {gx * t[0] + lx, gy * t[1] + ly, gz * t[2] + lz};
          id.threads_per_threadgroup = {tg[0], tg[1], tg[2]};
          id.dispatch_threads_per_threadgroup = {t[0], t[1], t[2]};
          id.threadgroups_per_grid = {ng[0], ng[1], ng[2]};
          id.threads_per_grid = id.grid_size = {g[0], g[1], g[2]};
          id.grid_origin = {0, 0, 0};
          id.thread_index_in_threadgroup = i;
          id.thread_index_in_simdgroup = i % kSimd;
          id.simdgroup_index_in_threadgroup = i / kSimd;
          id.simdgroups_per_threadgroup = (nt + kSimd - 1) / kSimd;
          id.dispatch_simdgroups_per_threadgroup = (t[0] * t[1] * t[2] + kSimd - 1) / kSimd;
          id.threads_per_simdgroup = id.thread_execution_width = kSimd;
          id.thread_index_in_quadgroup = i % 4;
          id.quadgroup_index_in_threadgroup = i / 4;
          id.quadgroups_per_threadgroup = (nt + 3) / 4;
          id.dispatch_quadgroups_per_threadgroup = (t[0] * t[1] * t[2] + 3) / 4;
        }
        run_threadgroup(nt);
      }
  FILE* o = std::fopen(argv[2], "wb");
  for (uint64_t i = n_inputs; i < n; ++i) std::fwrite(buf[i], 1, sizes[i], o);
  std::fclose(o);
  return 0;
}
}  // namespace mtl_emu
