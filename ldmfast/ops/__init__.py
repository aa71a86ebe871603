"""The fused ops, as ``torch.ops.ldmfast.*`` and as plain functions.

The compiled library registers the schemas and the CPU (and, when built, CUDA) kernels; this
module loads it and adds what Python provides: fake (meta) implementations for
``torch.compile``/``torch.export`` and autograd formulas. Kernel choices happen in C++.
"""
from __future__ import annotations

import torch

from . import _library

_library.load()
from . import _autograd, _fake  # noqa: E402,F401  (registrations need the schemas loaded)

__all__ = ["attention", "ddim_step", "geglu", "group_norm_silu", "cuda_available"]


def cuda_available() -> bool:
    """Whether the CUDA kernels were built and loaded."""
    return _library.cuda_loaded()


def group_norm_silu(x, weight, bias, num_groups: int, eps: float = 1e-5, silu: bool = True,
                    emb=None):
    """silu(GroupNorm(x + emb)) with float32 statistics; the output keeps x's memory format.

    x: (N, C, *spatial), float32/float16/bfloat16, NCHW-contiguous or channels_last.
    weight, bias: (C,), x's dtype or float32. emb: optional (N, C), added per channel before
    normalisation (the ResBlock time embedding). ``silu=False`` gives plain GroupNorm.
    """
    return torch.ops.ldmfast.group_norm_silu(x, weight, bias, num_groups, eps, silu, emb)


def attention(q, k, v, scale=None):
    """softmax(scale q k^T) v for q (B, Lq, H, D), k and v (B, Lk, H, D) -> (B, Lq, H, D).

    Strided views are accepted as long as the last dim is contiguous (e.g. slices of one fused
    QKV projection). Softmax in float32; ``scale`` defaults to D**-0.5.
    """
    return torch.ops.ldmfast.attention(q, k, v, scale)


def geglu(h):
    """h[..., :n] * gelu(h[..., n:]) for h (..., 2n) -> (..., n), the exact (erf) GELU.

    The LDM FeedForward's gate in one pass over h. float32/float16/bfloat16, math in float32;
    the last dim must be even with unit stride (other layouts are copied first).
    """
    return torch.ops.ldmfast.geglu(h)


def ddim_step(x, eps, alpha_t, alpha_prev, sigma_t=0.0, noise=None, eps_uncond=None,
              guidance_scale=1.0):
    """One DDIM update (Song et al. 2021, eq. 12) -> (x_prev, pred_x0).

    With ``eps_uncond``, classifier-free guidance is folded in:
    eps = eps_uncond + guidance_scale (eps - eps_uncond). Each scalar may be a Python float or a
    float tensor on x's device, 0-d or per-sample (N,), so a sampling loop needs no host sync.
    """
    values, tensors = [], []
    for s in (alpha_t, alpha_prev, sigma_t, guidance_scale):
        if isinstance(s, torch.Tensor):
            values.append(0.0)
            tensors.append(s)
        else:
            values.append(float(s))
            tensors.append(None)
    return torch.ops.ldmfast.ddim_step(x, eps, eps_uncond, noise, *values, *tensors)
