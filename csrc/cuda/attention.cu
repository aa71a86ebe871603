// Scaled dot-product attention, O = softmax(scale * Q K^T) V, flash-style: one CTA per
// (b, h, block of 32 queries) walks K and V in tiles of 32 keys held in shared memory, keeping a
// running max m, a running sum l and the unnormalised output in registers (online softmax, all
// in float32), so the Lq x Lk score matrix never exists in memory.
//
// This is the reference CUDA path: plain float32 FMA on the CUDA cores, written to be easy to
// check. Thread layout: 8 lanes share a query row and split its D dims interleaved (lane t owns
// dims t, t + 8, ...), each lane group holds 2 query rows; a score is a partial dot product per
// lane plus a 3-step butterfly, which leaves the same bits in all 8 lanes, so the softmax state
// agrees across them. Shared-memory reads are a broadcast across lane groups and 8 consecutive
// words within one: conflict-free.
#include <cmath>

#include "attention_mma.cuh"
#include "common.cuh"
#include "ldmfast/attention.h"

namespace ldmfast::cuda {
namespace {

using namespace detail;

constexpr int kThreads = 128;
constexpr int kLanesPerRow = 8;                        // lanes that split one query row's D dims
constexpr int kRowsPerLane = 2;                        // query rows each lane group holds
constexpr int kGroups = kThreads / kLanesPerRow;       // 16 lane groups
constexpr int kBlockQ = kGroups * kRowsPerLane;        // 32 queries per CTA
constexpr int kBlockK = 32;                            // keys per shared-memory tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Stages one tile of kBlockK rows of K or V (rows past Lk as zeros) into shared memory as float.
template <int D, class T>
__device__ __forceinline__ void load_tile(float (*dst)[D], const T* base, int64_t stride_l, int64_t k0,
                                          int64_t Lk, bool vec) {
  if (vec) {
    constexpr int V = kVec16<T>;
    constexpr int kChunks = D / V;  // every supported D is a multiple of 8
    for (int idx = threadIdx.x; idx < kBlockK * kChunks; idx += kThreads) {
      const int j = idx / kChunks, cv = idx - j * kChunks;
      float v[V];
      if (k0 + j < Lk) {
        load_vec<T, V>(base + (k0 + j) * stride_l + cv * V, v);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] = 0.0f;
      }
#pragma unroll
      for (int e = 0; e < V; ++e) dst[j][cv * V + e] = v[e];
    }
  } else {
    for (int idx = threadIdx.x; idx < kBlockK * D; idx += kThreads) {
      const int j = idx / D, d = idx - j * D;
      dst[j][d] = k0 + j < Lk ? to_float(base[(k0 + j) * stride_l + d]) : 0.0f;
    }
  }
}

template <int D, class T>
__global__ void __launch_bounds__(kThreads) attention_simt_kernel(const AttentionParams p, const bool vec) {
  static_assert(D % kLanesPerRow == 0, "D must split evenly over the lanes of a row");
  constexpr int DP = D / kLanesPerRow;  // dims per lane
  __shared__ float Ks[kBlockK][D];
  __shared__ float Vs[kBlockK][D];
  // Scores, then probabilities, of the tile; one row per (lane group, row slot). The +1 pad puts
  // the rows that different lane groups read at once in different banks.
  __shared__ float Ps[kBlockQ][kBlockK + 1];

  const int64_t nqb = ceil_div(p.Lq, kBlockQ);
  const int64_t qb = blockIdx.x % nqb, bh = blockIdx.x / nqb;
  const int64_t b = bh / p.H, h = bh - b * p.H;
  const int t = threadIdx.x % kLanesPerRow, grp = threadIdx.x / kLanesPerRow;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride_b + h * p.v_stride_h;

  // Scores are kept in log2 units: q is pre-multiplied by scale * log2(e), so exp2 does the
  // softmax's exponentials.
  const float qscale = p.scale * kLog2e;
  float qr[kRowsPerLane][DP], o[kRowsPerLane][DP], m[kRowsPerLane], l[kRowsPerLane];
  int64_t row[kRowsPerLane];
#pragma unroll
  for (int r = 0; r < kRowsPerLane; ++r) {
    row[r] = qb * kBlockQ + r * kGroups + grp;
    const bool ok = row[r] < p.Lq;
#pragma unroll
    for (int i = 0; i < DP; ++i) {
      qr[r][i] = ok ? to_float(q[row[r] * p.q_stride_l + t + i * kLanesPerRow]) * qscale : 0.0f;
      o[r][i] = 0.0f;
    }
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }

  for (int64_t k0 = 0; k0 < p.Lk; k0 += kBlockK) {
    __syncthreads();  // the previous tile is no longer read
    load_tile<D, T>(Ks, k, p.k_stride_l, k0, p.Lk, vec);
    load_tile<D, T>(Vs, v, p.v_stride_l, k0, p.Lk, vec);
    __syncthreads();
    const int valid = static_cast<int>(imin(p.Lk - k0, kBlockK));  // >= 1

#pragma unroll
    for (int r = 0; r < kRowsPerLane; ++r) {
      float* ps = Ps[r * kGroups + grp];
#pragma unroll 4
      for (int j = 0; j < kBlockK; ++j) {
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < DP; ++i) acc = fmaf(qr[r][i], Ks[j][t + i * kLanesPerRow], acc);
        acc += __shfl_xor_sync(kFullMask, acc, 1);
        acc += __shfl_xor_sync(kFullMask, acc, 2);
        acc += __shfl_xor_sync(kFullMask, acc, 4);
        if (t == 0) ps[j] = j < valid ? acc : -INFINITY;
      }
      __syncwarp();
      // Each lane takes every 8th score; the butterflies give all 8 lanes the same max and sum.
      constexpr int kPer = kBlockK / kLanesPerRow;
      float sc[kPer];
      float mx = m[r];
#pragma unroll
      for (int jj = 0; jj < kPer; ++jj) {
        sc[jj] = ps[t + jj * kLanesPerRow];
        mx = fmaxf(mx, sc[jj]);
      }
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 4));
      // On the first tile m is -inf and the rescale factor exp2(-inf) = 0 multiplies
      // accumulators that are still zero. mx is -inf only if every score so far overflowed to
      // -inf (|q|, |k| near the float range): exponents are then taken against 0, giving 0
      // where -inf - -inf would be NaN.
      const float ref = mx == -INFINITY ? 0.0f : mx;
      const float alpha = exp2f(m[r] - ref);
      m[r] = mx;
      float sum = 0.0f;
#pragma unroll
      for (int jj = 0; jj < kPer; ++jj) {
        sc[jj] = exp2f(sc[jj] - ref);  // 0 for the keys past Lk
        sum += sc[jj];
      }
      __syncwarp();  // all scores read before any probability overwrites them
#pragma unroll
      for (int jj = 0; jj < kPer; ++jj) ps[t + jj * kLanesPerRow] = sc[jj];
      sum += __shfl_xor_sync(kFullMask, sum, 1);
      sum += __shfl_xor_sync(kFullMask, sum, 2);
      sum += __shfl_xor_sync(kFullMask, sum, 4);
      l[r] = l[r] * alpha + sum;
      __syncwarp();
#pragma unroll
      for (int i = 0; i < DP; ++i) o[r][i] *= alpha;
#pragma unroll 4
      for (int j = 0; j < kBlockK; ++j) {
        const float pj = ps[j];
#pragma unroll
        for (int i = 0; i < DP; ++i) o[r][i] = fmaf(pj, Vs[j][t + i * kLanesPerRow], o[r][i]);
      }
      __syncwarp();  // the next row slot (or tile) rewrites nothing of this one, but keep it simple
    }
  }

  T* out = static_cast<T*>(p.o) + b * p.o_stride_b + h * p.o_stride_h;
#pragma unroll
  for (int r = 0; r < kRowsPerLane; ++r) {
    if (row[r] >= p.Lq) continue;
    const float inv = 1.0f / l[r];
#pragma unroll
    for (int i = 0; i < DP; ++i) out[row[r] * p.o_stride_l + t + i * kLanesPerRow] = from_float<T>(o[r][i] * inv);
    if (p.lse != nullptr && t == 0) p.lse[(b * p.H + h) * p.Lq + row[r]] = (m[r] + log2f(l[r])) * kLn2;
  }
}

template <int D, class T>
int launch_d(const AttentionParams& p, cudaStream_t stream) {
  constexpr int V = kVec16<T>;
  // 16-byte loads of K and V rows need aligned bases and row strides that keep them aligned.
  const bool vec = aligned16(p.k) && aligned16(p.v) && p.k_stride_b % V == 0 && p.k_stride_l % V == 0 &&
                   p.k_stride_h % V == 0 && p.v_stride_b % V == 0 && p.v_stride_l % V == 0 &&
                   p.v_stride_h % V == 0;
  const int64_t blocks = ceil_div(p.Lq, kBlockQ) * p.B * p.H;
  if (blocks > INT32_MAX) return static_cast<int>(cudaErrorInvalidConfiguration);
  attention_simt_kernel<D, T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, vec);
  return launch_status();
}

template <class T>
int launch(const AttentionParams& p, cudaStream_t stream) {
  return with_head_dim(p.D, [&](auto d) { return launch_d<decltype(d)::value, T>(p, stream); });
}

}  // namespace

bool attention_supports_head_dim(int64_t d) {
  return with_head_dim(d, [](auto) { return 0; }) == 0;
}

// kDefault's choice per shape, from the fastest-kernel table of bench_ops_cuda.py on an H100
// (fp16, SD-1.x / SD-2 shapes; 2026-11-24, commit 3ca7a93). Microseconds, default vs runner-up:
//   Lk <= 80, Lq >= 256: short (K, V in smem), within 2% of the best at every cross shape
//     (4096x77 d40 13.0 vs wgmma 15.2; 256x77 d160 8.57 vs mma 8.78).
//   Lq >= 1024, D <= 64: wgmma ping-pong, 3 warpgroups, overlap (4096^2 d40 165 vs 173;
//     1024^2 d64 23.4 vs 24.5); D <= 80: 2 warpgroups, overlap (1024^2 d80 24.9 vs 25.1).
//     D = 96 is not measured: 3 warpgroups (without overlap), as wins at D <= 64.
//   256 <= Lq < 1024, D <= 96: plain wgmma (256^2 d64 8.90 vs mma 9.80).
//   Else mma, pipelined: the small self-attention (64^2 d64 4.53 vs short 5.19) and D > 96
//     (256^2 d160 13.4 vs wgmma ping-pong 13.7).
// Needs attention_mma_supports(p).
static int attention_default(const AttentionParams& p, cudaStream_t stream) {
  if (p.Lq >= 256 && attention_short_supports(p)) return attention_short(p, stream);
  if (attention_wgmma_usable() && p.D <= kWgmma3MaxHeadDim) {
    if (p.Lq >= 1024 && p.D <= kWgmma3OverlapMaxHeadDim) return attention_wgmma(p, stream, true, true, 3);
    if (p.Lq >= 1024 && p.D <= kWgmmaOverlapMaxHeadDim) return attention_wgmma(p, stream, true, true);
    if (p.Lq >= 1024) return attention_wgmma(p, stream, false, true, 3);
    if (p.Lq >= 256) return attention_wgmma(p, stream, false, false);
  }
  return attention_mma(p, stream, true);
}

int attention(const AttentionParams& p, cudaStream_t stream, AttentionKernel kernel) {
  if (!attention_supports_head_dim(p.D)) return static_cast<int>(cudaErrorInvalidValue);
  if (p.B <= 0 || p.H <= 0 || p.Lq <= 0) return 0;
  if (p.Lk <= 0) return static_cast<int>(cudaErrorInvalidValue);  // softmax over no keys
  // float16 / bfloat16 take the tensor-core kernels (parity passed on an H100, 2026-11-24);
  // float32, and the scales they leave out, the SIMT kernel.
  if (attention_mma_supports(p)) {
    switch (kernel) {
      case AttentionKernel::kDefault: return attention_default(p, stream);
      case AttentionKernel::kFast:
        return attention_short_supports(p) ? attention_short(p, stream) : attention_mma(p, stream, true);
      case AttentionKernel::kMma: return attention_mma(p, stream, true);
      case AttentionKernel::kMmaSync: return attention_mma(p, stream, false);
      case AttentionKernel::kMmaWide:
        return attention_mma_wide_supports(p) ? attention_mma_wide(p, stream) : attention_mma(p, stream, true);
      case AttentionKernel::kWgmma:
      case AttentionKernel::kWgmmaOverlap:
      case AttentionKernel::kWgmmaPingpong:
      case AttentionKernel::kWgmmaPingpongOverlap:
      case AttentionKernel::kWgmmaPingpong3:
      case AttentionKernel::kWgmmaPingpong3Overlap: {
        if (!attention_wgmma_usable()) return attention_mma(p, stream, true);
        if (kernel == AttentionKernel::kWgmmaPingpong3 || kernel == AttentionKernel::kWgmmaPingpong3Overlap)
          return attention_wgmma(p, stream, kernel == AttentionKernel::kWgmmaPingpong3Overlap && p.D <= kWgmma3OverlapMaxHeadDim,
                                 true, p.D <= kWgmma3MaxHeadDim ? 3 : 2);
        const bool overlap = kernel == AttentionKernel::kWgmmaOverlap || kernel == AttentionKernel::kWgmmaPingpongOverlap;
        const bool pingpong = kernel == AttentionKernel::kWgmmaPingpong || kernel == AttentionKernel::kWgmmaPingpongOverlap;
        return attention_wgmma(p, stream, overlap && p.D <= kWgmmaOverlapMaxHeadDim, pingpong);
      }
      case AttentionKernel::kSimt: break;
    }
  }
  switch (p.dtype) {
    case DType::kFloat32: return launch<float>(p, stream);
    case DType::kFloat16: return launch<__half>(p, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace ldmfast::cuda
