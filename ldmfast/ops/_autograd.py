"""Autograd for the fused ops: analytic backward formulas in plain torch ops.

Each backward recomputes what it needs from the saved inputs in float32 (float64 for float64
inputs), so it runs on any device and traces under torch.compile. Dedicated backward kernels
are the training issue's work; these formulas are also their reference.
"""
from __future__ import annotations

import torch


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --- group_norm_silu -----------------------------------------------------------------------------

def _gn_setup(ctx, inputs, output):
    x, weight, bias, num_groups, eps, silu, emb = inputs
    ctx.save_for_backward(x, weight, bias, emb)
    ctx.num_groups, ctx.eps, ctx.silu = num_groups, eps, silu
    ctx.has_emb = emb is not None


def _gn_backward(ctx, grad):
    x, weight, bias, emb = ctx.saved_tensors
    G, eps = ctx.num_groups, ctx.eps
    f = _compute_dtype(x)
    N, C = x.shape[:2]
    z = x.to(f)
    if ctx.has_emb:
        z = z + emb.to(f).reshape(N, C, *([1] * (x.dim() - 2)))
    zg = z.reshape(N, G, -1)
    mean = zg.mean(-1, keepdim=True)
    rstd = torch.rsqrt(zg.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = ((zg - mean) * rstd).reshape(z.shape)
    shape_c = (1, C) + (1,) * (x.dim() - 2)
    w = weight.to(f).reshape(shape_c)
    g = grad.to(f)
    if ctx.silu:
        a = xhat * w + bias.to(f).reshape(shape_c)
        s = torch.sigmoid(a)
        g = g * (s * (1 + a * (1 - s)))
    reduce_dims = [0] + list(range(2, x.dim()))
    gw = (g * xhat).sum(reduce_dims)
    gb = g.sum(reduce_dims)
    gxhat = (g * w).reshape(N, G, -1)
    xh = xhat.reshape(N, G, -1)
    gz = rstd * (gxhat - gxhat.mean(-1, keepdim=True) - xh * (gxhat * xh).mean(-1, keepdim=True))
    gz = gz.reshape(z.shape)
    gemb = gz.sum(list(range(2, x.dim()))).to(emb.dtype).reshape(emb.shape) if ctx.has_emb else None
    return (gz.to(x.dtype), gw.to(weight.dtype), gb.to(bias.dtype), None, None, None, gemb)


torch.library.register_autograd("ldmfast::group_norm_silu", _gn_backward, setup_context=_gn_setup)


# --- attention -----------------------------------------------------------------------------------

def _attn_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = q.shape[-1] ** -0.5 if scale is None else scale


def _attn_backward(ctx, grad):
    # Standard softmax-attention gradients with the probabilities recomputed: dV = P^T dO,
    # dS = P * (dO V^T - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q.
    q, k, v = ctx.saved_tensors
    f = _compute_dtype(q)
    qh, kh, vh, go = (t.transpose(1, 2).to(f) for t in (q, k, v, grad))  # (B, H, L, D)
    p = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * ctx.scale, dim=-1)
    o = torch.matmul(p, vh)
    dv = torch.matmul(p.transpose(-1, -2), go)
    dp = torch.matmul(go, vh.transpose(-1, -2))
    ds = p * (dp - (go * o).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kh) * ctx.scale
    dk = torch.matmul(ds.transpose(-1, -2), qh) * ctx.scale
    back = lambda t, like: t.transpose(1, 2).to(like.dtype)  # noqa: E731
    return back(dq, q), back(dk, k), back(dv, v), None


torch.library.register_autograd("ldmfast::attention", _attn_backward, setup_context=_attn_setup)


# --- ddim_step -----------------------------------------------------------------------------------

def _ddim_setup(ctx, inputs, output):
    (x, eps, eps_uncond, noise, a_t, a_prev, sig, g, a_t_t, a_prev_t, sig_t, g_t) = inputs
    ctx.save_for_backward(x, a_t_t, a_prev_t, sig_t, g_t)
    ctx.values = (a_t, a_prev, sig, g)
    ctx.has_uncond, ctx.has_noise = eps_uncond is not None, noise is not None


def _ddim_backward(ctx, grad_x_prev, grad_pred_x0):
    # The step is linear in x, eps, eps_uncond and noise:
    #   e = g eps + (1 - g) u;  pred_x0 = x / sqrt(a_t) - sqrt(1 - a_t)/sqrt(a_t) e
    #   x_prev = sqrt(a_prev) pred_x0 + sqrt(max(1 - a_prev - sigma^2, 0)) e + sigma noise
    x, *scalar_tensors = ctx.saved_tensors
    f = _compute_dtype(x)

    def scalar(i):
        t = scalar_tensors[i]
        if t is None:
            return torch.tensor(ctx.values[i], dtype=f, device=x.device)
        t = t.to(device=x.device, dtype=f)
        return t.reshape((-1,) + (1,) * (x.dim() - 1)) if t.dim() == 1 else t

    a_t, a_prev, sig, g = (scalar(i) for i in range(4))
    gxp = torch.zeros_like(x, dtype=f) if grad_x_prev is None else grad_x_prev.to(f)
    gx0 = torch.zeros_like(x, dtype=f) if grad_pred_x0 is None else grad_pred_x0.to(f)
    g_pred = gx0 + torch.sqrt(a_prev) * gxp
    g_x = g_pred / torch.sqrt(a_t)
    g_e = -torch.sqrt(1 - a_t) / torch.sqrt(a_t) * g_pred \
        + torch.sqrt(torch.clamp(1 - a_prev - sig * sig, min=0)) * gxp
    if ctx.has_uncond:
        g_eps, g_unc = (g * g_e).to(x.dtype), ((1 - g) * g_e).to(x.dtype)
    else:
        g_eps, g_unc = g_e.to(x.dtype), None
    g_noise = (sig * gxp).to(x.dtype) if ctx.has_noise else None
    return (g_x.to(x.dtype), g_eps, g_unc, g_noise) + (None,) * 8


torch.library.register_autograd("ldmfast::ddim_step", _ddim_backward, setup_context=_ddim_setup)


# --- geglu ---------------------------------------------------------------------------------------

_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)


def _geglu_setup(ctx, inputs, output):
    (h,) = inputs
    ctx.save_for_backward(h)


def _geglu_backward(ctx, grad):
    # out = a gelu(g), gelu(g) = g Phi(g):  d/da = gelu(g),  d/dg = a (Phi(g) + g phi(g)),
    # Phi the standard normal CDF and phi its density.
    (h,) = ctx.saved_tensors
    f = _compute_dtype(h)
    a, g = h.to(f).chunk(2, dim=-1)
    go = grad.to(f)
    cdf = 0.5 * (1 + torch.erf(g * 0.7071067811865476))
    pdf = _INV_SQRT_2PI * torch.exp(-0.5 * g * g)
    return torch.cat([go * g * cdf, go * a * (cdf + g * pdf)], dim=-1).to(h.dtype)


torch.library.register_autograd("ldmfast::geglu", _geglu_backward, setup_context=_geglu_setup)
