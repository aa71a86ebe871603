"""Training recipes: a model config, both stages' schedules, and ``run`` to carry them out.

- ``shapes``: an f = 4 KL autoencoder (64x64x3 -> 16x16x4) and a text-to-image LDM on the
  built-in shapes data: the paper's transformer text encoder tau_theta over a word-level
  vocabulary of the captions, cross-attention in a small U-Net. Sized to train on a CPU.
- ``shapes-sr``: LDM-SR, 16x16 -> 64x64: the low-resolution image is concatenated to the 16x16
  latent (the pipeline's ``super_resolve``); reported against bicubic upsampling by PSNR.

``run(recipe, out)`` trains the autoencoder (unless a trained one is given), then the LDM,
resuming from ``out`` when checkpoints are there, writes the EMA model with
``ldmfast.checkpoint.save`` and evaluates it. Under ``torchrun`` every stage runs DDP.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time

import torch
import torch.nn.functional as F

from .. import fileio
from ..data import shapes
from . import engine
from .autoencoder import AETrainConfig, AutoencoderTrainer, evaluate_psnr, psnr
from .ldm import LDMTrainConfig, LDMTrainer, export_model
from .losses import AutoencoderLoss

log = logging.getLogger("ldmfast")

__all__ = ["Recipe", "RECIPES", "get", "run", "evaluate_txt2img", "evaluate_sr", "bicubic_baseline"]


@dataclasses.dataclass
class Recipe:
    name: str
    model: dict                        # {"unet", "first_stage", "cond_stage", "diffusion"}
    ae_loss: dict                      # AutoencoderLoss keyword arguments
    ae: AETrainConfig
    ldm: LDMTrainConfig
    data_seed: int = 0
    task: str = "txt2img"              # txt2img or sr
    eval_steps: int = 50               # DDIM steps for the evaluation samples
    guidance_scale: float = 3.0


def _first_stage() -> dict:
    # f = 4: three levels (two downsamplings). The full-resolution convolutions dominate the
    # cost, so 64x64 and 32x32 get 32 channels (the least GroupNorm(32) allows) and no residual
    # blocks in the encoder (one per level in the decoder): 0.4M parameters, a third of the
    # time per step of num_res_blocks=1 (measured: 0.43 vs 1.97 CPU-s at batch 8 vs 16).
    # Without residual blocks nothing widens the encoder (the CompVis semantics of
    # num_res_blocks=0), so every level is 32 wide (ch_mult 1, 1, 1), which also keeps it
    # expressible as a diffusers AutoencoderKL (layers_per_block=0); measured no worse than a
    # 64-wide decoder at 16x16: 21.2 vs 20.7 dB after 400 steps.
    return {"type": "kl", "embed_dim": 4,
            "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3,
                         "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 0,
                         "attn_resolutions": [], "dropout": 0.0}}


def _ae_loss(disc_start: int) -> dict:
    # Squared error, not CompVis' L1: without the perceptual term (no LPIPS weights here) L1
    # plateaus on flat-colour images (measured 24.7 vs 26.6 dB held-out PSNR after 1600 steps
    # of batch 8). The adversarial term comes on late and light, to sharpen edges without
    # costing the PSNR the first stage is judged by.
    return {"kind": "kl", "disc_start": disc_start, "kl_weight": 1e-6, "disc_weight": 0.1,
            "disc_layers": 2, "disc_channels": 32, "perceptual_weight": 1.0,
            "pixel_loss": "l2"}


def _shapes() -> Recipe:
    vocab = shapes.vocabulary()
    max_len = 12  # the longest caption is 7 words, plus [CLS] and [SEP]
    context = 128
    model = {
        "first_stage": _first_stage(),
        "cond_stage": {"type": "transformer", "n_embed": context, "n_layer": 2,
                       "vocab_size": len(vocab) + 4, "max_seq_len": max_len, "heads": 4,
                       "dim_head": 32,
                       "tokenizer": {"type": "word", "vocab": vocab, "max_length": max_len}},
        # 32 and 64 channels at 16x16 and 8x8, cross-attention at 16x16 and in the middle
        # block: 0.8M parameters, 0.7 CPU-s per training step at batch 32
        "unet": {"image_size": 16, "in_channels": 4, "out_channels": 4, "model_channels": 32,
                 "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [1],
                 "num_head_channels": 32, "use_spatial_transformer": True,
                 "transformer_depth": 1, "context_dim": context, "legacy": False},
        # v-prediction (as SD 2): with eps-prediction this small U-Net drew clean images from
        # real latents noised to t = 300 or 600 but not from t >= 900, where an eps error is
        # amplified sqrt(1 - abar) / sqrt(abar) times into x_0 (measured after 3000 steps:
        # eps MSE 0.0059 at t = 900, 6.5x the trivial predictor's, and 3 of 21 captions drawn).
        "diffusion": {"timesteps": 1000, "beta_schedule": "linear", "linear_start": 0.0015,
                      "linear_end": 0.0195, "parameterization": "v", "scale_factor": 1.0,
                      "conditioning_key": "crossattn"},
    }
    ae = AETrainConfig(steps=5000, batch_size=8, lr=1e-3)
    ldm = LDMTrainConfig(steps=4000, batch_size=32, lr=5e-4, warmup_steps=100, ema_decay=0.995,
                         cond_drop=0.1)
    return Recipe("shapes", model, _ae_loss(disc_start=2000), ae, ldm)


def _shapes_sr() -> Recipe:
    model = {
        "first_stage": _first_stage(),
        "cond_stage": {"type": "identity"},
        "unet": {"image_size": 16, "in_channels": 4 + 3, "out_channels": 4,
                 "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1,
                 "attention_resolutions": [2], "num_head_channels": 32, "legacy": False},
        # v-prediction, as the shapes recipe (eps: 19.6 dB after 1500 steps, bicubic 28.8)
        "diffusion": {"timesteps": 1000, "beta_schedule": "linear", "linear_start": 0.0015,
                      "linear_end": 0.0155, "parameterization": "v", "scale_factor": 1.0,
                      "conditioning_key": "concat"},
    }
    ae = AETrainConfig(steps=2500, batch_size=8, lr=1e-3)
    ldm = LDMTrainConfig(steps=3000, batch_size=32, lr=5e-4, warmup_steps=100, ema_decay=0.995,
                         cond_drop=0.0)
    return Recipe("shapes-sr", model, _ae_loss(disc_start=2000), ae, ldm, task="sr",
                  eval_steps=50)


RECIPES = {"shapes": _shapes, "shapes-sr": _shapes_sr}


def get(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    return RECIPES[name]()


# ----------------------------------------------------------------------------- evaluation

def eval_captions():
    """One caption per (colour, shape) pair, the held-out ones included."""
    return [f"a {c} {s}" for c, s in shapes.pairs("val")]


@torch.no_grad()
def evaluate_txt2img(model, captions=None, steps: int = 50, guidance_scale: float = 3.0,
                     seed: int = 0, batch: int = 32, per_caption: int = 1) -> dict:
    """Generates ``per_caption`` images per caption and asks ``shapes.judge`` for their
    (colour, shape): accuracy over all images, over those of held-out pairs, and of the colour
    alone."""
    captions = [c for c in (captions or eval_captions()) for _ in range(per_caption)]
    verdicts = []
    for i in range(0, len(captions), batch):
        chunk = captions[i:i + batch]
        imgs = model.txt2img(chunk, steps=steps, guidance_scale=guidance_scale, seed=seed + i,
                             progress=False, output_type="tensor")
        verdicts += shapes.judge_batch(imgs.float().cpu())
    rows = []
    for cap, got in zip(captions, verdicts):
        words = cap.split()
        want = next((c for c in shapes.COLOURS if c in words), None), \
            next((s for s in shapes.SHAPES if s in words), None)
        rows.append({"caption": cap, "judged": list(got), "ok": tuple(got) == want,
                     "colour_ok": got[0] == want[0], "heldout": want in shapes.HELDOUT})
    held = [r for r in rows if r["heldout"]]
    return {"accuracy": sum(r["ok"] for r in rows) / len(rows),
            "heldout_accuracy": (sum(r["ok"] for r in held) / len(held)) if held else None,
            "colour_accuracy": sum(r["colour_ok"] for r in rows) / len(rows),
            "samples": rows}


def bicubic_baseline(images, f: int):
    """(low, up): ``images`` area-downsampled by ``f`` and that upsampled back by bicubic
    interpolation, clamped to [-1, 1]: the baseline an SR model or an f-fold latent must beat."""
    low = F.interpolate(images, scale_factor=1.0 / f, mode="area")
    up = F.interpolate(low, scale_factor=f, mode="bicubic", align_corners=False).clamp(-1, 1)
    return low, up


@torch.no_grad()
def evaluate_sr(model, images, steps: int = 50, seed: int = 0, batch: int = 32) -> dict:
    """PSNR (dB) of LDM-SR's 4x upsampling of area-downsampled ``images`` and of bicubic
    upsampling of the same low-resolution images."""
    sr_vals, bic_vals = [], []
    f = model.downsampling_factor
    for i in range(0, images.shape[0], batch):
        x = images[i:i + batch]
        lr, bic = bicubic_baseline(x, f)
        sr = model.super_resolve(lr, steps=steps, seed=seed + i, progress=False,
                                 output_type="tensor").float().cpu()
        sr_vals.append(psnr(sr, x))
        bic_vals.append(psnr(bic, x))
    return {"psnr_sr": torch.cat(sr_vals).mean().item(),
            "psnr_bicubic": torch.cat(bic_vals).mean().item()}


# -------------------------------------------------------------------------------- running

def _load_first_stage(first_stage, path):
    """Weights for the first stage from an autoencoder training checkpoint or a model file."""
    if path.endswith(".pt"):
        state = engine.load_checkpoint(path)
        sd = state["autoencoder"] if state.get("kind") == "autoencoder" else state["first_stage"]
        first_stage.load_state_dict(sd)
        return
    from .. import checkpoint
    comp = checkpoint.load_components(path)
    if comp.first_stage is None:
        raise ValueError(f"{path!r} holds no first stage")
    first_stage.load_state_dict(comp.first_stage.state_dict())


def run(recipe: Recipe, out: str, ldm_steps: int | None = None, ae_steps: int | None = None,
        first_stage: str | None = None, lpips: str | None = None, precision: str | None = None,
        grad_checkpoint: bool = False, batch_size: int | None = None, progress: bool = True,
        evaluate: bool = True, export: str | None = None, seed: int | None = None,
        ops: str = "auto", threads: int | None = None) -> dict:
    """Trains both stages into ``out`` (resuming from its checkpoints) and returns a summary:
    seconds per step of each stage, the autoencoder's held-out PSNR, the evaluation, paths.

    ``ops``: "fused" trains through ``ldmfast.ops``, "reference" through the plain-PyTorch
    references, "auto" picks the references on CPU, where their native GroupNorm backward is
    faster than the fused op's autograd formula (measured: U-Net step 0.69 vs 0.77 CPU-s,
    autoencoder step 0.32 vs 0.45 CPU-s); sampling for the evaluation uses the fused ops."""
    from ..models import build, use_reference_ops
    from ..pipeline import LatentDiffusion

    if ops not in ("auto", "fused", "reference"):
        raise ValueError(f"ops must be auto, fused or reference, not {ops!r}")
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    if export is not None:  # found out before training, not after it
        if not os.fspath(export).endswith((".safetensors", ".ckpt")):
            raise ValueError(f"export: {os.fspath(export)!r} must end in .safetensors or .ckpt")
        if not os.path.isdir(os.path.dirname(os.path.abspath(export))):
            raise ValueError(f"export: the folder of {os.fspath(export)!r} does not exist")
        if os.path.lexists(export):
            raise FileExistsError(f"export: {os.fspath(export)!r} already exists; choose another "
                                  "path (a file the run did not write is never replaced)")
    if threads:
        # On a shared machine a multi-threaded OpenMP region waits at every op for its
        # descheduled threads: measured 8.9 s vs 0.25 s for one small step with 2 vs 1 thread
        # while another process kept one of 2 cores busy.
        torch.set_num_threads(int(threads))

    recipe = copy.deepcopy(recipe)
    info = engine.init_distributed()
    os.makedirs(out, exist_ok=True)
    if seed is not None:
        recipe.ae.seed = recipe.ldm.seed = recipe.data_seed = seed
    for cfg in (recipe.ae, recipe.ldm):
        cfg.out, cfg.progress = out, progress
        if precision:
            cfg.precision = precision
        if batch_size:
            cfg.batch_size = batch_size
        # A recipe's batch is the global one: each of N processes takes a 1/N share, so one
        # process and torchrun see the same images at every step.
        if cfg.batch_size % info.world:
            raise ValueError(f"batch size {cfg.batch_size} does not split over {info.world} "
                             "processes")
        cfg.batch_size //= info.world
    if ae_steps is not None:
        recipe.ae.steps = ae_steps
        recipe.ae_loss["disc_start"] = min(recipe.ae_loss["disc_start"], int(ae_steps * 0.6))
    if ldm_steps is not None:
        recipe.ldm.steps = ldm_steps
        recipe.ldm.warmup_steps = min(recipe.ldm.warmup_steps, max(ldm_steps // 10, 1))
    recipe.ldm.grad_checkpoint = grad_checkpoint
    reference = ops == "reference" or (ops == "auto" and info.device.type == "cpu")
    torch.manual_seed(recipe.ldm.seed)  # identical initial weights on every rank
    comp = build(recipe.model)
    data = shapes.ShapesBatches("train", recipe.data_seed)
    held = shapes.ShapesBatches("val", recipe.data_seed + 1).batch(range(64))["image"]
    summary = {"recipe": recipe.name, "out": out, "world_size": info.world}

    # stage 1: the autoencoder
    if first_stage:
        _load_first_stage(comp.first_stage, first_stage)
        log.info("first stage: weights from %s", first_stage)
    else:
        loss = AutoencoderLoss(**dict(recipe.ae_loss, perceptual_path=lpips))
        ae_tr = AutoencoderTrainer(comp.first_stage, loss, data, recipe.ae, info)
        ae_tr.resume()
        t0 = time.perf_counter()
        with use_reference_ops(reference):
            ae_tr.train()
        summary["ae_seconds"] = time.perf_counter() - t0
        summary["ae_sec_per_step"] = ae_tr.timer.mean
        summary["ae_cpu_sec_per_step"] = ae_tr.timer.cpu_mean
        summary["ae_steps"] = ae_tr.step
    comp.first_stage.eval()
    summary["ae_psnr_heldout"] = evaluate_psnr(comp.first_stage.to(info.device),
                                               held.to(info.device))
    log.info("autoencoder: PSNR %.2f dB on held-out images", summary["ae_psnr_heldout"])

    # stage 2: the latent diffusion model
    model = LatentDiffusion(comp.unet, comp.first_stage, comp.cond_stage, comp.config)
    tr = LDMTrainer(model, data, recipe.ldm, info)
    tr.resume()
    t0 = time.perf_counter()
    with use_reference_ops(reference):
        tr.train()
    summary["ldm_seconds"] = time.perf_counter() - t0
    summary["ldm_sec_per_step"] = tr.timer.mean
    summary["ldm_cpu_sec_per_step"] = tr.timer.cpu_mean
    summary["ldm_steps"] = tr.step
    summary["scale_factor"] = model.scale_factor

    if info.main:
        final = tr.ema_model()
        # what the evaluation samples with, for `generate` to use by default
        final.config["sampling"] = {"guidance_scale": recipe.guidance_scale,
                                    "steps": recipe.eval_steps}
        path = export or os.path.join(out, f"{recipe.name}.safetensors")
        try:
            # the default path is this run's own output, rewritten when the run is resumed
            summary["weights"] = export_model(final, path, overwrite=export is None)
            log.info("wrote %s", path)
        except RuntimeError as e:
            log.warning("%s", e)
        if evaluate:
            if recipe.task == "sr":
                summary["eval"] = evaluate_sr(final, held[:64].to(info.device),
                                              recipe.eval_steps)
            else:
                summary["eval"] = evaluate_txt2img(final, steps=recipe.eval_steps,
                                                   guidance_scale=recipe.guidance_scale)
        with fileio.atomic_path(os.path.join(out, "summary.json")) as tmp, \
                open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    return summary
