// Device helpers shared by the ldmfast CUDA kernels: dtype conversion, 16-byte vector access,
// warp/block reductions and a Welford accumulator. nvcc only; no torch headers (STYLE.md §1).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "ldmfast/common.h"

namespace ldmfast::cuda::detail {

constexpr unsigned kFullMask = 0xffffffffu;

// ---- dtype conversion ---------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- vector access ------------------------------------------------------------------------------

// Elements of T in one 16-byte access.
template <class T> constexpr int kVec16 = static_cast<int>(16 / sizeof(T));

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// A 32-bit word as the float values of the 1 (float) or 2 (half, bf16) elements it holds, low
// half first, and back. Bit intrinsics rather than pointer casts: those break strict aliasing.
template <class T> struct Word;
template <> struct Word<float> {
  static constexpr int kPer = 1;
  static __device__ __forceinline__ void unpack(uint32_t w, float* out) { out[0] = __uint_as_float(w); }
  static __device__ __forceinline__ uint32_t pack(const float* in) { return __float_as_uint(in[0]); }
};
template <> struct Word<__half> {
  static constexpr int kPer = 2;
  static __device__ __forceinline__ void unpack(uint32_t w, float* out) {
    out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  static __device__ __forceinline__ uint32_t pack(const float* in) {
    return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(in[0]))) |
           (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(in[1]))) << 16);
  }
};
template <> struct Word<__nv_bfloat16> {
  static constexpr int kPer = 2;
  static __device__ __forceinline__ void unpack(uint32_t w, float* out) {
    out[0] = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w & 0xffffu)));
    out[1] = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w >> 16)));
  }
  static __device__ __forceinline__ uint32_t pack(const float* in) {
    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(in[0]))) |
           (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(in[1]))) << 16);
  }
};

// One 16-byte global store. A plain uint4 store was split into four 4-byte ones in some unrolled
// loops (the optimiser scalarises the aggregate); inline PTX keeps it one instruction. kStream
// marks the line evict-first (st.global.cs): output that should not push inputs out of L2.
template <bool kStream = false>
__device__ __forceinline__ void store16(uint4* p, uint4 v) {
#if defined(__CUDA_ARCH__)
  if constexpr (kStream) {
    asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
  } else {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
  }
#else
  *p = v;  // the CPU emulator
#endif
}

// Asks L2 to fetch the line at p (prefetch.global.L2): no register waits for it.
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
#else
  (void)p;  // the CPU emulator
#endif
}

// The elements of one 16-byte word as float (what load_vec does after a 16-byte load), for
// kernels that hold raw words in registers and convert them more than once.
template <class T>
__device__ __forceinline__ void unpack16(const uint4& raw, float (&v)[kVec16<T>]) {
  constexpr int kPer = Word<T>::kPer;
  Word<T>::unpack(raw.x, v);
  Word<T>::unpack(raw.y, v + kPer);
  Word<T>::unpack(raw.z, v + 2 * kPer);
  Word<T>::unpack(raw.w, v + 3 * kPer);
}

// Loads V consecutive elements as float. V == 1 is a scalar access; otherwise V * sizeof(T) is 4,
// 8 or a multiple of 16 bytes and p aligned to min(16, V * sizeof(T)) (the callers check that on
// the host): one 4-, 8- or 16-byte access per word.
template <class T, int V>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[V]) {
  constexpr int kBytes = static_cast<int>(V * sizeof(T));
  constexpr int kPer = Word<T>::kPer;
  if constexpr (V == 1) {
    out[0] = to_float(p[0]);
  } else if constexpr (kBytes == 4) {
    Word<T>::unpack(*reinterpret_cast<const uint32_t*>(p), out);
  } else if constexpr (kBytes == 8) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    Word<T>::unpack(raw.x, out);
    Word<T>::unpack(raw.y, out + kPer);
  } else {
    static_assert(kBytes % 16 == 0, "vector must be 4, 8 or whole 16-byte words");
#pragma unroll
    for (int w = 0; w < kBytes / 16; ++w) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[w];
      float* o = out + w * 4 * kPer;
      Word<T>::unpack(raw.x, o);
      Word<T>::unpack(raw.y, o + kPer);
      Word<T>::unpack(raw.z, o + 2 * kPer);
      Word<T>::unpack(raw.w, o + 3 * kPer);
    }
  }
}

template <class T, int V, bool kStream = false>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[V]) {
  constexpr int kBytes = static_cast<int>(V * sizeof(T));
  constexpr int kPer = Word<T>::kPer;
  if constexpr (V == 1) {
    p[0] = from_float<T>(in[0]);
  } else if constexpr (kBytes == 4) {
    const uint32_t w = Word<T>::pack(in);
#if defined(__CUDA_ARCH__)
    if constexpr (kStream) {
      asm volatile("st.global.cs.u32 [%0], %1;\n" ::"l"(p), "r"(w) : "memory");
      return;
    }
#endif
    *reinterpret_cast<uint32_t*>(p) = w;
  } else if constexpr (kBytes == 8) {
    const uint32_t w0 = Word<T>::pack(in), w1 = Word<T>::pack(in + kPer);
#if defined(__CUDA_ARCH__)
    if constexpr (kStream) {
      asm volatile("st.global.cs.v2.u32 [%0], {%1, %2};\n" ::"l"(p), "r"(w0), "r"(w1) : "memory");
      return;
    }
#endif
    *reinterpret_cast<uint2*>(p) = make_uint2(w0, w1);
  } else {
    static_assert(kBytes % 16 == 0, "vector must be 4, 8 or whole 16-byte words");
#pragma unroll
    for (int w = 0; w < kBytes / 16; ++w) {
      const float* i = in + w * 4 * kPer;
      store16<kStream>(reinterpret_cast<uint4*>(p) + w,
                       make_uint4(Word<T>::pack(i), Word<T>::pack(i + kPer), Word<T>::pack(i + 2 * kPer),
                                  Word<T>::pack(i + 3 * kPer)));
    }
  }
}

// Whether p is aligned for a vector of `bytes` (the access load_vec / store_vec make).
inline bool aligned_for(const void* p, int bytes) {
  const int a = bytes >= 16 ? 16 : bytes;
  return (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(a)) == 0;
}

// ---- reductions ---------------------------------------------------------------------------------
// Every reduction below combines in a fixed order that depends only on the launch shape, so a
// kernel gives bit-identical results from run to run (no atomics anywhere).

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;  // the xor butterfly leaves the same bits in every lane (a + b == b + a)
}

// Sum over the block; every thread gets the result. `scratch` holds >= 32 floats. Starts with a
// barrier so that back-to-back calls may reuse `scratch`.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < nwarps ? scratch[lane] : 0.0f;
  return warp_sum(t);
}

// Count, mean and sum of squared deviations of a set of values (Chan et al.'s parallel form),
// so partial statistics combine without the cancellation of sum/sum-of-squares when the mean is
// large against the spread (GroupNorm inputs with mean 1000 and std 1).
struct Welford {
  float n = 0.0f, mean = 0.0f, m2 = 0.0f;
};

// The _rn intrinsics keep the compiler from contracting differently in different kernels.
__device__ __forceinline__ Welford welford_merge(const Welford& a, const Welford& b) {
  const float n = __fadd_rn(a.n, b.n);
  if (n == 0.0f) return a;
  const float delta = __fsub_rn(b.mean, a.mean);
  const float wb = __fdiv_rn(b.n, n);
  Welford r;
  r.n = n;
  r.mean = __fmaf_rn(delta, wb, a.mean);
  r.m2 = __fadd_rn(__fadd_rn(a.m2, b.m2), __fmul_rn(__fmul_rn(__fmul_rn(delta, delta), a.n), wb));
  return r;
}

__device__ __forceinline__ Welford welford_shfl_down(const Welford& w, int offset) {
  Welford r;
  r.n = __shfl_down_sync(kFullMask, w.n, offset);
  r.mean = __shfl_down_sync(kFullMask, w.mean, offset);
  r.m2 = __shfl_down_sync(kFullMask, w.m2, offset);
  return r;
}

// Lane 0 ends with the merge of all 32 lanes, in a fixed tree order.
__device__ __forceinline__ Welford warp_welford(Welford w) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) w = welford_merge(w, welford_shfl_down(w, o));
  return w;
}

// Merge over the block; the result is valid in thread 0 only. `scratch` holds >= 32 Welfords.
__device__ __forceinline__ Welford block_welford(Welford w, Welford* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  w = warp_welford(w);
  __syncthreads();
  if (lane == 0) scratch[warp] = w;
  __syncthreads();
  if (warp == 0) {
    Welford t = lane < nwarps ? scratch[lane] : Welford{};
    w = warp_welford(t);
  }
  return w;
}

// ---- host helpers -------------------------------------------------------------------------------

// Status of the launch just made (0 == cudaSuccess), as the contracts' return value.
inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

// Whether a host-side runtime call (a query, an attribute set) succeeded. A failed one also
// leaves its error as the runtime's last error, which launch_status() would then report as the
// next launch's failure: it is cleared here.
inline bool call_ok(cudaError_t err) {
  if (err == cudaSuccess) return true;
  (void)cudaGetLastError();
  return false;
}

// An attribute of the current device, or `fallback` when it cannot be read.
inline int device_attribute(cudaDeviceAttr attr, int fallback) {
  int dev = 0, n = 0;
  if (!call_ok(cudaGetDevice(&dev)) || !call_ok(cudaDeviceGetAttribute(&n, attr, dev))) return fallback;
  return n;
}

// Host queries about a kernel (occupancy, function attributes, raising its shared-memory limit)
// cost microseconds each and the launch heuristics ask them on every op call, so each answer is
// kept per device: a question is `what`, the kernel and up to two integers (threads, shared
// memory, cluster size); `ask()` computes the answer. An answer >= 0 is kept (a fallback when
// its call failed too: the workspace size and the launch then agree); a negative one is not,
// so the next call asks again. Thread-safe.
enum class Query : int { kClusterCapable, kActiveClusters, kBlocksPerSm, kSmemLimit };
struct QueryCache {
  std::mutex mu;
  std::map<std::tuple<int, int, const void*, int64_t, int64_t>, int> answers;
};
inline QueryCache& query_cache() {
  static QueryCache c;
  return c;
}
template <class F>
int cached_query(Query what, const void* kernel, int64_t a, int64_t b, F ask) {
  int dev = 0;
  if (!call_ok(cudaGetDevice(&dev))) return ask();
  const auto key = std::make_tuple(dev, static_cast<int>(what), kernel, a, b);
  QueryCache& c = query_cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    const auto it = c.answers.find(key);
    if (it != c.answers.end()) return it->second;
  }
  const int v = ask();  // outside the lock: a query may take a while
  if (v < 0) return v;
  std::lock_guard<std::mutex> lock(c.mu);
  return c.answers.emplace(key, v).first->second;
}

// CTAs of `kernel` resident per SM at `threads` and `smem` bytes of dynamic shared memory
// (at least 1).
template <class Kernel>
int blocks_per_sm(Kernel kernel, int threads, size_t smem) {
  return cached_query(Query::kBlocksPerSm, reinterpret_cast<const void*>(kernel), threads,
                      static_cast<int64_t>(smem), [&] {
                        int n = 0;
                        if (!call_ok(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem)) || n < 1)
                          n = 1;
                        return n;
                      });
}

// Lets `kernel` take `smem` bytes of dynamic shared memory (needed above 48 KB); once per device
// and size (each caller asks one constant size per kernel: a smaller size set later would lower
// the limit under the kept answer). Returns the cudaError_t of the attribute call; a failure is
// not kept, so the next call tries again.
template <class Kernel>
int allow_dynamic_smem(Kernel kernel, size_t smem) {
  const int r = cached_query(Query::kSmemLimit, reinterpret_cast<const void*>(kernel), static_cast<int64_t>(smem), 0, [&] {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    return call_ok(err) ? 0 : -static_cast<int>(err);
  });
  return r < 0 ? -r : 0;
}

inline int sm_count() {
  const int n = device_attribute(cudaDevAttrMultiProcessorCount, 1);
  return n < 1 ? 1 : n;
}

// Bytes of L2 on the current device (0 if unknown).
inline int64_t l2_bytes() { return device_attribute(cudaDevAttrL2CacheSize, 0); }

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

}  // namespace ldmfast::cuda::detail
