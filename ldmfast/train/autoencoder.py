"""First-stage training: an ``AutoencoderKL`` or ``VQModel`` with ``AutoencoderLoss``.

Each step updates the autoencoder on the generator objective (reconstruction + regulariser +
adaptively weighted adversarial term once the discriminator is on), then, from ``disc_start``
on, the discriminator on the hinge loss (Adam with betas (0.5, 0.9) for both, as CompVis).
Batches come from ``data.for_step(step, batch_size, rank, world)`` (e.g. ``ShapesBatches``),
so a resumed run sees exactly the images the uninterrupted one would have.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os

import torch

from . import engine
from .losses import AutoencoderLoss, DiscriminatorPair

log = logging.getLogger("ldmfast")

__all__ = ["AETrainConfig", "AutoencoderTrainer", "psnr"]


@dataclasses.dataclass
class AETrainConfig:
    steps: int = 3000
    batch_size: int = 16
    lr: float = 4e-4
    disc_lr: float | None = None      # defaults to lr
    betas: tuple = (0.5, 0.9)
    precision: str = "fp32"           # fp32, bf16 (CPU or CUDA), fp16 (CUDA)
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500             # 0: only at the end
    out: str | None = None            # folder for autoencoder.pt and autoencoder-log.jsonl
    progress: bool = True


def psnr(x, y) -> torch.Tensor:
    """Peak signal-to-noise ratio (dB) per image of two batches in [-1, 1] (peak-to-peak 2)."""
    mse = ((x.float().clamp(-1, 1) - y.float().clamp(-1, 1)) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))


class AutoencoderTrainer:
    CHECKPOINT = "autoencoder.pt"
    LOG = "autoencoder-log.jsonl"

    def __init__(self, autoencoder, loss: AutoencoderLoss, data, cfg: AETrainConfig,
                 info: engine.DistInfo | None = None):
        self.cfg = cfg
        self.info = info or engine.DistInfo()
        dev = self.info.device
        self.ae = autoencoder.to(dev).train()
        self.loss = loss.to(dev).train()
        self.kind = loss.kind
        self.data = data
        self.step = 0
        self.ae_ddp = engine.wrap_ddp(self.ae, self.info)
        self.disc_ddp = engine.wrap_ddp(DiscriminatorPair(self.loss.discriminator), self.info)
        gen_params = list(self.ae.parameters())
        if self.kind == "kl":
            gen_params.append(self.loss.logvar)
        self.opt = torch.optim.Adam(gen_params, lr=cfg.lr, betas=tuple(cfg.betas))
        self.opt_disc = torch.optim.Adam(self.loss.discriminator.parameters(),
                                         lr=cfg.disc_lr or cfg.lr, betas=tuple(cfg.betas))
        self.scaler = engine.grad_scaler(dev, cfg.precision)
        self.generator = torch.Generator(device="cpu")
        self.timer = engine.StepTimer()
        self.log = engine.LossLog(os.path.join(cfg.out, self.LOG) if cfg.out else None,
                                  self.info.main)

    @property
    def last_layer(self):
        return self.ae.decoder.conv_out.weight

    # ------------------------------------------------------------------------------ one step
    def _backward(self, loss, opt, extra=()):
        """Backward and step; ``extra``: parameters outside the DDP-wrapped modules (the KL
        loss' log-variance), whose gradients are averaged across ranks here."""
        opt.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.info.distributed:
            for p in extra:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(self.info.world)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()

    def train_step(self) -> dict:
        cfg, dev = self.cfg, self.info.device
        batch = self.data.for_step(self.step, cfg.batch_size, self.info.rank, self.info.world)
        x = batch["image"].to(dev)
        engine.seed_step(self.generator, cfg.seed, self.step, self.info.rank)
        with engine.autocast(dev, cfg.precision):
            if self.kind == "kl":
                recon, reg = self.ae_ddp(x, sample_posterior=True, generator=self.generator)
            else:
                recon, reg = self.ae_ddp(x)
            recon = recon.float()
            loss, logs = self.loss.generator_loss(x, recon, reg, self.step, self.last_layer)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"autoencoder loss is {loss.item()} at step {self.step}")
        self._backward(loss, self.opt, [self.loss.logvar] if self.kind == "kl" else [])
        if self.loss.disc_active(self.step):
            with engine.autocast(dev, cfg.precision):
                d_loss, d_logs = self.loss.discriminator_loss(x, recon, self.step, self.disc_ddp)
            self._backward(d_loss.float(), self.opt_disc)
            logs.update(d_logs)
        self.step += 1
        return logs

    # ------------------------------------------------------------------------------ the loop
    def train(self, steps: int | None = None) -> "AutoencoderTrainer":
        """Trains until ``steps`` (default ``cfg.steps``) steps are done in total."""
        end = self.cfg.steps if steps is None else steps
        return engine.train_loop(self, end, "autoencoder",
                                 lambda rec: {"loss": f"{rec['loss']:.4g}", "l1": f"{rec['l1']:.3f}"})

    # ------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"kind": "autoencoder", "step": self.step,
                "autoencoder": self.ae.state_dict(), "loss": self.loss.state_dict(),
                "optimizer": self.opt.state_dict(), "optimizer_disc": self.opt_disc.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": engine.rng_state(),
                "config": getattr(self.ae, "config", None),
                "train_config": dataclasses.asdict(self.cfg)}

    def load_state_dict(self, state: dict):
        if state.get("kind") != "autoencoder":
            raise ValueError("not an autoencoder training checkpoint")
        self.ae.load_state_dict(state["autoencoder"])
        self.loss.load_state_dict(state["loss"])
        self.opt.load_state_dict(state["optimizer"])
        self.opt_disc.load_state_dict(state["optimizer_disc"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        engine.set_rng_state(state["rng"])

    def save(self, path=None) -> str | None:
        """The resumable checkpoint (main rank only); returns its path."""
        path = path or os.path.join(self.cfg.out, self.CHECKPOINT)
        if self.info.main:
            engine.save_checkpoint(self.state_dict(), path)
        return path

    def resume(self, path=None) -> bool:
        """Loads ``path`` (default: the run folder's checkpoint) if it exists."""
        path = path or (os.path.join(self.cfg.out, self.CHECKPOINT) if self.cfg.out else None)
        if not path or not os.path.isfile(path):
            return False
        self.load_state_dict(engine.load_checkpoint(path))
        log.info("autoencoder: resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, images, batch_size: int = 64) -> float:
        """Mean PSNR (dB) of the reconstructions (posterior mode) of ``images``."""
        return evaluate_psnr(self.ae, images, batch_size)


@torch.no_grad()
def evaluate_psnr(autoencoder, images, batch_size: int = 64) -> float:
    """Mean PSNR (dB) of an autoencoder's deterministic reconstructions of ``images``."""
    was = autoencoder.training
    autoencoder.eval()
    dev = next(autoencoder.parameters()).device
    vals = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(dev)
        recon = autoencoder.decode_latent(autoencoder.encode_latent(x, sample=False))
        vals.append(psnr(recon, x))
    autoencoder.train(was)
    out = torch.cat(vals).mean().item()
    return out if math.isfinite(out) else float("nan")
