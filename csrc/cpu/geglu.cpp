// GEGLU on the CPU: out = a * gelu(g) with the exact (erf) GELU, a and g the two halves of a
// row of h. Elementwise and memory-bound on a big machine; on a small one the erf dominates, so
// it is computed by a branch-free approximation that vectorises (no libm call in the loop).
#include <algorithm>
#include <cstdint>

#include "dtype.h"
#include "ldmfast/geglu.h"
#include "vec_math.h"

namespace ldmfast::cpu {
namespace {

// erf and erfc to about 1e-7 absolute (and erfc to 5e-7 relative on the tail), for z >= 0.
// Coefficients are weighted least-squares fits made for this file in float64:
//  - z < 1:   erf(z) = z P(z^2), P of degree 5 (erf(z)/z is smooth and even);
//  - z >= 1:  erfc(z) = exp(-z^2) R(t), t = 1 / (1 + z/2), R of degree 9 (fit on z in [0.5, 10]),
//             so the negative tail of GELU, g/2 erfc(|g|/sqrt 2), keeps its relative accuracy
//             instead of being 1 - erf, which cancels.
// On the tail, exp(-z^2) is formed from g itself with the FMA residual of g*g, since an
// argument off by one rounding costs z^2 * 6e-8 relative (5e-6 at z = 9); measured relative
// error of the negative tail is below 4e-7 down to float32's smallest normal numbers.
LDMFAST_INLINE float erf_small(float z) {
  const float u = z * z;
  float p = -5.625396152e-04f;
  p = p * u + 4.916023463e-03f;
  p = p * u - 2.670994960e-02f;
  p = p * u + 1.128013059e-01f;
  p = p * u - 3.761231899e-01f;
  p = p * u + 1.128379107e+00f;
  return z * p;
}

// erfc(z) with z = a / sqrt 2; a is passed so that exp's argument -a^2/2 is formed from a exactly:
// the rounding of z itself would cost z^2 * 1.2e-7 relative (1e-5 at z = 9).
LDMFAST_INLINE float erfc_large(float z, float a) {
  const float t = 1.0f / (1.0f + 0.5f * z);
  float r = -6.453201175e-02f;
  r = r * t + 3.156865537e-01f;
  r = r * t - 5.556126237e-01f;
  r = r * t + 3.575416803e-01f;
  r = r * t - 8.127034456e-02f;
  r = r * t + 2.259021699e-01f;
  r = r * t + 2.369967103e-01f;
  r = r * t + 2.833345532e-01f;
  r = r * t + 2.820048630e-01f;
  r = r * t + 2.856139417e-06f;
  const float aa = a * a;
  const float aa_err = __builtin_fmaf(a, a, -aa);  // a*a - aa, exactly
  return exp_approx(-0.5f * aa) * (1.0f - 0.5f * aa_err) * r;
}

// g/2 (1 + erf(g / sqrt 2)), every branch computed and one selected (straight-line code).
LDMFAST_INLINE float gelu_erf(float g) {
  // Past |g| = 14, erfc(|g|/sqrt 2) < 1e-43 is at the end of float's range; clamping keeps the
  // tail fit inside the interval it was made on (a NaN passes the clamp and propagates).
  const float a = clamp(__builtin_fabsf(g), 0.0f, 14.0f);
  const float z = a * 0.707106781186547524f;
  // erfc(z) for z >= 0 from whichever approximation covers z
  const uint32_t small = float_to_bits(1.0f - erf_small(z));
  const uint32_t large = float_to_bits(erfc_large(z, a));
  const float erfc_z = bits_to_float(select_bits(z < 1.0f, small, large));
  // 1 + erf(g / sqrt 2) is 2 - erfc(z) for g >= 0 and erfc(z) for g < 0
  const float one_plus_erf = bits_to_float(select_bits(g < 0.0f, float_to_bits(erfc_z),
                                                       float_to_bits(2.0f - erfc_z)));
  return 0.5f * g * one_plus_erf;
}

constexpr int64_t kBlock = 8192;  // output elements per task

template <typename T>
void geglu_block(const T* __restrict a, const T* __restrict g, T* __restrict out, int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) out[j] = from_float<T>(to_float(a[j]) * gelu_erf(to_float(g[j])));
}

template <typename T>
void run(const GegluParams& p) {
  // Tasks are (row, column block) pairs, so a few wide rows or many narrow ones both spread.
  const int64_t blocks = (p.n + kBlock - 1) / kBlock;
  const T* h = static_cast<const T*>(p.h);
  T* out = static_cast<T*>(p.out);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < p.rows * blocks; ++t) {
    const int64_t r = t / blocks, j0 = (t % blocks) * kBlock;
    const T* row = h + r * p.h_row_stride;
    geglu_block<T>(row + j0, row + p.n + j0, out + r * p.n + j0, std::min(kBlock, p.n - j0));
  }
}

}  // namespace

void geglu(const GegluParams& p) {
  if (p.rows <= 0 || p.n <= 0) return;
  dispatch_dtype(p.dtype, [&](auto tag) { run<decltype(tag)>(p); });
}

}  // namespace ldmfast::cpu
