// GEGLU, out = a * gelu(g) with the exact (erf) GELU, a and g the two halves of a row of h: one
// read of h and one write of out, 16-byte accesses when the row layout allows them.
#include "common.cuh"
#include "ldmfast/geglu.h"

namespace ldmfast::cuda {
namespace {

using namespace detail;

constexpr int kMaxThreads = 256;
constexpr int64_t kMaxGrid = 0x7fffffff;  // gridDim.x limit

// g/2 (1 + erf(g / sqrt 2)). Above g = -3 that is erff as written: 1 + erf cancels as g falls
// (relative error 1 by g = -5.7, as PyTorch's GELU has it), but down to -3 it keeps the absolute
// error under 2e-7. From -3 down it is g/2 erfc(z), z = |g| / sqrt 2, where erfcf of the rounded z
// would still be off by z^2 * 1.2e-7 relative (1e-5 at g = -13). So the tail is
// exp(-g^2 / 2) erfcx(z): erfcx is smooth, and exp's argument is formed from g with the FMA
// residual of g*g, as the CPU kernel does (< 1e-6 relative down to float32's smallest normal
// numbers; test_gelu_accuracy_over_the_whole_range). The split at -3 rather than 0 keeps the
// tail's exp and erfcx off the common path: each element's branch diverges only where a lane's
// gate is below -3 (0.1% of normal gates), not for half of them; the H100 ran the split at 0 at
// 48% of the copy bandwidth (commit 3ca7a93, 8192x2560 fp16), torch.compile's GELU at 94%.
__device__ __forceinline__ float gelu_erf(float g) {
  constexpr float kRsqrt2 = 0.707106781186547524f;
  if (g > -3.0f) return 0.5f * g * (1.0f + erff(g * kRsqrt2));
  const float a = fminf(-g, 20.0f);  // exp(-a^2/2) is 0 in float past 20; a NaN g stays in g
  const float aa = a * a;
  const float aa_err = fmaf(a, a, -aa);  // a*a - aa, exactly
  return 0.5f * g * (expf(-0.5f * aa) * (1.0f - 0.5f * aa_err) * erfcxf(a * kRsqrt2));
}

// The grid is col_blocks x row_groups CTAs, in one dimension (so rows are not limited to 65535):
// a CTA covers one block of a row's items of V elements, for the rows r = group, group +
// row_groups, ... (one division per thread, none per item). The block is as wide as a row's
// items split evenly over the fewest blocks of at most kMaxThreads, in whole warps: the U-Net's
// 160 items (n = 1280, fp16) take one block of 160 threads, not 256 with 96 idle. With V > 1, n and the row stride
// are multiples of V and both pointers 16-byte aligned, so every vector lies inside one half of
// one row.
template <class T, int V>
__global__ void __launch_bounds__(kMaxThreads) geglu_kernel(const GegluParams p, int64_t col_blocks) {
  const T* h = static_cast<const T*>(p.h);
  T* out = static_cast<T*>(p.out);
  const int64_t row_groups = gridDim.x / col_blocks;
  const int64_t group = blockIdx.x / col_blocks;
  const int64_t col = ((blockIdx.x - group * col_blocks) * blockDim.x + threadIdx.x) * V;
  if (col >= p.n) return;
  for (int64_t r = group; r < p.rows; r += row_groups) {
    const T* row = h + r * p.h_row_stride;
    float a[V], g[V], o[V];
    load_vec<T, V>(row + col, a);
    load_vec<T, V>(row + p.n + col, g);
#pragma unroll
    for (int j = 0; j < V; ++j) o[j] = a[j] * gelu_erf(g[j]);
    store_vec<T, V>(out + r * p.n + col, o);
  }
}

template <class T>
int launch(const GegluParams& p, cudaStream_t stream) {
  constexpr int V = kVec16<T>;
  const bool vec = p.n % V == 0 && p.h_row_stride % V == 0 && aligned16(p.h) && aligned16(p.out);
  const int64_t items = ceil_div(p.n, static_cast<int64_t>(vec ? V : 1));
  const int64_t col_blocks = ceil_div(items, static_cast<int64_t>(kMaxThreads));
  const unsigned threads = static_cast<unsigned>(ceil_div(ceil_div(items, col_blocks), int64_t{32}) * 32);
  // One CTA per (column block, row) up to the grid limit; rows beyond it are strided over.
  const int64_t row_groups = imin(p.rows, kMaxGrid / col_blocks);
  const unsigned grid = static_cast<unsigned>(col_blocks * row_groups);
  if (vec)
    geglu_kernel<T, V><<<grid, threads, 0, stream>>>(p, col_blocks);
  else
    geglu_kernel<T, 1><<<grid, threads, 0, stream>>>(p, col_blocks);
  return launch_status();
}

}  // namespace

int geglu(const GegluParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.n <= 0) return 0;
  switch (p.dtype) {
    case DType::kFloat32: return launch<float>(p, stream);
    case DType::kFloat16: return launch<__half>(p, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace ldmfast::cuda
