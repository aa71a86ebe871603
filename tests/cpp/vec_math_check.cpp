// Accuracy of csrc/cpu/vec_math.h against double-precision libm, evaluated in vectorised loops
// as the kernels call it. Prints one "name max_ulp" line per function and special-value checks;
// tests/test_vec_math.py compiles this with the kernels' flags and checks the numbers.
#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "vec_math.h"

using namespace ldmfast::cpu;

// |got - want| in units of the float spacing at want (subnormal spacing below 2^-126).
static double ulp_error(float got, double want) {
  const double w = std::fabs(want);
  const double spacing = w < 0x1p-126 ? 0x1p-149 : std::ldexp(1.0, std::ilogb(w) - 23);
  return std::fabs(static_cast<double>(got) - want) / spacing;
}

template <class F, class R>
static double max_ulp(double lo, double hi, int n, F f, R ref) {
  std::vector<float> x(n), y(n);
  for (int i = 0; i < n; ++i) x[i] = static_cast<float>(lo + (hi - lo) * i / (n - 1));
#pragma omp simd
  for (int i = 0; i < n; ++i) y[i] = f(x[i]);
  double worst = 0;
  for (int i = 0; i < n; ++i) worst = std::fmax(worst, ulp_error(y[i], ref(static_cast<double>(x[i]))));
  return worst;
}

int main() {
  const int n = 1 << 21;
  auto exp2d = [](double v) { return std::exp2(v); };
  auto expd = [](double v) { return std::exp(v); };
  std::printf("exp2_nonpositive %.3f\n", max_ulp(-126.0, 0.0, n, [](float v) { return exp2_nonpositive(v); }, exp2d));
  std::printf("exp2_nonpositive_unit %.3f\n", max_ulp(-1.0, 0.0, n, [](float v) { return exp2_nonpositive(v); }, exp2d));
  std::printf("exp2_approx %.3f\n", max_ulp(-126.0, 127.0, n, [](float v) { return exp2_approx(v); }, exp2d));
  std::printf("exp_approx %.3f\n", max_ulp(-87.0, 88.0, n, [](float v) { return exp_approx(v); }, expd));
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  std::printf("special %d %d %d %d %d\n", exp2_nonpositive(0.0f) == 1.0f, exp2_nonpositive(-inf) == 0.0f,
              std::isnan(exp2_nonpositive(nan)), exp2_nonpositive(-127.5f) == 0.0f,
              exp2_approx(-inf) == 0.0f && exp2_approx(inf) == inf && std::isnan(exp2_approx(nan)));
}
