"""Noise schedules, parameterisations and the training objective of DDPM/LDM.

Notation follows Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", DDPM) and
Rombach et al. 2022 (LDM):  alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s, and the
forward process (DDPM eq. 4)

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.

The model predicts one of eps ("eps", DDPM eq. 14), x_0 ("x0") or the velocity
v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 ("v", Salimans & Ho 2022, section 4; the SD-2
768 models). The conversions below are exact rearrangements of the forward equation.

Per-step scalars are kept twice: a float64 CPU copy that discretisations are computed from, and
float32 buffers on the model's device for q_sample and the parameterisation conversions. The
buffers stay float32 whatever dtype the rest of the model is cast to: a half-precision abar_t
near t = 999 (about 5e-3) would lose most of its digits.
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BETA_SCHEDULES", "PARAMETERIZATIONS", "SPACINGS", "make_beta_schedule", "NoiseSchedule",
    "StepSchedule", "make_timesteps", "eps_from_x0", "x0_from_eps", "eps_from_v", "x0_from_v",
    "v_from_eps_x0", "to_eps", "to_x0", "training_target", "check_int", "check_real",
]


# --- argument checks shared by the samplers and the pipeline ------------------------------------

def _bounds(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"between {lo} and {hi}"
    return f"at least {lo}" if lo is not None else f"at most {hi}"


def check_int(name: str, value, lo=None, hi=None) -> int:
    """``value`` as an int in [lo, hi], else a TypeError (not an integer: 2.5 or "3" would be
    truncated or fail deep inside a loop; bool is refused too) or a ValueError naming ``name``.
    Python, NumPy and one-element integer torch tensors count (``operator.index``)."""
    try:
        if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}"[:200]) from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be {_bounds(lo, hi)}, got {value}")
    return value


def check_real(name: str, value, lo=None, hi=None) -> float:
    """``value`` as a finite float in [lo, hi], else a TypeError or a ValueError naming ``name``
    (a NaN would otherwise pass every comparison and poison the whole sample)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    outside = (lo is not None and value < lo) or (hi is not None and value > hi)
    if not math.isfinite(value) or outside:
        bounds = "" if lo is None and hi is None else " " + _bounds(lo, hi)
        raise ValueError(f"{name} must be a finite number{bounds}, got {value}")
    return value


BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")
PARAMETERIZATIONS = ("eps", "x0", "v")
SPACINGS = ("leading", "linspace", "trailing")


def make_beta_schedule(kind: str = "linear", timesteps: int = 1000, linear_start: float = 8.5e-4,
                       linear_end: float = 1.2e-2, cosine_s: float = 8e-3) -> torch.Tensor:
    """beta_1..beta_T as a float64 tensor, with the LDM code base's names.

    - ``"linear"``: betas linear in sqrt, linspace(sqrt(start), sqrt(end), T)**2. LDM and Stable
      Diffusion call this "linear"; diffusers calls it "scaled_linear".
    - ``"sqrt_linear"``: betas linear, linspace(start, end, T) (the DDPM schedule; diffusers'
      "linear").
    - ``"sqrt"``: linspace(start, end, T)**0.5.
    - ``"cosine"``: Nichol & Dhariwal 2021 eq. 17, abar(t) = cos((t/T + s)/(1 + s) pi/2)^2 and
      beta_t = 1 - abar(t)/abar(t-1), clipped to 0.999 (their section 3.2).
    """
    if kind == "linear":
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps,
                               dtype=torch.float64) ** 2
    elif kind == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    elif kind == "sqrt":
        betas = torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64) ** 0.5
    elif kind == "cosine":
        t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        abar = torch.cos((t + cosine_s) / (1 + cosine_s) * (math.pi / 2)) ** 2
        betas = (1 - abar[1:] / abar[:-1]).clamp(min=0.0, max=0.999)
    else:
        raise ValueError(f"unknown beta schedule {kind!r}; expected one of {BETA_SCHEDULES}")
    return betas


# --- parameterisations -------------------------------------------------------------------------
# `a` is abar_t, a tensor that broadcasts against x_t (see `_bcast`) or a float.

def _bcast(a, x: torch.Tensor) -> torch.Tensor:
    """abar_t as a float, 0-d or (N,) tensor, shaped to broadcast against x (N, C, ...)."""
    dtype = x.dtype if x.is_floating_point() else None
    a = torch.as_tensor(a, dtype=dtype, device=x.device)
    if a.dim() == 1:
        a = a.reshape((-1,) + (1,) * (x.dim() - 1))
    return a


def x0_from_eps(x_t, eps, a):
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)  (DDPM eq. 4 solved for x_0)."""
    a = _bcast(a, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def eps_from_x0(x_t, x0, a):
    """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
    a = _bcast(a, x_t)
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def eps_from_v(x_t, v, a):
    """eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t  (Salimans & Ho 2022, section 4)."""
    a = _bcast(a, x_t)
    return a.sqrt() * v + (1 - a).sqrt() * x_t


def x0_from_v(x_t, v, a):
    """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v  (Salimans & Ho 2022, section 4)."""
    a = _bcast(a, x_t)
    return a.sqrt() * x_t - (1 - a).sqrt() * v


def v_from_eps_x0(eps, x0, a):
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
    a = _bcast(a, eps)
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def to_eps(model_output, x_t, a, parameterization: str = "eps"):
    """The model's output in the eps parameterisation."""
    if parameterization == "eps":
        return model_output
    if parameterization == "v":
        return eps_from_v(x_t, model_output, a)
    if parameterization == "x0":
        return eps_from_x0(x_t, model_output, a)
    raise ValueError(f"unknown parameterization {parameterization!r}; expected {PARAMETERIZATIONS}")


def to_x0(model_output, x_t, a, parameterization: str = "eps"):
    """The model's output as a prediction of x_0."""
    if parameterization == "eps":
        return x0_from_eps(x_t, model_output, a)
    if parameterization == "v":
        return x0_from_v(x_t, model_output, a)
    if parameterization == "x0":
        return model_output
    raise ValueError(f"unknown parameterization {parameterization!r}; expected {PARAMETERIZATIONS}")


def training_target(x0, noise, a, parameterization: str = "eps"):
    """What the network regresses onto: eps (DDPM eq. 14, L_simple), x_0, or v."""
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return v_from_eps_x0(noise, x0, a)
    raise ValueError(f"unknown parameterization {parameterization!r}; expected {PARAMETERIZATIONS}")


# --- sampling discretisations ------------------------------------------------------------------

def make_timesteps(num_train: int, steps: int, spacing: str = "leading", offset: int = 1) -> list:
    """The descending training timesteps a sampler of ``steps`` steps visits.

    - ``"leading"``: 0, c, 2c, ... with c = T // steps, plus ``offset``. With offset 1 this is
      LDM's ``make_ddim_timesteps(..., "uniform")`` and diffusers' DDIM/PNDM with
      ``steps_offset=1`` (Stable Diffusion's settings); DDPMScheduler's default is offset 0.
    - ``"linspace"``: round(linspace(0, T - 1, steps + 1)) without its final 0, the DPM-Solver
      default (diffusers ``DPMSolverMultistepScheduler``); ``offset`` is ignored.
    - ``"trailing"``: round(arange(T, 0, -T / steps)) - 1, which starts at T - 1 (Lin et al. 2024,
      table 2); ``offset`` is ignored.
    """
    steps = check_int("steps", steps, 1, num_train)
    if spacing == "leading":
        c = num_train // steps
        ts = [i * c + offset for i in range(steps)]
        if ts[-1] >= num_train:
            # e.g. 1000 steps with offset 1 (diffusers' DDIMScheduler and LDM's
            # make_ddim_timesteps index past their tables there)
            raise ValueError(f"steps={steps} with leading spacing and offset {offset} puts the "
                             f"last timestep at {ts[-1]}, past {num_train - 1}")
    elif spacing == "linspace":
        ts = torch.linspace(0, num_train - 1, steps + 1, dtype=torch.float64).round().long()
        ts = ts.tolist()[1:]
    elif spacing == "trailing":
        ts = torch.arange(num_train, 0, -num_train / steps, dtype=torch.float64).round().long() - 1
        ts = sorted(ts.tolist())
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    return ts[::-1]


@dataclass
class StepSchedule:
    """A sampler's discretisation, as tensors on the sampling device, made once per call.

    ``timesteps[i]`` is the training timestep step i evaluates the model at, ``alphas[i]`` its
    abar and ``alphas_prev[i]`` the abar step i moves to: ``alphas[i + 1]``, and for the last
    step the final abar (abar_0 as in LDM's DDIM, or 1 where the chain ends at the data).
    Samplers index these with Python ints, which on a GPU yields device tensors and no host sync.
    """
    timesteps: torch.Tensor    # (S,) int64, descending
    alphas: torch.Tensor       # (S,) float32
    alphas_prev: torch.Tensor  # (S,) float32

    def __len__(self) -> int:
        return self.timesteps.shape[0]

    def to(self, device) -> "StepSchedule":
        return StepSchedule(self.timesteps.to(device), self.alphas.to(device),
                            self.alphas_prev.to(device))


class NoiseSchedule(nn.Module):
    """The diffusion process q: betas and everything derived from them, as buffers.

    Buffer names are those of the CompVis ``DDPM`` module, so that part of an LDM checkpoint
    means the same thing here. Buffers are float32 on the module's device (see the module
    docstring); ``self.alphas_cumprod64`` is the float64 CPU copy discretisations use.
    """

    def __init__(self, betas: torch.Tensor, parameterization: str = "eps"):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}; "
                             f"expected one of {PARAMETERIZATIONS}")
        self.parameterization = parameterization
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.dim() != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-d tensor of values in (0, 1)")
        self.num_timesteps = betas.shape[0]
        abar = torch.cumprod(1.0 - betas, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        # DDPM eq. 7: the posterior q(x_{t-1} | x_t, x_0) = N(c1 x_0 + c2 x_t, beta_tilde_t I).
        post_var = betas * (1 - abar_prev) / (1 - abar)
        self._canonical = {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
            "log_one_minus_alphas_cumprod": torch.log(1 - abar),
            "sqrt_recip_alphas_cumprod": (1 / abar).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / abar - 1).sqrt(),
            "posterior_variance": post_var,
            # beta_tilde_0 is 0; clip before the log as LDM does.
            "posterior_log_variance_clipped": torch.log(post_var.clamp(min=1e-20)),
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1 - abar),
            "posterior_mean_coef2": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
        }
        for name, value in self._canonical.items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)

    @classmethod
    def from_config(cls, diffusion: dict) -> "NoiseSchedule":
        """From a config's ``"diffusion"`` section (beta_schedule, linear_start/end, timesteps,
        parameterization); missing keys take Stable Diffusion's values."""
        betas = make_beta_schedule(diffusion.get("beta_schedule", "linear"),
                                   int(diffusion.get("timesteps", 1000)),
                                   float(diffusion.get("linear_start", 8.5e-4)),
                                   float(diffusion.get("linear_end", 1.2e-2)),
                                   float(diffusion.get("cosine_s", 8e-3)))
        return cls(betas, diffusion.get("parameterization") or "eps")

    @property
    def alphas_cumprod64(self) -> torch.Tensor:
        return self._canonical["alphas_cumprod"]

    def _apply(self, fn, recurse=True):
        # Follow device moves but never dtype casts: rebuild each buffer from the float64 copy.
        super()._apply(fn, recurse)
        for name, value in self._canonical.items():
            self._buffers[name] = value.to(device=self._buffers[name].device, dtype=torch.float32)
        return self

    # --- forward process and training ----------------------------------------------------------
    def q_sample(self, x0, t, noise=None, generator=None):
        """Draw x_t ~ q(x_t | x_0) (DDPM eq. 4); t is an (N,) long tensor."""
        if noise is None:
            noise = randn_like(x0, generator)
        a = self.alphas_cumprod.to(x0.device)[t]
        return _bcast(a.sqrt(), x0) * x0 + _bcast((1 - a).sqrt(), x0) * noise

    def training_target(self, x0, noise, t):
        a = self.alphas_cumprod.to(x0.device)[t]
        return training_target(x0, noise, a, self.parameterization)

    def loss(self, model, x0, t=None, noise=None, extra_args=None, generator=None):
        """The LDM training loss: mean squared error between ``model(x_t, t, **extra_args)`` and
        the parameterisation's target (DDPM eq. 14's L_simple for eps), averaged over
        everything. ``t`` defaults to a uniform draw from {0, ..., T-1}."""
        n = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (n,), generator=generator,
                              device=_gen_device(generator, x0)).to(x0.device)
        if noise is None:
            noise = randn_like(x0, generator)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t, **(extra_args or {}))
        return F.mse_loss(out.float(), self.training_target(x0, noise, t).float())

    # --- sampling ------------------------------------------------------------------------------
    def steps(self, steps: int, spacing: str = "leading", offset: int = 1,
              final_alpha: str = "first", device=None) -> StepSchedule:
        """The discretisation for a sampler, built on the host once and moved to ``device``.

        ``final_alpha``: where the last step lands, ``"first"`` for abar_0 (LDM's DDIM, diffusers'
        ``set_alpha_to_one=False``) or ``"one"`` for abar = 1, the data itself (DDPM, DPM-Solver
        with a zero final sigma).
        """
        ts = make_timesteps(self.num_timesteps, steps, spacing, offset)
        abar = self.alphas_cumprod64
        idx = torch.tensor(ts, dtype=torch.long)
        alphas = abar[idx]
        if final_alpha == "first":
            last = abar[:1]
        elif final_alpha == "one":
            last = abar.new_ones(1)
        else:
            raise ValueError(f"final_alpha must be 'first' or 'one', got {final_alpha!r}")
        alphas_prev = torch.cat([alphas[1:], last])
        device = self.betas.device if device is None else device
        return StepSchedule(idx, alphas.float(), alphas_prev.float()).to(device)


def _gen_device(generator, like):
    return generator.device if generator is not None else like.device


def randn_like(x, generator=None):
    """Standard normal noise shaped like x, drawn on the generator's device and moved to x's.

    Drawing where the generator lives makes a seed give the same noise whichever device the
    model runs on (a CPU generator with a CUDA model, as diffusers recommends)."""
    if generator is None:
        return torch.randn_like(x)
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    if noise.device == x.device:
        return noise
    if noise.device.type == "cpu" and x.device.type == "cuda":
        # A copy from pageable memory would wait for the GPU; from pinned memory it is queued.
        return noise.pin_memory().to(x.device, non_blocking=True)
    return noise.to(x.device)
