// exp and exp2 that vectorise. glibc's vector expf (libmvec) is only used under -ffast-math,
// which the kernels do not take (it would also license the compiler to break the fp16 rounding
// and NaN handling), so a scalar std::exp call would keep every softmax and SiLU loop scalar.
// These are written branch-free so that `#pragma omp simd` loops calling them vectorise.
//
// Method: x = n + r (exp2) or x = n ln2 + r (exp, Cody-Waite with a two-part ln2 and FMAs), |r|
// at most ln2/2, e^r by its degree-7 Taylor polynomial (truncation error below 6e-9 relative,
// so the result is within about 1 ulp), then a multiply by 2^n built in the exponent field.
// 2^n is applied as two factors 2^(n/2) 2^(n - n/2), each a normal float, so results in the
// subnormal range round correctly and overflow gives +inf rather than garbage: exp(-1000) = 0,
// exp(1000) = inf, NaN stays NaN. That makes x / (1 + exp(-x)) safe for any x.
#pragma once
#include <cstdint>

#include "dtype.h"

#if defined(__GNUC__)
#define LDMFAST_INLINE inline __attribute__((always_inline))
#define LDMFAST_NOINLINE __attribute__((noinline))
#else
#define LDMFAST_INLINE inline
#define LDMFAST_NOINLINE
#endif

namespace ldmfast::cpu {

// Clamps x to [lo, hi]; a NaN passes through. Masked selects rather than ?: because GCC turns
// `(x < lo ? lo : x) + c` into a branch around the (trapping) add and gives up vectorising.
LDMFAST_INLINE float clamp(float x, float lo, float hi) {
  uint32_t b = select_bits(x < lo, float_to_bits(lo), float_to_bits(x));
  b = select_bits(x > hi, float_to_bits(hi), b);
  return bits_to_float(b);
}

// e^r for |r| <= ln2/2.
LDMFAST_INLINE float exp_poly(float r) {
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p;
}

// p * 2^n for n in [-152, 130]; see the header comment for the two factors.
LDMFAST_INLINE float scale_by_pow2(float p, int32_t n) {
  const int32_t n1 = n >> 1;
  const int32_t n2 = n - n1;
  const float s1 = bits_to_float(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = bits_to_float(static_cast<uint32_t>(n2 + 127) << 23);
  return (p * s1) * s2;
}

// Rounds v to the nearest integer (ties to even) for |v| < 2^22 with the 1.5 * 2^23 shifter:
// the sum's low mantissa bits are the integer, so no float-to-int conversion (undefined for a
// NaN) is needed. Returns the rounded value and sets n to it.
LDMFAST_INLINE float round_small(float v, int32_t& n) {
  const float shifter = 12582912.0f;
  const float t = v + shifter;
  n = static_cast<int32_t>(float_to_bits(t) - float_to_bits(shifter));
  return t - shifter;
}

LDMFAST_INLINE float exp2_approx(float x) {
  // Clamping keeps n in range; outside [-151, 129] the result is already 0 or inf. A NaN passes
  // the clamps (both compares are false) and propagates through the polynomial.
  const float xc = clamp(x, -151.0f, 129.0f);
  int32_t n;
  const float nf = round_small(xc, n);
  const float r = (xc - nf) * 0.693147180559945309f;  // exact subtraction, one rounding
  return scale_by_pow2(exp_poly(r), n);
}

// 2^x for x <= 0, the softmax's case (scores minus their running maximum), at two thirds of
// exp2_approx's instructions: one clamp, a degree-5 polynomial fitted for relative error on
// [-1/2, 1/2] (2 ulp at most over [-126, 0] in float arithmetic, tests/test_vec_math.py; c0 = 1,
// so 2^0 = 1 exactly), one scale factor.
// Results below 2^-126 flush to 0, as does -inf; NaN stays NaN. Positive x is out of contract.
LDMFAST_INLINE float exp2_nonpositive(float x) {
  const float xc = bits_to_float(select_bits(x < -127.0f, float_to_bits(-127.0f), float_to_bits(x)));
  int32_t n;
  const float r = xc - round_small(xc, n);
  float p = 1.3268214e-3f;
  p = p * r + 9.6715111e-3f;
  p = p * r + 5.5507217e-2f;
  p = p * r + 0.24022242f;
  p = p * r + 0.69314700f;
  p = p * r + 1.0f;
  return p * bits_to_float(static_cast<uint32_t>(n + 127) << 23);  // n = -127 gives 0
}

LDMFAST_INLINE float exp_approx(float x) {
  const float xc = clamp(x, -105.0f, 90.0f);
  int32_t n;
  const float nf = round_small(xc * 1.44269504088896341f, n);
  // ln2 split so that n * ln2_hi is exact for |n| < 2^9.
  const float ln2_hi = 0.693145751953125f;
  const float ln2_lo = 1.42860682030941723212e-6f;
  float r = xc - nf * ln2_hi;
  r = r - nf * ln2_lo;
  return scale_by_pow2(exp_poly(r), n);
}

// x * sigmoid(x), finite for every finite x (exp overflow gives x / inf = -0).
LDMFAST_INLINE float silu(float x) { return x / (1.0f + exp_approx(-x)); }

}  // namespace ldmfast::cpu
