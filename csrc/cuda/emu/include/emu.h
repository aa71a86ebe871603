// A CPU emulator for the ldmfast CUDA kernels, for machines without a GPU: each CTA runs as one
// std::thread per CUDA thread, with std::barrier for __syncthreads / __syncwarp and an exchange
// buffer for the warp shuffles. It checks indexing, tails, reductions and layouts, not timing,
// memory-model subtleties or anything arch-specific (clusters, inline PTX other than the
// ldmatrix / mma.sync that emu_mma.h re-implements).
#pragma once
#include <cuda_runtime.h>
#include <barrier>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace emu {
struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<double> xbuf;  // shuffle exchange, 32 per warp
  std::vector<unsigned char> dsmem;
  std::vector<uint32_t> wx;  // warp exchange for the mma emulation, 32 lanes x 16 words per warp
};
inline Block* g_block = nullptr;
}  // namespace emu
inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

inline void __syncthreads() { emu::g_block->bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::g_block->warp_bar[threadIdx.x / 32]->arrive_and_wait(); }
template <class T> inline T emu_shfl(T v, int src_fn(int, int), int arg) {
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  double* buf = &emu::g_block->xbuf[w * 32];
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

namespace emu {
template <class K, class... Args>
void launch(K kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  const unsigned nthreads = block.x * block.y * block.z;
  for (unsigned bx = 0; bx < grid.x; ++bx) {
    Block b;
    b.bar = std::make_unique<std::barrier<>>(nthreads);
    for (unsigned w = 0; w < (nthreads + 31) / 32; ++w) b.warp_bar.push_back(std::make_unique<std::barrier<>>(32));
    b.xbuf.assign(((nthreads + 31) / 32) * 32, 0.0);
    b.dsmem.resize(smem + 16);
    b.wx.assign(((nthreads + 31) / 32) * 32 * 16, 0u);
    // Poison dynamic shared memory with NaN floats so reads of unwritten words show up.
    for (size_t i = 0; i + 4 <= b.dsmem.size(); i += 4) { float nan = NAN; std::memcpy(&b.dsmem[i], &nan, 4); }
    g_block = &b;
    std::vector<std::thread> th;
    th.reserve(nthreads);
    for (unsigned t = 0; t < nthreads; ++t)
      th.emplace_back([&, t] {
        threadIdx = make_uint3(t, 0, 0); blockIdx = make_uint3(bx, 0, 0); blockDim = block; gridDim = grid;
        kernel(args...);
      });
    for (auto& x : th) x.join();
    g_block = nullptr;
  }
}
template <class T> T* dyn_smem() { return reinterpret_cast<T*>(g_block->dsmem.data()); }
}  // namespace emu
template <class T> cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, T* f) {
  return cudaFuncGetAttributes(a, reinterpret_cast<const void*>(f));
}
