// A CPU emulator for the ldmfast CUDA kernels, for machines without a GPU: each CTA runs as one
// std::thread per CUDA thread, with std::barrier for __syncthreads / __syncwarp / cluster.sync
// and an exchange buffer for the warp shuffles. Static __shared__ variables live in a per-CTA
// arena (transform.py rewrites their declarations), so the CTAs of a cluster run concurrently
// and map_shared_rank works. It checks indexing, tails, reductions and layouts; not timing, the
// memory model, or inline PTX other than the ldmatrix / mma.sync that emu_mma.h re-implements.
#pragma once
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <typeindex>
#include <typeinfo>
#include <vector>

namespace emu {
struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<double> xbuf;  // shuffle exchange, 32 per warp
  std::vector<unsigned char> dsmem;
  std::vector<uint32_t> wx;  // warp exchange for the mma emulation, 32 lanes x 16 words per warp
  std::vector<unsigned char> arena;  // static __shared__ variables
  std::vector<Block*> cluster;       // the CTAs of this CTA's cluster, by rank
  std::barrier<>* cluster_bar = nullptr;
};
inline thread_local Block* t_block = nullptr;
constexpr size_t kArenaBytes = 256 * 1024;

// Offsets of the static __shared__ variables in every CTA's arena, assigned on first use within
// one launch (all its CTAs share the table); keyed by declaration and type, since template
// instances of one declaration differ in size.
struct SharedTable {
  std::mutex mu;
  std::map<std::pair<int, std::type_index>, size_t> offsets;
  size_t next = 0;
};
inline SharedTable g_shared;
inline void reset_shared_table() {
  std::lock_guard<std::mutex> lock(g_shared.mu);
  g_shared.offsets.clear();
  g_shared.next = 0;
}
inline size_t shared_offset(int id, std::type_index type, size_t bytes) {
  std::lock_guard<std::mutex> lock(g_shared.mu);
  auto it = g_shared.offsets.find({id, type});
  if (it != g_shared.offsets.end()) return it->second;
  g_shared.next = (g_shared.next + 15) & ~size_t(15);
  const size_t off = g_shared.next;
  g_shared.next += bytes;
  if (g_shared.next > kArenaBytes) {
    fprintf(stderr, "emu: static shared memory over %zu bytes\n", kArenaBytes);
    std::abort();
  }
  g_shared.offsets[{id, type}] = off;
  return off;
}
template <class T> T& shared_var(int id) {
  return *reinterpret_cast<T*>(t_block->arena.data() + shared_offset(id, std::type_index(typeid(T)), sizeof(T)));
}
}  // namespace emu
inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

inline void __syncthreads() { emu::t_block->bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::t_block->warp_bar[threadIdx.x / 32]->arrive_and_wait(); }
template <class T> inline T emu_shfl(T v, int src_fn(int, int), int arg) {
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  double* buf = &emu::t_block->xbuf[w * 32];
  std::memcpy(&buf[lane], &v, sizeof(T));
  __syncwarp();
  const int src = src_fn(lane, arg);
  T r = v;
  if (src >= 0 && src < 32) std::memcpy(&r, &buf[src], sizeof(T));
  __syncwarp();
  return r;
}
inline int emu_xor(int l, int o) { return l ^ o; }
inline int emu_down(int l, int o) { return l + o; }
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) { return emu_shfl(v, emu_xor, o); }
template <class T> inline T __shfl_down_sync(unsigned, T v, int o) { return emu_shfl(v, emu_down, o); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
[[noreturn]] inline void __trap() { std::abort(); }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

namespace emu {
inline void poison(std::vector<unsigned char>& v) {
  for (size_t i = 0; i + 4 <= v.size(); i += 4) { float nan = NAN; std::memcpy(&v[i], &nan, 4); }
}
inline std::unique_ptr<Block> make_block(unsigned nthreads, size_t smem) {
  auto b = std::make_unique<Block>();
  b->bar = std::make_unique<std::barrier<>>(nthreads);
  for (unsigned w = 0; w < (nthreads + 31) / 32; ++w) b->warp_bar.push_back(std::make_unique<std::barrier<>>(32));
  b->xbuf.assign(((nthreads + 31) / 32) * 32, 0.0);
  b->wx.assign(((nthreads + 31) / 32) * 32 * 16, 0u);
  // Shared memory starts as NaN floats, so reads of words nothing wrote show up.
  b->dsmem.resize(smem + 16);
  poison(b->dsmem);
  b->arena.resize(kArenaBytes);
  poison(b->arena);
  return b;
}
// Runs the grid cluster by cluster; the CTAs of one cluster run concurrently.
template <class K, class... Args>
void launch_clusters(K kernel, dim3 grid, dim3 block, size_t smem, unsigned csize, Args... args) {
  const unsigned nthreads = block.x * block.y * block.z;
  if (getenv("EMU_TRACE")) fprintf(stderr, "launch grid=%u block=%u cluster=%u smem=%zu\n", grid.x, nthreads, csize, smem);
  reset_shared_table();
  for (unsigned c0 = 0; c0 < grid.x; c0 += csize) {
    std::vector<std::unique_ptr<Block>> blocks;
    std::vector<Block*> ranks;
    for (unsigned r = 0; r < csize; ++r) { blocks.push_back(make_block(nthreads, smem)); ranks.push_back(blocks.back().get()); }
    std::barrier<> cbar(csize * nthreads);
    for (auto* b : ranks) { b->cluster = ranks; b->cluster_bar = &cbar; }
    std::vector<std::thread> th;
    for (unsigned r = 0; r < csize; ++r)
      for (unsigned t = 0; t < nthreads; ++t)
        th.emplace_back([&, r, t] {
          t_block = ranks[r];
          threadIdx = make_uint3(t, 0, 0); blockIdx = make_uint3(c0 + r, 0, 0); blockDim = block; gridDim = grid;
          kernel(args...);
        });
    for (auto& x : th) x.join();
  }
}
template <class K, class... Args>
void launch(K kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  launch_clusters(kernel, grid, block, smem, 1u, args...);
}
template <class K, class... Args>
cudaError_t launch_ex(const cudaLaunchConfig_t* cfg, K kernel, Args... args) {
  unsigned csize = 1;
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension) csize = cfg->attrs[i].val.clusterDim.x;
  if (cfg->gridDim.x % csize != 0) return cudaErrorInvalidConfiguration;
  launch_clusters(kernel, cfg->gridDim, cfg->blockDim, cfg->dynamicSmemBytes, csize, args...);
  return cudaSuccess;
}
template <class T> T* dyn_smem() { return reinterpret_cast<T*>(t_block->dsmem.data()); }
}  // namespace emu
template <class T> cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, T* f) {
  return cudaFuncGetAttributes(a, reinterpret_cast<const void*>(f));
}
template <class T> cudaError_t cudaFuncSetAttribute(T* f, cudaFuncAttribute a, int v) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(f), a, v);
}
template <class T> cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, T* f, int threads, size_t smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, reinterpret_cast<const void*>(f), threads, smem);
}
