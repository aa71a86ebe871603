// Argument checking and params filling shared by the CPU and CUDA bindings. The only place,
// with the other files of csrc/torch/, where torch headers appear. Every check names the
// argument and what was expected; problems with the arguments raise ValueError, unsupported
// but well-formed requests raise NotImplementedError (a RuntimeError in Python).
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "ldmfast/attention.h"
#include "ldmfast/ddim_step.h"
#include "ldmfast/geglu.h"
#include "ldmfast/group_norm_silu.h"

namespace ldmfast::binding {

inline DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_NOT_IMPLEMENTED(false, name, " has dtype ", t.scalar_type(),
                                  "; supported dtypes are float32, float16 and bfloat16");
  }
  return DType::kFloat32;
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "ldmfast: ", bn, " is on ", b.device(), " but ", an,
                    " is on ", a.device(), "; all tensor arguments must be on one device");
}

// Set LDMFAST_POISON_OUTPUTS=1 (the tests do) to fill outputs with NaN before a kernel runs, so
// an element the kernel fails to write shows up as NaN instead of stale memory.
inline void maybe_poison(at::Tensor& t) {
  const char* env = std::getenv("LDMFAST_POISON_OUTPUTS");
  if (env != nullptr && env[0] == '1') t.fill_(std::numeric_limits<float>::quiet_NaN());
}

// Output layout rule, mirrored by ldmfast/ops/_fake.py: channels_last iff x is dense in that
// order and not plain contiguous; anything else is computed from a contiguous copy.
inline bool is_channels_last(const at::Tensor& x) {
  if (x.is_contiguous()) return false;
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

inline at::MemoryFormat format_of(const at::Tensor& x) {
  if (!is_channels_last(x)) return at::MemoryFormat::Contiguous;
  return x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
}

// ---- group_norm_silu ---------------------------------------------------------------------------

struct GroupNormSiluCall {
  at::Tensor x, weight, bias, emb, y;  // kept alive for the kernel
  GroupNormSiluParams p;
};

inline GroupNormSiluCall prepare_group_norm_silu(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                 const at::Tensor& bias_in, int64_t num_groups,
                                                 double eps, bool silu,
                                                 const std::optional<at::Tensor>& emb_in) {
  GroupNormSiluCall c;
  TORCH_CHECK_VALUE(x_in.dim() >= 2, "ldmfast.group_norm_silu: x must be (N, C, *spatial), got a ",
                    x_in.dim(), "-d tensor of shape ", x_in.sizes());
  c.p.dtype = to_dtype(x_in, "ldmfast.group_norm_silu: x");
  const int64_t N = x_in.size(0), C = x_in.size(1);
  TORCH_CHECK_VALUE(num_groups > 0, "ldmfast.group_norm_silu: num_groups must be positive, got ", num_groups);
  TORCH_CHECK_VALUE(C % num_groups == 0, "ldmfast.group_norm_silu: the channel count C=", C,
                    " of x is not divisible by num_groups=", num_groups);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "ldmfast.group_norm_silu: eps must be finite and >= 0, got ", eps);
  for (auto [t, name] : {std::pair{&weight_in, "weight"}, std::pair{&bias_in, "bias"}}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == C, "ldmfast.group_norm_silu: ", name,
                      " must have shape (C,) = (", C, ",), got ", t->sizes());
    check_same_device(x_in, "x", *t, name);
    TORCH_CHECK_VALUE(t->scalar_type() == x_in.scalar_type() || t->scalar_type() == at::kFloat,
                      "ldmfast.group_norm_silu: ", name, " has dtype ", t->scalar_type(),
                      "; it must be x's dtype (", x_in.scalar_type(), ") or float32");
  }
  TORCH_CHECK_VALUE(weight_in.scalar_type() == bias_in.scalar_type(),
                    "ldmfast.group_norm_silu: weight (", weight_in.scalar_type(), ") and bias (",
                    bias_in.scalar_type(), ") must have the same dtype");
  const at::MemoryFormat fmt = format_of(x_in);
  c.x = x_in.contiguous(fmt);
  c.weight = weight_in.contiguous();
  c.bias = bias_in.contiguous();
  if (emb_in.has_value()) {
    const at::Tensor& e = *emb_in;
    check_same_device(x_in, "x", e, "emb");
    TORCH_CHECK_VALUE(e.scalar_type() == x_in.scalar_type(), "ldmfast.group_norm_silu: emb has dtype ",
                      e.scalar_type(), " but x has ", x_in.scalar_type());
    bool ok = e.dim() >= 2 && e.size(0) == N && e.size(1) == C;
    for (int64_t d = 2; ok && d < e.dim(); ++d) ok = e.size(d) == 1;
    TORCH_CHECK_VALUE(ok, "ldmfast.group_norm_silu: emb must be (N, C) = (", N, ", ", C,
                      ") (optionally followed by size-1 dims), got ", e.sizes());
    c.emb = e.reshape({N, C}).contiguous();
  }
  c.y = at::empty(x_in.sizes(), x_in.options().memory_format(fmt));
  maybe_poison(c.y);
  auto& p = c.p;
  p.x = c.x.data_ptr();
  p.emb = c.emb.defined() ? c.emb.data_ptr() : nullptr;
  p.weight = c.weight.data_ptr();
  p.bias = c.bias.data_ptr();
  p.y = c.y.data_ptr();
  p.N = N;
  p.C = C;
  p.S = N * C == 0 ? 0 : x_in.numel() / (N * C);
  p.G = num_groups;
  p.eps = static_cast<float>(eps);
  p.silu = silu;
  p.channels_last = fmt != at::MemoryFormat::Contiguous;
  p.param_dtype = to_dtype(c.weight, "ldmfast.group_norm_silu: weight");
  return c;
}

// ---- attention ---------------------------------------------------------------------------------

struct AttentionCall {
  at::Tensor q, k, v, o;
  AttentionParams p;
};

inline at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.stride(-1) == 1 || t.size(-1) == 1 ? t : t.contiguous();
}

inline AttentionCall prepare_attention(const at::Tensor& q_in, const at::Tensor& k_in,
                                       const at::Tensor& v_in, std::optional<double> scale) {
  AttentionCall c;
  for (auto [t, name] : {std::pair{&q_in, "q"}, std::pair{&k_in, "k"}, std::pair{&v_in, "v"}}) {
    TORCH_CHECK_VALUE(t->dim() == 4, "ldmfast.attention: ", name, " must be (B, L, H, D), got a ",
                      t->dim(), "-d tensor of shape ", t->sizes());
    TORCH_CHECK_VALUE(t->scalar_type() == q_in.scalar_type(), "ldmfast.attention: ", name,
                      " has dtype ", t->scalar_type(), " but q has ", q_in.scalar_type());
    check_same_device(q_in, "q", *t, name);
  }
  c.p.dtype = to_dtype(q_in, "ldmfast.attention: q");
  const int64_t B = q_in.size(0), Lq = q_in.size(1), H = q_in.size(2), D = q_in.size(3);
  const int64_t Lk = k_in.size(1);
  TORCH_CHECK_VALUE(k_in.size(0) == B && v_in.size(0) == B, "ldmfast.attention: batch sizes differ: q ",
                    B, ", k ", k_in.size(0), ", v ", v_in.size(0));
  TORCH_CHECK_VALUE(k_in.size(2) == H && v_in.size(2) == H, "ldmfast.attention: head counts differ: q ",
                    H, ", k ", k_in.size(2), ", v ", v_in.size(2));
  TORCH_CHECK_VALUE(k_in.size(3) == D && v_in.size(3) == D, "ldmfast.attention: head dims differ: q ",
                    D, ", k ", k_in.size(3), ", v ", v_in.size(3));
  TORCH_CHECK_VALUE(v_in.size(1) == Lk, "ldmfast.attention: k has length ", Lk, " but v has length ",
                    v_in.size(1), "; they must match");
  TORCH_CHECK_VALUE(Lk >= 1, "ldmfast.attention: k and v must hold at least one token (Lk >= 1), got Lk=0");
  TORCH_CHECK_VALUE(D >= 1, "ldmfast.attention: head dim D must be >= 1, got 0");
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  // The kernels take it as a float and the tensor-core ones multiply it by log2(e): finite there
  // too (1e39 would be inf, the output NaN).
  TORCH_CHECK_VALUE(std::isfinite(static_cast<float>(s) * 1.4426950408889634f),
                    "ldmfast.attention: scale must be finite as a float32 (times log2(e)), got ", s);
  c.q = unit_last_stride(q_in);
  c.k = unit_last_stride(k_in);
  c.v = unit_last_stride(v_in);
  c.o = at::empty({B, Lq, H, D}, q_in.options());
  maybe_poison(c.o);
  auto& p = c.p;
  p.q = c.q.data_ptr();
  p.k = c.k.data_ptr();
  p.v = c.v.data_ptr();
  p.o = c.o.data_ptr();
  p.lse = nullptr;
  p.B = B; p.Lq = Lq; p.Lk = Lk; p.H = H; p.D = D;
  p.q_stride_b = c.q.stride(0); p.q_stride_l = c.q.stride(1); p.q_stride_h = c.q.stride(2);
  p.k_stride_b = c.k.stride(0); p.k_stride_l = c.k.stride(1); p.k_stride_h = c.k.stride(2);
  p.v_stride_b = c.v.stride(0); p.v_stride_l = c.v.stride(1); p.v_stride_h = c.v.stride(2);
  p.o_stride_b = c.o.stride(0); p.o_stride_l = c.o.stride(1); p.o_stride_h = c.o.stride(2);
  p.scale = static_cast<float>(s);
  return c;
}

// ---- ddim_step ---------------------------------------------------------------------------------

struct DdimStepCall {
  at::Tensor x, eps, eps_uncond, noise, x_prev, pred_x0;
  at::Tensor scalars[4];
  DdimStepParams p;
};

inline DdimStepCall prepare_ddim_step(const at::Tensor& x_in, const at::Tensor& eps_in,
                                      const std::optional<at::Tensor>& eps_uncond_in,
                                      const std::optional<at::Tensor>& noise_in,
                                      double alpha_t, double alpha_prev, double sigma_t,
                                      double guidance_scale,
                                      const std::optional<at::Tensor>& alpha_t_t,
                                      const std::optional<at::Tensor>& alpha_prev_t,
                                      const std::optional<at::Tensor>& sigma_t_t,
                                      const std::optional<at::Tensor>& guidance_scale_t) {
  DdimStepCall c;
  TORCH_CHECK_VALUE(x_in.dim() >= 1, "ldmfast.ddim_step: x must have a batch dim, got a 0-d tensor");
  c.p.dtype = to_dtype(x_in, "ldmfast.ddim_step: x");
  const at::MemoryFormat fmt = format_of(x_in);
  auto take = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.sizes() == x_in.sizes(), "ldmfast.ddim_step: ", name, " has shape ", t.sizes(),
                      " but x has ", x_in.sizes());
    TORCH_CHECK_VALUE(t.scalar_type() == x_in.scalar_type(), "ldmfast.ddim_step: ", name, " has dtype ",
                      t.scalar_type(), " but x has ", x_in.scalar_type());
    check_same_device(x_in, "x", t, name);
    return t.contiguous(fmt);
  };
  c.x = x_in.contiguous(fmt);
  c.eps = take(eps_in, "eps");
  if (eps_uncond_in.has_value()) c.eps_uncond = take(*eps_uncond_in, "eps_uncond");
  if (noise_in.has_value()) c.noise = take(*noise_in, "noise");
  const int64_t N = x_in.size(0);
  const double values[4] = {alpha_t, alpha_prev, sigma_t, guidance_scale};
  const std::optional<at::Tensor>* tensors[4] = {&alpha_t_t, &alpha_prev_t, &sigma_t_t, &guidance_scale_t};
  const char* names[4] = {"alpha_t", "alpha_prev", "sigma_t", "guidance_scale"};
  DdimScalar* out[4] = {&c.p.alpha_t, &c.p.alpha_prev, &c.p.sigma_t, &c.p.guidance_scale};
  for (int i = 0; i < 4; ++i) {
    if (tensors[i]->has_value()) {
      const at::Tensor& t = **tensors[i];
      check_same_device(x_in, "x", t, names[i]);
      TORCH_CHECK_VALUE(t.is_floating_point(), "ldmfast.ddim_step: ", names[i],
                        " must be a floating-point tensor, got ", t.scalar_type());
      TORCH_CHECK_VALUE(t.numel() == 1 || (t.dim() == 1 && t.size(0) == N), "ldmfast.ddim_step: ",
                        names[i], " must be a scalar, a 0-d tensor or a per-sample (N,) = (", N,
                        ",) tensor, got shape ", t.sizes());
      c.scalars[i] = t.to(at::kFloat).contiguous();  // no copy when it already is float32
      out[i]->ptr = c.scalars[i].data_ptr<float>();
      out[i]->count = t.numel() == 1 ? 1 : N;
    } else {
      TORCH_CHECK_VALUE(std::isfinite(values[i]), "ldmfast.ddim_step: ", names[i], " must be finite, got ", values[i]);
      out[i]->value = static_cast<float>(values[i]);
    }
  }
  if (!tensors[0]->has_value())
    TORCH_CHECK_VALUE(alpha_t > 0 && alpha_t <= 1, "ldmfast.ddim_step: alpha_t must be in (0, 1], got ", alpha_t);
  if (!tensors[1]->has_value())
    TORCH_CHECK_VALUE(alpha_prev > 0 && alpha_prev <= 1, "ldmfast.ddim_step: alpha_prev must be in (0, 1], got ", alpha_prev);
  if (!tensors[2]->has_value())
    TORCH_CHECK_VALUE(sigma_t >= 0, "ldmfast.ddim_step: sigma_t must be >= 0, got ", sigma_t);
  TORCH_CHECK_VALUE(noise_in.has_value() || tensors[2]->has_value() || sigma_t == 0,
                    "ldmfast.ddim_step: sigma_t=", sigma_t, " > 0 needs noise (eta > 0 samples fresh noise)");
  // The kernel reads noise only where it is given and eps_uncond only where it is given: a step
  // that asks for either term without its tensor would silently be another step.
  TORCH_CHECK_VALUE(noise_in.has_value() || !tensors[2]->has_value(),
                    "ldmfast.ddim_step: a tensor sigma_t needs noise (its value is not read on the host): "
                    "pass noise=torch.zeros_like(x) for a deterministic step, or sigma_t=0.0");
  if (!eps_uncond_in.has_value()) {
    TORCH_CHECK_VALUE(!tensors[3]->has_value(), "ldmfast.ddim_step: a tensor guidance_scale needs eps_uncond, the "
                      "unconditional prediction it guides away from; without it pass guidance_scale=1.0");
    TORCH_CHECK_VALUE(guidance_scale == 1.0, "ldmfast.ddim_step: guidance_scale=", guidance_scale, " needs eps_uncond, "
                      "the unconditional prediction it guides away from; without it pass guidance_scale=1.0");
  }
  // A little slack: a sigma computed in float32 from the same alphas at eta = 1 must pass.
  if (!tensors[1]->has_value() && !tensors[2]->has_value() && sigma_t > 0 && alpha_prev <= 1)
    TORCH_CHECK_VALUE(sigma_t * sigma_t <= (1 - alpha_prev) * (1 + 1e-5), "ldmfast.ddim_step: sigma_t=", sigma_t,
                      " exceeds sqrt(1 - alpha_prev) = ", std::sqrt(1 - alpha_prev), " (alpha_prev=", alpha_prev,
                      "); the DDIM direction term would be negative");
  c.x_prev = at::empty(x_in.sizes(), x_in.options().memory_format(fmt));
  c.pred_x0 = at::empty(x_in.sizes(), x_in.options().memory_format(fmt));
  maybe_poison(c.x_prev);
  maybe_poison(c.pred_x0);
  auto& p = c.p;
  p.x = c.x.data_ptr();
  p.eps = c.eps.data_ptr();
  p.eps_uncond = c.eps_uncond.defined() ? c.eps_uncond.data_ptr() : nullptr;
  p.noise = c.noise.defined() ? c.noise.data_ptr() : nullptr;
  p.x_prev = c.x_prev.data_ptr();
  p.pred_x0 = c.pred_x0.data_ptr();
  p.N = N;
  p.M = N == 0 ? 0 : x_in.numel() / N;
  return c;
}

// ---- geglu -------------------------------------------------------------------------------------

struct GegluCall {
  at::Tensor h, out;
  GegluParams p;
};

inline GegluCall prepare_geglu(const at::Tensor& h_in) {
  GegluCall c;
  TORCH_CHECK_VALUE(h_in.dim() >= 1, "ldmfast.geglu: h must be (..., 2n), got a 0-d tensor");
  c.p.dtype = to_dtype(h_in, "ldmfast.geglu: h");
  const int64_t width = h_in.size(-1);
  TORCH_CHECK_VALUE(width % 2 == 0 && width > 0, "ldmfast.geglu: the last dim of h must be even "
                    "and positive (value and gate halves), got ", width, " (shape ", h_in.sizes(), ")");
  const int64_t n = width / 2;
  const int64_t rows = h_in.numel() / width;
  // A unit-stride last dim is required by the kernel; leading dims that collapse to one row
  // stride (a slice along the batch or the tokens) are taken as they are, others are copied.
  const at::Tensor h = h_in.stride(-1) == 1 ? h_in : h_in.contiguous();
  c.h = h.reshape({rows, width});
  auto out_sizes = h_in.sizes().vec();
  out_sizes.back() = n;
  c.out = at::empty(out_sizes, h_in.options().memory_format(at::MemoryFormat::Contiguous));
  maybe_poison(c.out);
  auto& p = c.p;
  p.h = c.h.data_ptr();
  p.out = c.out.data_ptr();
  p.rows = rows;
  p.n = n;
  p.h_row_stride = rows > 1 ? c.h.stride(0) : width;
  return c;
}

}  // namespace ldmfast::binding
