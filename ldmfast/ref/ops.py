"""References of the fused ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def group_norm_silu(x, weight, bias, num_groups, eps=1e-5, silu=True, emb=None):
    """silu(GroupNorm(x + emb[:, :, None, ...])) with float32 statistics (GroupNorm32).

    Inputs narrower than float32 are normalised in float32 and cast back, as the original
    ``GroupNorm32.forward`` does; float64 inputs stay float64 (the test reference).
    """
    if emb is not None:
        x = x + emb.reshape(emb.shape + (1,) * (x.dim() - 2))
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = F.group_norm(x.to(compute), num_groups, weight.to(compute), bias.to(compute), eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def attention(q, k, v, scale=None):
    """softmax(scale * q k^T) v in the (B, L, H, D) layout; scores and softmax in float32."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh, kh, vh = (t.transpose(1, 2).to(compute) for t in (q, k, v))  # (B, H, L, D)
    w = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(w, vh).transpose(1, 2).to(q.dtype)


def _per_sample(s, x):
    """A float, a 0-d tensor or an (N,) tensor as a tensor that broadcasts against x."""
    s = torch.as_tensor(s, dtype=x.dtype, device=x.device)
    return s.reshape((-1,) + (1,) * (x.dim() - 1)) if s.dim() == 1 else s


def ddim_step(x, eps, alpha_t, alpha_prev, sigma_t=0.0, noise=None, eps_uncond=None,
              guidance_scale=1.0):
    """DDIM update, Song et al. 2021 eq. 12, with classifier-free guidance folded in.

    Returns (x_prev, pred_x0), computed in float32 (float64 for float64 inputs) and cast back.
    The direction term's 1 - a_prev - sigma^2 is clamped at 0: it is never negative in exact
    arithmetic, and rounding must not turn it into a NaN.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, e = x.to(compute), eps.to(compute)
    if eps_uncond is not None:
        u = eps_uncond.to(compute)
        e = u + _per_sample(guidance_scale, xf) * (e - u)
    a_t, a_prev, sig = (_per_sample(s, xf) for s in (alpha_t, alpha_prev, sigma_t))
    pred_x0 = (xf - torch.sqrt(1 - a_t) * e) / torch.sqrt(a_t)
    x_prev = torch.sqrt(a_prev) * pred_x0 + torch.sqrt(torch.clamp(1 - a_prev - sig * sig, min=0)) * e
    if noise is not None:
        x_prev = x_prev + sig * noise.to(compute)
    return x_prev.to(x.dtype), pred_x0.to(x.dtype)


def geglu(h):
    """h[..., :n] * gelu(h[..., n:]) for h (..., 2n): the LDM ``GEGLU`` gate, exact (erf) GELU.

    Computed in float32 (float64 for float64 inputs) and cast back once; the original computes
    in the storage dtype, which for float16 rounds the GELU before the product.
    """
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32
    a, gate = h.to(compute).chunk(2, dim=-1)
    return (a * F.gelu(gate)).to(h.dtype)
