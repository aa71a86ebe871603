// What the GroupNorm+SiLU sources share: the kernel arguments, the channels_last group shift, and
// the host entry points of the rows path (group_norm_silu_rows.cu) and the held path
// (group_norm_silu_held.cu), called by the dispatcher in group_norm_silu.cu.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
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

// channels_last: the first element (pixel 0, after the emb add) of the group holding channel c of
// sample n. The rows and held kernels take the statistics about it, so that they stay small when
// the mean is large against the spread, and a float mean near 1000 does not round away the digits
// the output needs.
template <class T>
__device__ __forceinline__ float cl_group_shift(const GnArgs& a, int64_t n, int64_t c) {
  const int64_t first = c - c % a.Cg;
  float v = to_float(static_cast<const T*>(a.x)[n * a.CS + first]);
  if (a.emb != nullptr) v += to_float(static_cast<const T*>(a.emb)[n * a.C + first]);
  return v;
}

// Whether the rows kernels take p (16-byte columns of whole channels, aligned); p is already
// checked (N, C, S > 0, C % G == 0) by the caller.
bool rows_supported(const GroupNormSiluParams& p);
// Workspace bytes of the rows path for p; p must be rows_supported.
int64_t rows_workspace_bytes(const GroupNormSiluParams& p);
int group_norm_silu_rows(const GroupNormSiluParams& p, const GnArgs& a, void* workspace, cudaStream_t stream);

// Whether the held kernel takes p on the current device: channels_last, 16-byte columns of whole
// channels, a device with cooperative launch, and x small enough for the CTAs resident at once to
// hold it in registers and shared memory, with at most L2's size more streamed. p is already
// checked (N, C, S > 0, C % G == 0) by the caller.
bool held_supported(const GroupNormSiluParams& p);
// Workspace bytes of the held path for p; p must be held_supported.
int64_t held_workspace_bytes(const GroupNormSiluParams& p);
// cudaErrorCooperativeLaunchTooLarge (cleared, nothing launched) when the device would not take
// the grid as a cooperative launch after all (a share of the SMs under MPS, say).
int group_norm_silu_held(const GroupNormSiluParams& p, const GnArgs& a, void* workspace, cudaStream_t stream);

}  // namespace ldmfast::cuda::detail
