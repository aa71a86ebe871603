"""LatentDiffusion: parity with diffusers' StableDiffusionPipeline, and every task end to end.

The diffusers pipeline is built offline with random weights: a tiny U-Net, VAE and CLIP text
model, and a CLIP tokenizer from a vocabulary and merges written here.
"""
from __future__ import annotations

import copy
import json
import os

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
    cond, uncond, x_T = _embeds()
    ref_latents, ref_images = _run_diffusers(sd_pipe, cond, uncond, x_T, 10, 7.5, "pt")
    ours = model.sample(cond=cond, uncond=uncond, steps=10, guidance_scale=7.5, x_T=x_T,
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
    ref, _ = _run_diffusers(pipe, cond, uncond, x_T, 8, 5.0)
    ours = model.sample(cond=cond, uncond=uncond, steps=8, guidance_scale=5.0, x_T=x_T,
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


def test_seeded_sampling_is_reproducible(sd_pipe):
    model = LatentDiffusion.from_diffusers(sd_pipe)
    cond, uncond, _ = _embeds(1)
    run = lambda seed: model.sample(cond, uncond, steps=3, guidance_scale=2.0, progress=False,  # noqa: E731
                                    shape=(1, 4, 16, 16), eta=0.5,
                                    generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    steps_seen = []
    model.sample(cond, steps=4, x_T=torch.randn(1, 4, 16, 16), progress=False,
                 callback=lambda d: steps_seen.append(int(d["t"])))
    assert steps_seen == [751, 501, 251, 1]
