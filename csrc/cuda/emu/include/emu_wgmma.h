// Software wgmma (sm_90a warpgroup MMA): the fence / commit / wait instructions and
// wgmma.mma_async.m64nNk16 with f32 accumulators and f16/bf16 inputs, A from shared memory (SS)
// or registers (RS), B from shared memory: what wgmma.cuh provides as inline PTX.
//
// Asynchronous at its strictest, like cp.async in emu_mma.h: an op only records itself at issue
// (and A's registers, which live in other lanes, and the accumulator when no earlier op on it is
// still pending); it runs at the wgmma_wait that completes its group. Shared memory is read
// again then, by the waiting thread (ThreadSanitizer sees those reads, and the reads at issue),
// so a buffer rewritten before the wait gives the new bytes and a message; reading the
// accumulators before the wait gives their old values, and writing them is undone by the wait.
//
// Sources: the descriptor bitfields are CUTLASS's GmmaDescriptor (cute/arch/mma_sm90_desc.hpp);
// the no-swizzle operand layouts are make_gmma_desc's canonical ones
// (cute/atom/mma_traits_sm90_gmma.hpp), in 16-byte units:
//   K-major  ((8,m),2):((1,SBO),LBO)        rows 16 bytes apart, 8-row groups SBO apart, the two
//                                           8-element halves of k16 LBO apart;
//   MN-major ((1,n),(8,k)):((X,SBO),(1,LBO)) 8 MN-contiguous elements a row, 8 k-rows 16 bytes
//                                           apart, 8-element MN groups SBO apart, 8-k groups LBO apart.
// The register layouts are CLayout_64xN and ALayout_64x16 there, the same as the PTX ISA's
// "Register Fragments" figures for wgmma.mma_async.m64nNk16: warp w % 4 of the warpgroup holds
// rows 16 (w % 4) + lane / 4 (+ 8); d[v] is row + 8 ((v >> 1) & 1), column
// 8 (v >> 2) + 2 (lane % 4) + (v & 1); a[j] holds row + 8 (j & 1), k 8 (j >> 1) + 2 (lane % 4)
// (low half) and k + 1 (high half).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <type_traits>
#include <vector>

#include "emu.h"
#include "emu_mma.h"

namespace emu_wgmma {

[[noreturn]] inline void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "emu: wgmma (block %u, thread %u): ", blockIdx.x, threadIdx.x);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  std::abort();
}

// The dynamic shared memory the launch asked for (make_block allocates 16 bytes more).
inline size_t dsmem_bytes() { return emu::t_block->dsmem.size() - 16; }

// GmmaDescriptor: start address bits 0-13, leading byte offset 16-29, stride byte offset 32-45
// (each a byte count >> 4), base offset 49-51, layout type 62-63 (0 INTERLEAVE, i.e. no swizzle;
// 1 B128, 2 B64, 3 B32).
struct Desc {
  uint32_t start, lbo, sbo;
};
inline Desc decode(uint64_t d) {
  constexpr uint64_t kFields = 0x3FFFull | 0x3FFFull << 16 | 0x3FFFull << 32 | 0x7ull << 49 | 0x3ull << 62;
  const auto raw = static_cast<unsigned long long>(d);
  if (d & ~kFields) fail("descriptor 0x%016llx has bits set outside its fields", raw);
  const unsigned layout = unsigned(d >> 62), base_offset = unsigned(d >> 49 & 7);
  // The swizzled layouts XOR address bits in a way only hardware could confirm: refused, not guessed.
  if (layout != 0) fail("descriptor 0x%016llx: swizzled layout type %u not emulated (only 0, no swizzle)", raw, layout);
  if (base_offset != 0) fail("descriptor 0x%016llx: base offset %u (only meaningful with 64/128-byte swizzles)", raw, base_offset);
  return {uint32_t(d & 0x3FFF) << 4, uint32_t(d >> 16 & 0x3FFF) << 4, uint32_t(d >> 32 & 0x3FFF) << 4};
}
// Byte address of element (r, k) of a (rows x 16) operand, r along M (A) or N (B). In both
// no-swizzle layouts SBO steps 8 rows and LBO 8 k; they differ inside an 8 x 8 core matrix.
inline uint32_t elem_addr(const Desc& d, bool mn_major, int r, int k) {
  const uint32_t core = mn_major ? (r % 8) * 2 + (k % 8) * 16 : (r % 8) * 16 + (k % 8) * 2;
  return d.start + (r / 8) * d.sbo + (k / 8) * d.lbo + core;
}

struct Op {
  float* d;
  int n, nd;  // N, and the N / 2 accumulators of this thread
  bool rs, b_mn, accumulate, chained;  // chained: starts from the result of an earlier pending op on d
  uint64_t raw_a, raw_b;
  Desc a, b;
  float (*to_float)(uint16_t);
  uint32_t afrag[4][4];      // RS: the A registers of lanes 4 (lane / 4) + q, [q][register]
  const uint32_t* a_reg = nullptr;  // RS: this thread's A registers, and their values at issue
  uint32_t a_at_issue[4] = {};
  std::vector<float> d_in;   // d at issue, unless chained
  std::vector<uint16_t> seen;  // the shared-memory operands at issue
};
struct State {
  std::vector<Op> ops;         // issued and not complete, oldest first
  std::vector<size_t> groups;  // op counts of the committed groups not complete, oldest first
  size_t uncommitted = 0;      // the newest ops, in no group yet
  std::map<float*, std::vector<float>> last;  // the latest result per accumulator array
  bool fenced = false;         // a wgmma_fence since the last wait (or the kernel start)
  size_t seq = 0;              // ops issued, to match them across the warpgroup
};
inline State& state() {
  auto& p = emu::g_fiber->wgmma;
  if (!p) p = std::make_shared<State>();
  return *static_cast<State*>(p.get());
}

// What a warpgroup's 128 threads must issue alike (one instruction, one A and B for all rows).
struct Sig {
  int n;
  bool rs, bf16, accumulate;
  uint64_t a, b;
  bool operator==(const Sig& o) const { return n == o.n && rs == o.rs && bf16 == o.bf16 && accumulate == o.accumulate && a == o.a && b == o.b; }
};
struct BlockState {
  std::map<unsigned, std::vector<Sig>> issued;  // per warpgroup, each op as its first thread issued it
};
inline void check_uniform(State& st, const Sig& s) {
  emu::TsanIgnore hide;  // the emulator's bookkeeping, shared by the warpgroup
  auto& p = emu::t_block->wgmma;
  if (!p) p = std::make_shared<BlockState>();
  auto& v = static_cast<BlockState*>(p.get())->issued[threadIdx.x / 128];
  if (st.seq == v.size()) {
    v.push_back(s);
  } else if (!(v[st.seq] == s)) {
    const Sig& f = v[st.seq];
    fail("wgmma #%zu of warpgroup %u differs between its threads: n%d %s acc=%d A 0x%016llx B 0x%016llx here, "
         "n%d %s acc=%d A 0x%016llx B 0x%016llx in another thread (descriptors describe the whole 64-row A and all of B)",
         st.seq, threadIdx.x / 128, s.n, s.rs ? "RS" : "SS", s.accumulate, (unsigned long long)s.a, (unsigned long long)s.b,
         f.n, f.rs ? "RS" : "SS", f.accumulate, (unsigned long long)f.a, (unsigned long long)f.b);
  }
  ++st.seq;
}

// Reads, as this thread, the shared-memory elements its accumulators use: A's two rows over k16
// (SS only), then B's columns 8 j + 2 (lane % 4) + e (j < N / 8, e < 2) over k16. Together the
// warpgroup's threads read all of both operands. At issue (`at_issue`) every byte must be visible
// to the async proxy: a generic write not followed by its writer's fence.proxy.async aborts.
inline void gather(const Op& op, std::vector<uint16_t>& out, bool at_issue) {
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32 % 4;
  const unsigned char* base = emu::t_block->dsmem.data();
  const size_t limit = dsmem_bytes();
  out.clear();
  auto read = [&](const Desc& d, bool mn, int r, int k, uint64_t raw, char which) {
    const uint32_t at = elem_addr(d, mn, r, k);
    if (at + 2 > limit)
      fail("%c descriptor 0x%016llx: element (%d, %d) at shared byte %u, past the %zu bytes of dynamic shared memory",
           which, (unsigned long long)raw, r, k, at, limit);
    if (at_issue)
      if (const uint32_t w = emu::unfenced_writer(at))
        fail("%c descriptor 0x%016llx: element (%d, %d) at shared byte %u was written by thread %u through the generic "
             "proxy (a store or cp.async) with no fence.proxy.async by that thread before this wgmma read it",
             which, (unsigned long long)raw, r, k, at, w - 1);
    uint16_t v;
    std::memcpy(&v, base + at, 2);
    out.push_back(v);
  };
  if (!op.rs)
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 16; ++k) read(op.a, false, 16 * w + lane / 4 + 8 * h, k, op.raw_a, 'A');
  for (int j = 0; j < op.n / 8; ++j)
    for (int e = 0; e < 2; ++e)
      for (int k = 0; k < 16; ++k) read(op.b, op.b_mn, 8 * j + 2 * (lane % 4) + e, k, op.raw_b, 'B');
}

inline std::atomic<int> g_changed{0};  // messages printed about operands changed in flight
inline void complete(State& st, Op& op) {
  // The tensor core may read A's registers any time before the wait (PTX: writing them while
  // the wgmma is pending is undefined); the emulator took them at issue, so it checks instead.
  if (op.rs && std::memcmp(op.a_reg, op.a_at_issue, sizeof op.a_at_issue) != 0)
    fail("the A registers of a wgmma (B 0x%016llx) were written between its issue and the wait that completes it",
         (unsigned long long)op.raw_b);
  std::vector<uint16_t> now;
  gather(op, now, false);
  if (now != op.seen && g_changed.fetch_add(1, std::memory_order_relaxed) < 8)
    fprintf(stderr, "emu: wgmma (block %u, thread %u): a shared-memory operand (A 0x%016llx, B 0x%016llx) changed between "
            "the issue and the wait; the op used the bytes at the wait\n", blockIdx.x, threadIdx.x,
            (unsigned long long)op.raw_a, (unsigned long long)op.raw_b);
  const std::vector<float>& in = op.chained ? st.last[op.d] : op.d_in;
  auto A = [&](int h, int k) {
    if (!op.rs) return op.to_float(now[h * 16 + k]);
    const uint32_t v = op.afrag[(k % 8) / 2][h + 2 * (k / 8)];
    return op.to_float(uint16_t(k % 2 ? v >> 16 : v & 0xffff));
  };
  const size_t b0 = op.rs ? 0 : 32;
  std::vector<float> out(op.nd);
  for (int v = 0; v < op.nd; ++v) {
    // d[v]: row lane / 4 + 8 h of the warp's 16, column 8 j + 2 (lane % 4) + e, gathered as c = 2 j + e.
    const int h = (v >> 1) & 1, c = 2 * (v >> 2) + (v & 1);
    float acc = op.accumulate ? in[v] : 0.0f;
    for (int k = 0; k < 16; ++k) acc += A(h, k) * op.to_float(now[b0 + c * 16 + k]);
    out[v] = acc;
  }
  std::memcpy(op.d, out.data(), out.size() * sizeof(float));
  st.last[op.d] = std::move(out);
}

// Warpgroup instructions (wgmma, setmaxnreg) need the running thread's whole warpgroup.
inline void require_whole_warpgroup(const char* what) {
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  if ((threadIdx.x / 128 + 1) * 128 > threads) fail("%s needs a whole warpgroup (128 threads), the block has %u", what, threads);
}

template <class T>
inline void issue(float* d, int n, const uint32_t* a, uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  require_whole_warpgroup("wgmma");
  State& st = state();
  if (!st.fenced)
    fail("wgmma issued with no wgmma_fence since the kernel start or the last wgmma_wait (PTX: the fence must "
         "separate register accesses from a wgmma that uses those registers; the emulator asks for one after every wait)");
  const bool rs = a != nullptr;
  check_uniform(st, Sig{n, rs, std::is_same_v<T, __nv_bfloat16>, accumulate, rs ? 0 : desc_a, desc_b});
  Op op{};
  op.d = d;
  op.n = n;
  op.nd = n / 2;
  op.rs = rs;
  op.b_mn = rs;  // SS: imm-trans-b 0 (K-major B); RS: imm-trans-b 1 (MN-major B)
  op.accumulate = accumulate;
  op.raw_a = rs ? 0 : desc_a;
  op.raw_b = desc_b;
  if (!rs) op.a = decode(desc_a);
  op.b = decode(desc_b);
  op.to_float = emu_mma::b16_to_float<T>;
  if (rs) {  // the lanes' A registers, taken at issue (the exchange buffer stands in for the tensor core)
    op.a_reg = a;
    std::memcpy(op.a_at_issue, a, sizeof op.a_at_issue);
    emu::TsanIgnore hide;
    uint32_t* w = emu_mma::wbuf();
    const int lane = emu_mma::lane();
    std::memcpy(&w[lane * 16], a, 16);
    emu_warp_meet();
    for (int q = 0; q < 4; ++q) std::memcpy(op.afrag[q], &w[(4 * (lane / 4) + q) * 16], 16);
    emu_warp_meet();
  }
  for (const Op& p : st.ops) {
    if (p.d == d && p.nd == op.nd) op.chained = true;
    else if (p.d < d + op.nd && d < p.d + p.nd)
      fail("accumulator arrays of two pending wgmma overlap without being the same array: not emulated");
  }
  if (!op.chained) op.d_in.assign(d, d + op.nd);
  gather(op, op.seen, true);
  st.ops.push_back(std::move(op));
  ++st.uncommitted;
}

inline void wait(int n) {
  State& st = state();
  if (st.uncommitted != 0)
    fail("wgmma_wait<%d> with %zu issued wgmma not committed (wgmma_commit): no wait completes them", n, st.uncommitted);
  while (st.groups.size() > size_t(n)) {
    const auto k = static_cast<std::ptrdiff_t>(st.groups.front());
    for (std::ptrdiff_t i = 0; i < k; ++i) complete(st, st.ops[size_t(i)]);
    st.ops.erase(st.ops.begin(), st.ops.begin() + k);
    st.groups.erase(st.groups.begin());
  }
  if (st.ops.empty()) st.last.clear();
  st.fenced = false;  // the accumulators are the thread's again
}
}  // namespace emu_wgmma

namespace ldmfast::cuda::detail {
// The shared-state-space address of p: its offset in the CTA's dynamic shared memory (the only
// shared memory emulated wgmma operands may live in).
inline uint32_t smem_addr(const void* p) {
  const auto at = reinterpret_cast<uintptr_t>(p), base = reinterpret_cast<uintptr_t>(emu::t_block->dsmem.data());
  if (at < base || at - base >= emu_wgmma::dsmem_bytes())
    emu_wgmma::fail("smem_addr(%p): not inside the block's %zu bytes of dynamic shared memory", p, emu_wgmma::dsmem_bytes());
  return static_cast<uint32_t>(at - base);
}
inline void wgmma_fence() { emu_wgmma::state().fenced = true; }
inline void wgmma_commit() {
  emu_wgmma::State& st = emu_wgmma::state();
  st.groups.push_back(st.uncommitted);  // possibly empty, as in PTX
  st.uncommitted = 0;
}
template <int N> inline void wgmma_wait() {
  static_assert(N >= 0 && N <= 7, "wgmma.wait_group N: 0..7 (CUTLASS warpgroup_wait)");
  emu_wgmma::wait(N);
}
// Orders this thread's generic-proxy writes to shared memory before async-proxy reads (emu.h).
inline void fence_proxy_async() { emu::fence_proxy_async(); }
// setmaxnreg: registers are not modelled; the operand's rules are (a multiple of 8 in 24..256),
// and the warpgroup must be whole.
template <int N> inline void setmaxnreg_check() {
  static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg takes a multiple of 8 in 24..256");
  emu_wgmma::require_whole_warpgroup("setmaxnreg");
}
template <int N> inline void setmaxnreg_inc() { setmaxnreg_check<N>(); }
template <int N> inline void setmaxnreg_dec() { setmaxnreg_check<N>(); }
inline void mbar_init(uint64_t* bar, uint32_t count) { emu::mbarrier_init(bar, count); }
inline void mbar_arrive_lane0(uint64_t* bar, int lane) {
  if (lane == 0) emu::mbarrier(bar, "mbarrier.arrive").arrive();
}
inline void mbar_wait(uint64_t* bar, uint32_t parity) { emu::mbarrier(bar, "mbarrier.try_wait").wait_parity(parity & 1u); }

template <class T, int N> struct WgmmaCheck {
  static_assert(N >= 8 && N <= 256 && N % 8 == 0, "wgmma m64nNk16: N a multiple of 8 in 8..256");
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "f16 or bf16 inputs");
};
// wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16}: d = A B (+ d when accumulate), A and B
// K-major in shared memory.
template <class T, int N> struct WgmmaSS : WgmmaCheck<T, N> {
  static void run(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
    emu_wgmma::issue<T>(d, N, nullptr, desc_a, desc_b, accumulate);
  }
};
// The same with A from registers (the ALayout_64x16 fragment) and B MN-major (imm-trans-b 1).
template <class T, int N> struct WgmmaRS : WgmmaCheck<T, N> {
  static void run(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate) {
    emu_wgmma::issue<T>(d, N, a, 0, desc_b, accumulate);
  }
};
}  // namespace ldmfast::cuda::detail
