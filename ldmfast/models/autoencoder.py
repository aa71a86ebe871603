"""First-stage autoencoders (CompVis ``ldm/modules/diffusionmodules/model.py`` and
``ldm/models/autoencoder.py``): ``AutoencoderKL`` and ``VQModel``.

Parameter names are those of ``first_stage_model.*`` in the CompVis/SD checkpoints. GroupNorm
here is 32 groups with eps 1e-6 (the original ``Normalize``), through the fused op.

Both models also expose one interface for the diffusion model: ``encode_latent(x)`` and
``decode_latent(z)`` (a posterior sample/mode for KL; the unquantized encoding for VQ, which
``decode_latent`` quantizes, as ``VQModelInterface``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .quantize import VectorQuantizer

EPS = 1e-6


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=EPS, affine=True)


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        if self.with_conv:
            return ops.upsample_conv(x, self.conv)
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom only (the original's asymmetric pad)."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x):
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, 2, 2)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int | None = None,
                 conv_shortcut: bool = False, dropout: float = 0.0, temb_channels: int = 0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.use_conv_shortcut = conv_shortcut
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x, temb=None):
        h = self.conv1(ops.group_norm(x, self.norm1, silu=True))
        emb = self.temb_proj(F.silu(temb)) if temb is not None else None
        h = self.dropout(ops.group_norm(h, self.norm2, silu=True, emb=emb))
        if self.in_channels != self.out_channels:
            if not self.use_conv_shortcut:
                return ops.conv_plus_skip(h, self.conv2, x, self.nin_shortcut)
            return self.conv_shortcut(x) + self.conv2(h)
        return x + self.conv2(h)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q, k, v and proj_out."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, hh, ww = x.shape
        # channels-last rows so each projection is a (B, L, C) matmul viewed as (B, L, 1, C)
        h = ops.group_norm(x, self.norm).permute(0, 2, 3, 1).reshape(b, hh * ww, c)

        def proj(conv):
            return F.linear(h, conv.weight[:, :, 0, 0], conv.bias).view(b, hh * ww, 1, c)

        a = ops.attention(proj(self.q), proj(self.k), proj(self.v), c ** -0.5)
        out = F.linear(a.reshape(b, hh * ww, c), self.proj_out.weight[:, :, 0, 0], self.proj_out.bias)
        return x + out.reshape(b, hh, ww, c).permute(0, 3, 1, 2)


def _attn(channels: int, attn_type: str):
    if attn_type == "vanilla":
        return AttnBlock(channels)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"autoencoder: attn_type {attn_type!r} is not supported (vanilla, none)")


class Encoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult=(1, 2, 4, 8), num_res_blocks: int, attn_resolutions=(),
                 dropout: float = 0.0, resamp_with_conv: bool = True, in_channels: int,
                 resolution: int, z_channels: int, double_z: bool = True,
                 attn_type: str = "vanilla", out_ch=None, **ignored):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for level in range(self.num_resolutions):
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mult[level], ch * ch_mult[level]
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, dropout=dropout))
                block_in = block_out
                if res in attn_resolutions:
                    down.attn.append(_attn(block_in, attn_type))
            if level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout=dropout)
        self.mid.attn_1 = _attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout=dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for i, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i](h)
            if level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(ops.group_norm(h, self.norm_out, silu=True))


class Decoder(nn.Module):
    def __init__(self, *, ch: int, out_ch: int, ch_mult=(1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions=(), dropout: float = 0.0, resamp_with_conv: bool = True,
                 resolution: int, z_channels: int, give_pre_end: bool = False,
                 tanh_out: bool = False, attn_type: str = "vanilla", **ignored):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.give_pre_end, self.tanh_out = give_pre_end, tanh_out
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout=dropout)
        self.mid.attn_1 = _attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout=dropout)
        ups = []
        for level in reversed(range(self.num_resolutions)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, dropout=dropout))
                block_in = block_out
                if res in attn_resolutions:
                    up.attn.append(_attn(block_in, attn_type))
            if level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                res *= 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)  # indexed by level, built from the lowest resolution
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(ops.group_norm(h, self.norm_out, silu=True))
        return torch.tanh(h) if self.tanh_out else h


class DiagonalGaussianDistribution:
    """N(mean, exp(logvar)) from moments (B, 2C, H, W); logvar clamped to [-30, 20]."""

    def __init__(self, parameters, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None):
        # Drawn on the generator's device (a CPU generator with a CUDA model: the trainers'
        # and diffusers' habit), so a seed gives the same sample on any device.
        from ..diffusion.schedule import randn_like
        return self.mean + self.std * randn_like(self.mean, generator)

    def mode(self):
        return self.mean

    def kl(self, other: "DiagonalGaussianDistribution | None" = None):
        """KL(self || other), or KL(self || N(0, I)), summed over (C, H, W)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        dims = list(range(1, self.mean.dim()))
        if other is None:
            return 0.5 * torch.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum((self.mean - other.mean) ** 2 / other.var + self.var / other.var
                               - 1.0 - self.logvar + other.logvar, dim=dims)

    def nll(self, sample, dims=(1, 2, 3)):
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        log2pi = 1.8378770664093453  # log(2 pi)
        return 0.5 * torch.sum(log2pi + self.logvar + (sample - self.mean) ** 2 / self.var,
                               dim=list(dims))


def _ddconfig(ddconfig):
    dd = dict(ddconfig)
    dd.setdefault("ch_mult", (1, 2, 4, 8))
    dd.setdefault("attn_resolutions", ())
    return dd


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder: ``encode(x)`` -> posterior, ``decode(z)`` -> image."""

    def __init__(self, ddconfig: dict, embed_dim: int, **ignored):
        super().__init__()
        dd = _ddconfig(ddconfig)
        if not dd.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig double_z=True (mean and log-variance)")
        self.embed_dim = embed_dim
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        self.quant_conv = nn.Conv2d(2 * dd["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, dd["z_channels"], 1)

    def encode(self, x) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample_posterior: bool = True, generator=None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def encode_latent(self, x, sample: bool = True, generator=None):
        posterior = self.encode(x)
        return posterior.sample(generator) if sample else posterior.mode()

    def decode_latent(self, z):
        return self.decode(z)


class VQModel(nn.Module):
    """Vector-quantized autoencoder (Esser et al. 2021).

    ``encode(x)`` -> (quant, emb_loss, info) as the original; ``encode_to_prequant(x)`` gives the
    unquantized encoding the LDM diffuses in; ``decode(h)`` quantizes it first unless
    ``force_not_quantize`` (``VQModelInterface``; quantizing a quantized tensor is a no-op);
    ``decode_code(indices)`` decodes codebook indices (B, H, W).
    """

    def __init__(self, ddconfig: dict, n_embed: int, embed_dim: int, beta: float = 0.25,
                 remap=None, sane_index_shape: bool = False, **ignored):
        super().__init__()
        dd = _ddconfig(ddconfig)
        self.n_embed, self.embed_dim = n_embed, embed_dim
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=beta, remap=remap,
                                        sane_index_shape=sane_index_shape)
        self.quant_conv = nn.Conv2d(dd["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, dd["z_channels"], 1)

    def encode_to_prequant(self, x):
        return self.quant_conv(self.encoder(x))

    def encode(self, x):
        return self.quantize(self.encode_to_prequant(x))

    def decode(self, h, force_not_quantize: bool = False):
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code):
        """code: indices (B, H, W) into the codebook."""
        return self.decode(self.quantize.get_codebook_entry(code), force_not_quantize=True)

    def forward(self, x):
        quant, diff, _ = self.encode(x)
        return self.decode(quant, force_not_quantize=True), diff

    def encode_latent(self, x, sample: bool = True, generator=None):
        return self.encode_to_prequant(x)

    def decode_latent(self, z):
        return self.decode(z)
