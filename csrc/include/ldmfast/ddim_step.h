// One DDIM update (Song et al. 2021, eq. 12), with classifier-free guidance folded in:
//   e       = eps_uncond + g (eps - eps_uncond)      (e = eps when eps_uncond is absent)
//   pred_x0 = (x - sqrt(1 - a_t) e) / sqrt(a_t)
//   x_prev  = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev - sigma_t^2) e + sigma_t noise
// a_t and a_prev are cumulative products of (1 - beta). Every scalar is either a value or a
// float32 array in the kernel's memory (length 1, or N for per-sample values), so a sampling loop
// on the GPU can read its schedule from device memory and be captured in a CUDA graph.
#pragma once
#include "ldmfast/common.h"

namespace ldmfast {

struct DdimScalar {
  const float* ptr = nullptr;  // nullptr: use value; else float32 array, (1,) or (N,) dense
  int64_t count = 1;           // 1 (broadcast over the batch) or N (one per sample)
  float value = 0.0f;
};

struct DdimStepParams {
  const void* x;           // (N, M) dense, dtype: the current latent x_t, M elements per sample
  const void* eps;         // (N, M) dense, dtype: predicted noise (conditional one under guidance)
  const void* eps_uncond;  // optional (N, M) dense, dtype: unconditional prediction, or nullptr
  const void* noise;       // optional (N, M) dense, dtype: fresh noise for sigma_t > 0, or nullptr
  void* x_prev;            // (N, M) dense, dtype
  void* pred_x0;           // (N, M) dense, dtype

  int64_t N = 0;  // batch
  int64_t M = 0;  // elements per sample
  DdimScalar alpha_t, alpha_prev, sigma_t, guidance_scale;
  DType dtype = DType::kFloat32;
};

namespace cpu {
void ddim_step(const DdimStepParams& p);
}
namespace cuda {
// Launches on `stream`; returns 0 on success or a cudaError_t value.
int ddim_step(const DdimStepParams& p, cudaStream_t stream);
}

}  // namespace ldmfast
