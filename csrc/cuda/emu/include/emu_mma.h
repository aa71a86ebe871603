// Software ldmatrix / mma.sync.m16n8k16 / cp.async following the PTX ISA fragment layouts: what
// mma.cuh provides as inline PTX, so the tensor-core attention kernels can run in the emulator.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace emu_mma {
inline uint32_t* wbuf() { return &emu::t_block->wx[(threadIdx.x / 32) * 32 * 16]; }
inline int lane() { return threadIdx.x % 32; }
inline uint16_t ld16(uintptr_t a) { uint16_t v; std::memcpy(&v, reinterpret_cast<const void*>(a), 2); return v; }
// Every lane posts its row address; returns the 32 addresses. The lanes meet as in any warp
// collective (emu.h): the rows they read are ordered by the kernel's own barriers or not at all.
inline void post_addrs(const void* p, uintptr_t (&addr)[32]) {
  emu::TsanIgnore hide;
  uintptr_t a = reinterpret_cast<uintptr_t>(p);
  std::memcpy(&wbuf()[lane() * 16], &a, sizeof a);
  emu_warp_meet();
  for (int l = 0; l < 32; ++l) std::memcpy(&addr[l], &wbuf()[l * 16], sizeof(uintptr_t));
  emu_warp_meet();
}
template <int N, bool kTrans>
inline void ldmatrix(uint32_t* r, const void* p) {
  uintptr_t addr[32];
  post_addrs(p, addr);
  const int l = lane();
  for (int j = 0; j < N; ++j) {
    if (!kTrans) {
      const uintptr_t row = addr[j * 8 + l / 4];
      r[j] = ld16(row + 2 * (2 * (l % 4))) | (uint32_t(ld16(row + 2 * (2 * (l % 4) + 1))) << 16);
    } else {
      const uintptr_t r0 = addr[j * 8 + 2 * (l % 4)], r1 = addr[j * 8 + 2 * (l % 4) + 1];
      r[j] = ld16(r0 + 2 * (l / 4)) | (uint32_t(ld16(r1 + 2 * (l / 4))) << 16);
    }
  }
}
template <class T> inline float b16_to_float(uint16_t v) {
  T t; std::memcpy(static_cast<void*>(&t), &v, 2);
  if constexpr (std::is_same_v<T, __half>) return __half2float(t); else return __bfloat162float(t);
}
template <class T>
inline void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::TsanIgnore hide;  // registers only: the exchange buffer stands in for the tensor core
  uint32_t* w = wbuf();
  const int l = lane();
  uint32_t mine[10] = {a[0], a[1], a[2], a[3], b0, b1};
  std::memcpy(&mine[6], d, 16);
  std::memcpy(&w[l * 16], mine, sizeof mine);
  emu_warp_meet();
  auto A = [&](int row, int k) {  // a_i layout: reg = (row / 8) + 2 * (k / 8), half = k % 2
    const int ln = (row % 8) * 4 + (k % 8) / 2, reg = row / 8 + 2 * (k / 8);
    const uint32_t v = w[ln * 16 + reg];
    return b16_to_float<T>(uint16_t(k % 2 ? v >> 16 : v & 0xffff));
  };
  auto B = [&](int k, int n) {  // b_i layout: lane n*4 + (k%8)/2, reg k / 8, half k % 2
    const int ln = n * 4 + (k % 8) / 2;
    const uint32_t v = w[ln * 16 + 4 + k / 8];
    return b16_to_float<T>(uint16_t(k % 2 ? v >> 16 : v & 0xffff));
  };
  float out[4];
  for (int c = 0; c < 4; ++c) {
    const int row = l / 4 + 8 * (c / 2), col = 2 * (l % 4) + (c % 2);
    float acc = d[c];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    out[c] = acc;
  }
  emu_warp_meet();
  std::memcpy(d, out, 16);
}

// cp.async as the PTX ISA allows it to behave at its latest: a thread's copies land in shared
// memory only at the cp.async.wait_group that waits for their commit group; until then the
// destination keeps its old bytes. A missing wait (or commit) then reads stale data and fails
// the parity check instead of passing. The 16 source bytes are read at issue (global memory
// does not change during a kernel). EMU_CP_ASYNC=early lands them at issue instead, the other
// extreme, where a copy issued into a buffer other threads still read shows up. The pending
// copies and their groups are the running fiber's (emu::Fiber::pending, groups).
// Read at start-up, not in a function-local static: its guard, first passed inside a fiber,
// would order every later caller after the first one for ThreadSanitizer.
inline const bool g_cp_async_early = [] {
  const char* e = std::getenv("EMU_CP_ASYNC");
  return e != nullptr && std::strcmp(e, "early") == 0;
}();
}  // namespace emu_mma

namespace ldmfast::cuda::detail {
inline void cp_async16(void* dst, const void* src, bool fill) {
  if (emu_mma::g_cp_async_early) {
    if (fill) std::memcpy(dst, src, 16); else std::memset(dst, 0, 16);
    emu::note_generic_write(dst, 16);
    return;
  }
  emu::PendingCopy c{dst, {}};
  if (fill) std::memcpy(c.bytes, src, 16);
  emu::g_fiber->pending.push_back(c);
}
inline void cp_async_commit() { emu::g_fiber->groups.push_back(emu::g_fiber->pending.size()); }  // possibly empty
// cp.async.wait_group N: every committed group but the newest N has landed.
template <int N>
inline void cp_async_wait() {
  static_assert(N >= 0);
  auto& f = *emu::g_fiber;
  if (f.groups.size() <= static_cast<size_t>(N)) return;
  const size_t k = f.groups.size() - N, n = f.groups[k - 1];
  for (size_t i = 0; i < n; ++i) {
    std::memcpy(f.pending[i].dst, f.pending[i].bytes, 16);
    emu::note_generic_write(f.pending[i].dst, 16);
  }
  f.pending.erase(f.pending.begin(), f.pending.begin() + static_cast<std::ptrdiff_t>(n));
  f.groups.erase(f.groups.begin(), f.groups.begin() + static_cast<std::ptrdiff_t>(k));
  for (size_t& e : f.groups) e -= n;
}
inline void cp_async_wait_all() { cp_async_wait<0>(); }
inline void store_chunk16(void* dst, uint4 v) {
  std::memcpy(dst, &v, 16);
  emu::note_generic_write(dst, 16);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { emu_mma::ldmatrix<4, false>(r, p); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { emu_mma::ldmatrix<4, true>(r, p); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) { emu_mma::ldmatrix<2, true>(r, p); }
template <class T> struct Mma {
  static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { emu_mma::mma<T>(d, a, b0, b1); }
  static uint32_t pack(float lo, float hi) {
    uint16_t x[2];
    if constexpr (std::is_same_v<T, __half>) { __half h[2] = {__float2half_rn(lo), __float2half_rn(hi)}; std::memcpy(x, h, 4); }
    else { __nv_bfloat16 h[2] = {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)}; std::memcpy(x, h, 4); }
    return x[0] | (uint32_t(x[1]) << 16);
  }
};
}  // namespace ldmfast::cuda::detail
