// GEGLU (Shazeer 2020, "GLU variants"), the gate of the LDM transformer's feed-forward:
//   out[r, j] = h[r, j] * gelu(h[r, n + j]),   gelu(g) = g/2 (1 + erf(g / sqrt(2)))
// with the exact (erf) GELU of the original, in float32 whatever the storage type. h is the
// output of the FeedForward's projection (..., 2n), flattened to `rows` rows; the first half of
// a row is the value, the second the gate (torch.chunk(2, dim=-1) order). One read of h, one
// write of out: a memory-bound pass that replaces chunk + gelu + mul (three passes, one
// temporary).
#pragma once
#include "ldmfast/common.h"

namespace ldmfast {

struct GegluParams {
  const void* h;  // (rows, 2n), dtype, unit stride along a row, rows h_row_stride elements apart
  void* out;      // (rows, n) dense, dtype

  int64_t rows = 0;
  int64_t n = 0;             // output width; a row of h holds 2n elements
  int64_t h_row_stride = 0;  // elements between consecutive rows of h (>= 2n)
  DType dtype = DType::kFloat32;
};

namespace cpu {
void geglu(const GegluParams& p);
}
namespace cuda {
// Launches on `stream`; returns 0 on success or a cudaError_t value.
int geglu(const GegluParams& p, cudaStream_t stream);
}

}  // namespace ldmfast
