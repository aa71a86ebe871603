// The one schema file: every op of torch.ops.ldmfast, with its CPU implementation. The CUDA
// implementations live in cuda_ops.cpp, built as a separate library that a CPU-only torch never
// loads.
#include "op_params.h"

namespace ldmfast::binding {
namespace {

at::Tensor group_norm_silu_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                               int64_t num_groups, double eps, bool silu,
                               const std::optional<at::Tensor>& emb) {
  auto c = prepare_group_norm_silu(x, weight, bias, num_groups, eps, silu, emb);
  if (x.numel() > 0) cpu::group_norm_silu(c.p);
  return c.y;
}

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         std::optional<double> scale) {
  auto c = prepare_attention(q, k, v, scale);
  TORCH_CHECK_NOT_IMPLEMENTED(c.p.D <= cpu::kAttentionMaxHeadDim, "ldmfast.attention: head dim D=",
                              c.p.D, " is not supported on CPU (at most ", cpu::kAttentionMaxHeadDim, ")");
  if (c.o.numel() > 0) cpu::attention(c.p);
  return c.o;
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cpu(
    const at::Tensor& x, const at::Tensor& eps, const std::optional<at::Tensor>& eps_uncond,
    const std::optional<at::Tensor>& noise, double alpha_t, double alpha_prev, double sigma_t,
    double guidance_scale, const std::optional<at::Tensor>& alpha_t_t,
    const std::optional<at::Tensor>& alpha_prev_t, const std::optional<at::Tensor>& sigma_t_t,
    const std::optional<at::Tensor>& guidance_scale_t) {
  auto c = prepare_ddim_step(x, eps, eps_uncond, noise, alpha_t, alpha_prev, sigma_t, guidance_scale,
                             alpha_t_t, alpha_prev_t, sigma_t_t, guidance_scale_t);
  if (x.numel() > 0) cpu::ddim_step(c.p);
  return {c.x_prev, c.pred_x0};
}

at::Tensor geglu_cpu(const at::Tensor& h) {
  auto c = prepare_geglu(h);
  if (c.out.numel() > 0) cpu::geglu(c.p);
  return c.out;
}

}  // namespace
}  // namespace ldmfast::binding

TORCH_LIBRARY(ldmfast, m) {
  // silu(GroupNorm(x + emb)) with float32 statistics; y keeps x's memory format.
  m.def("group_norm_silu(Tensor x, Tensor weight, Tensor bias, int num_groups, float eps=1e-05, "
        "bool silu=True, Tensor? emb=None) -> Tensor");
  // softmax(scale q k^T) v on (B, L, H, D) tensors with a unit-stride last dim.
  m.def("attention(Tensor q, Tensor k, Tensor v, float? scale=None) -> Tensor");
  // DDIM step (Song et al. eq. 12) with guidance folded in; each scalar is a float or a tensor.
  m.def("ddim_step(Tensor x, Tensor eps, Tensor? eps_uncond, Tensor? noise, float alpha_t, "
        "float alpha_prev, float sigma_t, float guidance_scale, Tensor? alpha_t_t, "
        "Tensor? alpha_prev_t, Tensor? sigma_t_t, Tensor? guidance_scale_t) -> (Tensor, Tensor)");
  // h[..., :n] * gelu(h[..., n:]) with the exact (erf) GELU, float32 math: the FeedForward gate.
  m.def("geglu(Tensor h) -> Tensor");
}

TORCH_LIBRARY_IMPL(ldmfast, CPU, m) {
  m.impl("group_norm_silu", &ldmfast::binding::group_norm_silu_cpu);
  m.impl("attention", &ldmfast::binding::attention_cpu);
  m.impl("ddim_step", &ldmfast::binding::ddim_step_cpu);
  m.impl("geglu", &ldmfast::binding::geglu_cpu);
}
