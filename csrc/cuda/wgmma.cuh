// Hopper warpgroup MMA (wgmma.mma_async, sm_90a) pieces for attention_wgmma.cu: the shared-memory
// matrix descriptor, the fence / commit / wait instructions, and (wgmma_ops.cuh, generated) the
// m64nNk16 instructions themselves. Under the CPU emulator (LDMFAST_EMU) emu_wgmma.h provides
// software versions with the same operand layouts and the same asynchrony.
//
// Shared-memory tiles use the no-swizzle ("interleaved") canonical layout: 8 x 8 core matrices,
// each 8 rows of 16 contiguous bytes (128 bytes in all), so any head dim that is a multiple of 8
// fits without the 64/128-byte row widths the swizzled layouts want.
#pragma once
#include <cstdint>
#if defined(LDMFAST_EMU)
#include <cstdio>
#include <cstdlib>
#endif

#include "mma.cuh"

// True in a device pass that may use wgmma (the sm_90a target), and in the emulator.
#if defined(LDMFAST_EMU) || (defined(__CUDA_ARCH_FEAT_SM90_ALL) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900)
#define LDMFAST_WGMMA 1
#else
#define LDMFAST_WGMMA 0
#endif

namespace ldmfast::cuda::detail {

// Matrix descriptor (PTX ISA "matrix descriptor format"): start address, leading- and stride-
// dimension byte offsets, all in 16-byte units; layout type 0 (no swizzle) and base offset 0.
// For a K-major operand LBO steps between the two 8-element halves of a k16 slice and SBO
// between groups of 8 rows; for an MN-major one (no swizzle) LBO steps between groups of 8 rows
// along K and SBO between groups of 8 columns along M/N.
__host__ __device__ __forceinline__ uint64_t gmma_desc(uint32_t smem_byte_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
#if defined(LDMFAST_EMU)
  // The low 4 bits are dropped: a tile off a 16-byte boundary would pass unseen.
  if (((smem_byte_addr | lbo_bytes | sbo_bytes) & 15u) != 0) {
    std::fprintf(stderr, "emu: gmma_desc(%u, %u, %u) not in 16-byte units\n", smem_byte_addr, lbo_bytes, sbo_bytes);
    std::abort();
  }
#endif
  return static_cast<uint64_t>((smem_byte_addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFF) << 32);
}

// d with `units` (16-byte units) added to its start address, as a 32-bit add on the low word:
// the field cannot carry out (shared addresses are below 2^18 bytes), and the high word (the
// stride byte offset) stays a constant, so a kernel keeps one register per offset descriptor
// instead of a pair (the pairs of a loop's k16 steps spilled at 160 registers a thread).
__host__ __device__ __forceinline__ uint64_t desc_add(uint64_t d, uint32_t units) {
  return (d & 0xFFFFFFFF00000000ull) | static_cast<uint32_t>(static_cast<uint32_t>(d) + units);
}

}  // namespace ldmfast::cuda::detail

#if defined(LDMFAST_EMU)
#include "emu_wgmma.h"
#elif LDMFAST_WGMMA
namespace ldmfast::cuda::detail {

// Orders this warpgroup's register writes before the wgmma that read them (accumulators, A).
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Shared memory written through the generic proxy (ordinary stores, cp.async) is read by wgmma
// through the async proxy: each writing thread fences before the barrier that publishes it.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// mbarriers: 8-byte barrier objects in shared memory that count arrivals (each arriving thread
// once) and complete a phase when the count given to mbar_init has arrived; a wait names the
// parity of the phase it waits out (PTX ISA "Parallel synchronization: mbarrier"). The arrival
// releases and the wait acquires (.release.cta / .acquire.cta, their defaults), so what the
// arriving threads wrote before is visible to the waiting ones after.
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// Lane 0 of the warp arrives, as one predicated instruction: a branch in a loop body makes
// ptxas serialise the loop's wgmma.
__device__ __forceinline__ void mbar_arrive_lane0(uint64_t* bar, int lane) {
  asm volatile(
      "{\n .reg .pred p;\n .reg .b64 state;\n setp.eq.s32 p, %1, 0;\n"
      " @p mbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(smem_addr(bar)),
      "r"(lane)
      : "memory");
}
// Returns once the phase of the given parity has completed (at once if the barrier is already
// past it).
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (done == 0);
}
// The executing warpgroup's registers per thread become N (warp-specialised kernels: a loading
// warpgroup gives registers back, the computing ones take them). ptxas needs the starting count
// from the kernel's __launch_bounds__; without it ptxas drops the instruction (advisory C7508,
// a failure in tests/test_build.py).
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

}  // namespace ldmfast::cuda::detail
#include "wgmma_ops.cuh"
#endif

namespace ldmfast::cuda::detail {
// The compiler sees a wgmma's accumulators as written at issue, and its register A operand as
// read there; this pins a register read or written by ordinary code to its place after the wait
// (or before the fence that precedes the issue), as CUTLASS's warpgroup_fence_operand does.
// The emulator has no compiler to hold back.
#if !defined(LDMFAST_EMU)
__device__ __forceinline__ void pin(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void pin(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }
#else
inline void pin(float&) {}
inline void pin(uint32_t&) {}
#endif
// v through pin: a value the compiler cannot see through, so what is derived from it is
// computed where it is used instead of hoisted out of a loop (and kept in registers there).
template <class T>
__device__ __forceinline__ T opaque(T v) {
  pin(v);
  return v;
}
// Every register of an array (of arrays).
template <class T, int N>
__device__ __forceinline__ void pin(T (&a)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) pin(a[i]);
}
}  // namespace ldmfast::cuda::detail
