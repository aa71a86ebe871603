"""``LatentDiffusion``: the three networks, the noise schedule, and the tasks built on them.

Rombach et al. 2022: a first-stage autoencoder maps images to latents z = scale_factor * E(x)
(section 3.1; the scale makes the latents roughly unit variance), a U-Net eps_theta(z_t, t, c)
is trained on them with DDPM's objective (eq. 2, conditioned: eq. 3), and conditioning enters
by cross-attention (text, classes), by channel concatenation (super-resolution, inpainting) or
both ("hybrid"), as ``config["diffusion"]["conditioning_key"]`` says.

``sample`` runs a sampler in latent space and returns latents; the task helpers (``txt2img``,
``sample_class``, ``sample_unconditional``, ``super_resolve``, ``inpaint``, ``img2img``) prepare
the conditioning, decode and return PIL images (optionally saved as PNGs).
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import images as im
from .diffusion.guidance import EpsModel
from .diffusion.samplers import get_sampler, sample_ddim, sample_dpmpp_2m
from .diffusion.schedule import NoiseSchedule, StepSchedule, randn_like

log = logging.getLogger("ldmfast")

__all__ = ["LatentDiffusion"]


class _DecodeLatent(nn.Module):
    """A first stage's ``decode_latent`` as a module's forward (for ``functional_call``)."""

    def __init__(self, fs):
        super().__init__()
        self.fs = fs

    def forward(self, z):
        return self.fs.decode_latent(z)

# diffusers scheduler configs -> ldmfast's diffusion config
_DIFFUSERS_BETAS = {"scaled_linear": "linear", "linear": "sqrt_linear",
                    "squaredcos_cap_v2": "cosine"}
_DIFFUSERS_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _diffusion_config(config) -> dict:
    return dict((config or {}).get("diffusion") or {})


def diffusers_scheduler_kwargs(config) -> dict:
    """The diffusers scheduler arguments (beta_schedule, beta_start, beta_end, prediction_type)
    of a model config's diffusion section: the inverse of what ``from_diffusers`` reads."""
    diffusion = _diffusion_config(config)
    betas = {v: k for k, v in _DIFFUSERS_BETAS.items()}
    predictions = {v: k for k, v in _DIFFUSERS_PREDICTION.items()}
    beta = diffusion.get("beta_schedule", "linear")
    if beta not in betas:
        raise ValueError(f"beta_schedule {beta!r} has no diffusers equivalent "
                         f"(supported: {sorted(betas)})")
    return {"beta_schedule": betas[beta],
            "beta_start": float(diffusion.get("linear_start", 8.5e-4)),
            "beta_end": float(diffusion.get("linear_end", 1.2e-2)),
            "prediction_type": predictions[diffusion.get("parameterization", "eps")]}


def check_graphable_loop(sampler="ddim", eta=0.0, callback=None, mask=None) -> None:
    """Raises ValueError when ``sample(cuda_graph=True)`` cannot replay this loop (checked
    before any model is loaded by ``python -m ldmfast generate --cuda-graph``)."""
    fn, _ = get_sampler(sampler)
    if fn not in (sample_ddim, sample_dpmpp_2m):
        raise ValueError(f"sample(cuda_graph=True) supports the 'ddim' and 'dpmpp_2m' "
                         f"samplers, not {sampler!r} (its per-step noise would be frozen "
                         "into the graph)")
    if eta:
        raise ValueError("sample(cuda_graph=True) supports eta=0 only: eta > 0 draws noise at "
                         "every step, which a replayed graph would repeat")
    if callback is not None:
        raise ValueError("sample(cuda_graph=True) takes no callback: the loop runs as one "
                         "graph with no host code between steps")
    if mask is not None:
        raise ValueError("sample(cuda_graph=True) takes no mask/x0: the known region is "
                         "re-noised at every step, which a replayed graph would repeat")


class LatentDiffusion(nn.Module):
    """A latent diffusion model: ``.unet``, ``.first_stage``, ``.cond_stage``, ``.config``,
    ``.scale_factor`` and ``.schedule`` (a ``NoiseSchedule`` whose buffers move with the model
    but stay float32)."""

    def __init__(self, unet: nn.Module, first_stage: Optional[nn.Module] = None,
                 cond_stage: Optional[nn.Module] = None, config: Optional[dict] = None):
        super().__init__()
        self.unet = unet
        self.first_stage = first_stage
        self.cond_stage = cond_stage
        self.config = copy.deepcopy(config or {})
        diffusion = _diffusion_config(self.config)
        self.schedule = NoiseSchedule.from_config(diffusion)
        self.scale_factor = float(diffusion.get("scale_factor", 1.0))
        self.parameterization = self.schedule.parameterization
        self.conditioning_key = diffusion.get("conditioning_key", "crossattn")
        self.eval()

    # --- construction --------------------------------------------------------------------------
    @classmethod
    def from_components(cls, components) -> "LatentDiffusion":
        """From anything with ``.unet``, ``.first_stage``, ``.cond_stage`` and ``.config``
        (``ldmfast.models.Components``, or another ``LatentDiffusion``)."""
        if components.unet is None:
            raise ValueError("a LatentDiffusion needs a U-Net; these components have none")
        return cls(components.unet, components.first_stage, components.cond_stage,
                   components.config)

    @classmethod
    def load(cls, path, config=None, use_ema: bool = False, tokenizer=None) -> "LatentDiffusion":
        """From a CompVis/SD checkpoint, a diffusers folder or an ldmfast file
        (``ldmfast.checkpoint.load_components``); ``config``: a preset name or dict;
        ``tokenizer``: a local tokenizer folder for the text encoder (checkpoints hold none)."""
        from . import checkpoint
        return cls.from_components(checkpoint.load_components(path, config=config, use_ema=use_ema,
                                                              tokenizer=tokenizer))

    @classmethod
    def from_diffusers(cls, pipe) -> "LatentDiffusion":
        """The ldmfast model of a diffusers pipeline (``StableDiffusionPipeline`` and the like):
        its U-Net and VAE converted (``ldmfast.checkpoint.from_diffusers``), its text encoder and
        tokenizer wrapped, its scheduler's training schedule and ``vae.config.scaling_factor``
        taken over. The pipeline's own sampler settings are not: ``sample`` picks them."""
        from . import checkpoint

        unet = checkpoint.from_diffusers(pipe.unet)
        vae = getattr(pipe, "vae", None) or getattr(pipe, "vqvae", None)  # LDM pipelines: vqvae
        first_stage = checkpoint.from_diffusers(vae) if vae is not None else None
        # diffusers scales latents by scaling_factor for AutoencoderKL only; its VQ pipelines
        # (LDMPipeline, LDMSuperResolutionPipeline) decode the latents as they are.
        scale = 1.0
        if vae is not None and type(vae).__name__ == "AutoencoderKL":
            scale = float(getattr(vae.config, "scaling_factor", 1.0))
        sc = pipe.scheduler.config
        beta = sc.get("beta_schedule", "linear")
        if beta not in _DIFFUSERS_BETAS or sc.get("trained_betas") is not None:
            raise ValueError(f"the scheduler's beta_schedule {beta!r} has no ldmfast equivalent "
                             f"(supported: {sorted(_DIFFUSERS_BETAS)})")
        prediction = sc.get("prediction_type", "epsilon")
        if prediction not in _DIFFUSERS_PREDICTION:
            raise ValueError(f"the scheduler's prediction_type {prediction!r} is not supported")
        cond_stage, cond_cfg = None, None
        text_encoder = getattr(pipe, "text_encoder", None)
        if text_encoder is not None:
            cond_stage = checkpoint.from_diffusers(text_encoder)
            tokenizer = getattr(pipe, "tokenizer", None)
            folder = getattr(tokenizer, "name_or_path", None)
            if folder and os.path.isdir(folder):
                cond_stage.tokenizer_path = cond_stage.config["tokenizer_path"] = folder
            # a tokenizer built without model_max_length reports a huge number
            positions = int(text_encoder.config.max_position_embeddings)
            cond_stage.max_length = cond_stage.config["max_length"] = min(
                int(getattr(tokenizer, "model_max_length", positions) or positions), positions)
            if tokenizer is not None:
                # The pipeline's tokenizer object is used as is (there may be no folder to name).
                cond_stage._tokenizer = tokenizer
            cond_cfg = cond_stage.config
        config = {
            "unet": copy.deepcopy(getattr(unet, "config", None)),
            "first_stage": copy.deepcopy(getattr(first_stage, "config", None)),
            "cond_stage": cond_cfg,
            "diffusion": {
                "parameterization": _DIFFUSERS_PREDICTION[prediction],
                "beta_schedule": _DIFFUSERS_BETAS[beta],
                "linear_start": float(sc.get("beta_start", 8.5e-4)),
                "linear_end": float(sc.get("beta_end", 1.2e-2)),
                "timesteps": int(sc.get("num_train_timesteps", 1000)),
                "scale_factor": scale,
                "conditioning_key": {(True, False): "crossattn", (True, True): "hybrid",
                                     (False, True): "concat", (False, False): None}[
                    # Cross-attention is a property of the U-Net (it has a context_dim), not
                    # of whether the pipeline carries a text encoder: with prompt_embeds a
                    # pipeline may have none.
                    ((getattr(unet, "config", None) or {}).get("context_dim") is not None,
                     unet.in_channels > unet.out_channels)],
            },
        }
        model = cls(unet, first_stage, cond_stage, config)
        return model.to(pipe.unet.device)

    def save(self, path) -> str:
        """Writes the model atomically (``ldmfast.checkpoint.save``: .safetensors with its
        config, or a CompVis-layout .ckpt)."""
        from . import checkpoint
        return checkpoint.save(self, path)

    # --- properties ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        return int(self.unet.out_channels)

    @property
    def concat_channels(self) -> int:
        """Channels the U-Net expects concatenated to the latent (0 for most models)."""
        return int(self.unet.in_channels) - self.latent_channels

    @property
    def downsampling_factor(self) -> int:
        """f: image size / latent size (2^(levels - 1) of the first stage), 1 without one."""
        fs = (self.config.get("first_stage") or {})
        mult = (fs.get("ddconfig") or {}).get("ch_mult")
        if mult is None:
            return 1 if self.first_stage is None else 8
        return 2 ** (len(mult) - 1)

    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance scale the model's config recommends (``sampling``,
        written by the training recipes), else 7.5."""
        return float((self.config.get("sampling") or {}).get("guidance_scale", 7.5))

    @property
    def latent_size(self) -> int:
        """The latent side the model was configured for (the U-Net config's ``image_size``)."""
        size = (self.config.get("unet") or {}).get("image_size")
        return int(size) if size else 64

    # --- first stage and conditioning ----------------------------------------------------------
    def _first_stage(self):
        if self.first_stage is None:
            raise ValueError("this model has no first stage (autoencoder) to encode or decode with")
        return self.first_stage

    @torch.no_grad()
    def encode(self, x, sample: bool = False, generator=None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] (or PIL) -> latents scale_factor * E(x): the
        posterior's mode (or a sample) for a KL autoencoder, the pre-quantisation encoding for
        a VQ one (as LDM diffuses it)."""
        x = im.to_tensor(x, self.device, self._fs_dtype())
        z = self._first_stage().encode_latent(x, sample=sample, generator=generator)
        return z * self.scale_factor

    @torch.no_grad()
    def decode(self, z, cuda_graph: bool = False, fp16_guard: bool = True) -> torch.Tensor:
        """Latents -> images in [-1, 1]: the decoder applied to z / scale_factor (a VQ first
        stage quantises first).

        cuda_graph: replay the decoder from a CUDA graph captured per latent shape.
        fp16_guard: with a float16 first stage, samples whose output has a NaN or Inf (fp16
        overflow, SD's VAE at large sizes) are decoded again in float32 and replace them
        (``_decode_fp32``); the check costs one host sync per call. Logged once per model.
        """
        fs = self._first_stage()
        dtype = self._fs_dtype()
        if cuda_graph:
            self._check_graphable("decode")
            x = self._decode_graphed(fs, z, dtype)
        else:
            x = fs.decode_latent(z.to(dtype) / self.scale_factor)
        if fp16_guard and dtype == torch.float16:
            x = self._fp16_guard(x, z)
        return x

    def _decode_graphed(self, fs, z, dtype):
        from .graphs import tensor_spec
        from .models.ops import graph_settings

        z = z.to(next(fs.parameters()).device)
        scale = self.scale_factor
        key = ("decode", tensor_spec(z), dtype, scale, graph_settings())

        def body(z):
            return fs.decode_latent(z.to(dtype) / scale)
        return self.graph_cache().run(key, body, {"z": z}, watch=tuple(fs.parameters()))

    def _fp16_guard(self, x, z):
        bad = ~torch.isfinite(x).flatten(1).all(dim=1)
        if not bool(bad.any()):
            return x
        idx = bad.nonzero().flatten()
        if not self.__dict__.get("_fp16_guard_logged"):
            self.__dict__["_fp16_guard_logged"] = True
            log.warning("fp16 decode gave non-finite values for %d of %d samples; decoding "
                        "them again in float32 (logged once)", idx.numel(), x.shape[0])
        else:
            log.debug("fp16 decode: %d samples redone in float32", idx.numel())
        x = x.clone()
        x[idx] = self._decode_fp32(z[idx.to(z.device)]).to(x.dtype)
        return x

    def _decode_fp32(self, z):
        """The first stage's decode in float32 without touching the module: its decoder-side
        parameters are upcast into temporary copies (float32 = twice their fp16 size, ~200 MB
        for SD's VAE decoder, freed on return) and applied with ``torch.func.functional_call``.
        The module's own tensors, which captured graphs and shared weights point at, stay
        where they are."""
        fs = self._first_stage()
        params = {"fs." + n: p.float() for n, p in fs.named_parameters()
                  if not n.startswith(("encoder.", "quant_conv."))}
        z32 = z.to(next(fs.parameters()).device, torch.float32) / self.scale_factor
        return torch.func.functional_call(_DecodeLatent(fs), params, (z32,), strict=False)

    def _fs_dtype(self):
        return next(self._first_stage().parameters()).dtype

    @torch.no_grad()
    def encode_text(self, prompts) -> torch.Tensor:
        """Prompts (a string or a list) -> the cond stage's context (B, T, D)."""
        if self.cond_stage is None:
            raise ValueError("this model has no conditioning encoder (cond_stage) for text")
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.cond_stage.encode(list(prompts))

    @torch.no_grad()
    def get_learned_conditioning(self, c):
        """LDM's name: text, labels or images through the cond stage (identity without one)."""
        if self.cond_stage is None:
            return c
        if isinstance(c, str):
            c = [c]
        return self.cond_stage.encode(c)

    def _encode_cond(self, c, batch: int):
        """Prepares a conditioning for the U-Net: strings are encoded; class labels (long) go
        through a class-embedding cond stage unless the U-Net takes them as ``y``."""
        if c is None or isinstance(c, dict):
            return c
        if isinstance(c, str) or (isinstance(c, (list, tuple)) and c and isinstance(c[0], str)):
            c = self.encode_text(c)
        elif not isinstance(c, torch.Tensor):
            c = torch.as_tensor(c)
        if not c.is_floating_point() and self.conditioning_key != "adm":
            if self.cond_stage is None:
                raise ValueError("integer conditioning (class labels) needs a class-embedding "
                                 "cond stage or a U-Net with conditioning_key 'adm'")
            c = self.cond_stage.encode(c.to(self.device))
        c = c.to(self.device)
        if c.is_floating_point():
            c = c.to(self.dtype)
        if c.shape[0] == 1 and batch > 1:
            c = c.expand(batch, *c.shape[1:])
        if c.shape[0] != batch:
            raise ValueError(f"the conditioning has batch {c.shape[0]}, the sample has {batch}")
        return c

    def _check_concat(self, concat, shape):
        want = self.concat_channels
        total = int(self.unet.in_channels)
        if concat is None:
            if want:
                raise ValueError(f"this model's U-Net takes {total} input channels: "
                                 f"{self.latent_channels} latent + {want} concat; pass concat "
                                 f"(B, {want}, {shape[2]}, {shape[3]})")
            return None
        if not want:
            raise ValueError(f"this model's U-Net takes {total} input channels, all latent; "
                             f"it takes no concat (got concat with {concat.shape[1]} channels)")
        if concat.dim() != 4 or concat.shape[1] != want:
            got = concat.shape[1] if concat.dim() == 4 else tuple(concat.shape)
            raise ValueError(f"this model's U-Net takes {total} input channels: "
                             f"{self.latent_channels} latent + {want} concat; got concat with "
                             f"{got} channels")
        if tuple(concat.shape[2:]) != tuple(shape[2:]):
            raise ValueError(f"concat is {tuple(concat.shape[2:])} spatially, the latent "
                             f"{tuple(shape[2:])}")
        concat = concat.to(self.device, self.dtype)
        if concat.shape[0] == 1 and shape[0] > 1:
            concat = concat.expand(shape[0], *concat.shape[1:])
        return concat

    # --- sampling ------------------------------------------------------------------------------
    def steps(self, steps: int, sampler: str = "ddim") -> StepSchedule:
        """The discretisation ``sample`` uses for a sampler and step count."""
        _, disc = get_sampler(sampler)
        return self.schedule.steps(steps, device=self.device, **disc)

    @torch.no_grad()
    def sample(self, cond=None, uncond=None, steps: int = 50, guidance_scale: float = 1.0,
               sampler: str = "ddim", eta: float = 0.0, x_T=None, generator=None, shape=None,
               concat=None, mask=None, x0=None, progress: bool = True, callback=None,
               start_step: int = 0, cuda_graph: bool = False) -> torch.Tensor:
        """Samples latents (B, C, h, w).

        cond / uncond: encoded conditionings (text contexts (B, T, D), class labels (B,) long,
        or a dict of U-Net keyword arguments); strings are encoded. With ``guidance_scale``
        != 1, classifier-free guidance evaluates cond and uncond in one batch; a text model's
        missing uncond is the empty prompt's encoding.
        x_T: the initial noise; otherwise drawn from ``generator`` with ``shape`` (B, C, h, w),
        whose default is the cond's batch (or 1) at the configured latent size.
        concat: (B, C', h, w) concatenated to the latent for concat-conditioned U-Nets.
        mask / x0: latent-space inpainting with any model (mask == 1: keep x0's content), as in
        LDM's DDIM sampler; the known region is pasted once more at the end.
        start_step: skip the first steps (img2img: x_T must be noised to that step).
        cuda_graph: run the whole loop (U-Net on cond + uncond, guidance, sampler update) as one
        CUDA graph, captured on the first call for these shapes and settings and replayed after
        (``graph_body`` is the function captured; see ``ldmfast.graphs``). CUDA only; DDIM with
        eta = 0 and DPM-Solver++(2M), without callback or mask (their per-step host work or
        noise cannot be replayed). The guidance scale is a device input: changing it does not
        capture again.
        """
        if cuda_graph:
            self._check_graphable("sample", sampler=sampler, eta=eta, callback=callback,
                                  mask=mask)
        sampler_fn, disc = get_sampler(sampler)
        dev = self.device
        if x_T is not None:
            shape = tuple(x_T.shape)
        elif shape is None:
            b = 1
            for c in (cond, concat, x0):
                if isinstance(c, torch.Tensor):
                    b = c.shape[0]
                    break
                if isinstance(c, (list, tuple)):
                    b = len(c)
                    break
            hw = tuple(concat.shape[2:]) if concat is not None else (
                tuple(x0.shape[2:]) if x0 is not None else (self.latent_size,) * 2)
            shape = (b, self.latent_channels) + hw
        shape = tuple(shape)
        if len(shape) != 4 or shape[1] != self.latent_channels:
            raise ValueError(f"latent shape must be (B, {self.latent_channels}, h, w), got {shape}")
        b = shape[0]
        guide = isinstance(guidance_scale, torch.Tensor) or guidance_scale != 1.0
        cond = self._encode_cond(cond, b)
        if guide and uncond is None:
            if self.cond_stage is not None and hasattr(self.cond_stage, "tokenize"):
                uncond = [""] * b
            elif cond is not None:
                raise ValueError("classifier-free guidance needs uncond for this model "
                                 "(e.g. the null class label of a class-conditional model)")
        uncond = self._encode_cond(uncond, b) if guide else None
        if isinstance(guidance_scale, torch.Tensor):
            guidance_scale = guidance_scale.to(dev, torch.float32)
        concat = self._check_concat(concat, shape)
        if x_T is None:
            x_T = randn_like(torch.empty(shape, device=dev, dtype=self.dtype), generator)
        x = x_T.to(dev, self.dtype)
        if mask is not None:
            if x0 is None:
                raise ValueError("mask needs x0, the latent whose masked region is kept")
            mask = mask.to(dev, self.dtype)
            x0 = x0.to(dev, self.dtype)
        schedule = self.schedule.steps(steps, device=dev, **disc)
        if start_step:
            if not 0 <= start_step < steps:
                raise ValueError(f"start_step must be in [0, {steps}), got {start_step}")
            schedule = StepSchedule(schedule.timesteps[start_step:], schedule.alphas[start_step:],
                                    schedule.alphas_prev[start_step:])
        opts = {"eta": eta} if sampler_fn is sample_ddim else {}
        if eta and not opts:
            raise ValueError(f"eta applies to the DDIM sampler only, not {sampler!r}")
        if cuda_graph:
            return self._sample_graphed(sampler_fn, schedule, opts, x, cond, uncond,
                                        guidance_scale if guide else None, concat, steps,
                                        start_step)
        model = EpsModel(self.unet, self.schedule.alphas_cumprod, self.parameterization,
                         self.conditioning_key)
        extra = {"cond": cond, "uncond": uncond, "guidance_scale": guidance_scale,
                 "concat": concat}
        x = sampler_fn(model, x, schedule, extra_args=extra, callback=callback,
                       disable=not progress, generator=generator, mask=mask, x0=x0, **opts)
        if mask is not None:
            x = mask * x0 + (1 - mask) * x
        return x

    # --- CUDA graphs ---------------------------------------------------------------------------
    def graph_cache(self):
        """This model's ``ldmfast.graphs.GraphCache`` (made on first use; assign another, e.g.
        one with ``eager_capture``, to run the graph path without capturing)."""
        cache = self.__dict__.get("_graphs")
        if cache is None:
            from .graphs import GraphCache
            cache = self.__dict__["_graphs"] = GraphCache()
        return cache

    def set_graph_cache(self, cache) -> None:
        self.__dict__["_graphs"] = cache

    def _check_graphable(self, what, sampler="ddim", eta=0.0, callback=None, mask=None):
        if self.graph_cache().requires_cuda and self.device.type != "cuda":
            raise ValueError(f"{what}(cuda_graph=True) needs the model on a CUDA device; it is on "
                             f"{self.device.type} (move it with .to('cuda') or pass "
                             "cuda_graph=False)")
        if what == "sample":
            check_graphable_loop(sampler, eta, callback, mask)

    def graph_body(self, sampler_fn, schedule: StepSchedule, opts=None):
        """The function ``sample(cuda_graph=True)`` captures: x_T, the encoded conditionings,
        the guidance scale (a device tensor, or None for no guidance) and the concat ->
        latents, with the sampler loop, the U-Net on [uncond; cond] and guidance inside. Plain
        PyTorch: it runs eagerly as well (that is how it is tested without a GPU)."""
        opts = dict(opts or {})
        unet, abar = self.unet, self.schedule.alphas_cumprod
        param, key = self.parameterization, self.conditioning_key

        def body(x_T, cond=None, uncond=None, guidance_scale=None, concat=None):
            model = EpsModel(unet, abar, param, key)
            guided = guidance_scale is not None
            extra = {"cond": cond, "uncond": uncond if guided else None,
                     "guidance_scale": guidance_scale if guided else 1.0, "concat": concat}
            return sampler_fn(model, x_T, schedule, extra_args=extra, disable=True, **opts)
        return body

    def _sample_graphed(self, sampler_fn, schedule, opts, x, cond, uncond, guidance_scale,
                        concat, steps, start_step):
        from .graphs import tensor_spec
        from .models.ops import graph_settings

        scale = None
        if guidance_scale is not None:
            scale = torch.as_tensor(guidance_scale, dtype=torch.float32, device=self.device)
        inputs = {"x_T": x, "cond": cond, "uncond": uncond, "guidance_scale": scale,
                  "concat": concat}
        key = ("sample", sampler_fn.__name__, int(steps), int(start_step),
               tuple(sorted(opts.items())), self.parameterization, self.conditioning_key,
               graph_settings()) + tuple((k, tensor_spec(v)) for k, v in inputs.items())
        body = self.graph_body(sampler_fn, schedule, opts)
        return self.graph_cache().run(key, body, inputs, watch=tuple(self.unet.parameters()))

    # --- tasks ---------------------------------------------------------------------------------
    def _generator(self, seed, generator):
        if generator is not None:
            return generator
        if seed is None:
            return None
        return torch.Generator(device="cpu").manual_seed(int(seed))

    def _latent_hw(self, height, width):
        f = self.downsampling_factor
        h = height if height is not None else self.latent_size * f
        w = width if width is not None else self.latent_size * f
        if h % f or w % f:
            raise ValueError(f"height and width must be multiples of {f} (the first stage's "
                             f"downsampling factor), got {h}x{w}")
        return h // f, w // f

    def _finish(self, latents, out, output_type, cuda_graph: bool = False):
        if output_type == "latent":
            return latents
        pixels = self.decode(latents, cuda_graph=cuda_graph)
        if output_type == "tensor":
            return pixels
        if output_type != "pil":
            raise ValueError("output_type must be 'pil', 'tensor' or 'latent', "
                             f"got {output_type!r}")
        images = im.to_pil(pixels)
        if out is not None:
            for path in im.save_images(images, out):
                log.info("wrote %s", path)
        return images

    def txt2img(self, prompt, negative_prompt="", steps: int = 50, guidance_scale: float = 7.5,
                seed=None, height=None, width=None, batch: int = 1, sampler: str = "ddim",
                eta: float = 0.0, out=None, progress: bool = True, callback=None,
                generator=None, output_type: str = "pil", cuda_graph: bool = False):
        """Text to image: ``batch`` images of ``prompt`` (a string, or a list of ``batch``).
        ``cuda_graph``: the denoising loop and the decode replayed from CUDA graphs (see
        ``sample`` and ``decode``; no progress bar, the loop being one graph)."""
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        negatives = ([negative_prompt] * batch if isinstance(negative_prompt, str)
                     else list(negative_prompt))
        cond = self.encode_text(prompts)
        uncond = self.encode_text(negatives) if guidance_scale != 1.0 else None
        h, w = self._latent_hw(height, width)
        z = self.sample(cond, uncond, steps, guidance_scale, sampler, eta,
                        generator=self._generator(seed, generator),
                        shape=(batch, self.latent_channels, h, w), progress=progress,
                        callback=callback, cuda_graph=cuda_graph)
        return self._finish(z, out, output_type, cuda_graph)

    def sample_class(self, labels, steps: int = 50, guidance_scale: float = 1.0,
                     uncond_label=None, seed=None, sampler: str = "ddim", eta: float = 0.0,
                     height=None, width=None, out=None, progress: bool = True, callback=None,
                     generator=None, output_type: str = "pil"):
        """Class-conditional samples, one per label. With ``guidance_scale`` != 1,
        ``uncond_label`` is the model's null class (1000 for LDM's cin256-v2)."""
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        uncond = None
        if guidance_scale != 1.0:
            if uncond_label is None:
                raise ValueError("classifier-free guidance needs uncond_label, the null class")
            uncond = torch.full_like(labels, int(uncond_label))
        h, w = self._latent_hw(height, width)
        z = self.sample(labels, uncond, steps, guidance_scale, sampler, eta,
                        generator=self._generator(seed, generator), progress=progress,
                        shape=(labels.shape[0], self.latent_channels, h, w), callback=callback)
        return self._finish(z, out, output_type)

    def sample_unconditional(self, batch: int = 1, steps: int = 50, seed=None,
                             sampler: str = "ddim", eta: float = 0.0, height=None, width=None,
                             out=None, progress: bool = True, callback=None, generator=None,
                             output_type: str = "pil"):
        """Unconditional samples."""
        h, w = self._latent_hw(height, width)
        z = self.sample(None, None, steps, 1.0, sampler, eta,
                        generator=self._generator(seed, generator),
                        shape=(batch, self.latent_channels, h, w), progress=progress,
                        callback=callback)
        return self._finish(z, out, output_type)

    def super_resolve(self, low_res_image, steps: int = 100, seed=None, sampler: str = "ddim",
                      eta: float = 1.0, out=None, progress: bool = True, callback=None,
                      generator=None, output_type: str = "pil"):
        """LDM-SR (the paper's section 4.4, ``bsr_sr``): the low-resolution image, in [-1, 1],
        goes through the cond stage (identity) and is concatenated to the latent, which has its
        spatial size; the f = 4 first stage decodes to 4x. LDM's script uses eta = 1."""
        lr = im.to_tensor(low_res_image, self.device, self.dtype)
        c = self.get_learned_conditioning(lr)
        z = self.sample(None, None, steps, 1.0, sampler, eta, concat=c,
                        generator=self._generator(seed, generator),
                        shape=(c.shape[0], self.latent_channels) + tuple(c.shape[2:]),
                        progress=progress, callback=callback)
        return self._finish(z, out, output_type)

    def inpaint(self, image, mask, prompt=None, negative_prompt="", steps: int = 50,
                guidance_scale: float = 1.0, seed=None, sampler: str = "ddim", eta: float = 0.0,
                out=None, progress: bool = True, callback=None, generator=None,
                output_type: str = "pil"):
        """Fills the region where ``mask`` is 1 (white).

        An inpainting U-Net (in_channels = latent + latent + 1: LDM's inpainting model, SD's
        with "hybrid" conditioning) gets the masked image's latent and the mask downsampled to
        the latent size concatenated to its input (LDM: masked latent then mask; SD: mask then
        masked latent). Any other model inpaints by replacing the known region at every step
        (``sample``'s mask/x0). The result is composited with the input outside the mask.
        """
        x = im.to_tensor(image, self.device, self._fs_dtype())
        m = im.mask_to_tensor(mask, self.device, self._fs_dtype())
        if m.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"mask is {tuple(m.shape[-2:])}, the image {tuple(x.shape[-2:])}")
        b = x.shape[0]
        cond = uncond = None
        if prompt is not None:
            cond = self.encode_text([prompt] * b if isinstance(prompt, str) else prompt)
            if guidance_scale != 1.0:
                uncond = self.encode_text([negative_prompt] * b)
        gen = self._generator(seed, generator)
        n_lat = self.latent_channels
        if self.concat_channels == n_lat + 1:
            z_masked = self.encode((1 - m) * x)
            m_lat = F.interpolate(m, size=z_masked.shape[-2:])
            parts = [m_lat, z_masked] if self.conditioning_key == "hybrid" else [z_masked, m_lat]
            concat = torch.cat(parts, dim=1)
            z = self.sample(cond, uncond, steps, guidance_scale, sampler, eta, concat=concat,
                            generator=gen, shape=(b, n_lat) + tuple(z_masked.shape[2:]),
                            progress=progress, callback=callback)
        elif self.concat_channels == 0:
            z0 = self.encode(x)
            keep = 1 - F.interpolate(m, size=z0.shape[-2:])
            z = self.sample(cond, uncond, steps, guidance_scale, sampler, eta, mask=keep, x0=z0,
                            generator=gen, shape=tuple(z0.shape), progress=progress,
                            callback=callback)
        else:
            raise ValueError(f"this model's U-Net takes {int(self.unet.in_channels)} input "
                             f"channels: {n_lat} latent + {self.concat_channels} concat; "
                             f"inpainting needs {n_lat} + {n_lat + 1} (masked-image latent and "
                             f"mask) or a model without concat")
        if output_type == "latent":
            return z
        pixels = self.decode(z).to(x.dtype)
        pixels = (1 - m) * x + m * pixels
        return self._finish_pixels(pixels, out, output_type)

    def img2img(self, image, strength: float = 0.75, prompt=None, negative_prompt="",
                steps: int = 50, guidance_scale: float = 7.5, seed=None, sampler: str = "ddim",
                eta: float = 0.0, out=None, progress: bool = True, callback=None,
                generator=None, output_type: str = "pil"):
        """SDEdit (Meng et al. 2022) as SD's img2img: the image's latent is noised to the
        timestep of step (1 - strength) * steps of the discretisation and denoised from there;
        strength 1 ignores the image, 0 returns it."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        gen = self._generator(seed, generator)
        z0 = self.encode(image)
        b = z0.shape[0]
        n = min(int(steps * strength), steps)
        if n == 0:
            return self._finish(z0, out, output_type)
        cond = uncond = None
        if prompt is not None:
            cond = self.encode_text([prompt] * b if isinstance(prompt, str) else prompt)
            if guidance_scale != 1.0:
                uncond = self.encode_text([negative_prompt] * b)
        else:
            guidance_scale = 1.0
        start = steps - n
        a = self.steps(steps, sampler).alphas[start]
        z0 = z0.to(self.dtype)
        x_t = a.sqrt() * z0 + (1 - a).sqrt() * randn_like(z0, gen)  # q(x_t | x_0), DDPM eq. 4
        z = self.sample(cond, uncond, steps, guidance_scale, sampler, eta, x_T=x_t,
                        generator=gen, progress=progress, callback=callback, start_step=start)
        return self._finish(z, out, output_type)

    def _finish_pixels(self, pixels, out, output_type):
        if output_type == "tensor":
            return pixels
        images = im.to_pil(pixels)
        if out is not None:
            for path in im.save_images(images, out):
                log.info("wrote %s", path)
        return images

