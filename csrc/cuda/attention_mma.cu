// Flash attention on the tensor cores (sm_80+ mma.sync.m16n8k16, float32 accumulation) for
// float16 / bfloat16, after FlashAttention-2's forward pass.
//
// Parity tests passed on an H100 (2026-11-24). attention.cu dispatches here for
// AttentionKernel::kMma / kMmaSync / kMmaWide, kFast past 80 keys, and kDefault's small shapes.
//
// One CTA of 4 warps per (b, h, block of 64 R queries); each warp owns R tiles of 16 query rows
// (R = 1, or 2 for the "wide" variant). Q is staged
// through shared memory once and kept as mma A fragments in registers. K and V stream through
// shared memory in tiles of 64 keys: S = Q K^T on the tensor cores, online softmax on the S
// accumulators (a row's values sit in the 4 lanes of a quad, so row max and sum need two
// shuffles), then the S accumulators are re-packed in place as the A operand of O += P V (the
// m16n8 accumulator layout of two adjacent key tiles is the m16k16 A layout). D is padded to a
// multiple of 16 with zeros for the QK^T reduction (D = 40 -> 48); P V covers D in n8 tiles.
// Shared-memory rows are padded by 16 bytes so that ldmatrix's 8 row addresses hit 8 distinct
// 16-byte bank groups. Variants: pipelined (cp.async, K and V loads overlap the math), plain
// (synchronous loads; kept to compare and to fall back on), and wide (pipelined, R = 2, D <= 80).
// Which is fastest per shape is for the GPU benchmarks to say.
#include <cmath>
#include <cstdlib>

#include "attention_mma.cuh"
#include "mma.cuh"

namespace ldmfast::cuda {
namespace {

using namespace detail;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockK = 64;  // keys per tile

// kPipe: K and V in flight while the other is used (FlashAttention-2's order): V_j loads during
// S = Q K_j^T, K_{j+1} during the softmax and P V_j. Each buffer is still single; a barrier
// before each copy keeps it from overwriting a tile a warp still reads.
// R: tiles of 16 query rows per warp (kBlockQ = 64 R rows per CTA). Each K and V fragment read
// from shared memory then feeds R times the mma: with R = 1 one ldmatrix.x4 (512 bytes) feeds
// two m16n8k16, about what the shared-memory bandwidth of an SM keeps up with; R = 2 doubles the
// math per byte, at the price of twice the accumulator registers and half the CTAs.
template <int D, class T, bool kPipe, int R>
__global__ void __launch_bounds__(kThreads) attention_mma_kernel(const AttentionParams p, const bool vec, const bool vec_o) {
  static_assert(D % 8 == 0, "P V covers D in n8 tiles");
  constexpr int kBlockQ = 16 * R * kWarps;  // query rows per CTA
  static_assert(2 * kBlockK >= kBlockQ, "Q is staged through the K and V tile buffers");
  constexpr int DPAD = (D + 15) / 16 * 16;
  constexpr int kStride = DPAD + 8;  // +16 bytes: conflict-free ldmatrix
  constexpr int KC = DPAD / 16;      // k16 chunks of the QK^T reduction
  constexpr int NT = kBlockK / 8;    // n8 key tiles of S
  constexpr int DT = D / 8;          // n8 tiles of O
  // uint4 storage: 16-byte aligned for the 16-byte stores and ldmatrix rows. R = 2 stages Q (and
  // at the end O) in 128 rows, so K and V are then the two halves of one array; R = 1 keeps two
  // arrays (one array costs that kernel registers: D = 96 plain 147 -> 168 and a spill, sm_90a).
  constexpr int kTile = kBlockK * kStride * static_cast<int>(sizeof(T)) / 16;
  __shared__ uint4 raw_k[R == 1 ? kTile : 2 * kTile];
  __shared__ uint4 raw_v[R == 1 ? kTile : 1];
  T* sK = reinterpret_cast<T*>(raw_k);
  T* sV = R == 1 ? reinterpret_cast<T*>(raw_v) : sK + kBlockK * kStride;

  const int64_t nqb = ceil_div(p.Lq, kBlockQ);
  const int64_t qb = blockIdx.x % nqb, bh = blockIdx.x / nqb;
  const int64_t b = bh / p.H, h = bh - b * p.H;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int quad_col = lane & 3;  // the mma "threadID_in_group" (lane >> 2, quad_row, is the "groupID")

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride_b + h * p.v_stride_h;

  // Q -> shared (the tile buffers) -> A fragments: row tile r of warp w is rows (w R + r) 16 +
  // (lane % 16), columns kc 16 + 8 (lane / 16).
  load_rows<D, DPAD, kStride, false, T>(sK, q, p.q_stride_l, qb * kBlockQ, p.Lq, kBlockQ, vec, threadIdx.x, kThreads);
  __syncthreads();
  uint32_t qf[R][KC][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int kc = 0; kc < KC; ++kc)
      ldmatrix_x4(qf[r][kc], sK + ((warp * R + r) * 16 + (lane & 15)) * kStride + kc * 16 + (lane >> 4) * 8);

  // Accumulator element c of a tile is row quad_row + 8 * (c / 2), column 2 * quad_col + c % 2;
  // m[r][i], l[r][i]: row quad_row + 8 i of row tile r (l: this lane's part of the row sum).
  float o[R][DT][4];
  zero_acc(o);
  float m[R][2], l[R][2];
#pragma unroll
  for (int r = 0; r < R; ++r) m[r][0] = m[r][1] = -INFINITY, l[r][0] = l[r][1] = 0.0f;
  const float qscale = p.scale * kLog2e;  // scores in log2 units

  if constexpr (kPipe) {
    __syncthreads();  // every warp has its Q fragments out of the buffers
    load_rows<D, DPAD, kStride, true, T>(sK, k, p.k_stride_l, 0, p.Lk, kBlockK, vec, threadIdx.x, kThreads);
  }

  for (int64_t k0 = 0; k0 < p.Lk; k0 += kBlockK) {
    if constexpr (kPipe) {
      cp_async_wait_all();  // K_j (this thread's copies)
      __syncthreads();      // K_j from every thread; every warp is done with P V_{j-1}, so V is free
      load_rows<D, DPAD, kStride, true, T>(sV, v, p.v_stride_l, k0, p.Lk, kBlockK, vec, threadIdx.x, kThreads);
    } else {
      __syncthreads();  // every warp is done with the buffers (the Q fragments, the last tile)
      load_rows<D, DPAD, kStride, false, T>(sK, k, p.k_stride_l, k0, p.Lk, kBlockK, vec, threadIdx.x, kThreads);
      load_rows<D, DPAD, kStride, false, T>(sV, v, p.v_stride_l, k0, p.Lk, kBlockK, vec, threadIdx.x, kThreads);
      __syncthreads();
    }

    float s[R][NT][4];
    zero_acc(s);
#pragma unroll
    for (int kc = 0; kc < KC; ++kc)
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) qk_16keys<R, NT, KC, kStride>(s, qf, sK, np, kc, lane);

    if constexpr (kPipe) {
      cp_async_wait_all();  // V_j
      __syncthreads();      // V_j from every thread; every warp is done with Q K_j^T, so K is free
      if (k0 + kBlockK < p.Lk) load_rows<D, DPAD, kStride, true, T>(sK, k, p.k_stride_l, k0 + kBlockK, p.Lk, kBlockK, vec, threadIdx.x, kThreads);
    }

    // Online softmax (mma.cuh), then O rescaled by each row's alpha.
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float alpha[2];
      softmax_tile(s[r], m[r], l[r], alpha, k0, p.Lk, qscale, quad_col);
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int c = 0; c < 4; ++c) o[r][dt][c] *= alpha[c >> 1];
    }

    // O += P V.
#pragma unroll
    for (int kk = 0; kk < kBlockK / 16; ++kk) pv_16keys<R, D, NT, kStride>(o, s, sV, kk, lane);
  }

  // Out through the tile buffers, 16 R rows per warp, for 16-byte stores. The barrier: without
  // the pipeline no barrier follows the last Q K^T, so another warp may still read that K tile
  // (and any warp may still read the V tile).
  __syncthreads();
  T* out = static_cast<T*>(p.o) + b * p.o_stride_b + h * p.o_stride_h;
  float* lse = p.lse == nullptr ? nullptr : p.lse + (b * p.H + h) * p.Lq;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int tile = warp * R + r;
    finish_16rows<D, kStride>(o[r], m[r], l[r], sK + tile * 16 * kStride, out, qb * kBlockQ + tile * 16, p.Lq,
                              p.o_stride_l, vec_o, lse, lane);
  }
}

template <int D, class T, bool kPipe, int R>
int launch_d(const AttentionParams& p, cudaStream_t stream) {
  const bool vec = qkv_aligned16(p);
  const int64_t blocks = ceil_div(p.Lq, 16 * R * kWarps) * p.B * p.H;
  if (blocks > INT32_MAX) return static_cast<int>(cudaErrorInvalidConfiguration);
  attention_mma_kernel<D, T, kPipe, R><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, vec, o_aligned16(p));
  return launch_status();
}

template <class T, bool kPipe>
int launch(const AttentionParams& p, cudaStream_t stream) {
  return with_head_dim(p.D, [&](auto d) { return launch_d<decltype(d)::value, T, kPipe, 1>(p, stream); });
}

// Two row tiles per warp, pipelined only, and only for the head dims whose accumulators still fit
// the registers (at D = 80: 80 of O, 64 of S, 40 of Q fragments per lane).
template <class T>
int launch_wide(const AttentionParams& p, cudaStream_t stream) {
  switch (p.D) {
    case 32: return launch_d<32, T, true, 2>(p, stream);
    case 40: return launch_d<40, T, true, 2>(p, stream);
    case 64: return launch_d<64, T, true, 2>(p, stream);
    case 80: return launch_d<80, T, true, 2>(p, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

bool attention_mma_supports(const AttentionParams& p) {
  // scale > 0: the softmax takes the largest scaled score from the largest raw one, and a masked
  // key's -inf score times the scale stays -inf.
  return (p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16) && attention_supports_head_dim(p.D) &&
         p.scale > 0.0f;
}

bool attention_mma_wide_supports(const AttentionParams& p) {
  return attention_mma_supports(p) && p.D <= kWideMaxHeadDim;
}

int attention_mma(const AttentionParams& p, cudaStream_t stream, bool pipelined) {
  if (!attention_mma_supports(p)) return static_cast<int>(cudaErrorInvalidValue);
  if (p.B <= 0 || p.H <= 0 || p.Lq <= 0) return 0;
  if (p.Lk <= 0) return static_cast<int>(cudaErrorInvalidValue);
  if (p.dtype == DType::kFloat16)
    return pipelined ? launch<__half, true>(p, stream) : launch<__half, false>(p, stream);
  return pipelined ? launch<__nv_bfloat16, true>(p, stream) : launch<__nv_bfloat16, false>(p, stream);
}

int attention_mma_wide(const AttentionParams& p, cudaStream_t stream) {
  if (!attention_mma_wide_supports(p)) return static_cast<int>(cudaErrorInvalidValue);
  if (p.B <= 0 || p.H <= 0 || p.Lq <= 0) return 0;
  if (p.Lk <= 0) return static_cast<int>(cudaErrorInvalidValue);
  return p.dtype == DType::kFloat16 ? launch_wide<__half>(p, stream) : launch_wide<__nv_bfloat16>(p, stream);
}

}  // namespace ldmfast::cuda
