// Scaled dot-product attention, O = softmax(scale * Q K^T) V, per batch and head, in the layout a
// linear projection produces: (B, L, H, D) with the last dim contiguous and the other strides
// free, so q, k and v may be views of one fused QKV projection. No mask: LDM attention has none.
#pragma once
#include "ldmfast/common.h"

namespace ldmfast {

struct AttentionParams {
  const void* q;  // (B, Lq, H, D), strides q_stride_{b,l,h}, unit stride on D, dtype
  const void* k;  // (B, Lk, H, D), strides k_stride_{b,l,h}, unit stride on D, dtype
  const void* v;  // (B, Lk, H, D), strides v_stride_{b,l,h}, unit stride on D, dtype
  void* o;        // (B, Lq, H, D), strides o_stride_{b,l,h}, unit stride on D, dtype
  float* lse;     // optional (B, H, Lq) dense float32: log-sum-exp of the scaled scores, for a
                  // backward pass; nullptr when not wanted

  int64_t B = 0, Lq = 0, Lk = 0, H = 0, D = 0;
  // Strides in elements.
  int64_t q_stride_b = 0, q_stride_l = 0, q_stride_h = 0;
  int64_t k_stride_b = 0, k_stride_l = 0, k_stride_h = 0;
  int64_t v_stride_b = 0, v_stride_l = 0, v_stride_h = 0;
  int64_t o_stride_b = 0, o_stride_l = 0, o_stride_h = 0;
  float scale = 1.0f;  // usually D**-0.5
  DType dtype = DType::kFloat32;
};

namespace cpu {
constexpr int64_t kAttentionMaxHeadDim = 512;  // the autoencoders' mid-block attention has one head of 512
void attention(const AttentionParams& p);
}
namespace cuda {
// Head dims the CUDA kernel is instantiated for; anything else is refused by the binding.
bool attention_supports_head_dim(int64_t d);
// Which kernel runs float16 / bfloat16 (float32 always takes the SIMT kernel):
//   kSimt     float32 FMA on the CUDA cores, the checked reference path
//   kMma      tensor cores, FlashAttention-2 style, K/V loads overlapped with cp.async
//   kMmaSync  the same with synchronous loads
//   kMmaWide  kMma with 32 query rows per warp instead of 16 (head dims up to 80; else kMma)
//   kFast     tensor cores: the short-context kernel when Lk <= 80, else kMma
//   kWgmma    Hopper warpgroup MMA (sm_90 device, library built with sm_90a); elsewhere kMma
//   kWgmmaOverlap  kWgmma with P V overlapping the next tile's softmax (head dims up to 80; else kWgmma)
//   kWgmmaPingpong  kWgmma fed by a producer warpgroup, its two warpgroups taking turns on the tensor cores
//   kWgmmaPingpongOverlap  both (head dims up to 80; else kWgmmaPingpong)
//   kWgmmaPingpong3  kWgmmaPingpong with three computing warpgroups, 192 queries a CTA (head dims
//                    up to 96; else kWgmmaPingpong)
//   kWgmmaPingpong3Overlap  kWgmmaPingpong3 with the overlap, FlashAttention-3's forward
//                    configuration for small head dims (up to 64; else kWgmmaPingpong3)
// kDefault picks one of the tensor-core kernels by Lq, Lk and D (the table in attention.cu,
// measured on an H100).
enum class AttentionKernel : int32_t {
  kDefault = 0, kSimt, kMma, kMmaSync, kFast, kMmaWide, kWgmma, kWgmmaOverlap, kWgmmaPingpong, kWgmmaPingpongOverlap,
  kWgmmaPingpong3, kWgmmaPingpong3Overlap
};
// Launches on `stream`; returns 0 on success or a cudaError_t value.
int attention(const AttentionParams& p, cudaStream_t stream, AttentionKernel kernel = AttentionKernel::kDefault);
}

}  // namespace ldmfast
