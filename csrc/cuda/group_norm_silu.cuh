// What the two GroupNorm+SiLU sources share: the kernel arguments and the rows path's host entry
// points (group_norm_silu_rows.cu), called by the dispatcher in group_norm_silu.cu.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "ldmfast/group_norm_silu.h"

namespace ldmfast::cuda::detail {

struct GnArgs {
  const void* x;
  const void* emb;
  const void* w;
  const void* b;
  void* y;
  int64_t C, S, G, Cg, E, CS;  // E = Cg * S elements per group, CS = C * S per sample
  float eps;
  bool silu;
  bool evict_first;  // x is larger than L2: the second pass stores y evict-first (st.global.cs)
};

// Groups of at most this many elements are normalised by one CTA from shared memory: 47 KB of
// float, which with the static reduction scratch stays inside the 48 KB a CTA gets without opting
// in to more.
constexpr int64_t kFusedMaxElems = 12032;

// Whether the rows kernels take p (16-byte columns of whole channels, aligned); p is already
// checked (N, C, S > 0, C % G == 0) by the caller.
bool rows_supported(const GroupNormSiluParams& p);
// Workspace bytes of the rows path for p; p must be rows_supported.
int64_t rows_workspace_bytes(const GroupNormSiluParams& p);
int group_norm_silu_rows(const GroupNormSiluParams& p, const GnArgs& a, void* workspace, cudaStream_t stream);

}  // namespace ldmfast::cuda::detail
