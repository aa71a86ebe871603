"""LatentDiffusion: parity with diffusers' StableDiffusionPipeline, and every task end to end.

The diffusers pipeline is built offline with random weights: a tiny U-Net, VAE and CLIP text
model, and a CLIP tokenizer from a vocabulary and merges written here.
"""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ldmfast import images as im
from ldmfast.pipeline import LatentDiffusion

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

REL = 1e-4  # fp32 relative error budget for parity with diffusers


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def rand_image(h=32, w=32, b=1, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------ the diffusers pipeline

def write_clip_tokenizer(folder):
    """A CLIP BPE tokenizer over letters and a few merges, written as vocab.json/merges.txt."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = (["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
              + ["th", "the</w>", "re", "red</w>", "ca", "cat</w>"])
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\nt h\nth e</w>\nr e\nre d</w>\nc a\nca t</w>\n")
    return transformers.CLIPTokenizer(os.path.join(folder, "vocab.json"),
                                      os.path.join(folder, "merges.txt"), model_max_length=77)


def make_sd_pipeline(folder, prediction_type="epsilon"):
    torch.manual_seed(0)
    tokenizer = write_clip_tokenizer(folder)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4)
    vae = diffusers.AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
        max_position_embeddings=77))
    # Random weights give eps a std of ~0.3; scaled to ~1 as a trained model's.
    with torch.no_grad():
        unet.conv_out.weight.mul_(3)
    scheduler = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
        set_alpha_to_one=False, clip_sample=False, prediction_type=prediction_type)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    return make_sd_pipeline(str(tmp_path_factory.mktemp("clip_tokenizer")))


def _embeds(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 77, 32, generator=g), torch.randn(b, 77, 32, generator=g),
            torch.randn(b, 4, 16, 16, generator=g))


def _run_diffusers(pipe, cond, uncond, x_T, steps, guidance, output_type="latent"):
    final = {}

    def grab(p, i, t, kw):
        final["latents"] = kw["latents"]
        return kw

    out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=x_T.clone(),
               num_inference_steps=steps, guidance_scale=guidance, output_type=output_type,
               callback_on_step_end=grab).images
    return final["latents"], out


def test_ddim_with_guidance_matches_diffusers(sd_pipe):
    model = LatentDiffusion.from_diffusers(sd_pipe)
    assert model.scale_factor == sd_pipe.vae.config.scaling_factor
    assert model.parameterization == "eps" and model.conditioning_key == "crossattn"
    assert model.conditioning == "text" and model.context_dim == 32 and model.size_multiple == 4
    cond, uncond, x_T = _embeds()
    ref_latents, ref_images = _run_diffusers(sd_pipe, cond, uncond, x_T, 8, 7.5, "pt")
    ours = model.sample(cond=cond, uncond=uncond, steps=8, guidance_scale=7.5, x_T=x_T,
                        progress=False)
    assert (ours - x_T).norm() > 0.1 * x_T.norm()  # the model moved the sample
    assert rel_err(ours, ref_latents) < REL
    images = (model.decode(ours) / 2 + 0.5).clamp(0, 1)  # diffusers' post-processing
    assert rel_err(images, ref_images) < REL
    # and through PIL, pixel for pixel up to rounding at the half-way points
    ours_pil, ref_pil = im.to_pil(model.decode(ours)), im.to_pil(ref_images * 2 - 1)
    for a, b in zip(ours_pil, ref_pil):
        diff = (torch.tensor(list(a.getdata())) - torch.tensor(list(b.getdata()))).abs()
        assert diff.max() <= 1


@pytest.mark.parametrize("beta,param", [("linear", "v"), ("sqrt_linear", "eps"), ("cosine", "x0")])
def test_diffusers_scheduler_kwargs_invert_from_diffusers(sd_pipe, beta, param):
    from ldmfast.pipeline import diffusers_scheduler_kwargs
    want = {"beta_schedule": beta, "linear_start": 0.0015, "linear_end": 0.0195,
            "parameterization": param}
    pipe = copy.copy(sd_pipe)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(
        sd_pipe.scheduler.config, **diffusers_scheduler_kwargs({"diffusion": want}))
    got = LatentDiffusion.from_diffusers(pipe).config["diffusion"]
    assert {k: got[k] for k in want} == want
    with pytest.raises(ValueError, match="beta_schedule 'quad' has no diffusers equivalent"):
        diffusers_scheduler_kwargs({"diffusion": {"beta_schedule": "quad"}})


def test_text_encoder_matches_diffusers(sd_pipe):
    model = LatentDiffusion.from_diffusers(sd_pipe)
    prompts = ["the red cat", "a cat"]
    ref = sd_pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    torch.testing.assert_close(model.encode_text(prompts), ref, rtol=1e-5, atol=1e-5)


def test_dpm_solver_matches_diffusers(sd_pipe):
    pipe = copy.copy(sd_pipe)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        sd_pipe.scheduler.config, timestep_spacing="linspace", steps_offset=0)
    model = LatentDiffusion.from_diffusers(pipe)
    cond, uncond, x_T = _embeds(1, seed=1)
    ref, _ = _run_diffusers(pipe, cond, uncond, x_T, 6, 5.0)
    ours = model.sample(cond=cond, uncond=uncond, steps=6, guidance_scale=5.0, x_T=x_T,
                        sampler="dpmpp_2m", progress=False)
    assert rel_err(ours, ref) < REL


def test_v_prediction_matches_diffusers(sd_pipe, tmp_path):
    pipe = copy.copy(sd_pipe)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(sd_pipe.scheduler.config,
                                                         prediction_type="v_prediction")
    model = LatentDiffusion.from_diffusers(pipe)
    assert model.parameterization == "v"
    cond, uncond, x_T = _embeds(1, seed=2)
    ref, _ = _run_diffusers(pipe, cond, uncond, x_T, 6, 3.0)
    ours = model.sample(cond=cond, uncond=uncond, steps=6, guidance_scale=3.0, x_T=x_T,
                        progress=False)
    assert rel_err(ours, ref) < REL


def test_super_resolution_matches_diffusers_ldm_sr():
    """Concat conditioning and a VQ first stage against LDMSuperResolutionPipeline, seed for
    seed (both draw x_T from the same CPU generator)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=6, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
    with torch.no_grad():
        unet.conv_out.weight.mul_(3)
    vq = diffusers.VQModel(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=3,
        num_vq_embeddings=32, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015,
                                        beta_end=0.0155, steps_offset=1, set_alpha_to_one=False,
                                        clip_sample=False)
    pipe = diffusers.LDMSuperResolutionPipeline(vqvae=vq, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    low = rand_image(8, 8, seed=1)
    ref = pipe(low, num_inference_steps=5, eta=0.0, generator=torch.Generator().manual_seed(2),
               output_type="np").images
    model = LatentDiffusion.from_diffusers(pipe)
    assert model.conditioning_key == "concat" and model.scale_factor == 1.0
    out = model.super_resolve(low, steps=5, seed=2, eta=0.0, progress=False, output_type="tensor")
    out = (out / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert rel_err(out, torch.from_numpy(ref)) < REL


def test_seeded_sampling_is_reproducible(sd_pipe):
    model = LatentDiffusion.from_diffusers(sd_pipe)
    cond, uncond, _ = _embeds(1)
    def run(seed):
        return model.sample(cond, uncond, steps=3, guidance_scale=2.0, progress=False,
                            shape=(1, 4, 16, 16), eta=0.5,
                            generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    steps_seen = []
    model.sample(cond, steps=4, x_T=torch.randn(1, 4, 16, 16), progress=False,
                 callback=lambda d: steps_seen.append(int(d["t"])))
    assert steps_seen == [751, 501, 251, 1]


# -------------------------------------------------------------------- tasks on the tiny preset

configs = pytest.importorskip("ldmfast.configs")
# U-Nets without cross-attention, for models that take no context
NO_XATTN = {"unet__use_spatial_transformer": False, "unet__context_dim": None}


def tiny(**changes):
    """The ``tiny`` preset with ``section__key=value`` (or ``section=value``) changes."""
    cfg = configs.get("tiny")
    for name, value in changes.items():
        section, _, key = name.partition("__")
        if key:
            cfg[section][key] = value
        else:
            cfg[section] = value
    torch.manual_seed(0)
    return LatentDiffusion.from_components(configs.build(cfg))


@pytest.fixture(scope="module")
def txt_model():
    return tiny()



def test_txt2img_shapes_seeds_and_files(txt_model, tmp_path):
    f = txt_model.downsampling_factor
    assert f == 4 and txt_model.latent_channels == 4
    kw = dict(steps=2, guidance_scale=3.0, height=32, width=48, progress=False)
    a = txt_model.txt2img("a red cat", seed=1, batch=2, out=tmp_path / "cat.png", **kw)
    assert len(a) == 2 and all(i.size == (48, 32) and i.mode == "RGB" for i in a)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cat-000.png", "cat-001.png", "cat.png"]  # images, grid, no temp files
    assert Image.open(tmp_path / "cat-000.png").tobytes() == a[0].tobytes()
    b = txt_model.txt2img("a red cat", seed=1, batch=2, **kw)
    c = txt_model.txt2img("a red cat", seed=2, batch=2, **kw)
    assert a[0].tobytes() == b[0].tobytes() and a[0].tobytes() != c[0].tobytes()
    z = txt_model.txt2img("a red cat", seed=1, steps=2, progress=False, output_type="latent")
    assert z.shape == (1, 4, txt_model.latent_size, txt_model.latent_size)
    with pytest.raises(ValueError, match="height must be a positive multiple of 8"):
        txt_model.txt2img("a cat", steps=1, height=30, width=32, progress=False)


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m"])
def test_txt2img_other_samplers(txt_model, sampler):
    out = txt_model.txt2img(["a cat", "a dog"], steps=3, seed=0, height=16, width=16,
                            sampler=sampler, progress=False, output_type="tensor")
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    # a text model's missing uncond is the empty prompt
    x_T = torch.randn(1, 4, 4, 4)
    auto = txt_model.sample("a cat", steps=2, guidance_scale=3.0, x_T=x_T, sampler=sampler,
                            progress=False, generator=torch.Generator().manual_seed(0))
    explicit = txt_model.sample(txt_model.encode_text("a cat"), txt_model.encode_text(""),
                                steps=2, guidance_scale=3.0, x_T=x_T, sampler=sampler,
                                progress=False, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(auto, explicit, rtol=0, atol=0)
    with pytest.raises(ValueError, match="eta applies to the DDIM sampler only"):
        txt_model.sample("a cat", steps=2, sampler=sampler, eta=0.5, progress=False)


def test_encode_decode_scale_factor(txt_model):
    x = rand_image()
    z = txt_model.encode(x)
    assert z.shape == (1, 4, 8, 8)
    assert txt_model.decode(z).shape == (1, 3, 32, 32)
    model = tiny(diffusion__scale_factor=0.5)
    model.load_state_dict(txt_model.state_dict())
    torch.testing.assert_close(model.encode(x), 0.5 * z)
    torch.testing.assert_close(model.decode(0.5 * z), txt_model.decode(z))
    pil = im.to_pil(x)[0]
    assert txt_model.encode(pil).shape == (1, 4, 8, 8)


def test_sample_argument_checks(txt_model):
    with pytest.raises(ValueError, match="batch 2, the sample has 3"):
        txt_model.sample(torch.randn(2, 16, 32), steps=1, shape=(3, 4, 8, 8), progress=False)
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        txt_model.sample("a cat", steps=1, shape=(1, 3, 8, 8), progress=False)
    with pytest.raises(ValueError, match="takes no concat"):
        txt_model.sample("a cat", steps=1, concat=torch.randn(1, 3, 8, 8), progress=False)
    with pytest.raises(ValueError, match="unknown sampler"):
        txt_model.sample("a cat", steps=1, sampler="heun", progress=False)


def test_class_conditional_through_the_class_embedder():
    model = tiny(cond_stage={"type": "class", "embed_dim": 32, "n_classes": 11})
    out = model.sample_class([1, 2, 3], steps=2, guidance_scale=3.0, uncond_label=10, seed=0,
                             height=16, width=16, progress=False)
    assert len(out) == 3 and out[0].size == (16, 16)
    with pytest.raises(ValueError, match="uncond_label"):
        model.sample_class([1], steps=1, guidance_scale=3.0, progress=False)
    # labels outside the embedding's table, or not integers, are refused by name
    with pytest.raises(ValueError, match=r"labels must be in \[0, 11\), got \[11\]"):
        model.sample_class([1, 11], steps=1, progress=False)
    with pytest.raises(TypeError, match="labels must be integers"):
        model.sample_class([1.5], steps=1, progress=False)
    with pytest.raises(ValueError, match="uncond_label must be between 0 and 10, got 11"):
        model.sample_class([1], steps=1, guidance_scale=3.0, uncond_label=11, progress=False)
    with pytest.raises(ValueError, match=r"cond has class labels outside \[0, 11\): \[12\]"):
        model.sample(torch.tensor([12]), steps=1, progress=False)


def test_class_conditional_through_y():
    model = tiny(unet__num_classes=10, cond_stage=None, diffusion__conditioning_key="adm",
                 **NO_XATTN)
    seen = []
    forward = model.unet.forward
    def spy(x, t, context=None, y=None):
        seen.append(y)
        return forward(x, t, context, y)

    model.unet.forward = spy
    z = model.sample_class([4, 7], steps=2, seed=0, height=16, width=16, progress=False,
                           output_type="latent")
    assert z.shape == (2, 4, 4, 4) and torch.equal(seen[0], torch.tensor([4, 7]))


def test_unconditional():
    model = tiny(cond_stage=None, diffusion__conditioning_key=None, **NO_XATTN)
    out = model.sample_unconditional(2, steps=2, seed=0, height=16, width=16, progress=False)
    assert len(out) == 2 and out[0].size == (16, 16)


@pytest.fixture(scope="module")
def sr_model():
    return tiny(cond_stage={"type": "identity"}, diffusion__conditioning_key="concat",
                unet__in_channels=7, **NO_XATTN)


def test_super_resolution_is_4x_and_checks_channels(sr_model, txt_model):
    low = rand_image(8, 12)
    out = sr_model.super_resolve(low, steps=2, seed=0, progress=False)
    assert out[0].size == (48, 32)  # 4x of 12x8 (W x H)
    out = sr_model.super_resolve(im.to_pil(low)[0], steps=2, seed=0, progress=False)
    assert out[0].size == (48, 32)
    msg = ("this model's U-Net takes 7 input channels: 4 latent + 3 concat; "
           "got concat with 4 channels")
    with pytest.raises(ValueError, match=msg.replace("+", r"\+")):
        sr_model.sample(concat=torch.randn(1, 4, 8, 8), steps=1, progress=False)
    with pytest.raises(ValueError, match="pass concat"):
        sr_model.sample(steps=1, progress=False)
    with pytest.raises(ValueError, match="inpainting needs 4 \\+ 5"):
        sr_model.inpaint(rand_image(), torch.ones(1, 1, 32, 32), steps=1, progress=False)


def test_inpainting_model_concatenates_masked_latent_and_mask():
    model = tiny(cond_stage={"type": "first_stage"}, diffusion__conditioning_key="concat",
                 unet__in_channels=9, **NO_XATTN)
    x = rand_image()
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :, 16:] = 1  # fill the right half
    seen = {}
    forward = model.unet.forward

    def spy(xin, t, context=None, y=None):
        seen["x"] = xin
        return forward(xin, t, context, y)

    model.unet.forward = spy
    out = model.inpaint(x, mask, steps=2, seed=0, progress=False, output_type="tensor")
    assert out.shape == (1, 3, 32, 32) and seen["x"].shape == (1, 9, 8, 8)
    # LDM's order: the masked image's latent, then the mask at the latent size
    torch.testing.assert_close(seen["x"][:, 4:8], model.encode((1 - mask) * x))
    assert torch.equal(seen["x"][:, 8:], torch.nn.functional.interpolate(mask, size=(8, 8)))
    torch.testing.assert_close(out[..., :16], x[..., :16])  # the known half is the input
    mask_pil = Image.fromarray((mask[0, 0].numpy() * 255).astype("uint8"))
    pil = model.inpaint(im.to_pil(x)[0], mask_pil,
                        steps=2, seed=0, progress=False)
    assert pil[0].size == (32, 32)
    with pytest.raises(ValueError, match="mask is"):
        model.inpaint(x, torch.ones(1, 1, 16, 16), steps=1, progress=False)
    # one mask serves a batch of images (it is concatenated per image)
    two = model.inpaint(rand_image(b=2), mask, steps=1, seed=0, progress=False,
                        output_type="tensor")
    assert two.shape == (2, 3, 32, 32)


def test_inpainting_with_a_text_model_blends_the_known_region(txt_model):
    x = rand_image()
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 16:, :] = 1
    out = txt_model.inpaint(x, mask, prompt="a red cat", guidance_scale=2.0, steps=3, seed=0,
                            progress=False, output_type="tensor")
    torch.testing.assert_close(out[..., :16, :], x[..., :16, :])
    z = txt_model.inpaint(x, mask, prompt="a cat", steps=2, seed=0, progress=False,
                          output_type="latent")
    keep = 1 - torch.nn.functional.interpolate(mask, size=(8, 8))
    torch.testing.assert_close(z * keep, txt_model.encode(x) * keep)


def test_img2img(txt_model):
    x = rand_image()
    out = txt_model.img2img(x, strength=0.5, prompt="a blue house", steps=4, seed=0,
                            progress=False)
    assert out[0].size == (32, 32)
    seen = []
    txt_model.img2img(x, strength=0.5, prompt="a blue house", steps=4, seed=0, progress=False,
                      callback=lambda d: seen.append(int(d["t"])))
    assert seen == txt_model.steps(4).timesteps.tolist()[2:]  # strength 0.5: the last 2 of 4
    same = txt_model.img2img(x, strength=0.0, steps=4, progress=False, output_type="tensor")
    torch.testing.assert_close(same, txt_model.decode(txt_model.encode(x)))
    with pytest.raises(ValueError, match="strength"):
        txt_model.img2img(x, strength=1.5, steps=2, progress=False)


def test_save_load_roundtrip(txt_model, tmp_path):
    from ldmfast import checkpoint
    import ldmfast
    path = checkpoint.save(txt_model, str(tmp_path / "tiny.safetensors"))
    loaded = ldmfast.load(path)
    assert isinstance(loaded, LatentDiffusion) and loaded.config == txt_model.config
    x_T = torch.randn(1, 4, 8, 8)
    a = txt_model.sample("a cat", steps=2, x_T=x_T, progress=False)
    b = loaded.sample("a cat", steps=2, x_T=x_T, progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_schedule_follows_the_model_but_stays_float32(txt_model):
    model = tiny()
    model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.schedule.alphas_cumprod.dtype == torch.float32
    z = model.txt2img("a cat", steps=2, seed=0, height=16, width=16, progress=False,
                      output_type="latent")
    assert z.dtype == torch.bfloat16 and torch.isfinite(z.float()).all()


# ------------------------------------------------------------------------------ image helpers

def test_image_conversions_and_grid(tmp_path):
    arr = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    x = arr.float() / 127.5 - 1
    pils = im.to_pil(x)
    assert [p.size for p in pils] == [(7, 5)] * 2
    back = im.to_tensor(pils)
    torch.testing.assert_close(back, x)  # exact round trip for 8-bit values
    assert torch.equal(im.to_tensor(x[0]), x[:1])
    # uint8 tensors (torchvision's read_image) and arrays are scaled alike; other dtypes refused.
    torch.testing.assert_close(im.to_tensor(arr), x)
    torch.testing.assert_close(im.to_tensor(arr[1]), x[1:])
    torch.testing.assert_close(im.to_tensor(arr.permute(0, 2, 3, 1).numpy()), x)
    with pytest.raises(ValueError, match="uint8 .0..255. or floating point"):
        im.to_tensor(arr.to(torch.int32))
    with pytest.raises(ValueError, match="must be uint8 .H, W, 3.*float32"):
        im.to_tensor(arr.permute(0, 2, 3, 1).numpy().astype(np.float32))
    grid = im.make_grid(pils + pils[:1], pad=1)
    assert grid.size == (2 * 7 + 3, 2 * 5 + 3)
    m = im.mask_to_tensor(Image.fromarray(((arr[0, 0] > 127).numpy() * 255).astype("uint8")))
    assert m.shape == (1, 1, 5, 7) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(m[0, 0], (arr[0, 0] > 127).float())
    with pytest.raises(ValueError, match="one size"):
        im.to_tensor([pils[0], pils[0].resize((3, 3))])
    path = im.save_png(pils[0], tmp_path / "sub" / "a.png")
    assert os.listdir(tmp_path / "sub") == ["a.png"]
    assert Image.open(path).tobytes() == pils[0].tobytes()


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_context_projected_once_per_sampling_run(txt_model, monkeypatch, guidance):
    """Cross-attention K/V of the conditioning are projected once per run, not at every step,
    and the result equals the per-step projection's."""
    from ldmfast.models.transformer import CrossAttention

    cond = txt_model.encode_text(["a red circle"])
    uncond = txt_model.encode_text([""])
    x_T = torch.randn(1, txt_model.latent_channels, 8, 8, generator=torch.Generator().manual_seed(3))
    layers = len(list(txt_model.unet._context_layers()))
    calls = []
    real = CrossAttention.project_context
    # Only the layers that attend to the conditioning count (self-attention projects x).
    monkeypatch.setattr(CrossAttention, "project_context",
                        lambda self, c: (self.context_slot is not None and calls.append(1)) or real(self, c))
    z = txt_model.sample(cond=cond, uncond=uncond, steps=4, guidance_scale=guidance, x_T=x_T,
                         progress=False)
    assert layers > 0 and len(calls) == layers
    # The same run with the preparation disabled projects at every step and agrees.
    monkeypatch.setattr(type(txt_model.unet), "prepare_context", property(lambda self: None))
    calls.clear()
    z_steps = txt_model.sample(cond=cond, uncond=uncond, steps=4, guidance_scale=guidance, x_T=x_T,
                               progress=False)
    assert len(calls) == 4 * layers
    assert torch.equal(z, z_steps)


# ---------------------------------------------------------------- arguments refused up front

X, MASK = rand_image(), torch.ones(1, 1, 32, 32)
Q = dict(steps=1, progress=False)
NAN = float("nan")
# id: (call on (text model, super-resolution model), error type, message pattern)
BAD_CALLS = {
    # sizes: multiples of f = 4 are not enough, the U-Net halves the latent once
    "height-odd-latent": (lambda t, sr: t.txt2img("a cat", height=36, width=32, **Q), ValueError,
                          r"height must be a positive multiple of 8 \(the first stage's factor 4 "
                          r"times 2\*\*1 for the U-Net's 1 downsampling\), got 36"),
    "height-0": (lambda t, sr: t.txt2img("a cat", height=0, **Q), ValueError,
                 "height must be a positive multiple of 8 .*got 0"),
    "width-negative": (lambda t, sr: t.txt2img("a cat", width=-32, **Q), ValueError,
                       "width must be a positive multiple of 8 .*got -32"),
    "height-float": (lambda t, sr: t.txt2img("a cat", height=32.0, **Q), TypeError,
                     "height must be an integer, got float"),
    "img2img-size": (lambda t, sr: t.img2img(rand_image(36, 32), prompt="a cat", **Q), ValueError,
                     "image must have a height and width that are multiples of 8 .*got 36x32"),
    "inpaint-size": (lambda t, sr: t.inpaint(rand_image(36, 32), torch.ones(36, 32), prompt="a",
                                             **Q), ValueError,
                     "image must have a height and width that are multiples of 8 .*got 36x32"),
    "sr-size": (lambda t, sr: sr.super_resolve(rand_image(9, 8), **Q), ValueError,
                "low_res_image must have a height and width that are multiples of 2 .*got 9x8"),
    # steps: DDIM's offset leaves 999 of the 1000 timesteps; integers only
    "ddim-1000-steps": (lambda t, sr: t.txt2img("a cat", steps=1000, progress=False), ValueError,
                        r"steps must be between 1 and 999 for the 'ddim' sampler \(its "
                        r"timesteps are offset by 1: step 1000 would land past timestep 999\)"),
    "steps-float": (lambda t, sr: t.txt2img("a cat", steps=2.5), TypeError,
                    "steps must be an integer, got float 2.5"),
    "steps-str": (lambda t, sr: t.txt2img("a cat", steps="3"), TypeError,
                  "steps must be an integer, got str '3'"),
    "img2img-steps-0": (lambda t, sr: t.img2img(X, prompt="a cat", steps=0), ValueError,
                        "steps must be between 1 and 999"),
    # eta: finite, in [0, 1]
    "eta-nan": (lambda t, sr: t.txt2img("a cat", eta=NAN, **Q), ValueError,
                r"eta must be a finite number between 0.0 and 1.0, got nan"),
    "eta-negative": (lambda t, sr: t.txt2img("a cat", eta=-1.0, **Q), ValueError,
                     "eta must be a finite number between 0.0 and 1.0, got -1.0"),
    "eta-above-1": (lambda t, sr: t.sample("a cat", eta=5.0, **Q), ValueError,
                    "eta must be a finite number between 0.0 and 1.0, got 5.0"),
    "eta-str": (lambda t, sr: t.txt2img("a cat", eta="0", **Q), TypeError,
                "eta must be a number, got str"),
    "sr-eta": (lambda t, sr: sr.super_resolve(rand_image(8, 8), eta=-2.0, **Q), ValueError,
               "eta must be a finite number between 0.0 and 1.0, got -2.0"),
    # the conditioning a model needs, or does not take
    "img2img-no-prompt": (lambda t, sr: t.img2img(X, steps=4, progress=False), ValueError,
                          "this model is text-conditioned: pass prompt"),
    "inpaint-no-prompt": (lambda t, sr: t.inpaint(X, MASK, **Q), ValueError,
                          "this model is text-conditioned: pass prompt"),
    "sample-no-cond": (lambda t, sr: t.sample(None, **Q), ValueError,
                       r"this model is text-conditioned: pass cond \(a prompt or its encoding\)"),
    "class-on-text-model": (lambda t, sr: t.sample_class([1], **Q), ValueError,
                            "sample_class needs a model that is class-conditional; this model "
                            "is text-conditioned"),
    "sr-on-text-model": (lambda t, sr: t.super_resolve(rand_image(8, 8), **Q), ValueError,
                         "super_resolve needs a super-resolution model .*this model is "
                         "text-conditioned"),
    "unconditional-on-text-model": (lambda t, sr: t.sample_unconditional(**Q), ValueError,
                                    "sample_unconditional needs an unconditional model; this "
                                    "model is text-conditioned"),
    "txt2img-on-sr-model": (lambda t, sr: sr.txt2img("a cat", **Q), ValueError,
                            "txt2img needs a model that is text-conditioned; this model is "
                            "conditioned only on 3 channels concatenated to the latent"),
    "cond-on-sr-model": (lambda t, sr: sr.sample("a cat", concat=torch.randn(1, 3, 8, 8), **Q),
                         ValueError, "it takes no cond"),
    "cond-width": (lambda t, sr: t.sample(torch.randn(1, 16, 31), **Q), ValueError,
                   r"cond must have width 32 \(the U-Net's context_dim\), got 31"),
    "uncond-width": (lambda t, sr: t.sample(torch.randn(1, 16, 32), torch.randn(1, 16, 31),
                                            guidance_scale=2.0, **Q), ValueError,
                     "uncond must have width 32"),
    # inpaint's mask: one for the batch or one per image
    "mask-batch": (lambda t, sr: t.inpaint(X, torch.ones(3, 32, 32), prompt="a cat", **Q),
                   ValueError, "mask has batch 3, the image 1"),
    # txt2img's other arguments
    "batch-0": (lambda t, sr: t.txt2img("a cat", batch=0, **Q), ValueError,
                "batch must be at least 1, got 0"),
    "prompt-empty": (lambda t, sr: t.txt2img([], **Q), ValueError, "prompt is an empty list"),
    "prompt-none": (lambda t, sr: t.txt2img(None, **Q), TypeError,
                    "prompt must be a string or a list of strings, got NoneType"),
    "batch-vs-prompt-list": (lambda t, sr: t.txt2img(["a cat", "a dog"], batch=3, **Q),
                             ValueError, "batch=3 conflicts with prompt, a list of 2 prompts"),
    "negative-prompt-count": (lambda t, sr: t.txt2img(["a", "b"], ["x", "y", "z"], **Q),
                              ValueError, "negative_prompt has 3 prompts for a batch of 2"),
    "seed-str": (lambda t, sr: t.txt2img("a cat", seed="abc", **Q), TypeError,
                 "seed must be an integer, got str"),
    "seed-too-large": (lambda t, sr: t.txt2img("a cat", seed=2 ** 70, **Q), ValueError,
                       r"seed must be between -2\*\*63 and 2\*\*64 - 1"),
    "guidance-nan": (lambda t, sr: t.txt2img("a cat", guidance_scale=NAN, **Q), ValueError,
                     "guidance_scale must be a finite number, got nan"),
    "output-type": (lambda t, sr: t.txt2img("a cat", output_type="np", **Q), ValueError,
                    "output_type must be one of"),
    "sampler-none": (lambda t, sr: t.sample("a cat", sampler=None, **Q), TypeError,
                     "sampler must be a name"),
    # the other entry points
    "strength-str": (lambda t, sr: t.img2img(X, strength="0.5", prompt="a cat", **Q), TypeError,
                     "strength must be a number, got str"),
    "decode-channels": (lambda t, sr: t.decode(torch.randn(1, 7, 8, 8)), ValueError,
                        r"z must be latents \(B, 4, h, w\), got \(1, 7, 8, 8\)"),
    "encode-channels": (lambda t, sr: t.encode(torch.zeros(1, 1, 32, 32)), ValueError,
                        r"x must have 3 channels \(B, 3, H, W\), got \(1, 1, 32, 32\)"),
}


@pytest.mark.parametrize("call,error,match", list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_bad_arguments_are_refused_up_front(txt_model, sr_model, monkeypatch, call, error, match):
    """Each bad argument gets an error naming it, before any network runs."""
    def ran(*args, **kwargs):
        raise AssertionError("a network ran before the arguments were checked")

    for model in (txt_model, sr_model):
        monkeypatch.setattr(model.unet, "forward", ran)
        monkeypatch.setattr(model.first_stage, "encode_latent", ran)
        monkeypatch.setattr(model.first_stage, "decode_latent", ran)
    monkeypatch.setattr(txt_model.cond_stage, "encode", ran)
    with pytest.raises(error, match=match):
        call(txt_model, sr_model)


def test_size_multiple_follows_the_unet_depth(txt_model):
    assert txt_model.size_multiple == 8
    deep = tiny(unet__channel_mult=[1, 2, 2])
    assert deep.unet_downsamplings == 2 and deep.size_multiple == 16
    with pytest.raises(ValueError, match=r"height must be a positive multiple of 16 \(the first "
                       r"stage's factor 4 times 2\*\*2 for the U-Net's 2 downsamplings\)"):
        deep.txt2img("a cat", steps=1, height=40, width=32, progress=False)
    z = deep.txt2img("a cat", steps=1, height=16, width=48, progress=False, output_type="latent")
    assert z.shape == (1, 4, 4, 12)


def test_step_limits_and_prompt_batches(txt_model):
    assert len(txt_model.steps(999)) == 999 and len(txt_model.steps(1000, "ddpm")) == 1000
    z = txt_model.txt2img(["a cat", "a dog"], batch=2, steps=1, height=16, width=16,
                          progress=False, output_type="latent")
    assert z.shape == (2, 4, 4, 4)


def test_out_is_checked_before_any_work(txt_model, monkeypatch, tmp_path):
    from PIL import Image
    old = tmp_path / "old.png"
    Image.new("RGB", (4, 4)).save(old)
    notes = tmp_path / "notes.png"  # a .png name on something else
    notes.write_text("mine")
    kw = dict(steps=1, height=16, width=16, progress=False)
    # nothing replaced without overwrite; a batch's numbered names count too
    first = txt_model.txt2img("a cat", out=tmp_path / "b.png", batch=2, **kw)
    assert len(first) == 2

    def ran(*args, **kwargs):
        raise AssertionError("a network ran before out was checked")
    monkeypatch.setattr(txt_model.unet, "forward", ran)
    monkeypatch.setattr(txt_model.cond_stage, "encode", ran)
    for out, extra, error, match in [
            (old, {}, FileExistsError, "overwrite=True"),
            (tmp_path / "b.png", {"batch": 2}, FileExistsError, "b-000.png"),
            (notes, {"overwrite": True}, FileExistsError, "is not a PNG image"),
            (tmp_path / "x.jpg", {}, ValueError, "must end in .png"),
            (tmp_path / "y.png", {"output_type": "tensor"}, ValueError, "output_type='pil'")]:
        with pytest.raises(error, match=match):
            txt_model.txt2img("a cat", out=out, **extra, **kw)
    monkeypatch.undo()
    before = old.read_bytes()
    txt_model.txt2img("a cat", out=old, overwrite=True, **kw)
    assert old.read_bytes() != before and notes.read_text() == "mine"


def test_integer_and_tensor_arguments_users_pass_still_work(txt_model):
    import numpy as np
    kw = dict(height=16, width=16, progress=False)
    a = txt_model.txt2img("a cat", seed=torch.tensor(3), steps=torch.tensor(1),
                          batch=torch.tensor(2), **kw)
    b = txt_model.txt2img("a cat", seed=np.int64(3), steps=np.int64(1), batch=2, **kw)
    assert len(a) == len(b) == 2 and list(a[0].getdata()) == list(b[0].getdata())
    for g in (torch.tensor(3.0), torch.tensor([3.0, 2.0])):  # 0-d or per sample, as sample()
        assert len(txt_model.txt2img("a cat", steps=1, guidance_scale=g, batch=2, **kw)) == 2
    z = txt_model.sample("a cat", shape=(np.int64(1), 4, 4, 4), steps=1, progress=False)
    assert z.shape == (1, 4, 4, 4)
    with pytest.raises(TypeError, match="seed must be an integer"):
        txt_model.txt2img("a cat", seed=torch.tensor(3.5), steps=1, **kw)
