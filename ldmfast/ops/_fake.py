"""Fake (meta) implementations: output shapes, dtypes and memory formats, no data.

They mirror the output allocation of csrc/torch/op_params.h exactly, strides included, and its
shape checks (ValueError, the same messages in substance), so that a graph traced with bad
shapes (torch.compile, torch.export) fails when it is traced, not when it first runs.
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
    op = "ldmfast.group_norm_silu"
    torch._check_value(x.dim() >= 2, lambda: f"{op}: x must be (N, C, *spatial), got a "
                       f"{x.dim()}-d tensor")
    N, C = x.shape[0], x.shape[1]
    torch._check_value(num_groups > 0, lambda: f"{op}: num_groups must be positive, got {num_groups}")
    torch._check_value(C % num_groups == 0, lambda: f"{op}: the channel count C={C} is not "
                       f"divisible by num_groups={num_groups}")
    for name, t in (("weight", weight), ("bias", bias)):
        torch._check_value(t.dim() == 1 and t.shape[0] == C, lambda: f"{op}: {name} must have "
                           f"shape (C,) = ({C},), got {list(t.shape)}")
    if emb is not None:
        torch._check_value(tuple(emb.shape) == (N, C), lambda: f"{op}: emb must be (N, C) = "
                           f"({N}, {C}), got {list(emb.shape)}")
    return _like(x)


@torch.library.register_fake("ldmfast::attention")
def _attention_fake(q, k, v, scale=None):
    op = "ldmfast.attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        torch._check_value(t.dim() == 4, lambda: f"{op}: {name} must be (B, L, H, D), got a "
                           f"{t.dim()}-d tensor")
    B, _, H, D = q.shape
    torch._check_value(k.shape[0] == B and v.shape[0] == B, lambda: f"{op}: batch sizes differ: "
                       f"q {B}, k {k.shape[0]}, v {v.shape[0]}")
    torch._check_value(k.shape[2] == H and v.shape[2] == H, lambda: f"{op}: head counts differ: "
                       f"q {H}, k {k.shape[2]}, v {v.shape[2]}")
    torch._check_value(k.shape[3] == D and v.shape[3] == D, lambda: f"{op}: head dims differ: "
                       f"q {D}, k {k.shape[3]}, v {v.shape[3]}")
    torch._check_value(v.shape[1] == k.shape[1], lambda: f"{op}: k has length {k.shape[1]} but v "
                       f"has length {v.shape[1]}")
    return q.new_empty(q.shape)


@torch.library.register_fake("ldmfast::ddim_step")
def _ddim_step_fake(x, eps, eps_uncond, noise, alpha_t, alpha_prev, sigma_t, guidance_scale,
                    alpha_t_t, alpha_prev_t, sigma_t_t, guidance_scale_t):
    torch._check_value(x.dim() >= 1, lambda: "ldmfast.ddim_step: x must have a batch dim, got a "
                       "0-d tensor")
    for name, t in (("eps", eps), ("eps_uncond", eps_uncond), ("noise", noise)):
        if t is not None:
            torch._check_value(t.shape == x.shape, lambda: f"ldmfast.ddim_step: {name} has shape "
                               f"{list(t.shape)}, x {list(x.shape)}")
    return _like(x), _like(x)


@torch.library.register_fake("ldmfast::geglu")
def _geglu_fake(h):
    torch._check(h.dim() >= 1 and h.shape[-1] % 2 == 0,
                 lambda: f"ldmfast.geglu: the last dim of h must be even, got shape {tuple(h.shape)}")
    return h.new_empty(h.shape[:-1] + (h.shape[-1] // 2,))
