// y = silu(GroupNorm(x + emb)) on the CPU.
//
// Two reads of x and one write of y: a statistics pass, then an apply pass with a precomputed
// per-(n, c) affine map. Statistics are gathered per channel as shifted sums (the shift is the
// channel's first element, so an input with mean 1000 and std 1 sums values of order 1, not
// 1000: no catastrophic cancellation), in float within blocks of a few hundred elements that
// vectorise and in double across blocks. Channels are merged into groups with the exact
// pairwise (Chan et al.) formula in double. Everything is split into pieces whose bounds depend
// on the shape alone, and partial results are combined in a fixed order, so the output does not
// depend on the thread count.
//
// The apply pass computes ((x - m_hi) - m_lo) * scale + shift with the group mean split into
// two floats: folding the mean into the shift (x * scale + shift) would cancel two values of the
// size of the mean and lose its low bits for large-mean inputs.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "dtype.h"
#include "ldmfast/group_norm_silu.h"
#include "vec_math.h"

namespace ldmfast::cpu {
namespace {

constexpr int64_t kLanes = 32;          // float accumulators per sum: four AVX2 registers
constexpr int64_t kStatBlock = 512;     // elements summed in float before moving to double
constexpr int64_t kApplyBlock = 8192;   // elements per task of the NCHW apply pass
constexpr int64_t kRowsPerFlush = 64;   // channels_last: rows summed in float per flush
constexpr int64_t kMaxRowChunks = 64;   // channels_last: at most this many row chunks per image

// Shifted sums of one channel (or a chunk of one): s1 = sum (x - k), s2 = sum (x - k)^2.
struct Moments {
  double k = 0, s1 = 0, s2 = 0;
};

// Per-(n, c) affine map of the apply pass: y = ((x - m_hi) - m_lo) * scale + shift.
struct Affine {
  std::vector<float> m_hi, m_lo, scale, shift;
  explicit Affine(int64_t n) : m_hi(n), m_lo(n), scale(n), shift(n) {}
};

template <typename T>
Moments contiguous_moments(const T* x, int64_t S) {
  Moments m;
  const float k = to_float(x[0]);
  m.k = k;
  for (int64_t b = 0; b < S; b += kStatBlock) {
    const int64_t e = std::min(S, b + kStatBlock);
    float a1[kLanes] = {}, a2[kLanes] = {};
    int64_t i = b;
    for (; i + kLanes <= e; i += kLanes) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        const float d = to_float(x[i + l]) - k;
        a1[l] += d;
        a2[l] += d * d;
      }
    }
    for (; i < e; ++i) {
      const float d = to_float(x[i]) - k;
      a1[0] += d;
      a2[0] += d * d;
    }
    for (int64_t l = 0; l < kLanes; ++l) {
      m.s1 += a1[l];
      m.s2 += a2[l];
    }
  }
  return m;
}

// Turns per-channel moments (each over S elements, shift k in x's domain) into the group
// statistics and the apply-pass coefficients of the channels of group (n, g).
template <typename P, typename T>
void group_affine(const GroupNormSiluParams& p, const Moments* mom, int64_t n, int64_t g, Affine& a) {
  const int64_t cg = p.C / p.G, c0 = g * cg;
  const double S = static_cast<double>(p.S);
  const P* w = static_cast<const P*>(p.weight);
  const P* bias = static_cast<const P*>(p.bias);
  const T* emb = static_cast<const T*>(p.emb);
  // Channel means of z = x + emb, then the exact merge: M2_g = sum M2_c + S sum (mean_c - mean)^2.
  double sum_mean = 0;
  for (int64_t c = c0; c < c0 + cg; ++c) {
    const Moments& m = mom[n * p.C + c];
    const double e = emb ? to_float(emb[n * p.C + c]) : 0.0;
    sum_mean += m.k + e + m.s1 / S;
  }
  const double mean = sum_mean / static_cast<double>(cg);
  double m2 = 0;
  for (int64_t c = c0; c < c0 + cg; ++c) {
    const Moments& m = mom[n * p.C + c];
    const double e = emb ? to_float(emb[n * p.C + c]) : 0.0;
    const double dm = m.k + e + m.s1 / S - mean;
    m2 += std::max(m.s2 - m.s1 * m.s1 / S, 0.0) + S * dm * dm;
  }
  const double var = m2 / (S * static_cast<double>(cg));
  const double rstd = 1.0 / std::sqrt(var + static_cast<double>(p.eps));
  for (int64_t c = c0; c < c0 + cg; ++c) {
    const double e = emb ? to_float(emb[n * p.C + c]) : 0.0;
    const double mx = mean - e;  // the group mean in x's domain for this channel
    const float hi = static_cast<float>(mx);
    const int64_t i = n * p.C + c;
    a.m_hi[i] = hi;
    a.m_lo[i] = static_cast<float>(mx - hi);
    a.scale[i] = static_cast<float>(rstd * to_float(w[c]));
    a.shift[i] = to_float(bias[c]);
  }
}

template <bool kSilu, typename T>
void apply_contiguous(const T* x, T* y, int64_t len, float m_hi, float m_lo, float scale, float shift) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    float v = ((to_float(x[i]) - m_hi) - m_lo) * scale + shift;
    if constexpr (kSilu) v = silu(v);
    y[i] = from_float<T>(v);
  }
}

// NCHW: each channel is S contiguous elements.
template <bool kSilu, typename T, typename P>
void run_nchw(const GroupNormSiluParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int64_t N = p.N, C = p.C, S = p.S, G = p.G, cg = C / G;
  std::vector<Moments> mom(N * C);
  Affine a(N * C);
  if (N * G >= 4 * static_cast<int64_t>(omp_get_max_threads())) {
    // Enough groups to keep every thread busy: one task per group does stats and apply back to
    // back, so the second read of the group usually comes from this core's L2 instead of DRAM.
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t ng = 0; ng < N * G; ++ng) {
      const int64_t n = ng / G, g = ng % G;
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c) mom[n * C + c] = contiguous_moments(x + (n * C + c) * S, S);
      group_affine<P, T>(p, mom.data(), n, g, a);
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
        const int64_t i = n * C + c;
        apply_contiguous<kSilu>(x + i * S, y + i * S, S, a.m_hi[i], a.m_lo[i], a.scale[i], a.shift[i]);
      }
    }
    return;
  }
  // Few groups (small batch, one group): parallelise over channels, then over blocks of S.
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < N * C; ++i) mom[i] = contiguous_moments(x + i * S, S);
  for (int64_t ng = 0; ng < N * G; ++ng) group_affine<P, T>(p, mom.data(), ng / G, ng % G, a);
  const int64_t blocks = (S + kApplyBlock - 1) / kApplyBlock;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N * C * blocks; ++t) {
    const int64_t i = t / blocks, s0 = (t % blocks) * kApplyBlock;
    const int64_t len = std::min(kApplyBlock, S - s0);
    apply_contiguous<kSilu>(x + i * S + s0, y + i * S + s0, len, a.m_hi[i], a.m_lo[i], a.scale[i], a.shift[i]);
  }
}

// channels_last: image n is S rows of C contiguous channels. The statistics pass splits each
// image into row chunks (bounds from S alone); a chunk sums kRowsPerFlush rows at a time into
// per-channel float accumulators, flushes them into double ones, and writes its double sums to
// its own slot, which are added up in chunk order afterwards.
template <bool kSilu, typename T, typename P>
void run_channels_last(const GroupNormSiluParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int64_t N = p.N, C = p.C, S = p.S, G = p.G;
  const int64_t chunks = std::clamp<int64_t>((S + kRowsPerFlush - 1) / kRowsPerFlush, 1, kMaxRowChunks);
  const int64_t rows_per_chunk = (S + chunks - 1) / chunks;
  std::vector<double> part(static_cast<size_t>(N * chunks * 2 * C));
#pragma omp parallel
  {
    std::vector<float> shift_k(C), a1(C), a2(C);
    std::vector<double> d1(C), d2(C);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < N * chunks; ++t) {
      const int64_t n = t / chunks, r0 = (t % chunks) * rows_per_chunk;
      const int64_t r1 = std::min(S, r0 + rows_per_chunk);
      const T* xn = x + n * S * C;
      for (int64_t c = 0; c < C; ++c) shift_k[c] = to_float(xn[c]);
      std::fill(d1.begin(), d1.end(), 0.0);
      std::fill(d2.begin(), d2.end(), 0.0);
      for (int64_t f0 = r0; f0 < r1; f0 += kRowsPerFlush) {
        std::fill(a1.begin(), a1.end(), 0.0f);
        std::fill(a2.begin(), a2.end(), 0.0f);
        float* __restrict A1 = a1.data();
        float* __restrict A2 = a2.data();
        const float* __restrict K = shift_k.data();
        for (int64_t r = f0; r < std::min(r1, f0 + kRowsPerFlush); ++r) {
          const T* row = xn + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const float d = to_float(row[c]) - K[c];
            A1[c] += d;
            A2[c] += d * d;
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          d1[c] += A1[c];
          d2[c] += A2[c];
        }
      }
      double* out = part.data() + t * 2 * C;
      std::copy(d1.begin(), d1.end(), out);
      std::copy(d2.begin(), d2.end(), out + C);
    }
  }
  std::vector<Moments> mom(N * C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      Moments& m = mom[n * C + c];
      m.k = to_float(x[n * S * C + c]);
      for (int64_t ch = 0; ch < chunks; ++ch) {
        const double* pp = part.data() + (n * chunks + ch) * 2 * C;
        m.s1 += pp[c];
        m.s2 += pp[C + c];
      }
    }
  Affine a(N * C);
  for (int64_t ng = 0; ng < N * G; ++ng) group_affine<P, T>(p, mom.data(), ng / G, ng % G, a);
  // Apply: rows of C channels, a few rows per task so that small C still makes sizeable tasks.
  const int64_t rows_per_task = std::max<int64_t>(1, kApplyBlock / std::max<int64_t>(C, 1));
  const int64_t tasks_per_image = (S + rows_per_task - 1) / rows_per_task;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N * tasks_per_image; ++t) {
    const int64_t n = t / tasks_per_image, r0 = (t % tasks_per_image) * rows_per_task;
    const int64_t r1 = std::min(S, r0 + rows_per_task);
    const float* __restrict mh = a.m_hi.data() + n * C;
    const float* __restrict ml = a.m_lo.data() + n * C;
    const float* __restrict sc = a.scale.data() + n * C;
    const float* __restrict sh = a.shift.data() + n * C;
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict xr = x + (n * S + r) * C;
      T* __restrict yr = y + (n * S + r) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        float v = ((to_float(xr[c]) - mh[c]) - ml[c]) * sc[c] + sh[c];
        if constexpr (kSilu) v = silu(v);
        yr[c] = from_float<T>(v);
      }
    }
  }
}

template <typename T, typename P>
void run(const GroupNormSiluParams& p) {
  if (p.channels_last) {
    if (p.silu) run_channels_last<true, T, P>(p);
    else run_channels_last<false, T, P>(p);
  } else {
    if (p.silu) run_nchw<true, T, P>(p);
    else run_nchw<false, T, P>(p);
  }
}

}  // namespace

void group_norm_silu(const GroupNormSiluParams& p) {
  if (p.N <= 0 || p.C <= 0 || p.S <= 0 || p.G <= 0) return;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.param_dtype == DType::kFloat32) run<T, float>(p);
    else run<T, T>(p);
  });
}

}  // namespace ldmfast::cpu
