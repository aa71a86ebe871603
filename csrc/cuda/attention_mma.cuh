// Tensor-core (mma.sync m16n8k16) attention for float16 / bfloat16, declared apart from the
// contract: it is an alternative implementation of ldmfast::cuda::attention, reached only through
// the opt-in in attention.cu until it has passed the parity tests on a GPU.
#pragma once
#include "ldmfast/attention.h"

namespace ldmfast::cuda {

// True when attention_mma can run `p` (float16 / bfloat16 and a supported head dim).
bool attention_mma_supports(const AttentionParams& p);
// Same contract as attention(): launches on `stream`, returns 0 or a cudaError_t value.
// `pipelined`: cp.async loads of K and V overlap the math (else synchronous loads).
int attention_mma(const AttentionParams& p, cudaStream_t stream, bool pipelined = true);

}  // namespace ldmfast::cuda
