// CUDA implementations of torch.ops.ldmfast. Compiled by the host compiler with -DUSE_CUDA and
// no c10/cuda headers: the current stream and the device guard come from the AOTInductor C
// shim, whose declarations the CPU torch wheels ship as well.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>

#include <cstdlib>
#include <initializer_list>
#include <string>
#include <utility>

#include "op_params.h"

namespace ldmfast::binding {
namespace {

// Makes x's device current for the call and yields its current stream. An error that earlier
// CUDA work left pending is raised here, named as such: read after the launch, it would be
// reported as the launch's failure.
class CudaScope {
 public:
  CudaScope(const at::Tensor& t, const char* op) {
    const int32_t index = t.device().index();
    TORCH_CHECK(aoti_torch_create_cuda_guard(index, &guard_) == AOTI_TORCH_SUCCESS,
                "ldmfast: could not set the current CUDA device to ", index);
    void* s = nullptr;
    const int pending = cuda::take_last_error();
    if (pending != 0 || aoti_torch_get_current_cuda_stream(index, &s) != AOTI_TORCH_SUCCESS) {
      // A throwing constructor runs no destructor: restore the device before the error.
      aoti_torch_delete_cuda_guard(guard_);
      TORCH_CHECK(pending == 0, "ldmfast.", op, ": a CUDA error from earlier work was pending before this ",
                  "call (", cuda::error_string(pending), "); a kernel's fault shows at a later call, and ",
                  "CUDA_LAUNCH_BLOCKING=1 finds the kernel that made it");
      TORCH_CHECK(false, "ldmfast: could not get the current CUDA stream of device ", index);
    }
    stream_ = static_cast<cudaStream_t>(s);
  }
  ~CudaScope() { aoti_torch_delete_cuda_guard(guard_); }
  CudaScope(const CudaScope&) = delete;
  CudaScope& operator=(const CudaScope&) = delete;
  cudaStream_t stream() const { return stream_; }

 private:
  CUDAGuardHandle guard_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

// A kernel choice from the environment variable `name`, read at every call so that a benchmark
// can compare the kernels in one process: unset or "auto" is E::kDefault, else one of `names`.
template <class E>
E kernel_from_env(const char* name, const char* op, std::initializer_list<std::pair<const char*, E>> names) {
  const char* env = std::getenv(name);
  const std::string v = env == nullptr ? "" : env;
  if (v.empty() || v == "auto") return E::kDefault;
  std::string valid = "auto";
  for (const auto& [n, e] : names) {
    if (v == n) return e;
    valid += std::string(", ") + n;
  }
  TORCH_CHECK(false, "ldmfast.", op, ": ", name, " must be one of ", valid, "; got '", v, "'");
  return E::kDefault;  // not reached; older torch headers do not mark the throw [[noreturn]]
}

// See AttentionKernel in attention.h.
cuda::AttentionKernel attention_kernel_from_env() {
  using K = cuda::AttentionKernel;
  return kernel_from_env<K>("LDMFAST_ATTENTION_KERNEL", "attention",
                            {{"simt", K::kSimt}, {"mma", K::kMma}, {"mma_sync", K::kMmaSync}, {"mma_wide", K::kMmaWide}, {"fast", K::kFast}, {"wgmma", K::kWgmma}, {"wgmma_overlap", K::kWgmmaOverlap},
                             {"wgmma_pingpong", K::kWgmmaPingpong}, {"wgmma_pingpong_overlap", K::kWgmmaPingpongOverlap},
                             {"wgmma_pingpong3", K::kWgmmaPingpong3}, {"wgmma_pingpong3_overlap", K::kWgmmaPingpong3Overlap}});
}

// See GroupNormKernel in group_norm_silu.h (it only matters for large channels_last groups).
cuda::GroupNormKernel group_norm_kernel_from_env() {
  using K = cuda::GroupNormKernel;
  return kernel_from_env<K>("LDMFAST_GN_KERNEL", "group_norm_silu", {{"groups", K::kGroups}, {"rows", K::kRows}, {"cluster", K::kCluster}, {"held", K::kHeld}});
}

void check_launch(int err, const char* op) {
  if (err == 0) return;
  constexpr int kNoKernelImage = 209;  // cudaErrorNoKernelImageForDevice
  if (err == kNoKernelImage) {
    const std::string what = std::string("ldmfast.") + op + ": " + cuda::error_string(err);
    const int cc = cuda::device_compute_capability();
    TORCH_CHECK(cc > 0, what, " (the kernels were built for LDMFAST_CUDA_ARCHS=\"", cuda::built_archs(),
                "\"; the device's compute capability could not be read)");
    // The kernels use sm_80 instructions (mma.sync m16n8k16, cp.async, bf16): no rebuild helps.
    TORCH_CHECK(cc >= 80, what, ". ldmfast's CUDA kernels need compute capability 8.0 or newer and this ",
                "device is sm_", cc, "; ldmfast.models.use_reference_ops(True) runs the models with PyTorch ops instead");
    TORCH_CHECK(false, what, ". The kernels were built for LDMFAST_CUDA_ARCHS=\"", cuda::built_archs(),
                "\" and this device is sm_", cc, "; rebuild with LDMFAST_CUDA_ARCHS=\"", cc,
                "\" (pip install --no-build-isolation -e .)");
  }
  TORCH_CHECK(false, "ldmfast.", op, ": CUDA kernel launch failed (", cuda::error_string(err), ")");
}

at::Tensor group_norm_silu_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                int64_t num_groups, double eps, bool silu,
                                const std::optional<at::Tensor>& emb) {
  CudaScope scope(x, "group_norm_silu");
  const cuda::GroupNormKernel kernel = group_norm_kernel_from_env();
  auto c = prepare_group_norm_silu(x, weight, bias, num_groups, eps, silu, emb);
  if (x.numel() == 0) return c.y;
  // The rows kernels' per-chunk statistics: from torch's caching allocator, so the call stays
  // capturable in a CUDA graph and the memory is reused across calls.
  const int64_t ws_bytes = cuda::group_norm_silu_workspace_bytes(c.p, kernel);
  at::Tensor ws;
  if (ws_bytes > 0) ws = at::empty({ws_bytes}, x.options().dtype(at::kByte));
  check_launch(cuda::group_norm_silu(c.p, scope.stream(), ws_bytes > 0 ? ws.data_ptr() : nullptr, kernel),
               "group_norm_silu");
  return c.y;
}

at::Tensor attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          std::optional<double> scale) {
  CudaScope scope(q, "attention");
  auto c = prepare_attention(q, k, v, scale);
  TORCH_CHECK_NOT_IMPLEMENTED(cuda::attention_supports_head_dim(c.p.D), "ldmfast.attention: head dim D=",
                              c.p.D, " is not supported by the CUDA kernel (supported: 32, 40, 64, 80, "
                              "96, 128, 160)");
  const cuda::AttentionKernel kernel = attention_kernel_from_env();
  if (c.o.numel() > 0) check_launch(cuda::attention(c.p, scope.stream(), kernel), "attention");
  return c.o;
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cuda(
    const at::Tensor& x, const at::Tensor& eps, const std::optional<at::Tensor>& eps_uncond,
    const std::optional<at::Tensor>& noise, double alpha_t, double alpha_prev, double sigma_t,
    double guidance_scale, const std::optional<at::Tensor>& alpha_t_t,
    const std::optional<at::Tensor>& alpha_prev_t, const std::optional<at::Tensor>& sigma_t_t,
    const std::optional<at::Tensor>& guidance_scale_t) {
  CudaScope scope(x, "ddim_step");
  auto c = prepare_ddim_step(x, eps, eps_uncond, noise, alpha_t, alpha_prev, sigma_t, guidance_scale,
                             alpha_t_t, alpha_prev_t, sigma_t_t, guidance_scale_t);
  if (x.numel() > 0) check_launch(cuda::ddim_step(c.p, scope.stream()), "ddim_step");
  return {c.x_prev, c.pred_x0};
}

at::Tensor geglu_cuda(const at::Tensor& h) {
  CudaScope scope(h, "geglu");
  auto c = prepare_geglu(h);
  if (c.out.numel() > 0) check_launch(cuda::geglu(c.p, scope.stream()), "geglu");
  return c.out;
}

}  // namespace
}  // namespace ldmfast::binding

TORCH_LIBRARY_IMPL(ldmfast, CUDA, m) {
  m.impl("group_norm_silu", &ldmfast::binding::group_norm_silu_cuda);
  m.impl("attention", &ldmfast::binding::attention_cuda);
  m.impl("ddim_step", &ldmfast::binding::ddim_step_cuda);
  m.impl("geglu", &ldmfast::binding::geglu_cuda);
}
