"""The LDM denoising U-Net (CompVis ``ldm/modules/diffusionmodules/openaimodel.py``).

Parameter names are those of ``model.diffusion_model.*`` in the CompVis/Stability checkpoints.
GroupNorm (32 groups, eps 1e-5, float32 statistics as ``GroupNorm32``) runs through the fused
``group_norm_silu`` op; the ResBlock adds its time embedding inside that op.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .transformer import BasicTransformerBlock, CrossAttention, PreparedContext, SpatialTransformer

NORM_GROUPS = 32


def timestep_embedding(timesteps, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half) (DDPM/ADM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=1e-5)


def _conv(dims: int, *args, **kwargs):
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](*args, **kwargs)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels, self.dims = channels, dims
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = _conv(dims, channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        elif self.use_conv and self.dims == 2:
            return ops.upsample_conv(x, self.conv)
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (``use_conv``) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None,
                 padding: int = 1):
        super().__init__()
        self.out_channels = out_channels or channels
        stride = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = _conv(dims, channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            assert self.out_channels == channels, "average pooling cannot change the channel count"
            self.op = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](stride, stride)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, time embedding (added, or as scale and shift), GroupNorm-SiLU-conv,
    skip connection; optionally resampling the input (``up``/``down``, BigGAN style)."""

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0,
                 out_channels: int | None = None, use_conv: bool = False, dims: int = 2,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(),
                                       _conv(dims, channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm
                                 else self.out_channels))
        self.out_layers = nn.Sequential(
            _norm(self.out_channels), nn.SiLU(), nn.Dropout(dropout),
            _conv(dims, self.out_channels, self.out_channels, 3, padding=1))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = _conv(dims, channels, self.out_channels, 3 if use_conv else 1,
                                         padding=1 if use_conv else 0)

    def forward(self, x, emb):
        h = ops.group_norm(x, self.in_layers[0], silu=True)
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)
        h = self.in_layers[2](h)
        emb_out = self.emb_layers(emb).to(h.dtype)
        norm = self.out_layers[0]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.reshape(emb_out.shape + (1,) * (h.dim() - 2)).chunk(2, dim=1)
            h = F.silu(ops.group_norm(h, norm) * (1 + scale) + shift)
        else:
            h = ops.group_norm(h, norm, silu=True, emb=emb_out)
        h = self.out_layers[2](h)
        if isinstance(self.skip_connection, nn.Conv2d):  # the channel count changes
            return ops.conv_plus_skip(h, self.out_layers[3], x, self.skip_connection)
        return self.skip_connection(x) + self.out_layers[3](h)


class AttentionBlock(nn.Module):
    """Spatial self-attention with one fused qkv 1x1 conv (ADM's ``AttentionBlock``).

    ``legacy_order`` (``QKVAttentionLegacy``) lays the qkv channels out as (heads, 3, d);
    otherwise (``use_new_attention_order``) as (3, heads, d). The 1x1 convs are applied as
    linear layers on (B, L, C) so that the attention op gets its (B, L, H, D) layout by a view.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            assert channels % num_head_channels == 0, (
                f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.head_dim = channels // self.num_heads
        self.legacy_order = not use_new_attention_order
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c = x.shape[:2]
        h = ops.group_norm(x, self.norm).reshape(b, c, -1).transpose(1, 2)  # (B, L, C)
        n = h.shape[1]
        qkv = F.linear(h, self.qkv.weight[..., 0], self.qkv.bias)
        if self.legacy_order:
            qkv = qkv.view(b, n, self.num_heads, 3, self.head_dim)
            q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        else:
            qkv = qkv.view(b, n, 3, self.num_heads, self.head_dim)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        a = ops.attention(q, k, v, self.head_dim ** -0.5).reshape(b, n, c)
        out = F.linear(a, self.proj_out.weight[..., 0], self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(x.shape)


class TimestepEmbedSequential(nn.Sequential):
    """A sequential block passing the time embedding to ResBlocks and the context to
    SpatialTransformers."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def count_downsamplings(unet) -> int:
    """How many times a U-Net halves its input: input blocks holding a Downsample (BigGAN-style
    down ResBlocks hold one too). Image sides must be multiples of 2 to that power."""
    return sum(any(isinstance(m, Downsample) for m in block.modules())
               for block in getattr(unet, "input_blocks", ()))


def _as_tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


class UNetModel(nn.Module):
    """The LDM U-Net: ``unet(x, timesteps, context=None, y=None)`` -> prediction shaped like x
    with ``out_channels`` channels. Constructor arguments follow CompVis ``UNetModel``;
    ``image_size``, ``use_checkpoint``, ``use_fp16`` and ``n_embed`` are accepted and ignored
    (``n_embed``, the codebook-id head, is not supported)."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions, dropout: float = 0.0,
                 channel_mult=(1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes: int | None = None, num_heads: int = -1, num_head_channels: int = -1,
                 num_heads_upsample: int = -1, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, use_new_attention_order: bool = False,
                 use_spatial_transformer: bool = False, transformer_depth=1,
                 context_dim=None, disable_self_attentions=None, use_linear_in_transformer: bool = False,
                 legacy: bool = True, image_size=None, use_checkpoint: bool = False,
                 use_fp16: bool = False, n_embed=None):
        super().__init__()
        if n_embed is not None:
            raise ValueError("UNetModel: n_embed (codebook-id prediction) is not supported")
        if use_spatial_transformer and context_dim is None:
            raise ValueError("UNetModel: use_spatial_transformer needs context_dim")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("UNetModel: set num_heads or num_head_channels")
        if isinstance(context_dim, (list, tuple)):
            context_dim = list(context_dim)[0]  # one context for every level, as SD-1/2
        num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.in_channels, self.out_channels = in_channels, out_channels
        self.model_channels = model_channels
        self.num_classes = num_classes
        n_levels = len(channel_mult)
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * n_levels
        depths = list(_as_tuple(transformer_depth))
        if len(depths) == 1:
            depths = depths * n_levels
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def attn(ch, heads_arg, depth, disable_self):
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            if legacy:  # the original's quirk: AttentionBlock keeps num_head_channels as given
                dim_head = ch // heads if use_spatial_transformer else num_head_channels
            if use_spatial_transformer:  # the original passes num_heads here, also upsampling
                return SpatialTransformer(ch, heads, dim_head, depth, dropout, context_dim,
                                          disable_self, use_linear_in_transformer)
            return AttentionBlock(ch, heads_arg, dim_head, use_new_attention_order)

        def disabled(level):
            return bool(disable_self_attentions[level]) if disable_self_attentions else False

        def res(ch, out, **kw):
            return ResBlock(ch, emb_dim, dropout, out, dims=dims,
                            use_scale_shift_norm=use_scale_shift_norm, **kw)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(_conv(dims, in_channels, model_channels, 3, padding=1))])
        chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks[level]):
                layers = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads, depths[level], disabled(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != n_levels - 1:
                down = (res(ch, ch, down=True) if resblock_updown
                        else Downsample(ch, conv_resample, dims, ch))
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            res(ch, ch), attn(ch, num_heads, depths[-1], False), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks[level] + 1):
                layers = [res(ch + chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample, depths[level], disabled(level)))
                if level and i == num_res_blocks[level]:
                    layers.append(res(ch, ch, up=True) if resblock_updown
                                  else Upsample(ch, conv_resample, dims, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(),
                                 _conv(dims, model_channels, out_channels, 3, padding=1))
        for slot, layer in enumerate(self._context_layers()):
            layer.context_slot = slot

    def _context_layers(self):
        return [layer for m in self.modules() if isinstance(m, BasicTransformerBlock)
                for layer in m.context_layers()]

    def fuse_qkv(self) -> int:
        """Fuses the q/k/v projections of every self-attention layer (see
        ``CrossAttention.fuse_qkv``); returns how many layers fused. Call it after the weights
        are loaded and before capturing; in-place weight updates stay visible afterwards."""
        return sum(m.fuse_qkv() for m in self.modules() if isinstance(m, CrossAttention))

    def unfuse_qkv(self) -> None:
        for m in self.modules():
            if isinstance(m, CrossAttention):
                m.unfuse_qkv()

    def prepare_context(self, context) -> PreparedContext:
        """Every cross-attention layer's K and V projections of ``context`` (B, T, context_dim).

        ``forward(x, t, context=prepared)`` then gives exactly what ``forward(x, t, context)``
        gives, without re-projecting the context at every sampling step. Batches combine with
        ``PreparedContext.cat`` (classifier-free guidance's [uncond; cond]). The K/V are tensors
        computed from the current weights: prepare again after changing the weights.
        """
        if isinstance(context, PreparedContext):
            return context
        return PreparedContext(tuple(layer.project_context(context)
                                     for layer in self._context_layers()))

    def forward(self, x, timesteps, context=None, y=None):
        """x (B, in_channels, H, W); timesteps (B,) or a scalar; context (B, T, context_dim)
        for cross-attention, or a ``PreparedContext`` from ``prepare_context``; y (B,) class
        labels when ``num_classes`` is set."""
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        if self.num_classes is not None:
            if y is None:
                raise ValueError("UNetModel: a class-conditional model needs y")
            emb = emb + self.label_emb(y)
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        h = ops.group_norm(h, self.out[0], silu=True)
        return self.out[2](h)
