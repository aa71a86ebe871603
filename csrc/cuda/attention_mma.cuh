// The tensor-core attention kernels, declared apart from the contract: alternative
// implementations of ldmfast::cuda::attention for float16 / bfloat16 that attention.cu reaches
// through AttentionKernel until they have passed the parity tests on a GPU.
#pragma once
#include "ldmfast/attention.h"

namespace ldmfast::cuda {

// True when attention_mma can run `p` (float16 / bfloat16 and a supported head dim).
bool attention_mma_supports(const AttentionParams& p);
// Same contract as attention(): launches on `stream`, returns 0 or a cudaError_t value.
// `pipelined`: cp.async loads of K and V overlap the math (else synchronous loads).
int attention_mma(const AttentionParams& p, cudaStream_t stream, bool pipelined = true);

// True when attention_short can run `p`: attention_mma_supports and 1 <= Lk <= 80.
bool attention_short_supports(const AttentionParams& p);
// The short-context (cross-attention) kernel: K and V in shared memory, Q streamed once.
int attention_short(const AttentionParams& p, cudaStream_t stream);

}  // namespace ldmfast::cuda
