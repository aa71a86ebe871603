"""The samplers' model contract, and classifier-free guidance in one batch.

A sampler calls ``model(x, t, **extra_args)`` with x (N, C, H, W) and t a 0-d or (N,) int64
tensor of training timesteps, and gets back the noise prediction eps, either as a tensor or as
a ``GuidedEps`` that keeps the conditional and unconditional predictions apart. Keeping them
apart lets the DDIM sampler fold guidance into the fused ``ddim_step`` op; every other sampler
calls ``resolve`` to get the guided eps (Ho & Salimans 2022, eq. 6):

    eps~ = eps(x_t, 0) + w (eps(x_t, c) - eps(x_t, 0)).

``EpsModel`` adapts an LDM U-Net, ``unet(x, timesteps, context=None, y=None)``, to the contract:
it routes the conditioning by the model's ``conditioning_key``, concatenates channel-wise
conditioning (super-resolution, inpainting), evaluates the conditional and unconditional
inputs as one batch of 2N, and converts x_0- or v-predictions to eps.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from .schedule import PARAMETERIZATIONS, to_eps

__all__ = ["GuidedEps", "resolve", "EpsModel", "CONDITIONING_KEYS"]

CONDITIONING_KEYS = (None, "crossattn", "concat", "hybrid", "adm")


class GuidedEps(NamedTuple):
    """eps(x_t, c), eps(x_t, 0) and the guidance scale w, not yet combined."""
    cond: torch.Tensor
    uncond: Optional[torch.Tensor]
    scale: Union[float, torch.Tensor]

    def combine(self) -> torch.Tensor:
        if self.uncond is None:
            return self.cond
        w = self.scale
        if isinstance(w, torch.Tensor) and w.dim() == 1:
            w = w.reshape((-1,) + (1,) * (self.cond.dim() - 1))
        return self.uncond + w * (self.cond - self.uncond)


def resolve(out) -> torch.Tensor:
    """A model output as a plain (guided) eps tensor."""
    return out.combine() if isinstance(out, GuidedEps) else out


def _cat(a, b):
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return torch.cat([a, b])


class EpsModel:
    """An LDM U-Net as a sampler model: ``(x, t, cond, uncond, guidance_scale, concat) -> eps``.

    ``cond``/``uncond`` are encoded conditionings: with ``conditioning_key`` "crossattn" or
    "hybrid" they are the cross-attention context (N, L, D); with "adm" the U-Net's ``y``
    (class labels (N,) or vectors). A dict such as ``{"context": c, "y": y}`` is passed to the
    U-Net as keyword arguments whatever the key. ``concat`` (N, C', H, W) is concatenated to x
    on the channel dim before every call.

    Guidance runs when an ``uncond`` is given and ``guidance_scale`` is not the float 1.0 (a
    tensor scale always guides, since testing its value would sync with the device).
    """

    def __init__(self, unet, alphas_cumprod: torch.Tensor, parameterization: str = "eps",
                 conditioning_key: Optional[str] = "crossattn"):
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}")
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"unknown conditioning_key {conditioning_key!r}; "
                             f"expected one of {CONDITIONING_KEYS}")
        self.unet = unet
        self.alphas_cumprod = alphas_cumprod
        self.parameterization = parameterization
        self.conditioning_key = conditioning_key
        # (uncond, cond, what the U-Net gets for them), made once per sampling run: a sampler
        # passes the same objects every step. An EpsModel lives for one run, so the prepared
        # K/V never outlive a weight update.
        self._pair = (None, None, None)
        self._single = (None, None)

    def _prepare(self, cond):
        """The cross-attention context with every layer's K/V projected once
        (``UNetModel.prepare_context``) instead of at every step."""
        prepare = getattr(self.unet, "prepare_context", None)
        if prepare is None or cond is None:
            return cond
        if isinstance(cond, dict):
            return {**cond, "context": prepare(cond["context"])} if cond.get("context") is not None else cond
        return prepare(cond) if self.conditioning_key in ("crossattn", "hybrid") else cond

    def _both(self, uncond, cond):
        """[uncond; cond] as one batch, prepared on the first step only."""
        u, c, both = self._pair
        if u is not uncond or c is not cond:
            both = self._prepare(_cat(uncond, cond))
            self._pair = (uncond, cond, both)
        return both

    def _one(self, cond):
        c, prepared = self._single
        if c is not cond:
            prepared = self._prepare(cond)
            self._single = (cond, prepared)
        return prepared

    def _kwargs(self, cond) -> dict:
        if cond is None:
            return {}
        if isinstance(cond, dict):
            return dict(cond)
        if self.conditioning_key in ("crossattn", "hybrid"):
            return {"context": cond}
        if self.conditioning_key == "adm":
            return {"y": cond}
        raise ValueError(f"a model with conditioning_key={self.conditioning_key!r} takes no "
                         "cond; pass channel-wise conditioning as concat")

    def __call__(self, x, t, cond=None, uncond=None, guidance_scale=1.0, concat=None):
        n = x.shape[0]
        guide = uncond is not None and (isinstance(guidance_scale, torch.Tensor)
                                        or guidance_scale != 1.0)
        x_in = x if concat is None else torch.cat([x, concat.to(x.dtype)], dim=1)
        if guide:
            t_in = t.reshape(-1).expand(2 * n) if t.numel() == 1 else _cat(t, t)
            t = t_in[:n]
            out = self.unet(_cat(x_in, x_in), t_in, **self._kwargs(self._both(uncond, cond)))
            out_uncond, out_cond = out.chunk(2)
            return GuidedEps(self._eps(out_cond, x, t), self._eps(out_uncond, x, t), guidance_scale)
        t = t.reshape(-1).expand(n) if t.numel() == 1 else t
        return self._eps(self.unet(x_in, t, **self._kwargs(self._one(cond))), x, t)

    def _eps(self, out, x, t):
        if self.parameterization == "eps":
            return out
        # x_0 and v are affine in the output with weights that depend only on t, so converting
        # each half before guiding equals guiding first and converting after.
        a = self.alphas_cumprod.to(x.device)[t]
        return to_eps(out.to(x.dtype), x, a, self.parameterization)
