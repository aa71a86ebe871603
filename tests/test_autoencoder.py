"""First stages: the original's attention and padding, the Gaussian posterior, the vector
quantizer, and the paper's autoencoder presets."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldmfast import configs
from ldmfast.models import (AutoencoderKL, DiagonalGaussianDistribution, VectorQuantizer, VQModel,
                            build_first_stage)
from ldmfast.models.autoencoder import AttnBlock, Downsample


def tiny_dd(**kw):
    dd = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
              ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], dropout=0.0)
    dd.update(kw)
    return dd


def test_attn_block_matches_the_original():
    torch.manual_seed(0)
    blk = AttnBlock(32).double()
    x = torch.randn(2, 32, 3, 5, dtype=torch.float64)
    h = F.group_norm(x, 32, blk.norm.weight, blk.norm.bias, 1e-6)
    q, k, v = blk.q(h), blk.k(h), blk.v(h)
    b, c, hh, ww = q.shape
    w = torch.softmax(torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c ** -0.5, dim=2)
    a = torch.bmm(v.reshape(b, c, -1), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), x + blk.proj_out(a), rtol=1e-10, atol=1e-10)


def test_downsample_pads_right_and_bottom():
    d = Downsample(4, True)
    x = torch.randn(1, 4, 7, 6)
    with torch.no_grad():
        ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), d.conv.weight, d.conv.bias, stride=2)
        torch.testing.assert_close(d(x), ref)
    assert d(x).shape[-2:] == (3, 3)  # floor((7 + 1 - 3) / 2) + 1


def test_kl_autoencoder_shapes_and_posterior():
    torch.manual_seed(0)
    ae = AutoencoderKL(tiny_dd(), embed_dim=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        post = ae.encode(x)
        assert post.mean.shape == (2, 4, 16, 16)
        s1 = post.sample(torch.Generator().manual_seed(3))
        s2 = post.sample(torch.Generator().manual_seed(3))
        assert torch.equal(s1, s2) and not torch.equal(s1, post.mode())
        assert ae.decode(post.mode()).shape == x.shape
        assert torch.equal(ae.encode_latent(x, sample=False), post.mode())
        ae_cl = ae.to(memory_format=torch.channels_last)
        torch.testing.assert_close(ae_cl.decode(post.mode().to(memory_format=torch.channels_last)),
                                   ae.decode(post.mode()), rtol=1e-4, atol=1e-5)


def test_diagonal_gaussian():
    mean, logvar = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    d = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (0.5 * logvar).exp()),
                                            torch.distributions.Normal(0.0, 1.0)).sum((1, 2, 3))
    torch.testing.assert_close(d.kl(), ref)
    other = DiagonalGaussianDistribution(torch.randn(2, 6, 4, 4, dtype=torch.float64))
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, d.std), torch.distributions.Normal(other.mean, other.std)).sum((1, 2, 3))
    torch.testing.assert_close(d.kl(other), ref)
    x = torch.randn_like(mean)
    torch.testing.assert_close(d.nll(x), -torch.distributions.Normal(mean, d.std).log_prob(x).sum((1, 2, 3)))
    clamped = DiagonalGaussianDistribution(torch.cat([mean, torch.full_like(logvar, 100.0)], 1))
    assert clamped.logvar.max() == 20.0
    det = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1), deterministic=True)
    assert torch.equal(det.sample(), mean) and torch.equal(det.kl(), torch.zeros(2))


def test_vector_quantizer():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 3, beta=0.25)
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    zq, loss, (_, _, idx) = vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    brute = torch.cdist(flat, vq.embedding.weight.detach()).argmin(1)
    assert torch.equal(idx, brute)
    nearest = vq.embedding.weight[brute].reshape(2, 4, 5, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(zq, nearest)
    mse = ((nearest - z) ** 2).mean()
    torch.testing.assert_close(loss, 1.25 * mse)  # ||sg[zq]-z||^2 + beta ||zq-sg[z]||^2
    zq.sum().backward()  # straight-through: d zq / d z = identity
    torch.testing.assert_close(z.grad, torch.ones_like(z))
    torch.testing.assert_close(vq.get_codebook_entry(idx.reshape(2, 4, 5)), zq.detach())


def test_vq_model():
    torch.manual_seed(0)
    m = VQModel(tiny_dd(double_z=False, z_channels=3), n_embed=32, embed_dim=3,
                sane_index_shape=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        quant, loss, (_, _, idx) = m.encode(x)
        assert quant.shape == (2, 3, 16, 16) and idx.shape == (2, 16, 16) and loss.dim() == 0
        dec = m.decode(quant, force_not_quantize=True)
        torch.testing.assert_close(m.decode_code(idx), dec)
        h = m.encode_to_prequant(x)
        torch.testing.assert_close(m.decode(h), dec)  # decode quantizes, as VQModelInterface
        torch.testing.assert_close(m.decode_latent(m.encode_latent(x)), dec)


def test_mid_attention_can_be_absent():
    m = build_first_stage(configs.first_stage("vq-f4-noattn"))
    assert isinstance(m.encoder.mid.attn_1, torch.nn.Identity)
    assert not any("attn_1" in k for k in m.state_dict())


# parameter counts of the paper's autoencoders (kl-f8 is SD's VAE: 83,653,863)
PARAMS = {"kl-f4": 55_312_063, "kl-f8": 83_653_863, "kl-f16": 69_610_963,
          "kl-f32": 103_880_131, "vq-f4": 55_322_782, "vq-f8": 67_717_295,
          "vq-f16": 69_593_371}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_presets(name):
    cfg = configs.first_stage(name)
    with torch.device("meta"):
        m = build_first_stage(cfg)
    assert sum(p.numel() for p in m.parameters()) == PARAMS[name]
    f = 2 ** (len(cfg["ddconfig"]["ch_mult"]) - 1)
    small = dict(cfg, ddconfig=dict(cfg["ddconfig"], ch=32))  # same structure, narrow
    m = build_first_stage(small).eval()
    x = torch.randn(1, 3, 2 * f, 2 * f)
    with torch.no_grad():
        z = m.encode_latent(x)
        assert z.shape == (1, cfg["embed_dim"], 2, 2)
        assert m.decode_latent(z).shape == x.shape


def test_bad_configs():
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(tiny_dd(double_z=False), embed_dim=4)
    with pytest.raises(ValueError, match="attn_type"):
        AutoencoderKL(tiny_dd(attn_type="linear"), embed_dim=4)
    with pytest.raises(ValueError, match="first_stage type"):
        build_first_stage({"type": "gan"})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_posterior_sample_with_a_cpu_generator_on_cuda():
    """The trainers (and diffusers users) pass a CPU generator with a CUDA model: the noise is
    drawn on the generator's device, the same sample as on the CPU."""
    params = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    cpu = DiagonalGaussianDistribution(params).sample(torch.Generator().manual_seed(3))
    gpu = DiagonalGaussianDistribution(params.cuda()).sample(torch.Generator().manual_seed(3))
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu)
