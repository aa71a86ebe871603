// One DDIM update (Song et al. 2021, eq. 12) with classifier-free guidance folded in, on the CPU.
// Purely elementwise and memory-bound: the per-sample scalars are resolved once per sample and
// the element loop streams x, eps (and eps_uncond, noise) once and writes both outputs once.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "dtype.h"
#include "ldmfast/ddim_step.h"

namespace ldmfast::cpu {
namespace {

constexpr int64_t kBlock = 16384;  // elements per task: large enough to amortise scheduling

float scalar_at(const DdimScalar& s, int64_t n) {
  if (s.ptr == nullptr) return s.value;
  return s.ptr[s.count == 1 ? 0 : n];
}

// The sample's coefficients, computed in float as the float32 reference does.
struct Coeffs {
  float sqrt_1m_at, sqrt_at, sqrt_aprev, dir, sigma, g;
};

Coeffs coeffs_of(const DdimStepParams& p, int64_t n) {
  const float at = scalar_at(p.alpha_t, n), ap = scalar_at(p.alpha_prev, n);
  const float sig = scalar_at(p.sigma_t, n);
  Coeffs c;
  c.sqrt_1m_at = std::sqrt(1.0f - at);
  c.sqrt_at = std::sqrt(at);
  c.sqrt_aprev = std::sqrt(ap);
  // 1 - a_prev - sigma^2 >= 0 in exact arithmetic; the clamp keeps rounding from making a NaN.
  c.dir = std::sqrt(std::max(1.0f - ap - sig * sig, 0.0f));
  c.sigma = sig;
  c.g = scalar_at(p.guidance_scale, n);
  return c;
}

template <typename T, bool kGuided, bool kNoise>
void step_block(const DdimStepParams& p, const Coeffs& c, int64_t begin, int64_t len) {
  const T* __restrict x = static_cast<const T*>(p.x) + begin;
  const T* __restrict eps = static_cast<const T*>(p.eps) + begin;
  const T* __restrict unc = kGuided ? static_cast<const T*>(p.eps_uncond) + begin : nullptr;
  const T* __restrict noise = kNoise ? static_cast<const T*>(p.noise) + begin : nullptr;
  T* __restrict x_prev = static_cast<T*>(p.x_prev) + begin;
  T* __restrict pred_x0 = static_cast<T*>(p.pred_x0) + begin;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    float e = to_float(eps[i]);
    if constexpr (kGuided) {
      const float u = to_float(unc[i]);
      e = u + c.g * (e - u);
    }
    // A division, not a multiply by 1/sqrt(a_t), to round as the reference does.
    const float x0 = (to_float(x[i]) - c.sqrt_1m_at * e) / c.sqrt_at;
    float xp = c.sqrt_aprev * x0 + c.dir * e;
    if constexpr (kNoise) xp += c.sigma * to_float(noise[i]);
    pred_x0[i] = from_float<T>(x0);
    x_prev[i] = from_float<T>(xp);
  }
}

template <typename T, bool kGuided, bool kNoise>
void run(const DdimStepParams& p) {
  const int64_t blocks = (p.M + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < p.N * blocks; ++t) {
    const int64_t n = t / blocks, m0 = (t % blocks) * kBlock;
    const Coeffs c = coeffs_of(p, n);
    step_block<T, kGuided, kNoise>(p, c, n * p.M + m0, std::min(kBlock, p.M - m0));
  }
}

}  // namespace

void ddim_step(const DdimStepParams& p) {
  if (p.N <= 0 || p.M <= 0) return;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool guided = p.eps_uncond != nullptr, noise = p.noise != nullptr;
    if (guided && noise) run<T, true, true>(p);
    else if (guided) run<T, true, false>(p);
    else if (noise) run<T, false, true>(p);
    else run<T, false, false>(p);
  });
}

}  // namespace ldmfast::cpu
