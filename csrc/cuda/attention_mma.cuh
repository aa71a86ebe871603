// Internal to the CUDA attention kernels: the head-dim dispatch they share, and the tensor-core
// kernels, declared apart from the contract: alternative
// implementations of ldmfast::cuda::attention for float16 / bfloat16 that attention.cu reaches
// through AttentionKernel until they have passed the parity tests on a GPU.
#pragma once
#include <cuda_runtime.h>

#include <type_traits>

#include "ldmfast/attention.h"

namespace ldmfast::cuda {

// The one list of head dims the attention kernels are instantiated for: calls
// f(std::integral_constant<int, D>{}) for a supported d, else returns cudaErrorInvalidValue.
template <class F>
int with_head_dim(int64_t d, F&& f) {
  switch (d) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 40: return f(std::integral_constant<int, 40>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 80: return f(std::integral_constant<int, 80>{});
    case 96: return f(std::integral_constant<int, 96>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 160: return f(std::integral_constant<int, 160>{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

// True when attention_mma can run `p` (float16 / bfloat16, a supported head dim, and a scale
// above 0: a zero or negative one, which no LDM uses, runs the SIMT kernel).
bool attention_mma_supports(const AttentionParams& p);
// Same contract as attention(): launches on `stream`, returns 0 or a cudaError_t value.
// `pipelined`: cp.async loads of K and V overlap the math (else synchronous loads).
int attention_mma(const AttentionParams& p, cudaStream_t stream, bool pipelined = true);

// The wide variant: 2 tiles of 16 query rows per warp, so each K and V fragment read from shared
// memory feeds twice the mma (pipelined loads). Only up to this head dim: D = 80 takes 254
// registers on sm_90a and D = 96 the whole 255 (no spill yet, but nothing left for the
// scheduler), so past it the one-tile kernel is the better bet.
constexpr int64_t kWideMaxHeadDim = 80;
bool attention_mma_wide_supports(const AttentionParams& p);
int attention_mma_wide(const AttentionParams& p, cudaStream_t stream);

// True when attention_short can run `p`: attention_mma_supports and 1 <= Lk <= 80.
bool attention_short_supports(const AttentionParams& p);
// The short-context (cross-attention) kernel: K and V in shared memory, Q streamed once.
int attention_short(const AttentionParams& p, cudaStream_t stream);

// The Hopper kernel (wgmma.mma_async): usable when the current device is sm_90 and the library
// holds sm_90a code (the CPU emulator: always). Same contract as attention_mma.
// `overlap`: P V of each key tile runs during the next tile's softmax (head dims up to
// kWgmmaOverlapMaxHeadDim: SD's self-attention head dims up to 80 are what it is instantiated
// for; larger ones would fit in registers too). `pingpong`: a producer warpgroup loads and the computing
// warpgroups take turns on the tensor cores. `groups`: 2 computing warpgroups (128 query rows a
// CTA), or 3 (192 rows; ping-pong only, head dims up to kWgmma3MaxHeadDim, with overlap up to
// kWgmma3OverlapMaxHeadDim, whose registers fit in the 160 a thread left to each).
constexpr int64_t kWgmmaOverlapMaxHeadDim = 80;
constexpr int64_t kWgmma3MaxHeadDim = 96;
constexpr int64_t kWgmma3OverlapMaxHeadDim = 64;
bool attention_wgmma_usable();
int attention_wgmma(const AttentionParams& p, cudaStream_t stream, bool overlap = false, bool pingpong = false,
                    int groups = 2);

}  // namespace ldmfast::cuda
