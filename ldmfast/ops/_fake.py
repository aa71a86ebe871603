"""Fake (meta) implementations: output shapes, dtypes and memory formats, no data.

They mirror the output allocation of csrc/torch/op_params.h exactly, strides included.
"""
from __future__ import annotations

import torch


def _is_channels_last(x) -> bool:
    """The rule the C++ side uses: channels_last iff dense in that order and not contiguous."""
    if x.is_contiguous():
        return False
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def _like(x):
    if _is_channels_last(x):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return torch.empty(x.shape, dtype=x.dtype, device=x.device).to(memory_format=fmt)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.register_fake("ldmfast::group_norm_silu")
def _group_norm_silu_fake(x, weight, bias, num_groups, eps=1e-5, silu=True, emb=None):
    return _like(x)


@torch.library.register_fake("ldmfast::attention")
def _attention_fake(q, k, v, scale=None):
    return q.new_empty(q.shape)


@torch.library.register_fake("ldmfast::ddim_step")
def _ddim_step_fake(x, eps, eps_uncond, noise, alpha_t, alpha_prev, sigma_t, guidance_scale,
                    alpha_t_t, alpha_prev_t, sigma_t_t, guidance_scale_t):
    return _like(x), _like(x)


@torch.library.register_fake("ldmfast::geglu")
def _geglu_fake(h):
    torch._check(h.dim() >= 1 and h.shape[-1] % 2 == 0,
                 lambda: f"ldmfast.geglu: the last dim of h must be even, got shape {tuple(h.shape)}")
    return h.new_empty(h.shape[:-1] + (h.shape[-1] // 2,))
