"""Latent diffusion training (Rombach et al. 2022, eq. 2-3; CompVis ``LatentDiffusion``).

The first stage is frozen; images are encoded to z = scale_factor * E(x) with a posterior sample
(as CompVis' ``get_first_stage_encoding``), and ``scale_factor`` is set on the first batch to
1 / std(z) so that the latents have unit variance (the paper's section 3.1 and appendix G) when
``scale_by_std`` is on (the default). The U-Net eps_theta(z_t, t, tau_theta(y)) and the conditioning
encoder tau_theta are trained jointly on the eps-prediction MSE of ``NoiseSchedule.loss``
(DDPM's L_simple). Conditioning is taken from ``config["diffusion"]["conditioning_key"]``:

- "crossattn": captions through a text encoder (tokenized in the loop), or class labels through
  a class embedder; a fraction ``cond_drop`` is replaced by the empty caption (the null class)
  so that one model also learns the unconditional eps for classifier-free guidance (Ho &
  Salimans 2022).
- "adm": class labels added to the time embedding (``y``), with the same dropout.
- "concat": the low-resolution image (the batch's "lowres", or the image area-downsampled to
  the latent size) through the cond stage, concatenated to z_t (LDM-SR, section 4.4).

Weights are averaged (EMA) for sampling; optimisation is AdamW with an optional linear warm-up.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import engine

log = logging.getLogger("ldmfast")

__all__ = ["LDMTrainConfig", "Denoiser", "LDMTrainer", "export_model"]


@dataclasses.dataclass
class LDMTrainConfig:
    steps: int = 20000
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    ema_decay: float = 0.9999
    cond_drop: float = 0.1            # fraction of captions/labels replaced by the null one
    scale_by_std: bool = True         # set scale_factor = 1 / std(z) on the first batch
    precision: str = "fp32"           # fp32, bf16 (CPU or CUDA), fp16 (CUDA)
    grad_checkpoint: bool = False
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 1000            # 0: only at the end
    out: str | None = None            # folder for ldm.pt and ldm-log.jsonl
    progress: bool = True


class Denoiser(nn.Module):
    """eps_theta with its conditioning encoder, as one module (what DDP wraps and EMA averages).

    ``forward(z_t, t, cond=None, concat=None)``: ``cond`` is token ids or class labels (through
    ``cond_stage``) or a ready context; ``concat`` an image for channel concatenation."""

    def __init__(self, unet: nn.Module, cond_stage: nn.Module | None, conditioning_key: str | None):
        super().__init__()
        if conditioning_key not in (None, "crossattn", "concat", "adm"):
            raise ValueError(f"training supports conditioning_key crossattn, concat, adm or "
                             f"None, not {conditioning_key!r}")
        self.unet, self.cond_stage = unet, cond_stage
        self.conditioning_key = conditioning_key

    def forward(self, x, t, cond=None, concat=None):
        context = y = None
        if concat is not None:
            c = self.cond_stage(concat) if self.cond_stage is not None else concat
            x = torch.cat([x, c.to(x.dtype)], dim=1)
        if cond is not None:
            if self.conditioning_key == "adm":
                y = cond
            else:
                context = self.cond_stage(cond) if self.cond_stage is not None else cond
        return self.unet(x, t, context=context, y=y)


def _null_label(cond_stage, unet) -> int:
    n = getattr(getattr(cond_stage, "embedding", None), "num_embeddings", None)
    n = n or getattr(unet, "num_classes", None)
    if not n:
        raise ValueError("class conditioning needs a class embedder or a U-Net with num_classes")
    return int(n) - 1  # LDM's convention: the last class is the null class


class LDMTrainer:
    """Trains a ``LatentDiffusion``'s U-Net and cond stage on ``data.for_step(...)`` batches
    (dicts with "image" in [-1, 1] and "caption", "label" or "lowres" as the conditioning
    needs)."""

    CHECKPOINT = "ldm.pt"
    LOG = "ldm-log.jsonl"

    def __init__(self, model, data, cfg: LDMTrainConfig, info: engine.DistInfo | None = None):
        self.cfg = cfg
        self.info = info or engine.DistInfo()
        dev = self.info.device
        self.model = model.to(dev)
        self.data = data
        self.step = 0
        if model.first_stage is None:
            raise ValueError("LDM training needs a first stage (autoencoder)")
        model.first_stage.eval().requires_grad_(False)
        self.key = model.conditioning_key if model.cond_stage is not None or \
            model.conditioning_key in ("concat", "adm") else None
        if self.key == "concat" and model.concat_channels == 0:
            raise ValueError("conditioning_key 'concat' needs a U-Net with concat input channels")
        self.denoiser = Denoiser(model.unet, model.cond_stage, self.key).train()
        # the text transformer's language-model head is in the checkpoints but takes no part in
        # the embeddings: frozen, so that every trained parameter gets a gradient (as DDP needs)
        head = getattr(getattr(model.cond_stage, "transformer", None), "to_logits", None)
        if head is not None:
            head.requires_grad_(False)
        if cfg.grad_checkpoint:
            u = model.unet
            n = engine.enable_gradient_checkpointing(
                list(u.input_blocks) + [u.middle_block] + list(u.output_blocks))
            log.info("gradient checkpointing on %d U-Net blocks", n)
        self.ddp = engine.wrap_ddp(self.denoiser, self.info)
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas),
                                     weight_decay=cfg.weight_decay)
        warm = max(int(cfg.warmup_steps), 0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.ema = engine.EMA(self.denoiser, cfg.ema_decay)
        self.scaler = engine.grad_scaler(dev, cfg.precision)
        self.generator = torch.Generator(device="cpu")
        self.timer = engine.StepTimer()
        self.log = engine.LossLog(os.path.join(cfg.out, self.LOG) if cfg.out else None,
                                  self.info.main)
        model.config.setdefault("diffusion", {})
        self.auto_scale = bool(cfg.scale_by_std)
        self._text = self.key == "crossattn" and hasattr(model.cond_stage, "tokenize")

    # ------------------------------------------------------------------------- conditioning
    def _drop(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator) < self.cfg.cond_drop

    def conditioning(self, batch, n: int, latent_hw):
        """(cond, concat) for the Denoiser from a batch, with condition dropout applied."""
        dev = self.info.device
        if self.key is None:
            return None, None
        if self.key == "concat":
            lr = batch.get("lowres")
            if lr is None:
                lr = F.interpolate(batch["image"], size=tuple(latent_hw), mode="area")
            return None, lr.to(dev)
        drop = self._drop(n)
        if self._text:
            caps = [("" if d else c) for c, d in zip(batch["caption"], drop.tolist())]
            return self.model.cond_stage.tokenize(caps).to(dev), None
        labels = torch.as_tensor(batch["label"]).long().clone()
        labels[drop] = _null_label(self.model.cond_stage, self.model.unet)
        return labels.to(dev), None

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """Unscaled latents E(x): a posterior sample (KL) or the pre-quantisation encoding (VQ)."""
        fs = self.model.first_stage
        return fs.encode_latent(images, sample=True, generator=self.generator)

    def set_scale_factor(self, z):
        """scale_factor = 1 / std(z) of rank 0's first batch (LDM's ``scale_by_std``)."""
        sf = engine.broadcast_float(1.0 / z.float().flatten().std().item(), self.info)
        self.model.scale_factor = sf
        self.model.config["diffusion"]["scale_factor"] = sf
        self.auto_scale = False
        log.info("scale_factor = %.6g (1 / std of the first batch's latents)", sf)

    # ------------------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        cfg, dev = self.cfg, self.info.device
        batch = self.data.for_step(self.step, cfg.batch_size, self.info.rank, self.info.world)
        engine.seed_step(self.generator, cfg.seed, self.step, self.info.rank)
        x = batch["image"].to(dev)
        z = self.encode(x)
        if self.auto_scale:
            self.set_scale_factor(z)
        z = z.float() * self.model.scale_factor
        n = z.shape[0]
        cond, concat = self.conditioning(batch, n, z.shape[2:])
        sched = self.model.schedule
        t = torch.randint(0, sched.num_timesteps, (n,), generator=self.generator).to(dev)
        noise = torch.randn(z.shape, generator=self.generator).to(dev)
        extra = {}
        if cond is not None:
            extra["cond"] = cond
        if concat is not None:
            extra["concat"] = concat
        with engine.autocast(dev, cfg.precision):
            loss = sched.loss(self.ddp, z, t=t, noise=noise, extra_args=extra)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"LDM loss is {loss.item()} at step {self.step}")
        self.opt.zero_grad(set_to_none=True)
        logs = {"loss": loss.detach()}
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        if cfg.grad_clip:
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.denoiser.parameters(),
                                                               cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.ema.update(self.denoiser)
        self.step += 1
        logs["lr"] = self.sched.get_last_lr()[0]
        return logs

    # ------------------------------------------------------------------------------ the loop
    def train(self, steps: int | None = None) -> "LDMTrainer":
        """Trains until ``steps`` (default ``cfg.steps``) steps are done in total."""
        end = self.cfg.steps if steps is None else steps
        return engine.train_loop(self, end, "ldm")

    # ------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"kind": "ldm", "step": self.step,
                "denoiser": self.denoiser.state_dict(), "ema": self.ema.state_dict(),
                "first_stage": self.model.first_stage.state_dict(),
                "optimizer": self.opt.state_dict(), "lr_schedule": self.sched.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "scale_factor": None if self.auto_scale else self.model.scale_factor,
                "rng": engine.rng_state(), "config": copy.deepcopy(self.model.config),
                "train_config": dataclasses.asdict(self.cfg)}

    def load_state_dict(self, state: dict):
        if state.get("kind") != "ldm":
            raise ValueError("not an LDM training checkpoint")
        self.denoiser.load_state_dict(state["denoiser"])
        self.ema.load_state_dict(state["ema"])
        self.model.first_stage.load_state_dict(state["first_stage"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["lr_schedule"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("scale_factor") is not None:
            self.model.scale_factor = float(state["scale_factor"])
            self.model.config["diffusion"]["scale_factor"] = self.model.scale_factor
            self.auto_scale = False
        engine.set_rng_state(state["rng"])
        self.step = int(state["step"])

    def save(self, path=None) -> str:
        path = path or os.path.join(self.cfg.out, self.CHECKPOINT)
        if self.info.main:
            engine.save_checkpoint(self.state_dict(), path)
        return path

    def resume(self, path=None) -> bool:
        path = path or (os.path.join(self.cfg.out, self.CHECKPOINT) if self.cfg.out else None)
        if not path or not os.path.isfile(path):
            return False
        self.load_state_dict(engine.load_checkpoint(path))
        log.info("ldm: resumed from %s at step %d", path, self.step)
        return True

    # ---------------------------------------------------------------------------- results
    def ema_model(self):
        """A copy of the ``LatentDiffusion`` with the EMA weights, in eval mode."""
        model = copy.deepcopy(self.model)
        ema_den = Denoiser(model.unet, model.cond_stage, self.key)
        self.ema.copy_to(ema_den)
        return model.eval()


def export_model(model, path, overwrite: bool = False) -> str:
    """Writes a trained ``LatentDiffusion`` with ``ldmfast.checkpoint.save`` (safetensors with
    its config), so that ``ldmfast.load(path)`` restores it; an existing file is replaced only
    with ``overwrite``."""
    try:
        from .. import checkpoint
    except ImportError as e:
        raise RuntimeError("ldmfast.checkpoint is not available to write the model "
                           f"({e}); the training checkpoint holds the weights meanwhile") from e
    model.config.setdefault("diffusion", {})["scale_factor"] = float(model.scale_factor)
    checkpoint.save(model, path, overwrite=overwrite)
    return os.fspath(path)
