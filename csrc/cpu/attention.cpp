// O = softmax(scale Q K^T) V on the CPU, flash-style: the Lq x Lk score matrix is never
// materialised. One task is a chunk of up to 240 queries of one (batch, head); it walks the keys
// in tiles of up to 128, keeping per query a running maximum m, a running sum l and an
// unnormalised output accumulator (the online softmax of Milakov & Gimelshein, as in
// FlashAttention). Within a key tile the chunk is processed kBq queries at a time, whose scores
// stay in L1.
//
// K and V are converted to float once per call, before the tasks start (pack_kv): K transposed to
// (D, keys) tiles so the score micro-kernel runs along keys with unit stride, V as (keys, D)
// tiles. Each task converts its Q rows, pre-multiplied by scale * log2(e) so that the softmax is
// a bare exp2 (exp2_nonpositive). Both products are register-blocked micro-kernels written as
// plain loops over fixed-size arrays that the compiler keeps in vector registers:
//   scores: 6 query rows x 16 keys (12 AVX2 / 6 AVX-512 accumulators), one rank-1 update per
//           head-dim step;
//   P V:    6 query rows x 16 head-dim lanes, one rank-1 update per key, and 8 rows x 8 lanes
//           for the last 8 lanes when the padded head dim is not a multiple of 16 (40, 72...).
// Rows, keys and head dims are padded with zeros to those block sizes; padded keys get a score
// of -inf so they carry no probability. The micro-kernels are not inlined: inlined into the
// task loop, GCC ran out of registers and reloaded a row offset from the stack before every
// FMA (perf annotate; 1.2x slower on Zen 4).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>

#include "dtype.h"
#include "ldmfast/attention.h"
#include "vec_math.h"

namespace ldmfast::cpu {
namespace {

constexpr int64_t kBq = 48;      // queries whose scores are live at once
constexpr int64_t kQkRows = 6;   // score micro-kernel: query rows ...
constexpr int64_t kQkCols = 16;  // ... times keys
constexpr int64_t kPvRows = 6;   // P V micro-kernel: query rows ...
constexpr int64_t kPvCols = 16;  // ... times head-dim lanes
constexpr int64_t kPvTailRows = 8;  // the 8-lane tail kernel's rows
constexpr int64_t kDimPad = 8;   // head dims are padded to a multiple of 8 lanes
constexpr int64_t kRowPad = 24;  // rows are padded to a multiple of every micro-kernel's rows
static_assert(kRowPad % kQkRows == 0 && kRowPad % kPvRows == 0 && kRowPad % kPvTailRows == 0 &&
                  kBq % kRowPad == 0,
              "row blocking");
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Keys per tile: 128 keeps K^T, V and the scores of a task in L2 up to D = 128; larger head dims
// take fewer so that D = 256 (64 keys) and the autoencoders' single 512-wide head (32) still fit.
int64_t key_tile(int64_t D) { return D > 256 ? 32 : D > 128 ? 64 : 128; }

// s[r][j] = sum_d q[r][d] kt[d][j] for 6 rows and 16 keys.
LDMFAST_NOINLINE void qk_micro(const float* __restrict q, int64_t ldq, const float* __restrict kt, int64_t ldk,
                     int64_t D, float* __restrict s, int64_t lds) {
  float acc[kQkRows][kQkCols] = {};
  for (int64_t d = 0; d < D; ++d) {
    const float* __restrict kr = kt + d * ldk;
    float qv[kQkRows];
    for (int64_t r = 0; r < kQkRows; ++r) qv[r] = q[r * ldq + d];
    for (int64_t r = 0; r < kQkRows; ++r) {
#pragma omp simd
      for (int64_t j = 0; j < kQkCols; ++j) acc[r][j] += qv[r] * kr[j];
    }
  }
  for (int64_t r = 0; r < kQkRows; ++r)
    for (int64_t j = 0; j < kQkCols; ++j) s[r * lds + j] = acc[r][j];
}

// o[r][0:COLS] += sum_j p[r][j] v[j][0:COLS] for ROWS rows.
template <int64_t ROWS, int64_t COLS>
LDMFAST_NOINLINE void pv_micro(const float* __restrict p, int64_t ldp, const float* __restrict v, int64_t ldv,
                               int64_t nk, float* __restrict o, int64_t ldo) {
  float acc[ROWS][COLS];
  for (int64_t r = 0; r < ROWS; ++r)
    for (int64_t c = 0; c < COLS; ++c) acc[r][c] = o[r * ldo + c];
  for (int64_t j = 0; j < nk; ++j) {
    const float* __restrict vr = v + j * ldv;
    float pv[ROWS];
    for (int64_t r = 0; r < ROWS; ++r) pv[r] = p[r * ldp + j];
    for (int64_t r = 0; r < ROWS; ++r) {
#pragma omp simd
      for (int64_t c = 0; c < COLS; ++c) acc[r][c] += pv[r] * vr[c];
    }
  }
  for (int64_t r = 0; r < ROWS; ++r)
    for (int64_t c = 0; c < COLS; ++c) o[r * ldo + c] = acc[r][c];
}

// Rows of Q (and of the output accumulator) a task keeps in float: as many as fit in about
// 64 KiB each, at most 240: the per-tile overheads (pointer set-up, output rescaling) are then
// shared by that many queries.
// (A multiple of kBq, so a chunk's padded rows never exceed its buffers.)
int64_t chunk_cap(int64_t dp) { return std::clamp<int64_t>(16384 / dp / kBq * kBq, kBq, 5 * kBq); }

// K and V of every head in float, packed once per call by pack_kv so that no task converts or
// transposes them again: for key tile t of head bh, kt(bh, t) is a (D, ldk) row-major block
// (keys along rows, for the score micro-kernel) and v(bh, t) a (ldk, dp) block. Keys past Lk
// and head-dim lanes past D are zero.
struct PackedKV {
  int64_t D, dp, ldk, tiles;
  // Left uninitialised (pack_kv writes every element, padding included): zero-filling the
  // buffers first would be a third pass over memory the size of K and V.
  std::unique_ptr<float[]> k, v;
  PackedKV(const AttentionParams& p, int64_t dp_, int64_t ldk_)
      : D(p.D), dp(dp_), ldk(ldk_), tiles((p.Lk + ldk_ - 1) / ldk_),
        k(new float[static_cast<size_t>(p.B * p.H * tiles * p.D * ldk_)]),
        v(new float[static_cast<size_t>(p.B * p.H * tiles * ldk_ * dp_)]) {}
  float* kt(int64_t bh, int64_t t) { return k.get() + (bh * tiles + t) * D * ldk; }
  float* vt(int64_t bh, int64_t t) { return v.get() + (bh * tiles + t) * ldk * dp; }
};

// Called inside run's parallel region: the orphaned `omp for` shares the tiles among its
// threads and ends with a barrier, so every tile is packed before any task reads one.
template <typename T>
void pack_kv(const AttentionParams& p, PackedKV& pk) {
  const int64_t D = p.D, dp = pk.dp, ldk = pk.ldk;
#pragma omp for schedule(static)
  for (int64_t u = 0; u < p.B * p.H * pk.tiles; ++u) {
    const int64_t bh = u / pk.tiles, t = u % pk.tiles, b = bh / p.H, h = bh % p.H;
    const int64_t k0 = t * ldk, bk = std::min(ldk, p.Lk - k0);
    const T* K = static_cast<const T*>(p.k) + b * p.k_stride_b + h * p.k_stride_h + k0 * p.k_stride_l;
    const T* V = static_cast<const T*>(p.v) + b * p.v_stride_b + h * p.v_stride_h + k0 * p.v_stride_l;
    float* kt = pk.kt(bh, t);
    float* v = pk.vt(bh, t);
    // Transposed in 16-key slabs: each slab's rows (D x 16 floats) stay in L1 while written.
    for (int64_t j0 = 0; j0 < ldk; j0 += kQkCols) {
      const int64_t jn = std::clamp<int64_t>(bk - j0, 0, kQkCols);
      for (int64_t j = 0; j < jn; ++j) {
        const T* src = K + (j0 + j) * p.k_stride_l;
        for (int64_t d = 0; d < D; ++d) kt[d * ldk + j0 + j] = to_float(src[d]);
      }
      for (int64_t d = 0; d < D; ++d) std::fill(kt + d * ldk + j0 + jn, kt + d * ldk + j0 + kQkCols, 0.0f);
    }
    for (int64_t j = 0; j < ldk; ++j) {
      float* vj = v + j * dp;
      if (j < bk) {
        const T* src = V + j * p.v_stride_l;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) vj[d] = to_float(src[d]);
        std::fill(vj + D, vj + dp, 0.0f);
      } else {
        std::fill(vj, vj + dp, 0.0f);
      }
    }
  }
}

// Per-thread buffers, left uninitialised: attention_chunk writes every element it reads (Q rows
// and their padding, o, m, l, the scores and their padded keys), and zeroing ~100 KB per thread
// per call is measurable at the U-Net's small shapes.
struct Workspace {
  int64_t dp, bk_max;
  std::unique_ptr<float[]> q_, s_, o_, m_, l_;
  Workspace(int64_t D, int64_t bk_max_, int64_t chunk)
      : dp(round_up(D, kDimPad)),
        bk_max(bk_max_),
        q_(new float[static_cast<size_t>(chunk * dp)]),
        s_(new float[static_cast<size_t>(kBq * bk_max)]),
        o_(new float[static_cast<size_t>(chunk * dp)]),
        m_(new float[static_cast<size_t>(chunk)]),
        l_(new float[static_cast<size_t>(chunk)]) {}
  float* q() { return q_.get(); }
  float* s() { return s_.get(); }
  float* o() { return o_.get(); }
  float* m() { return m_.get(); }
  float* l() { return l_.get(); }
};

// Queries [q0, q0 + rows) of head (b, h). Every query row goes through the same key tiles in
// the same order with the same arithmetic whatever the chunking, so results do not depend on
// how the rows were grouped into tasks (nor on the thread count).
template <typename T>
void attention_chunk(const AttentionParams& p, PackedKV& pk, int64_t b, int64_t h, int64_t q0, int64_t rows,
                     Workspace& w) {
  const int64_t D = p.D, dp = w.dp, ldk = w.bk_max;
  const int64_t rows_p = round_up(rows, kRowPad);
  const T* Q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  float* q = w.q();
  float* s = w.s();
  float* o = w.o();
  float* m = w.m();
  float* l = w.l();
  const float qscale = p.scale * kLog2e;  // scores come out in log2 units

  for (int64_t i = 0; i < rows_p; ++i) {
    float* qi = q + i * dp;
    if (i < rows) {
      const T* src = Q + (q0 + i) * p.q_stride_l;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) qi[d] = to_float(src[d]) * qscale;
      std::fill(qi + D, qi + dp, 0.0f);
    } else {
      std::fill(qi, qi + dp, 0.0f);  // padding rows: finite scores, results dropped
    }
  }
  std::fill(o, o + rows_p * dp, 0.0f);
  std::fill(m, m + rows_p, -std::numeric_limits<float>::infinity());
  std::fill(l, l + rows_p, 0.0f);

  for (int64_t k0 = 0; k0 < p.Lk; k0 += ldk) {
    const int64_t bk = std::min(ldk, p.Lk - k0);
    const int64_t bkp = round_up(bk, kQkCols);
    const float* kt = pk.kt(b * p.H + h, k0 / ldk);
    const float* v = pk.vt(b * p.H + h, k0 / ldk);

    // kBq rows at a time, so that their scores stay in L1 between the three steps.
    for (int64_t i0 = 0; i0 < rows_p; i0 += kBq) {
      const int64_t nr = std::min(kBq, rows_p - i0);
      for (int64_t i = 0; i < nr; i += kQkRows)
        for (int64_t j = 0; j < bkp; j += kQkCols)
          qk_micro(q + (i0 + i) * dp, dp, kt + j, ldk, D, s + i * ldk + j, ldk);

      // Online softmax: rescale what was accumulated by 2^(m_old - m_new), add this tile.
      for (int64_t i = 0; i < nr; ++i) {
        float* si = s + i * ldk;
        for (int64_t j = bk; j < bkp; ++j) si[j] = -std::numeric_limits<float>::infinity();
        const float m_old = m[i0 + i];
        float mx = m_old;
#pragma omp simd reduction(max : mx)
        for (int64_t j = 0; j < bk; ++j) mx = mx > si[j] ? mx : si[j];
        // Scores that all overflowed to -inf so far (|q|, |k| near the float range) leave mx at
        // -inf: exponents are then taken against 0, giving 0 where -inf - -inf would be NaN.
        const float ref = mx == -std::numeric_limits<float>::infinity() ? 0.0f : mx;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < bkp; ++j) {
          const float e = exp2_nonpositive(si[j] - ref);
          si[j] = e;
          sum += e;
        }
        const float alpha = exp2_nonpositive(m_old - ref);  // 0 on the first tile (m_old = -inf)
        m[i0 + i] = mx;
        l[i0 + i] = l[i0 + i] * alpha + sum;
        if (alpha != 1.0f) {
          float* oi = o + (i0 + i) * dp;
#pragma omp simd
          for (int64_t d = 0; d < dp; ++d) oi[d] *= alpha;
        }
      }

      const int64_t wide = dp / kPvCols * kPvCols;
      for (int64_t i = 0; i < nr; i += kPvRows)
        for (int64_t c = 0; c < wide; c += kPvCols)
          pv_micro<kPvRows, kPvCols>(s + i * ldk, ldk, v + c, dp, bkp, o + (i0 + i) * dp + c, dp);
      if (wide < dp)  // dp - wide = 8 lanes
        for (int64_t i = 0; i < nr; i += kPvTailRows)
          pv_micro<kPvTailRows, kDimPad>(s + i * ldk, ldk, v + wide, dp, bkp, o + (i0 + i) * dp + wide, dp);
    }
  }

  T* O = static_cast<T*>(p.o) + b * p.o_stride_b + h * p.o_stride_h;
  for (int64_t i = 0; i < rows; ++i) {
    const float inv = 1.0f / l[i];
    const float* oi = o + i * dp;
    T* dst = O + (q0 + i) * p.o_stride_l;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(oi[d] * inv);
  }
  if (p.lse != nullptr) {
    float* lse = p.lse + (b * p.H + h) * p.Lq + q0;
    for (int64_t i = 0; i < rows; ++i) lse[i] = (m[i] + std::log2(l[i])) * kLn2;
  }
}

template <typename T>
void run(const AttentionParams& p) {
  const int64_t dp = round_up(p.D, kDimPad);
  // A context shorter than a tile (77 text tokens) gets a tile of its own length: the padded
  // keys would be packed and zeroed for nothing.
  const int64_t bk_max = std::min(key_tile(p.D), round_up(p.Lk, kQkCols));
  // Large chunks amortise the Q conversion and per-tile overheads; smaller ones when there
  // would otherwise be too few tasks to keep every thread busy (about four per thread).
  const int64_t want_tasks = 4 * static_cast<int64_t>(omp_get_max_threads());
  const int64_t per_head = (want_tasks + p.B * p.H - 1) / (p.B * p.H);
  const int64_t chunk = std::clamp(round_up((p.Lq + per_head - 1) / per_head, kBq), kBq, chunk_cap(dp));
  const int64_t chunks = (p.Lq + chunk - 1) / chunk;
  const int64_t tasks = p.B * p.H * chunks;
  PackedKV pk(p, dp, bk_max);
#pragma omp parallel
  {
    pack_kv<T>(p, pk);
    Workspace w(p.D, bk_max, chunk);
    // Chunks of one head are consecutive, so neighbouring tasks share K and V in cache.
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t c = t % chunks, bh = t / chunks;
      attention_chunk<T>(p, pk, bh / p.H, bh % p.H, c * chunk, std::min(chunk, p.Lq - c * chunk), w);
    }
  }
}

}  // namespace

void attention(const AttentionParams& p) {
  if (p.B <= 0 || p.H <= 0 || p.Lq <= 0 || p.Lk <= 0 || p.D <= 0) return;
  dispatch_dtype(p.dtype, [&](auto tag) { run<decltype(tag)>(p); });
}

}  // namespace ldmfast::cpu
