"""ldmfast modules converted from random diffusers models give the same outputs, and ldmfast's
CompVis-layout weights convert back through diffusers' own converter."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel, VQModel  # noqa: E402
from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,  # noqa: E402
                                                 convert_ldm_vae_checkpoint)

from ldmfast.checkpoint import from_diffusers  # noqa: E402
from ldmfast.configs import get  # noqa: E402
from ldmfast.models import build_unet  # noqa: E402

RTOL = 1e-4  # fp32, relative to the largest output magnitude


def rel_err(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def randomize(module, seed=0, std=0.1):
    """Random weights everywhere: diffusers zero-initialises output convs, which would hide a
    wrong mapping of those layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
    return module.eval()


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def tiny_cond_unet(**kw):
    args = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=16, attention_head_dim=2, norm_num_groups=32)
    args.update(kw)
    return randomize(UNet2DConditionModel(**args))


@pytest.mark.parametrize("kw", [
    {},  # SD-1 style: conv projections, a head count
    {"use_linear_projection": True, "attention_head_dim": [1, 2]},  # SD-2: linear, head width 32
    {"transformer_layers_per_block": 2, "num_class_embeds": 10},
    {"resnet_time_scale_shift": "scale_shift", "layers_per_block": 2,
     "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
     "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")},
], ids=["sd1-like", "sd2-like", "depth2-classes", "scale-shift-all-attn"])
def test_unet2d_condition(kw):
    d = tiny_cond_unet(**kw)
    u = from_diffusers(d)
    assert n_params(u) == n_params(d)
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    t = torch.tensor([3, 870])
    y = torch.tensor([1, 7]) if "num_class_embeds" in kw else None
    with torch.no_grad():
        ref = d(x, t, c, class_labels=y).sample
        out = u(x, t, c, y=y)
    assert rel_err(out, ref) < RTOL


def test_same_dtype_and_device():
    d = tiny_cond_unet().double()
    u = from_diffusers(d)
    p = next(u.parameters())
    assert p.dtype == torch.float64 and p.device == next(d.parameters()).device
    x, c = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.randn(1, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(u(x, torch.tensor([10]), c), d(x, torch.tensor([10]), c).sample) < 1e-10


def test_weights_are_copies():
    d = tiny_cond_unet()
    u = from_diffusers(d)
    with torch.no_grad():
        u.input_blocks[0][0].weight.zero_()
    assert d.conv_in.weight.abs().sum() > 0


@pytest.mark.parametrize("resample", ["conv", "resnet"])
def test_unet2d_unconditional(resample):
    d = randomize(UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"), attention_head_dim=16,
        downsample_type=resample, upsample_type=resample))
    u = from_diffusers(d)
    assert n_params(u) == n_params(d)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(u(x, torch.tensor([0, 999])), d(x, torch.tensor([0, 999])).sample) < RTOL


def test_unet2d_class_scale_shift():
    d = randomize(UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
        num_class_embeds=5, resnet_time_scale_shift="scale_shift", attn_norm_num_groups=32))
    u = from_diffusers(d)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 4])
    with torch.no_grad():
        ref = d(x, torch.tensor([5, 50]), class_labels=y).sample
        assert rel_err(u(x, torch.tensor([5, 50]), y=y), ref) < RTOL


def vae_kwargs(**kw):
    args = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64),
                latent_channels=4, norm_num_groups=32, layers_per_block=2, sample_size=32)
    args.update(kw)
    return args


def test_autoencoder_kl():
    d = randomize(AutoencoderKL(**vae_kwargs()), std=0.05)
    m = from_diffusers(d)
    assert n_params(m) == n_params(d)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dist, post = d.encode(x).latent_dist, m.encode(x)
        assert rel_err(post.mean, dist.mean) < RTOL
        assert rel_err(post.std, dist.std) < RTOL
        z = post.mode()
        assert rel_err(m.decode(z), d.decode(z).sample) < RTOL


def test_vq_model():
    d = randomize(VQModel(**vae_kwargs(num_vq_embeddings=64, vq_embed_dim=3)), std=0.05)
    m = from_diffusers(d)
    assert n_params(m) == n_params(d)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = d.encode(x).latents
        assert rel_err(m.encode_to_prequant(x), h) < RTOL
        quant, loss, (_, _, idx) = m.encode(x)
        ref_quant, ref_loss, (_, _, ref_idx) = d.quantize(h)
        assert torch.equal(idx.reshape(-1), ref_idx.reshape(-1))
        assert rel_err(quant, ref_quant) < RTOL and rel_err(loss, ref_loss) < RTOL
        assert rel_err(m.decode(h), d.decode(h).sample) < RTOL  # both quantize first


def test_refuses_what_compvis_cannot_express():
    with pytest.raises(ValueError, match="only_cross_attention"):
        from_diffusers(tiny_cond_unet(only_cross_attention=True))
    with pytest.raises(ValueError, match="not supported"):
        from_diffusers(torch.nn.Linear(2, 2))


def test_diffusers_converter_reads_our_layout():
    """diffusers' own CompVis converters map ldmfast's prefixed state dicts correctly."""
    d = tiny_cond_unet()
    u = from_diffusers(d)
    sd = {"model.diffusion_model." + k: v for k, v in u.state_dict().items()}
    back = UNet2DConditionModel(**d.config).eval()
    back.load_state_dict(convert_ldm_unet_checkpoint(sd, dict(d.config)), strict=True)
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16)
    with torch.no_grad():
        assert rel_err(u(x, torch.tensor([42]), c), back(x, torch.tensor([42]), c).sample) < RTOL

    vae = randomize(AutoencoderKL(**vae_kwargs()), std=0.05)
    m = from_diffusers(vae)
    sd = {"first_stage_model." + k: v for k, v in m.state_dict().items()}
    vback = AutoencoderKL(**vae.config).eval()
    vback.load_state_dict(convert_ldm_vae_checkpoint(sd, dict(vae.config)), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(m.encode(x).mean, vback.encode(x).latent_dist.mean) < RTOL


def test_sd1_unet_parameter_count_on_meta():
    with torch.device("meta"):
        u = build_unet(get("sd1")["unet"])
        d = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    assert n_params(u) == n_params(d) == 859_520_964


def fill_cheaply(module, seed=0):
    """Random-looking weights for a big model at memory speed: slices of one random pool,
    scaled by fan-in (drawing 860M fresh numbers would dominate the test)."""
    pool = torch.rand(2 << 20, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    half = pool.numel() // 2
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            flat, off = p.view(-1), (i * 7919) % half
            scale = p[0].numel() ** -0.5 if p.dim() > 1 else 0.1
            for s in range(0, flat.numel(), half):
                k = min(half, flat.numel() - s)
                flat[s:s + k].copy_(pool[off:off + k]).mul_(scale)
            if p.dim() == 1 and i % 2:
                flat.add_(1.0)  # norm weights near one, biases near zero, roughly
    return module.eval()


@pytest.mark.slow
def test_sd15_shaped_unet():
    """The real SD-1.5 U-Net shape (random weights) at an 8x8 latent, batch 1."""
    with torch.device("meta"):
        d = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    d = fill_cheaply(d.to_empty(device="cpu"))
    u = from_diffusers(d)
    assert n_params(u) == n_params(d) == 859_520_964
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        ref = d(x, torch.tensor([500]), c).sample
        out = u(x, torch.tensor([500]), c)
    assert rel_err(out, ref) < RTOL
