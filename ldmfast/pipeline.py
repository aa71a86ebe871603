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
import operator
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import images as im
from .diffusion.guidance import EpsModel
from .diffusion.samplers import check_sampler_args, get_sampler, sample_ddim, sample_dpmpp_2m
from .diffusion.schedule import NoiseSchedule, StepSchedule, check_int, check_real, randn_like

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


OUTPUT_TYPES = ("pil", "tensor", "latent")

# What a model's cond is (``LatentDiffusion.conditioning``), as its errors say it.
_KINDS = {"text": "text-conditioned", "class": "class-conditional",
          "context": "conditioned on a cross-attention context (with no encoder for prompts)",
          None: "unconditional"}


def _guided(guidance_scale) -> bool:
    # A tensor scale (0-d or per sample, maybe on the GPU) is not read: it always means guidance.
    return isinstance(guidance_scale, torch.Tensor) or guidance_scale != 1.0


def _check_output_type(output_type):
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def _prompt_list(name, prompt, batch=None) -> list:
    """A prompt argument (a string or a non-empty list of strings) as a list of ``batch``
    strings: a string or a one-item list is repeated, a list of another length is refused."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
        if not prompts:
            raise ValueError(f"{name} is an empty list; give at least one prompt")
    else:
        raise TypeError(f"{name} must be a string or a list of strings, got "
                        f"{type(prompt).__name__} {prompt!r}"[:200])
    if batch is None or len(prompts) == batch:
        return prompts
    if len(prompts) == 1:
        return prompts * batch
    raise ValueError(f"{name} has {len(prompts)} prompts for a batch of {batch}")


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

    def _unet_config(self) -> dict:
        # The model's own record of the U-Net: it outlives a module swapped in for speed
        # (a TensorRTModule has no blocks to inspect).
        return self.config.get("unet") or getattr(self.unet, "config", None) or {}

    @property
    def unet_downsamplings(self) -> int:
        """d: how many times the U-Net halves the latent (len(channel_mult) - 1)."""
        mult = self._unet_config().get("channel_mult")
        if mult is not None:
            return len(mult) - 1
        from .models.unet import count_downsamplings
        return count_downsamplings(self.unet)

    @property
    def size_multiple(self) -> int:
        """N = f * 2**d: image heights and widths must be multiples of N, the latent being
        halved d times by the U-Net, whose skip connections need every halving exact (64 for
        Stable Diffusion: f = 8, d = 3)."""
        return self.downsampling_factor * 2 ** self.unet_downsamplings

    def _size_reason(self, pixels: bool = True) -> str:
        d = self.unet_downsamplings
        unet = f"2**{d} for the U-Net's {d} downsampling{'s' if d != 1 else ''}"
        if pixels:
            return f"the first stage's factor {self.downsampling_factor} times {unet}"
        return unet

    def _check_sides(self, name, h, w, pixels: bool = True):
        """Refuses an image (``pixels``) or latent-sized input whose sides the U-Net cannot
        halve d times, or the first stage encode at its factor."""
        n = self.size_multiple if pixels else 2 ** self.unet_downsamplings
        if h % n or w % n:
            raise ValueError(f"{name} must have a height and width that are multiples of {n} "
                             f"({self._size_reason(pixels)}), got {h}x{w}")

    @property
    def context_dim(self) -> Optional[int]:
        """The width of the context the U-Net cross-attends to; None if it takes none."""
        cfg = self._unet_config()
        if cfg:
            dim = cfg.get("context_dim") if cfg.get("use_spatial_transformer") else None
            return int(dim[0] if isinstance(dim, (list, tuple)) else dim) if dim else None
        from .models.transformer import CrossAttention
        return next((int(m.to_k.in_features) for m in self.unet.modules()
                     if isinstance(m, CrossAttention) and not m.is_self_attention), None)

    @property
    def num_classes(self) -> Optional[int]:
        """How many class labels a class-conditional model takes; None for other models."""
        from .models.encoders import ClassEmbedder
        if isinstance(self.cond_stage, ClassEmbedder):
            return int(self.cond_stage.embedding.num_embeddings)
        n = self._unet_config().get("num_classes", getattr(self.unet, "num_classes", None))
        return int(n) if n is not None else None

    @property
    def conditioning(self) -> Optional[str]:
        """What ``cond`` the U-Net needs (channel-wise concat aside): "text" (prompts, through
        a text encoder), "class" (labels, through a class embedder or the U-Net's own ``y``),
        "context" (a cross-attention context with no encoder here for prompts) or None."""
        if self.num_classes is not None:
            return "class"
        if hasattr(self.cond_stage, "tokenize"):
            return "text"
        if self.conditioning_key in ("crossattn", "hybrid") and self.context_dim is not None:
            return "context"
        return None

    def _require(self, task: str, *kinds):
        """Refuses a task this model's conditioning cannot serve."""
        if self.conditioning not in kinds:
            need = " or ".join(_KINDS[k].split(" (")[0] for k in kinds)
            raise ValueError(f"{task} needs a model that is {need}; this model is "
                             f"{self._describe()}")

    def _describe(self) -> str:
        if self.conditioning is None and self.concat_channels:
            return (f"conditioned only on {self.concat_channels} channels concatenated to the "
                    "latent (a super-resolution or inpainting model)")
        return _KINDS[self.conditioning]

    def _encode_prompts(self, prompts, negatives, guidance_scale):
        """(cond, uncond) of a task's checked prompts (``_task_prompts``): None without prompts;
        the negatives are encoded only when guidance will use them."""
        if prompts is None:
            return None, None
        cond = self.encode_text(prompts)
        return cond, self.encode_text(negatives) if _guided(guidance_scale) else None

    def _task_prompts(self, task, prompt, negative_prompt, batch, needed: bool = True):
        """A task's prompt checked against the model: required by a text model (unless nothing
        is to be sampled, not ``needed``), refused by others; returns (prompts, negatives) as
        lists of ``batch``, or (None, None)."""
        if prompt is None and not needed:
            return None, None
        if self.conditioning != "text":
            if prompt is not None:
                raise ValueError(f"this model is {self._describe()}: {task} takes no prompt")
            self._require(task, "text", None)
            return None, None
        if prompt is None:
            raise ValueError("this model is text-conditioned: pass prompt")
        return (_prompt_list("prompt", prompt, batch),
                _prompt_list("negative_prompt", negative_prompt, batch))

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
        x = self._image(x, "x")
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
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z must be a tensor of latents, got {type(z).__name__}")
        if z.dim() != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"z must be latents (B, {self.latent_channels}, h, w), "
                             f"got {tuple(z.shape)}")
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
        key = ("decode", tensor_spec(z), dtype, scale, graph_settings(),
               torch.is_inference_mode_enabled())

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

    def _image(self, image, name: str, multiple: bool = False) -> torch.Tensor:
        """An image argument as (B, C, H, W) in the first stage's dtype, refused unless it has
        the encoder's channels (and, with ``multiple``, sides the model can sample at)."""
        if image is None:
            raise TypeError(f"{name} must be an image (PIL, array or tensor), got None")
        x = im.to_tensor(image, self.device, self._fs_dtype())
        want = int(((self.config.get("first_stage") or {}).get("ddconfig") or {})
                   .get("in_channels", 3))
        if x.shape[1] != want:
            raise ValueError(f"{name} must have {want} channels (B, {want}, H, W), "
                             f"got {tuple(x.shape)}")
        if multiple:
            self._check_sides(name, *x.shape[-2:])
        return x

    @torch.no_grad()
    def encode_text(self, prompts) -> torch.Tensor:
        """Prompts (a string or a list) -> the cond stage's context (B, T, D)."""
        if self.conditioning != "text":
            raise ValueError(f"this model is {self._describe()}: it has no text encoder for "
                             "prompts")
        return self.cond_stage.encode(_prompt_list("prompts", prompts))

    @torch.no_grad()
    def get_learned_conditioning(self, c):
        """LDM's name: text, labels or images through the cond stage (identity without one)."""
        if self.cond_stage is None:
            return c
        if isinstance(c, str):
            c = [c]
        return self.cond_stage.encode(c)

    def _encode_cond(self, c, batch: int, name: str = "cond"):
        """Prepares a conditioning for the U-Net, checked against what the model takes (before
        the U-Net meets it as a shape error): strings are encoded; integers are class labels
        (through a class embedder, or as the U-Net's ``y``) or a text model's token ids; a
        cross-attention context must be (B, T, context_dim)."""
        if c is None or isinstance(c, dict):
            return c
        kind = self.conditioning
        if kind is None:
            raise ValueError(f"this model is {self._describe()}: it takes no {name}")
        if isinstance(c, str) or (isinstance(c, (list, tuple)) and c
                                  and all(isinstance(p, str) for p in c)):
            c = self.encode_text(c)
        elif not isinstance(c, torch.Tensor):
            try:
                c = torch.as_tensor(c)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"{name} must be a prompt, a tensor or a list of class labels, "
                                f"got {type(c).__name__}") from None
        if not c.is_floating_point() and kind == "class":
            c = c.reshape(-1)
            n = self.num_classes
            bad = c[(c < 0) | (c >= n)]
            if bad.numel():
                raise ValueError(f"{name} has class labels outside [0, {n}): {bad.tolist()}")
        if not c.is_floating_point() and self.conditioning_key != "adm":
            if self.cond_stage is None:
                raise ValueError(f"integer {name} (class labels or token ids) needs a class "
                                 "embedder or text encoder; this model has no cond stage")
            c = self.cond_stage.encode(c.to(self.device))
        c = c.to(self.device)
        if c.is_floating_point():
            c = c.to(self.dtype)
        if self.conditioning_key == "adm" and (c.is_floating_point() or c.dim() != 1):
            raise ValueError(f"{name} must be class labels, integers (B,), got {c.dtype} "
                             f"{tuple(c.shape)}")
        dim = self.context_dim
        if self.conditioning_key in ("crossattn", "hybrid") and dim is not None:
            if c.dim() != 3:
                raise ValueError(f"{name} must be a context (B, T, {dim}), got {tuple(c.shape)}")
            if c.shape[-1] != dim:
                raise ValueError(f"{name} must have width {dim} (the U-Net's context_dim), "
                                 f"got {c.shape[-1]}")
        if c.shape[0] == 1 and batch > 1:
            c = c.expand(batch, *c.shape[1:])
        if c.shape[0] != batch:
            raise ValueError(f"{name} has batch {c.shape[0]}, the sample has {batch}")
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
        if not isinstance(concat, torch.Tensor):
            raise TypeError(f"concat must be a tensor, got {type(concat).__name__}")
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
        if concat.shape[0] not in (1, shape[0]):
            raise ValueError(f"concat has batch {concat.shape[0]}, the sample has {shape[0]}")
        concat = concat.to(self.device, self.dtype)
        if concat.shape[0] == 1 and shape[0] > 1:
            concat = concat.expand(shape[0], *concat.shape[1:])
        return concat

    # --- sampling ------------------------------------------------------------------------------
    def steps(self, steps: int, sampler: str = "ddim") -> StepSchedule:
        """The discretisation ``sample`` uses for a sampler and step count."""
        _, disc, steps, _ = check_sampler_args(sampler, steps, 0.0, self.schedule.num_timesteps)
        return self.schedule.steps(steps, device=self.device, **disc)

    @torch.no_grad()
    def sample(self, cond=None, uncond=None, steps: int = 50, guidance_scale: float = 1.0,
               sampler: str = "ddim", eta: float = 0.0, x_T=None, generator=None, shape=None,
               concat=None, mask=None, x0=None, progress: bool = True, callback=None,
               start_step: int = 0, cuda_graph: bool = False) -> torch.Tensor:
        """Samples latents (B, C, h, w).

        steps: 1 to the training timesteps (1000), 999 for DDIM, whose timesteps are offset by
        1. eta: DDIM's (0 deterministic, 1 the DDPM posterior's variance), in [0, 1].
        cond / uncond: encoded conditionings (text contexts (B, T, D), class labels (B,) long,
        or a dict of U-Net keyword arguments); strings are encoded. A model that is text- or
        class-conditioned needs cond (``conditioning`` says which). With ``guidance_scale``
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
        # Every argument is checked before the first network runs (text encoding included).
        sampler_fn, disc, steps, eta = check_sampler_args(sampler, steps, eta,
                                                          self.schedule.num_timesteps)
        if cuda_graph:
            self._check_graphable("sample", sampler=sampler, eta=eta, callback=callback,
                                  mask=mask)
        start_step = check_int("start_step", start_step, 0, steps - 1)
        if not isinstance(guidance_scale, torch.Tensor):
            guidance_scale = check_real("guidance_scale", guidance_scale)
        for name, value, kind in (("x_T", x_T, torch.Tensor), ("generator", generator,
                                  torch.Generator), ("mask", mask, torch.Tensor),
                                  ("x0", x0, torch.Tensor)):
            if value is not None and not isinstance(value, kind):
                raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        if mask is not None and x0 is None:
            raise ValueError("mask needs x0, the latent whose masked region is kept")
        if cond is None and self.conditioning is not None:
            how = {"text": "a prompt or its encoding", "class": "class labels",
                   "context": f"a context (B, T, {self.context_dim})"}[self.conditioning]
            raise ValueError(f"this model is {self._describe()}: pass cond ({how})")
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
            hw = tuple(concat.shape[2:]) if isinstance(concat, torch.Tensor) else (
                tuple(x0.shape[2:]) if x0 is not None else (self.latent_size,) * 2)
            shape = (b, self.latent_channels) + hw
        try:
            shape = tuple(operator.index(n) for n in shape)  # NumPy / torch integers too
        except TypeError:
            shape = tuple(shape)
        if (len(shape) != 4 or shape[1] != self.latent_channels
                or not all(isinstance(n, int) and n > 0 for n in shape)):
            raise ValueError(f"latent shape must be (B, {self.latent_channels}, h, w) of "
                             f"positive sizes, got {shape}")
        self._check_sides("the latent", shape[2], shape[3], pixels=False)
        concat = self._check_concat(concat, shape)
        b = shape[0]
        guide = _guided(guidance_scale)
        cond = self._encode_cond(cond, b)
        if guide and uncond is None:
            if self.conditioning == "text":
                uncond = [""] * b
            elif cond is not None:
                raise ValueError("classifier-free guidance needs uncond for this model "
                                 "(e.g. the null class label of a class-conditional model)")
        uncond = self._encode_cond(uncond, b, "uncond") if guide else None
        if isinstance(guidance_scale, torch.Tensor):
            guidance_scale = guidance_scale.to(dev, torch.float32)
        if x_T is None:
            x_T = randn_like(torch.empty(shape, device=dev, dtype=self.dtype), generator)
        x = x_T.to(dev, self.dtype)
        if mask is not None:
            mask = mask.to(dev, self.dtype)
            x0 = x0.to(dev, self.dtype)
        schedule = self.schedule.steps(steps, device=dev, **disc)
        if start_step:
            schedule = StepSchedule(schedule.timesteps[start_step:], schedule.alphas[start_step:],
                                    schedule.alphas_prev[start_step:])
        opts = {"eta": eta} if sampler_fn is sample_ddim else {}
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

        bound = schedule

        def body(x_T, cond=None, uncond=None, guidance_scale=None, concat=None, schedule=None):
            # schedule: (timesteps, alphas, alphas_prev) as graph inputs, so that a replay reads
            # the graph's own static buffers (None: the schedule given to graph_body).
            model = EpsModel(unet, abar, param, key)
            sched = bound if schedule is None else StepSchedule(*schedule)
            guided = guidance_scale is not None
            extra = {"cond": cond, "uncond": uncond if guided else None,
                     "guidance_scale": guidance_scale if guided else 1.0, "concat": concat}
            return sampler_fn(model, x_T, sched, extra_args=extra, disable=True, **opts)
        return body

    def _sample_graphed(self, sampler_fn, schedule, opts, x, cond, uncond, guidance_scale,
                        concat, steps, start_step):
        from .graphs import tensor_spec
        from .models.ops import graph_settings

        scale = None
        if guidance_scale is not None:
            scale = torch.as_tensor(guidance_scale, dtype=torch.float32, device=self.device)
        inputs = {"x_T": x, "cond": cond, "uncond": uncond, "guidance_scale": scale,
                  "concat": concat,
                  "schedule": (schedule.timesteps, schedule.alphas, schedule.alphas_prev)}
        # Inference mode: static buffers made under it are inference tensors, which a later
        # call outside it could not copy into.
        key = ("sample", sampler_fn.__name__, int(steps), int(start_step),
               tuple(sorted(opts.items())), self.parameterization, self.conditioning_key,
               graph_settings(), torch.is_inference_mode_enabled()) + tuple(
                   (k, tensor_spec(v)) for k, v in inputs.items())
        body = self.graph_body(sampler_fn, schedule, opts)
        return self.graph_cache().run(key, body, inputs, watch=tuple(self.unet.parameters()))

    # --- tasks ---------------------------------------------------------------------------------
    # Each task checks all its arguments first (``_check_task``), so that a bad one is refused
    # before any network runs, and names the argument the caller passed.
    def _check_task(self, steps, sampler, eta, guidance_scale, seed, generator, output_type):
        """The sampling arguments every task shares; returns (steps, generator)."""
        _, _, steps, _ = check_sampler_args(sampler, steps, eta, self.schedule.num_timesteps)
        if not isinstance(guidance_scale, torch.Tensor):  # tensors (0-d or per sample): as sample()
            check_real("guidance_scale", guidance_scale)
        _check_output_type(output_type)
        return steps, self._generator(seed, generator)

    def _generator(self, seed, generator):
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator, got "
                                f"{type(generator).__name__}")
            return generator
        if seed is None:
            return None
        seed = check_int("seed", seed)
        if not -2 ** 63 <= seed < 2 ** 64:  # torch.Generator.manual_seed's range
            raise ValueError(f"seed must be between -2**63 and 2**64 - 1, got {seed}")
        return torch.Generator(device="cpu").manual_seed(seed)

    def _latent_hw(self, height, width):
        f, n = self.downsampling_factor, self.size_multiple
        sides = []
        for name, side in (("height", height), ("width", width)):
            side = self.latent_size * f if side is None else check_int(name, side)
            if side < 1 or side % n:
                raise ValueError(f"{name} must be a positive multiple of {n} "
                                 f"({self._size_reason()}), got {side}")
            sides.append(side // f)
        return tuple(sides)

    def _check_out(self, out, n, output_type, overwrite):
        """``out`` checked before any work: it needs PIL output, and no file it would replace
        (``images.check_outputs``: an existing PNG only with ``overwrite``, nothing else ever)."""
        if out is None:
            return
        if output_type != "pil":
            raise ValueError(f"out is written from PIL images: it needs output_type='pil', got "
                             f"{output_type!r}")
        im.check_outputs(out, n, overwrite)

    def _finish(self, latents, out, output_type, cuda_graph: bool = False, overwrite=False):
        if output_type == "latent":
            return latents
        pixels = self.decode(latents, cuda_graph=cuda_graph)
        return self._finish_pixels(pixels, out, output_type, overwrite)

    def txt2img(self, prompt, negative_prompt="", steps: int = 50, guidance_scale: float = 7.5,
                seed=None, height=None, width=None, batch: Optional[int] = None,
                sampler: str = "ddim", eta: float = 0.0, out=None, progress: bool = True,
                callback=None, generator=None, output_type: str = "pil",
                cuda_graph: bool = False, overwrite: bool = False):
        """Text to image: ``batch`` images of ``prompt``, a string (``batch`` defaults to 1) or
        a list of prompts (one image each; ``batch``, if given, must be their number).
        ``negative_prompt``: a string, or a list of one per image. ``height`` and ``width``
        must be multiples of ``size_multiple``. ``eta`` (DDIM only) is in [0, 1].
        ``cuda_graph``: the denoising loop and the decode replayed from CUDA graphs (see
        ``sample`` and ``decode``; no progress bar, the loop being one graph). ``out``: a .png
        path to write (a batch also writes ``<stem>-<i>.png``; every task takes it), checked
        before any work: an existing PNG is replaced only with ``overwrite=True``, any other
        file never."""
        self._require("txt2img", "text")
        batch = None if batch is None else check_int("batch", batch, 1)
        if isinstance(prompt, str):
            prompts = [prompt] * (batch or 1)
        else:
            prompts = _prompt_list("prompt", prompt)
            if batch is not None and batch != len(prompts):
                raise ValueError(f"batch={batch} conflicts with prompt, a list of {len(prompts)} "
                                 "prompts (one image each): leave batch out or make them agree")
        negatives = _prompt_list("negative_prompt", negative_prompt, len(prompts))
        steps, gen = self._check_task(steps, sampler, eta, guidance_scale, seed, generator,
                                      output_type)
        h, w = self._latent_hw(height, width)
        self._check_out(out, len(prompts), output_type, overwrite)
        cond, uncond = self._encode_prompts(prompts, negatives, guidance_scale)
        z = self.sample(cond, uncond, steps, guidance_scale, sampler, eta, generator=gen,
                        shape=(len(prompts), self.latent_channels, h, w), progress=progress,
                        callback=callback, cuda_graph=cuda_graph)
        return self._finish(z, out, output_type, cuda_graph, overwrite)

    def sample_class(self, labels, steps: int = 50, guidance_scale: float = 1.0,
                     uncond_label=None, seed=None, sampler: str = "ddim", eta: float = 0.0,
                     height=None, width=None, out=None, progress: bool = True, callback=None,
                     generator=None, output_type: str = "pil", overwrite: bool = False):
        """Class-conditional samples, one per label (integers in [0, ``num_classes``)). With
        ``guidance_scale`` != 1, ``uncond_label`` is the model's null class (1000 for LDM's
        cin256-v2). ``eta`` (DDIM only) is in [0, 1]."""
        self._require("sample_class", "class")
        try:
            t = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            t = None
        if t is None or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"labels must be integers (a list or a tensor), got {labels!r}"[:200])
        labels = t.to(torch.long).reshape(-1)
        n = self.num_classes
        if not labels.numel():
            raise ValueError("labels is empty; give at least one class label")
        bad = labels[(labels < 0) | (labels >= n)]
        if bad.numel():
            raise ValueError(f"labels must be in [0, {n}), got {bad.tolist()}")
        steps, gen = self._check_task(steps, sampler, eta, guidance_scale, seed, generator,
                                      output_type)
        uncond = None
        if _guided(guidance_scale):
            if uncond_label is None:
                raise ValueError("classifier-free guidance needs uncond_label, the null class")
            uncond = torch.full_like(labels, check_int("uncond_label", uncond_label, 0, n - 1))
        h, w = self._latent_hw(height, width)
        self._check_out(out, labels.shape[0], output_type, overwrite)
        z = self.sample(labels, uncond, steps, guidance_scale, sampler, eta, generator=gen,
                        progress=progress, shape=(labels.shape[0], self.latent_channels, h, w),
                        callback=callback)
        return self._finish(z, out, output_type, overwrite=overwrite)

    def sample_unconditional(self, batch: int = 1, steps: int = 50, seed=None,
                             sampler: str = "ddim", eta: float = 0.0, height=None, width=None,
                             out=None, progress: bool = True, callback=None, generator=None,
                             output_type: str = "pil", overwrite: bool = False):
        """Unconditional samples. ``eta`` (DDIM only) is in [0, 1]."""
        if self.conditioning is not None or self.concat_channels:
            raise ValueError(f"sample_unconditional needs an unconditional model; this model is "
                             f"{self._describe()}")
        batch = check_int("batch", batch, 1)
        steps, gen = self._check_task(steps, sampler, eta, 1.0, seed, generator, output_type)
        h, w = self._latent_hw(height, width)
        self._check_out(out, batch, output_type, overwrite)
        z = self.sample(None, None, steps, 1.0, sampler, eta, generator=gen,
                        shape=(batch, self.latent_channels, h, w), progress=progress,
                        callback=callback)
        return self._finish(z, out, output_type, overwrite=overwrite)

    def super_resolve(self, low_res_image, steps: int = 100, seed=None, sampler: str = "ddim",
                      eta: float = 1.0, out=None, progress: bool = True, callback=None,
                      generator=None, output_type: str = "pil", overwrite: bool = False):
        """LDM-SR (the paper's section 4.4, ``bsr_sr``): the low-resolution image, in [-1, 1],
        goes through the cond stage (identity) and is concatenated to the latent, which has its
        spatial size; the f = 4 first stage decodes to 4x. LDM's script uses eta = 1; eta is in
        [0, 1] (DDIM only)."""
        if self.conditioning is not None or not self.concat_channels:
            raise ValueError("super_resolve needs a super-resolution model (a U-Net that takes "
                             f"the low-resolution image concatenated); this model is "
                             f"{self._describe()}, its U-Net taking "
                             f"{self.concat_channels} concat channels")
        steps, gen = self._check_task(steps, sampler, eta, 1.0, seed, generator, output_type)
        if low_res_image is None:
            raise TypeError("low_res_image must be an image (PIL, array or tensor), got None")
        lr = im.to_tensor(low_res_image, self.device, self.dtype)
        c = self.get_learned_conditioning(lr)
        if c.dim() != 4 or c.shape[1] != self.concat_channels:
            raise ValueError(f"low_res_image gives {c.shape[1]} channels to concatenate, this "
                             f"model's U-Net takes {self.concat_channels}")
        self._check_sides("low_res_image", *c.shape[-2:], pixels=False)
        self._check_out(out, c.shape[0], output_type, overwrite)
        z = self.sample(None, None, steps, 1.0, sampler, eta, concat=c, generator=gen,
                        shape=(c.shape[0], self.latent_channels) + tuple(c.shape[2:]),
                        progress=progress, callback=callback)
        return self._finish(z, out, output_type, overwrite=overwrite)

    def inpaint(self, image, mask, prompt=None, negative_prompt="", steps: int = 50,
                guidance_scale: float = 1.0, seed=None, sampler: str = "ddim", eta: float = 0.0,
                out=None, progress: bool = True, callback=None, generator=None,
                output_type: str = "pil", overwrite: bool = False):
        """Fills the region where ``mask`` is 1 (white). ``mask``: one for the batch or one per
        image; ``prompt``: required by a text-conditioned model, refused by others; ``eta``
        (DDIM only) is in [0, 1]; the image's sides must be multiples of ``size_multiple``.

        An inpainting U-Net (in_channels = latent + latent + 1: LDM's inpainting model, SD's
        with "hybrid" conditioning) gets the masked image's latent and the mask downsampled to
        the latent size concatenated to its input (LDM: masked latent then mask; SD: mask then
        masked latent). Any other model inpaints by replacing the known region at every step
        (``sample``'s mask/x0). The result is composited with the input outside the mask.
        """
        n_lat = self.latent_channels
        if self.concat_channels not in (0, n_lat + 1):
            raise ValueError(f"this model's U-Net takes {int(self.unet.in_channels)} input "
                             f"channels: {n_lat} latent + {self.concat_channels} concat; "
                             f"inpainting needs {n_lat} + {n_lat + 1} (masked-image latent and "
                             f"mask) or a model without concat")
        x = self._image(image, "image", multiple=True)
        m = im.mask_to_tensor(mask, self.device, self._fs_dtype())
        b = x.shape[0]
        if m.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"mask is {tuple(m.shape[-2:])}, the image {tuple(x.shape[-2:])}")
        if m.shape[0] not in (1, b):
            raise ValueError(f"mask has batch {m.shape[0]}, the image {b}: give one mask for "
                             "the batch or one per image")
        m = m.expand(b, -1, -1, -1)
        prompts, negatives = self._task_prompts("inpaint", prompt, negative_prompt, b)
        steps, gen = self._check_task(steps, sampler, eta, guidance_scale, seed, generator,
                                      output_type)
        self._check_out(out, b, output_type, overwrite)
        cond, uncond = self._encode_prompts(prompts, negatives, guidance_scale)
        if self.concat_channels:
            z_masked = self.encode((1 - m) * x)
            m_lat = F.interpolate(m, size=z_masked.shape[-2:])
            parts = [m_lat, z_masked] if self.conditioning_key == "hybrid" else [z_masked, m_lat]
            concat = torch.cat(parts, dim=1)
            z = self.sample(cond, uncond, steps, guidance_scale, sampler, eta, concat=concat,
                            generator=gen, shape=(b, n_lat) + tuple(z_masked.shape[2:]),
                            progress=progress, callback=callback)
        else:
            z0 = self.encode(x)
            keep = 1 - F.interpolate(m, size=z0.shape[-2:])
            z = self.sample(cond, uncond, steps, guidance_scale, sampler, eta, mask=keep, x0=z0,
                            generator=gen, shape=tuple(z0.shape), progress=progress,
                            callback=callback)
        if output_type == "latent":
            return z
        pixels = self.decode(z).to(x.dtype)
        pixels = (1 - m) * x + m * pixels
        return self._finish_pixels(pixels, out, output_type, overwrite)

    def img2img(self, image, strength: float = 0.75, prompt=None, negative_prompt="",
                steps: int = 50, guidance_scale: float = 7.5, seed=None, sampler: str = "ddim",
                eta: float = 0.0, out=None, progress: bool = True, callback=None,
                generator=None, output_type: str = "pil", overwrite: bool = False):
        """SDEdit (Meng et al. 2022) as SD's img2img: the image's latent is noised to the
        timestep of step (1 - strength) * steps of the discretisation and denoised from there;
        strength 1 ignores the image, 0 returns it. ``prompt``: required by a text-conditioned
        model, refused by others; ``eta`` (DDIM only) is in [0, 1]; the image's sides must be
        multiples of ``size_multiple``."""
        strength = check_real("strength", strength, 0.0, 1.0)
        if self.concat_channels:
            raise ValueError(f"img2img needs a model without concat conditioning; this model is "
                             f"{self._describe()}")
        x = self._image(image, "image", multiple=True)
        steps, gen = self._check_task(steps, sampler, eta, guidance_scale, seed, generator,
                                      output_type)
        n = min(int(steps * strength), steps)  # steps to run; none returns the image
        prompts, negatives = self._task_prompts("img2img", prompt, negative_prompt, x.shape[0],
                                                needed=n > 0)
        self._check_out(out, x.shape[0], output_type, overwrite)
        z0 = self.encode(x)
        if n == 0:
            return self._finish(z0, out, output_type, overwrite=overwrite)
        cond, uncond = self._encode_prompts(prompts, negatives, guidance_scale)
        if prompts is None:
            guidance_scale = 1.0
        start = steps - n
        a = self.steps(steps, sampler).alphas[start]
        z0 = z0.to(self.dtype)
        x_t = a.sqrt() * z0 + (1 - a).sqrt() * randn_like(z0, gen)  # q(x_t | x_0), DDPM eq. 4
        z = self.sample(cond, uncond, steps, guidance_scale, sampler, eta, x_T=x_t,
                        generator=gen, progress=progress, callback=callback, start_step=start)
        return self._finish(z, out, output_type, overwrite=overwrite)

    def _finish_pixels(self, pixels, out, output_type, overwrite=False):
        _check_output_type(output_type)
        if output_type == "tensor":
            return pixels
        images = im.to_pil(pixels)
        if out is not None:
            for path in im.save_images(images, out, overwrite):
                log.info("wrote %s", path)
        return images
