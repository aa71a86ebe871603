// Attention with a short key sequence (Lk <= 80: the 77 text tokens that SD 1.x and 2.x attend
// to, a single class token) for float16 / bfloat16 on the tensor cores.
//
// Parity tests passed on an H100 (2026-11-24); attention.cu reaches it for AttentionKernel::kFast
// and for kDefault's cross-attention (Lk <= 80, Lq >= 256).
//
// Cross-attention is memory-bound: all of K and V for one (b, h) fit in shared memory, so the
// floor is one read of Q and one write of O. A CTA of 4 warps loads K and V of its (b, h) once
// and its warps then walk blocks of 16 query rows each, independently (no CTA barrier after the
// start): the next block's Q is fetched with cp.async while the current one is computed, so Q
// streams through once. The whole key range is one tile, so the softmax needs no running
// rescale: S = Q K^T over at most 80 keys (chunks of 16 past Lk are skipped), row max and sum
// over the quad, P packed in place as the A operand of O = P V. O is staged in shared memory
// per warp so that it leaves in 16-byte stores. A grid of about kCtasPerSm CTAs per SM (tunable
// with LDMFAST_ATTENTION_SHORT_CTAS_PER_SM, capped by the occupancy the kernel can reach) bounds
// how often K and V are re-read from L2. LDMFAST_ATTENTION_SHORT_ROWS=32 gives each warp two
// tiles of 16 query rows per block (head dims up to 80): two independent chains of mma, softmax
// and stores in flight per warp, and each K / V fragment read from shared memory feeds both.
#include <cmath>
#include <cstdlib>

#include "attention_mma.cuh"
#include "mma.cuh"

namespace ldmfast::cuda {
namespace {

using namespace detail;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxKeys = 80;  // 5 chunks of 16: 77 context tokens fit with 3 keys of padding
constexpr int kCtasPerSm = 4;
// Two row tiles a warp only up to this head dim: at D = 80 S, O and Q's fragments of two tiles
// are 200 registers; past it they would spill.
constexpr int kTwoTilesMaxHeadDim = 80;

template <int D, int R> struct Tile {
  static constexpr int DPAD = (D + 15) / 16 * 16;
  static constexpr int kStride = DPAD + 8;  // +16 bytes: conflict-free ldmatrix rows
  // K, V (kMaxKeys rows each), then per warp a Q and an O buffer of 16 R rows.
  template <class T> static constexpr size_t smem_bytes() {
    return static_cast<size_t>(2 * kMaxKeys + kWarps * 2 * 16 * R) * kStride * sizeof(T);
  }
};

template <int D, int R, class T>
__global__ void __launch_bounds__(kThreads)
    attention_short_kernel(const AttentionParams p, const int64_t ctas_per_bh, const bool vec, const bool vec_o) {
  static_assert(D % 8 == 0, "P V covers D in n8 tiles");
  constexpr int DPAD = Tile<D, R>::DPAD;
  constexpr int kStride = Tile<D, R>::kStride;
  constexpr int kRows = 16 * R;        // query rows of a warp's block
  constexpr int KC = DPAD / 16;        // k16 chunks of the QK^T reduction
  constexpr int NT = kMaxKeys / 8;     // n8 key tiles of S
  constexpr int DT = D / 8;            // n8 tiles of O
  extern __shared__ uint4 smem_raw[];  // uint4: 16-byte aligned rows for cp.async and ldmatrix
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int quad_col = lane & 3;  // the mma "threadID_in_group" (lane >> 2, quad_row, is the "groupID")
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kMaxKeys * kStride;
  T* sQ = sV + kMaxKeys * kStride + warp * 2 * kRows * kStride;
  T* sO = sQ + kRows * kStride;

  const int64_t bh = blockIdx.x / ctas_per_bh, cta = blockIdx.x - bh * ctas_per_bh;
  const int64_t b = bh / p.H, h = bh - b * p.H;
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride_b + h * p.v_stride_h;
  T* out = static_cast<T*>(p.o) + b * p.o_stride_b + h * p.o_stride_h;

  const int nkc = static_cast<int>(ceil_div(p.Lk, 16));  // key chunks in use, 1..5
  const int64_t nrb = ceil_div(p.Lq, kRows);             // blocks of kRows query rows
  const int64_t step = ctas_per_bh * kWarps;
  int64_t rb = cta * kWarps + warp;

  // K and V once (rows Lk..16*nkc zero), and this warp's first Q block.
  load_rows<D, DPAD, kStride, true, T>(sK, k, p.k_stride_l, 0, p.Lk, 16 * nkc, vec, threadIdx.x, kThreads);
  load_rows<D, DPAD, kStride, true, T>(sV, v, p.v_stride_l, 0, p.Lk, 16 * nkc, vec, threadIdx.x, kThreads);
  if (rb < nrb) load_rows<D, DPAD, kStride, true, T>(sQ, q, p.q_stride_l, rb * kRows, p.Lq, kRows, vec, lane, 32);
  cp_async_wait_all();
  __syncthreads();

  const float qscale = p.scale * kLog2e;  // scores in log2 units
  for (; rb < nrb; rb += step) {
    uint32_t qf[R][KC][4];  // R tiles of 16 query rows
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int kc = 0; kc < KC; ++kc)
        ldmatrix_x4(qf[r][kc], sQ + (r * 16 + (lane & 15)) * kStride + kc * 16 + (lane >> 4) * 8);
    __syncwarp();  // every lane's fragments are out of sQ before the prefetch overwrites it
    const int64_t next = rb + step;
    if (next < nrb) load_rows<D, DPAD, kStride, true, T>(sQ, q, p.q_stride_l, next * kRows, p.Lq, kRows, vec, lane, 32);

    // S = Q K^T over the key chunks in use (a warp-uniform test; the indices into s stay
    // compile-time).
    float sr[R][NT][4];
    zero_acc(sr);
#pragma unroll
    for (int kc = 0; kc < KC; ++kc)
#pragma unroll
      for (int np = 0; np < NT / 2; ++np)
        if (np < nkc) qk_16keys<R, NT, KC, kStride>(sr, qf, sK, np, kc, lane);

    // Softmax over the whole key range at once: one tile of the online softmax (mma.cuh) from
    // an empty start. Key 0 is always valid, so the max is finite.
    float m[R][2], l[R][2], alpha[R][2];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      m[r][0] = m[r][1] = -INFINITY;
      l[r][0] = l[r][1] = 0.0f;
      softmax_tile(sr[r], m[r], l[r], alpha[r], 0, p.Lk, qscale, quad_col);
    }

    // O = P V.
    float o[R][DT][4];
    zero_acc(o);
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk)
      if (kk < nkc) pv_16keys<R, D, NT, kStride>(o, sr, sV, kk, lane);

#pragma unroll
    for (int r = 0; r < R; ++r)
      finish_16rows<D, kStride>(o[r], m[r], l[r], sO + r * 16 * kStride, out, rb * kRows + r * 16, p.Lq,
                                p.o_stride_l, vec_o, p.lse == nullptr ? nullptr : p.lse + (b * p.H + h) * p.Lq, lane);
    if (next < nrb) cp_async_wait_all();  // the next Q block (this lane's copies)
    __syncwarp();  // ... from every lane; and sO is read before the next block rewrites it
  }
}

int ctas_per_sm() {
  const char* env = std::getenv("LDMFAST_ATTENTION_SHORT_CTAS_PER_SM");
  const int n = env == nullptr ? 0 : std::atoi(env);
  return n > 0 ? n : kCtasPerSm;
}

// Query rows a warp takes per block: 32 where LDMFAST_ATTENTION_SHORT_ROWS=32 asks for them (head
// dims up to kTwoTilesMaxHeadDim), else 16.
bool two_tiles() {
  const char* env = std::getenv("LDMFAST_ATTENTION_SHORT_ROWS");
  return env != nullptr && std::atoi(env) == 32;
}

template <int D, int R, class T>
int launch_dr(const AttentionParams& p, cudaStream_t stream) {
  constexpr size_t smem = Tile<D, R>::template smem_bytes<T>();
  const bool vec = qkv_aligned16(p);
  const bool vec_o = o_aligned16(p);
  // As many CTAs per (b, h) as fill the machine kCtasPerSm deep (or as deep as registers and
  // shared memory allow: 2 at D = 160), but no CTA without a block: each CTA loads K and V once,
  // so more CTAs than run at once would only re-read them.
  if (smem > 48 * 1024) {
    if (const int err = allow_dynamic_smem(attention_short_kernel<D, R, T>, smem)) return err;
  }
  const int resident = blocks_per_sm(attention_short_kernel<D, R, T>, kThreads, smem);
  const int per_sm = ctas_per_sm() < resident ? ctas_per_sm() : resident;
  const int64_t bh = p.B * p.H;
  const int64_t max_cpb = ceil_div(ceil_div(p.Lq, 16 * R), kWarps);
  int64_t cpb = ceil_div(static_cast<int64_t>(per_sm) * sm_count(), bh);
  cpb = cpb < 1 ? 1 : cpb > max_cpb ? max_cpb : cpb;
  const int64_t blocks = bh * cpb;
  if (blocks > INT32_MAX) return static_cast<int>(cudaErrorInvalidConfiguration);
  attention_short_kernel<D, R, T><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p, cpb, vec, vec_o);
  return launch_status();
}

template <int D, class T>
int launch_d(const AttentionParams& p, cudaStream_t stream) {
  if constexpr (D <= kTwoTilesMaxHeadDim) {
    if (two_tiles()) return launch_dr<D, 2, T>(p, stream);
  }
  return launch_dr<D, 1, T>(p, stream);
}

template <class T>
int launch(const AttentionParams& p, cudaStream_t stream) {
  return with_head_dim(p.D, [&](auto d) { return launch_d<decltype(d)::value, T>(p, stream); });
}

}  // namespace

bool attention_short_supports(const AttentionParams& p) {
  return attention_mma_supports(p) && p.Lk >= 1 && p.Lk <= kMaxKeys;
}

int attention_short(const AttentionParams& p, cudaStream_t stream) {
  if (!attention_short_supports(p)) return static_cast<int>(cudaErrorInvalidValue);
  if (p.B <= 0 || p.H <= 0 || p.Lq <= 0) return 0;
  return p.dtype == DType::kFloat16 ? launch<__half>(p, stream) : launch<__nv_bfloat16>(p, stream);
}

}  // namespace ldmfast::cuda
