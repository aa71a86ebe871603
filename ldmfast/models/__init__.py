"""The LDM model layer: U-Net, first-stage autoencoders, conditioning encoders.

A model is described by a plain config dict (see ``ldmfast.configs``); ``build(config)`` makes
its modules, each carrying its own part of the config as ``module.config`` so that it can be
saved and rebuilt alone. The fused ops are reached through ``ldmfast.models.ops``;
``use_reference_ops(True)`` switches the whole layer to the plain-PyTorch references.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

from torch import nn

from .autoencoder import AutoencoderKL, DiagonalGaussianDistribution, VQModel
from .encoders import (ClassEmbedder, CLIPTextEmbedder, HFTokenizer, IdentityEncoder,
                       SpatialRescaler, TransformerEmbedder, WordTokenizer)
from .ops import use_reference_ops, using_reference_ops
from .quantize import VectorQuantizer
from .transformer import PreparedContext, SpatialTransformer
from .unet import AttentionBlock, ResBlock, UNetModel, timestep_embedding

__all__ = [
    "AttentionBlock", "AutoencoderKL", "CLIPTextEmbedder", "ClassEmbedder", "Components",
    "DiagonalGaussianDistribution", "HFTokenizer", "IdentityEncoder", "PreparedContext", "ResBlock",
    "SpatialRescaler", "SpatialTransformer", "TransformerEmbedder", "UNetModel", "VQModel",
    "VectorQuantizer", "WordTokenizer", "build", "build_cond_stage", "build_first_stage",
    "build_unet", "timestep_embedding", "use_reference_ops", "using_reference_ops",
]


@dataclasses.dataclass
class Components:
    """The three networks of a latent diffusion model and the config they were built from.

    Any part may be None (an unconditional model has no cond_stage; a file holding one module
    restores only that one)."""

    unet: nn.Module | None
    first_stage: nn.Module | None
    cond_stage: nn.Module | None
    config: dict[str, Any]


def _tag(module, cfg):
    module.config = copy.deepcopy(cfg)
    return module


def build_unet(cfg: dict) -> UNetModel:
    return _tag(UNetModel(**cfg), cfg)


def build_first_stage(cfg: dict) -> nn.Module:
    kind = cfg.get("type")
    params = {k: v for k, v in cfg.items() if k != "type"}
    if kind == "kl":
        return _tag(AutoencoderKL(**params), cfg)
    if kind == "vq":
        return _tag(VQModel(**params), cfg)
    raise ValueError(f"first_stage type {kind!r} is unknown (kl, vq)")


def build_cond_stage(cfg: dict | None) -> nn.Module | None:
    """The conditioning encoder; None for unconditional models and for type "first_stage"
    (inpainting: the conditioning is encoded by the first stage)."""
    if cfg is None:
        return None
    kind = cfg.get("type")
    params = {k: v for k, v in cfg.items() if k != "type"}
    if kind in (None, "first_stage"):
        return None
    builders = {"class": ClassEmbedder, "transformer": TransformerEmbedder,
                "clip": CLIPTextEmbedder, "rescaler": SpatialRescaler, "identity": IdentityEncoder}
    if kind == "openclip":
        raise ValueError("cond_stage type 'openclip' is not built as such: SD-2's OpenCLIP "
                         "text encoder runs as a transformers CLIPTextModel (type 'clip'; "
                         "ldmfast.checkpoint converts cond_stage_model.model.* weights to it)")
    if kind not in builders:
        raise ValueError(f"cond_stage type {kind!r} is unknown ({', '.join(builders)}, "
                         "first_stage, None)")
    return _tag(builders[kind](**params), cfg)


def build(config: dict) -> Components:
    """Modules (random weights) for a config dict: {"unet", "first_stage", "cond_stage", ...}."""
    unet = build_unet(config["unet"]) if config.get("unet") else None
    first = build_first_stage(config["first_stage"]) if config.get("first_stage") else None
    cond = build_cond_stage(config.get("cond_stage"))
    return Components(unet, first, cond, copy.deepcopy(config))
