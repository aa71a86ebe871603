"""SpatialTransformer and its parts (CompVis ``ldm/modules/attention.py``).

Parameter names are those of the CompVis/Stability checkpoints. Attention goes through the fused
op in the (B, L, H, D) layout: projections are reshaped with a view, never transposed.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import ops


class PreparedContext(NamedTuple):
    """The cross-attention K and V of one conditioning, projected once (``UNetModel.prepare_context``).

    ``kv[i]`` is the (k, v) pair of the U-Net's i-th context-taking attention layer, each
    (B, T, heads, dim_head) in the layer's parameter dtype: the layout ``ops.attention`` takes.
    The context does not change during a sampling run, so its projections need not be redone
    at every step (SD-1: 16 layers x 2 GEMMs per step). A NamedTuple of tensors is a pytree,
    so it passes through ``torch.compile`` and ``torch.utils._pytree`` untouched.
    """

    kv: tuple

    @property
    def batch_size(self) -> int:
        return self.kv[0][0].shape[0] if self.kv else 0

    @classmethod
    def cat(cls, *contexts: "PreparedContext") -> "PreparedContext":
        """Batch concatenation, as ``torch.cat`` of the contexts would give (guidance's
        [uncond; cond])."""
        first = contexts[0]
        return cls(tuple((torch.cat([c.kv[i][0] for c in contexts]),
                          torch.cat([c.kv[i][1] for c in contexts]))
                         for i in range(len(first.kv))))


class GEGLU(nn.Module):
    """x * gelu(gate) from one projection (Shazeer 2020, "GLU variants")."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        # x * gelu(gate) of the two halves of the projection, in one fused pass
        return ops.geglu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        inner = int(dim * mult)
        project_in = GEGLU(dim, inner) if glu else nn.Sequential(nn.Linear(dim, inner), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner, dim_out or dim))

    def forward(self, x):
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of x (B, N, query_dim) over context (B, M, context_dim), or over x."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        # attends to x itself (attn1); only such a layer can fuse its q/k/v projections
        self.is_self_attention = context_dim is None
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.dim_head = heads, dim_head
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        # Index of this layer's K/V in a PreparedContext; set by the U-Net for the layers that
        # attend to the context (None: never reached through a U-Net).
        self.context_slot: int | None = None
        self._qkv_weight = None  # the (3 inner, query_dim) buffer while fused; see fuse_qkv
        self.register_load_state_dict_post_hook(lambda module, keys: module._refuse_if_detached())

    # ---- fused QKV projection ------------------------------------------------------------------
    # While fused, to_q/to_k/to_v.weight are row blocks (views) of one (3 inner, C) buffer, and
    # self-attention computes q, k and v with one GEMM whose output is sliced by views. The
    # parameters keep their names and shapes (CompVis state dicts load strict) and every in-place
    # update of them (load_state_dict, param.data.add_ for LoRA merging) writes into the buffer,
    # so the fused GEMM, and a CUDA graph already captured on it, sees it. .to()/.half()/.cuda()
    # convert each parameter on its own; _apply then rebuilds the buffer from them. Fusion is
    # off by default: code that points the parameters at other storage (ldmfast.accelerate
    # sharing diffusers' weights) must leave it off or call unfuse_qkv() first; training
    # (grad enabled and weights requiring grad) takes the unfused path.

    @property
    def qkv_fused(self) -> bool:
        return self._qkv_weight is not None

    def _qkv_params(self):
        return self.to_q.weight, self.to_k.weight, self.to_v.weight

    def fuse_qkv(self) -> bool:
        """Makes the q/k/v weights views of one buffer; only self-attention layers fuse (a
        cross-attention layer's K/V come from the context). Returns whether it is fused."""
        if not self.is_self_attention:
            return False
        params = self._qkv_params()
        with torch.no_grad():
            buf = torch.cat([p.detach() for p in params])
            rows = params[0].shape[0]
            for i, p in enumerate(params):
                p.data = buf[i * rows:(i + 1) * rows]
        self._qkv_weight = buf
        return True

    def unfuse_qkv(self) -> None:
        """Gives each weight its own storage again (the unfused path, as before fusing)."""
        if self._qkv_weight is None:
            return
        with torch.no_grad():
            for p in self._qkv_params():
                p.data = p.data.clone()
        self._qkv_weight = None

    def _is_attached(self) -> bool:
        buf = self._qkv_weight
        rows = buf.shape[0] // 3
        return all(p.data.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
                   and p.data.storage_offset() == buf.storage_offset() + i * rows * buf.shape[1]
                   and p.dtype == buf.dtype and p.device == buf.device
                   for i, p in enumerate(self._qkv_params()))

    def _refuse_if_detached(self):
        # After .to() (new storage per parameter) or load_state_dict(assign=True) (new
        # parameters); a plain in-place load keeps the views and the buffer, so nothing happens.
        if self._qkv_weight is not None and not self._is_attached():
            self.fuse_qkv()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._refuse_if_detached()
        return out

    def _fused_path(self) -> bool:
        # A Python-level choice (grad mode and flags), guarded by torch.compile, never a value test.
        return self._qkv_weight is not None and not (
            torch.is_grad_enabled() and any(p.requires_grad for p in self._qkv_params()))

    def project_context(self, context):
        """K and V of a context (B, M, context_dim), each (B, M, heads, dim_head)."""
        b, m = context.shape[:2]
        k = self.to_k(context).view(b, m, self.heads, self.dim_head)
        v = self.to_v(context).view(b, m, self.heads, self.dim_head)
        return k, v

    def forward(self, x, context=None):
        b, n, _ = x.shape
        if context is None and self._fused_path():
            qkv = F.linear(x, self._qkv_weight).view(b, n, 3, self.heads, self.dim_head)
            out = ops.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.scale)
            return self.to_out(out.reshape(b, n, self.heads * self.dim_head))
        q = self.to_q(x).view(b, n, self.heads, self.dim_head)
        if isinstance(context, PreparedContext):  # a Python type check: static under tracing
            if self.context_slot is None:
                raise ValueError("CrossAttention got a PreparedContext but has no context slot; "
                                 "prepare it with the UNetModel that owns this layer")
            k, v = context.kv[self.context_slot]
        else:
            k, v = self.project_context(x if context is None else context)
        out = ops.attention(q, k, v, self.scale)
        return self.to_out(out.reshape(b, n, self.heads * self.dim_head))


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and gated feed-forward, each residual."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0,
                 context_dim: int | None = None, gated_ff: bool = True,
                 disable_self_attn: bool = False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, n_heads,
                                    d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def context_layers(self):
        """The attention layers that attend to the context, in a fixed order."""
        return (self.attn1, self.attn2) if self.disable_self_attn else (self.attn2,)

    def forward(self, x, context=None):
        x = self.attn1(self.norm1(x), context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of an image feature map, conditioned by cross-attention.

    GroupNorm (eps 1e-6, as the original ``Normalize``), projection in (1x1 conv, or a linear
    layer after flattening with ``use_linear``, SD-2), ``depth`` transformer blocks, projection
    out, and a residual connection.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1,
                 dropout: float = 0.0, context_dim: int | None = None,
                 disable_self_attn: bool = False, use_linear: bool = False):
        super().__init__()
        inner = n_heads * d_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, n_heads, d_head, dropout, context_dim,
                                  disable_self_attn=disable_self_attn) for _ in range(depth))
        if use_linear:
            self.proj_out = nn.Linear(inner, in_channels)
        else:
            self.proj_out = nn.Conv2d(inner, in_channels, 1)

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        x_in = x
        x = ops.group_norm(x, self.norm)
        if not self.use_linear:
            x = self.proj_in(x)
        inner = x.shape[1]
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, inner)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
