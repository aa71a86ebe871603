"""ldmfast: Latent Diffusion Models (Rombach et al., CVPR 2022) with fused C++/CUDA kernels.

    import ldmfast
    model = ldmfast.load("v1-5-pruned-emaonly.safetensors")   # or a diffusers folder
    model = ldmfast.load()      # the built-in model trained on ldmfast's generated shapes
    image = model.txt2img("a red circle", steps=50, guidance_scale=7.5, seed=0)

Submodules load lazily, so ``import ldmfast`` stays cheap and works before the compiled ops are
needed: ``ldmfast.ops`` (fused ops), ``ldmfast.ref`` (their references), ``ldmfast.models``,
``ldmfast.configs``, ``ldmfast.checkpoint``, ``ldmfast.pipeline``.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = {"ops", "ref", "models", "configs", "checkpoint", "pipeline", "diffusion", "export",
               "train", "data", "dropin", "graphs"}


# The models ldmfast trained itself on its generated shapes data and ships in the package
# (``python -m ldmfast train --recipe <name>`` retrains them).
BUILTIN = ("shapes", "shapes-sr")


def builtin_path(name: str = "shapes") -> str:
    """The file of a built-in model; a clear error when this install does not carry it."""
    import os
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in model {name!r} (built in: {', '.join(BUILTIN)})")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights",
                        f"{name}.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"the built-in model {name!r} is not in this install ({path}); "
                                f"train it with: python -m ldmfast train --recipe {name} "
                                f"--export {path}")
    return path


def load(path=None, config=None, use_ema=False, tokenizer=None):
    """A ``LatentDiffusion`` from a CompVis/SD checkpoint, a diffusers folder or an ldmfast file;
    ``tokenizer``: a local tokenizer folder for checkpoints that carry none (SD ``.ckpt``).
    With no ``path``, the built-in text-to-image model (``builtin_path("shapes")``)."""
    from .pipeline import LatentDiffusion
    if path is None:
        path = builtin_path("shapes")
    return LatentDiffusion.load(path, config=config, use_ema=use_ema, tokenizer=tokenizer)


def save(obj, path, overwrite: bool = False):
    """Writes a model (or one of its modules) atomically; an existing file is replaced only with
    ``overwrite=True``. See ``ldmfast.checkpoint.save``."""
    from .checkpoint import save as _save
    return _save(obj, path, overwrite=overwrite)


def from_diffusers(module_or_pipeline):
    """The ldmfast equivalent of a diffusers pipeline (a ``LatentDiffusion``) or module."""
    if hasattr(module_or_pipeline, "unet") and hasattr(module_or_pipeline, "vae"):
        from .pipeline import LatentDiffusion
        return LatentDiffusion.from_diffusers(module_or_pipeline)
    from .checkpoint import from_diffusers as _convert
    return _convert(module_or_pipeline)


def accelerate(obj, restore: bool = False, cuda_graph=None):
    """ldmfast's U-Net and VAE decoder inside a diffusers pipeline (or bare module), sharing its
    weights; ``restore=True`` undoes it; ``cuda_graph=True`` replays the calls from CUDA graphs.
    See ``ldmfast.dropin``."""
    from .dropin import accelerate as _accelerate
    return _accelerate(obj, restore=restore, cuda_graph=cuda_graph)


def __getattr__(name):
    if name == "LatentDiffusion":
        from .pipeline import LatentDiffusion
        return LatentDiffusion
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'ldmfast' has no attribute {name!r}")
