// Tensor-core building blocks shared by the attention kernels (sm_80+): ldmatrix, cp.async and
// mma.sync.m16n8k16 with float32 accumulation as inline PTX, and a row loader that stages
// (rows x D) tiles of a (B, L, H, D) tensor in shared memory. Under the CPU emulator
// (LDMFAST_EMU) the PTX helpers come from emu_mma.h, software versions with the same fragment
// layouts.
#pragma once
#include <cstring>

#include "common.cuh"
#include "ldmfast/attention.h"

#if defined(LDMFAST_EMU)
#include "emu_mma.h"
#else
namespace ldmfast::cuda::detail {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}

// 16-byte global -> shared copy that bypasses registers; `fill` false writes 16 zero bytes
// (src-size 0) without reading src.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool fill) {
  // "memory": the compiler must not move shared-memory accesses across the copy (today every
  // producer and consumer is also separated by a barrier; this keeps it safe if one is not).
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(fill ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Every committed group of this thread's copies but the newest N has landed.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { cp_async_wait<0>(); }
// A 16-byte store to shared memory (the emulator tracks these for the proxy fence wgmma needs).
__device__ __forceinline__ void store_chunk16(void* dst, uint4 v) { *reinterpret_cast<uint4*>(dst) = v; }
// Named barriers 1..15 (0 is __syncthreads'): `threads` (a multiple of 32) arrive per phase.
// bar_arrive does not wait; it orders this thread's earlier memory accesses before whatever
// the threads that wait at the same phase (bar_sync) do after it.
__device__ __forceinline__ void bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

template <class T> struct Mma;

template <> struct Mma<__half> {
  // d += a (16x16, row) * b (16x8, col)
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // Two floats as one 32-bit register of packed halves; `lo` is the lower column.
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &h, 4);
    return r;
  }
};

template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &h, 4);
    return r;
  }
};

}  // namespace ldmfast::cuda::detail
#endif

namespace ldmfast::cuda::detail {

// Reads the 16-byte chunk at s (8 elements): one vector load when vec, else element by element
// (a base or stride off 16 bytes).
template <class T>
__device__ __forceinline__ uint4 read_chunk16(const T* s, bool vec) {
  if (vec) return *reinterpret_cast<const uint4*>(s);
  const uint16_t* s16 = reinterpret_cast<const uint16_t*>(s);
  uint32_t w[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) w[e] = static_cast<uint32_t>(s16[2 * e]) | (static_cast<uint32_t>(s16[2 * e + 1]) << 16);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Copies `rows` rows of D elements (row r from src + (row0 + r) * stride_l) into shared memory
// rows of kStride elements, as 16-byte chunks, spread over the `nthreads` threads numbered from
// `tid`. Rows at or past L and the columns D..DPAD are zeros: the padding enters the QK^T
// reduction, and rows past Lk meet P = 0 in P V, where garbage (a NaN) would still poison the
// sum. kAsync (needs vec) issues cp.async copies and one commit group instead: the caller waits
// (cp_async_wait_all, then a barrier) before reading.
template <int D, int DPAD, int kStride, bool kAsync, class T>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int64_t stride_l, int64_t row0, int64_t L,
                                          int rows, bool vec, int tid, int nthreads) {
  constexpr int kChunks = DPAD / 8;
  constexpr int kDataChunks = D / 8;
  if (kAsync && vec) {
    for (int idx = tid; idx < rows * kChunks; idx += nthreads) {
      const int r = idx / kChunks, c = idx - r * kChunks;
      const bool fill = c < kDataChunks && row0 + r < L;
      cp_async16(dst + r * kStride + c * 8, fill ? src + (row0 + r) * stride_l + c * 8 : src, fill);
    }
    cp_async_commit();
    return;
  }
  for (int idx = tid; idx < rows * kChunks; idx += nthreads) {
    const int r = idx / kChunks, c = idx - r * kChunks;
    const bool fill = c < kDataChunks && row0 + r < L;
    store_chunk16(dst + r * kStride + c * 8,
                  fill ? read_chunk16(src + (row0 + r) * stride_l + c * 8, vec) : make_uint4(0u, 0u, 0u, 0u));
  }
}

// Zeroes R x N m16n8 accumulator tiles (S before Q K^T, O before P V).
template <int R, int N>
__device__ __forceinline__ void zero_acc(float (&acc)[R][N][4]) {
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int j = 0; j < N; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][j][c] = 0.0f;
}

// S += Q K^T for the 16 keys of key pair np (n8 tiles 2 np and 2 np + 1 of S) over the k16 chunk
// kc of the head dim, for R tiles of 16 query rows: qf[r][kc] is Q's A fragment, sK the keys in
// shared memory rows of kStride. One K fragment serves all R row tiles (R = 2 halves the
// shared-memory reads per mma). B fragments of K (keys are the n dim, d the k dim, d contiguous:
// "col" layout, no transpose). Matrices of one x4: keys +0..7 | d +0..7, keys +0..7 | d +8..15,
// keys +8..15 | d +0..7, keys +8..15 | d +8..15.
template <int R, int NT, int KC, int kStride, class T>
__device__ __forceinline__ void qk_16keys(float (&s)[R][NT][4], const uint32_t (&qf)[R][KC][4], const T* sK, int np,
                                          int kc, int lane) {
  uint32_t kf[4];
  ldmatrix_x4(kf, sK + (np * 16 + (lane & 7) + (lane >> 4) * 8) * kStride + kc * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    Mma<T>::run(s[r][2 * np], qf[r][kc], kf[0], kf[1]);
    Mma<T>::run(s[r][2 * np + 1], qf[r][kc], kf[2], kf[3]);
  }
}

// O += P V for the 16 keys of key pair kk, for R tiles of 16 query rows, P being the
// (exponentiated) S accumulators of n8 tiles 2 kk and 2 kk + 1: the m16n8 accumulator layout of
// two adjacent key tiles is the m16k16 A layout, so P is packed in place. One V fragment serves
// all R row tiles. B fragments of V (keys are the k dim, d the n dim, d contiguous: transposed
// ldmatrix). Matrices of one x4: keys +0..7 | d +0..7, keys +8..15 | d +0..7, keys +0..7 |
// d +8..15, keys +8..15 | d +8..15. O covers D in n8 tiles.
template <int R, int D, int NT, int kStride, class T>
__device__ __forceinline__ void pv_16keys(float (&o)[R][D / 8][4], const float (&s)[R][NT][4], const T* sV, int kk,
                                          int lane) {
  constexpr int DT = D / 8;
  uint32_t pa[R][4];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    pa[r][0] = Mma<T>::pack(s[r][2 * kk][0], s[r][2 * kk][1]);
    pa[r][1] = Mma<T>::pack(s[r][2 * kk][2], s[r][2 * kk][3]);
    pa[r][2] = Mma<T>::pack(s[r][2 * kk + 1][0], s[r][2 * kk + 1][1]);
    pa[r][3] = Mma<T>::pack(s[r][2 * kk + 1][2], s[r][2 * kk + 1][3]);
  }
  const T* vrow = sV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kStride;
#pragma unroll
  for (int dp = 0; dp < DT / 2; ++dp) {
    uint32_t vf[4];
    ldmatrix_x4_trans(vf, vrow + dp * 16 + (lane >> 4) * 8);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      Mma<T>::run(o[r][2 * dp], pa[r], vf[0], vf[1]);
      Mma<T>::run(o[r][2 * dp + 1], pa[r], vf[2], vf[3]);
    }
  }
  if constexpr (DT % 2 == 1) {  // D = 40: an odd count of n8 tiles
    uint32_t vf[2];
    ldmatrix_x2_trans(vf, vrow + (DT - 1) * 8);
#pragma unroll
    for (int r = 0; r < R; ++r) Mma<T>::run(o[r][DT - 1], pa[r], vf[0], vf[1]);
  }
}

constexpr float kLog2e = 1.4426950408889634f;  // scores are kept in log2 units
constexpr float kLn2 = 0.6931471805599453f;

// 2^x as the one MUFU.EX2 instruction (ex2.approx.ftz.f32, the same approximation exp2f uses).
// Without --use_fast_math, exp2f wraps it in a range test and two multiplies that keep results
// below 2^-126 as denormals: three more instructions for each of the softmax's exponentials,
// which share the issue slots with the rest of its work. Flushed to zero instead, they are
// probabilities below 2^-126 of the row's largest (exponents are x - max <= 0), which change
// no row sum (at least 1) and no output at float32 precision.
__device__ __forceinline__ float exp2_ftz(float x) {
#if defined(LDMFAST_EMU)
  const float r = std::exp2(x);
  return r < 1.17549435e-38f ? 0.0f : r;  // FLT_MIN: the denormals flushed
#else
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
#endif
}

template <bool kMask, int NT>
__device__ __forceinline__ void softmax_tile_impl(float (&s)[NT][4], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                                  int64_t k0, int64_t Lk, float qscale, int quad_col) {
  const int lim = Lk - k0 < NT * 8 ? static_cast<int>(Lk - k0) : NT * 8;
  float mx[2] = {-INFINITY, -INFINITY};  // the tile's largest raw scores
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (kMask && j * 8 + quad_col * 2 + (c & 1) >= lim) s[j][c] = -INFINITY;
      mx[c >> 1] = fmaxf(mx[c >> 1], s[j][c]);
    }
  float ref[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {  // the row's other values sit in the 3 other lanes of the quad
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(kFullMask, mx[i], 1));
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(kFullMask, mx[i], 2));
    // qscale > 0, so the largest scaled score is qscale times the largest raw one.
    const float mnew = fmaxf(m[i], mx[i] * qscale);
    ref[i] = mnew == -INFINITY ? 0.0f : mnew;
    alpha[i] = exp2_ftz(m[i] - ref[i]);
    m[i] = mnew;
    l[i] *= alpha[i];
  }
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      // One FFMA an exponent (s qscale - max, rounded once), instead of a multiply and a
      // subtract; a masked key's -inf stays -inf (qscale > 0) and its weight 0.
      s[j][c] = exp2_ftz(fmaf(s[j][c], qscale, -ref[c >> 1]));
      l[c >> 1] += s[j][c];
    }
}

// One key tile (8 NT keys from k0) of the online softmax for the two rows a lane holds of an m16
// accumulator tile (rows quad_row and quad_row + 8; element c of n8 tile j is key k0 + 8 j +
// 2 quad_col + c % 2 of row c / 2): scores scaled to log2 units (qscale > 0: see
// attention_mma_supports), keys at or past Lk masked (the compares only on a tile that reaches
// past Lk), the running max m (scaled) updated, s replaced by exp2(s qscale - max), the lane's
// part of the row sum l rescaled and added to; alpha is the factor the caller rescales O by. The first tile's alpha, exp2(-inf) = 0, meets
// accumulators that are still zero. A max of -inf (every score so far overflowed to -inf: |q|,
// |k| near the bf16 range) is taken as 0, so exponents are -inf (0), not NaN.
template <int NT>
__device__ __forceinline__ void softmax_tile(float (&s)[NT][4], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                             int64_t k0, int64_t Lk, float qscale, int quad_col) {
  if (k0 + NT * 8 <= Lk)
    softmax_tile_impl<false>(s, m, l, alpha, k0, Lk, qscale, quad_col);
  else
    softmax_tile_impl<true>(s, m, l, alpha, k0, Lk, qscale, quad_col);
}

// Writes a warp's 16 output rows row0..row0+15 (those < Lq): O accumulators times inv (1 / the
// row sums) are packed into the warp's shared buffer sO (16 rows of kStride), then copied out in
// 16-byte chunks (vec_o: out and o_stride_l allow them; else element by element). A 2-byte store
// per element straight from the accumulator layout would split each row into 4-byte pieces.
// The caller syncs the warp before sO is written again.
template <int D, int kStride, class T>
__device__ __forceinline__ void store_o_16rows(const float (&o)[D / 8][4], const float (&inv)[2], T* sO, T* out,
                                               int64_t row0, int64_t Lq, int64_t o_stride_l, bool vec_o, int lane) {
  constexpr int DT = D / 8;
  const int quad_row = lane >> 2, quad_col = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
      *reinterpret_cast<uint32_t*>(sO + (quad_row + 8 * r) * kStride + dt * 8 + 2 * quad_col) =
          Mma<T>::pack(o[dt][2 * r] * inv[r], o[dt][2 * r + 1] * inv[r]);
  __syncwarp();
  constexpr int kChunks = D / 8;
  for (int idx = lane; idx < 16 * kChunks; idx += 32) {
    const int r = idx / kChunks, c = idx - r * kChunks;
    const int64_t row = row0 + r;
    if (row >= Lq) break;  // rows grow with idx
    const T* src = sO + r * kStride + c * 8;
    T* dst = out + row * o_stride_l + c * 8;
    if (vec_o) {
      store16(reinterpret_cast<uint4*>(dst), *reinterpret_cast<const uint4*>(src));
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = src[e];
    }
  }
}

// The end of a warp's 16 query rows from row0: l (this lane's parts of the row sums) summed over
// the quad, O normalised and written (store_o_16rows, through sO), and, when lse is given (this
// (b, h)'s Lq log-sum-exps), each row's log-sum-exp from its max m (log2 units) and sum.
template <int D, int kStride, class T>
__device__ __forceinline__ void finish_16rows(const float (&o)[D / 8][4], const float (&m)[2], float (&l)[2], T* sO,
                                              T* out, int64_t row0, int64_t Lq, int64_t o_stride_l, bool vec_o,
                                              float* lse, int lane) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {  // the 4 lanes of a quad hold disjoint columns of the same two rows
    l[i] += __shfl_xor_sync(kFullMask, l[i], 1);
    l[i] += __shfl_xor_sync(kFullMask, l[i], 2);
  }
  const float inv[2] = {1.0f / l[0], 1.0f / l[1]};
  store_o_16rows<D, kStride>(o, inv, sO, out, row0, Lq, o_stride_l, vec_o, lane);
  if (lse != nullptr && (lane & 3) == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t row = row0 + (lane >> 2) + 8 * i;
      if (row < Lq) lse[row] = (m[i] + log2f(l[i])) * kLn2;
    }
  }
}

// Whether o's base and strides allow 16-byte (8-element) chunks.
inline bool o_aligned16(const AttentionParams& p) {
  return aligned16(p.o) && p.o_stride_b % 8 == 0 && p.o_stride_l % 8 == 0 && p.o_stride_h % 8 == 0;
}

// Whether every q/k/v base and stride allows 16-byte (8-element) chunks.
inline bool qkv_aligned16(const AttentionParams& p) {
  constexpr int64_t V = 8;
  return aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && p.q_stride_b % V == 0 &&
         p.q_stride_l % V == 0 && p.q_stride_h % V == 0 && p.k_stride_b % V == 0 &&
         p.k_stride_l % V == 0 && p.k_stride_h % V == 0 && p.v_stride_b % V == 0 &&
         p.v_stride_l % V == 0 && p.v_stride_h % V == 0;
}

}  // namespace ldmfast::cuda::detail
