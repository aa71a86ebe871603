// GroupNorm (+ optional per-(n, c) add before it, + optional SiLU after it), the op that runs
// before almost every convolution of an LDM. Statistics are float32 whatever the storage type,
// as the original GroupNorm32 of latent-diffusion.
#pragma once
#include "ldmfast/common.h"

namespace ldmfast {

struct GroupNormSiluParams {
  const void* x;       // input, N x C x S elements (S = product of the spatial sizes), dtype;
                       // memory order (N, C, S) when !channels_last, (N, S, C) when channels_last
  const void* emb;     // optional (N, C) dense, dtype; added to x before normalisation
                       // (the U-Net ResBlock's time embedding), nullptr when absent
  const void* weight;  // (C,) dense, param_dtype (gamma)
  const void* bias;    // (C,) dense, param_dtype (beta)
  void* y;             // output, same shape and memory order as x, dtype

  int64_t N = 0;       // batch
  int64_t C = 0;       // channels, divisible by G
  int64_t S = 0;       // spatial positions per image (>= 1)
  int64_t G = 0;       // groups
  float eps = 1e-5f;   // added to the variance (1e-5 in the U-Net, 1e-6 in the autoencoder)
  bool silu = true;    // apply y = y * sigmoid(y) after the affine transform
  bool channels_last = false;
  DType dtype = DType::kFloat32;        // of x, emb, y
  DType param_dtype = DType::kFloat32;  // of weight and bias: dtype or float32
};

namespace cpu {
void group_norm_silu(const GroupNormSiluParams& p);
}
namespace cuda {
// Which kernel normalises channels_last groups too large for one CTA's shared memory (smaller
// groups, and every NCHW group, always take the single-CTA or cluster kernels):
//   kGroups  one cluster of CTAs per group, reading the group's channels strided C apart
//   kRows    whole pixel rows of all channels, read coalesced, in two launches that meet in
//            `workspace` (a group's Cg channels are often narrower than a 32-byte sector)
//   kHeld    whole pixel rows read once into registers by one cooperative launch of at most the
//            CTAs resident at once, which meet in `workspace` at a grid barrier; only for x that
//            those CTAs can hold (128 KB each), cudaErrorNotSupported otherwise
// kDefault is kHeld where it holds x and a workspace is given, else kRows when a workspace is
// given and the image has 256 x 256 pixels or more (where rows measured faster than groups),
// else kGroups. kCluster (for tests: proof the path ran) is kGroups with every group split over
// a cluster of at least two CTAs that merge through distributed shared memory, for NCHW too;
// cudaErrorNotSupported where that launch is not possible (a group that fits one CTA, a device
// before sm_90).
enum class GroupNormKernel : int32_t { kDefault = 0, kGroups, kRows, kCluster, kHeld };
// Bytes of device workspace that `kernel` needs for p (0: none); depends on the current device.
int64_t group_norm_silu_workspace_bytes(const GroupNormSiluParams& p,
                                        GroupNormKernel kernel = GroupNormKernel::kDefault);
// Launches on `stream`; returns 0 on success or a cudaError_t value. `workspace` holds at least
// group_norm_silu_workspace_bytes(p, kernel) bytes, 16-byte aligned, or is nullptr when that is 0.
// y must not overlap x: every CTA of a group reads the group's first element of x, which another
// CTA may already have overwritten in y.
int group_norm_silu(const GroupNormSiluParams& p, cudaStream_t stream, void* workspace = nullptr,
                    GroupNormKernel kernel = GroupNormKernel::kDefault);
}

}  // namespace ldmfast
