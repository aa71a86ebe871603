"""Samplers for discrete-time diffusion models, all with one signature.

    sample_x(model, x, schedule, extra_args=None, callback=None, disable=None,
             generator=None, mask=None, x0=None, **options) -> x_0

after k-diffusion's ``sample_x(model, x, sigmas, extra_args, callback, disable)``, with the
sigma grid replaced by a ``StepSchedule`` (timesteps and their abar, on the device):

- ``model(x, t, **extra_args)`` returns eps, or a ``GuidedEps`` (see ``guidance``).
- ``x`` is x_T, already scaled as the schedule's first step expects (unit variance noise for
  these variance-preserving models).
- ``callback({"x", "i", "t", "denoised"})`` after every step, ``denoised`` being the step's
  prediction of x_0.
- ``disable`` turns the tqdm progress bar off.
- ``generator``: a ``torch.Generator`` for every random draw, so a seed reproduces a sample.
- ``mask``/``x0``: inpainting with a model that was not trained for it, as in LDM's DDIM
  sampler (and RePaint, Lugmayr et al. 2022): before each step the region where mask == 1 is
  replaced by x0 noised to the step's timestep, q(x_t | x_0). mask broadcasts against x.

No loop reads a value back from the device: every per-step scalar is computed from the
schedule before the loop, as a vector on the sampling device, and indexed with a Python int.
"""
from __future__ import annotations

import logging

import torch
from tqdm.auto import trange

from .guidance import GuidedEps, resolve
from .schedule import StepSchedule, _bcast, check_int, check_real, randn_like, x0_from_eps

log = logging.getLogger("ldmfast")

from ldmfast import ref as _ref
from ldmfast.models.ops import using_reference_ops

try:  # the fused op; its reference has the same signature and semantics
    from ldmfast import ops as _ops
except ImportError as exc:  # the compiled library is not built in this checkout
    _ops = None
    log.debug("ldmfast.ops unavailable (%s); DDIM uses the reference ddim_step", exc)


def _ddim_step_for(x):
    """The fused ddim_step where a kernel exists for x's device and the model layer is not
    switched to the references (``use_reference_ops``), else the reference; chosen once per
    sampling call, before the loop."""
    if _ops is None or using_reference_ops() or (x.device.type == "cuda" and not _ops.cuda_available()):
        return _ref.ddim_step
    if x.device.type not in ("cpu", "cuda"):
        return _ref.ddim_step
    return _ops.ddim_step

__all__ = ["sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "SAMPLERS", "DISCRETISATIONS",
           "get_sampler", "check_sampler_args"]


def _known_region(mask, x0, schedule: StepSchedule, generator):
    """The per-step blend of the known region (mask == 1) noised to the step's timestep."""
    if mask is None:
        return lambda x, i: x
    if x0 is None:
        raise ValueError("mask needs x0, the latent whose masked region is kept")

    def blend(x, i):
        known = _noised(x0, schedule.alphas[i], randn_like(x0, generator))
        return mask * known + (1 - mask) * x
    return blend


def _noised(x0, a, noise):
    # DDPM eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    return _bcast(a.sqrt(), x0) * x0 + _bcast((1 - a).sqrt(), x0) * noise


def _split(out):
    if isinstance(out, GuidedEps):
        # no unconditional prediction: nothing to guide away from (as GuidedEps.combine)
        return out.cond, out.uncond, 1.0 if out.uncond is None else out.scale
    return out, None, 1.0


def _coef_dtype(x):
    # Per-step coefficients are formed in float64 once (not on devices without it).
    return torch.float32 if x.device.type == "mps" else torch.float64


@torch.no_grad()
def sample_ddim(model, x, schedule: StepSchedule, extra_args=None, callback=None, disable=None,
                generator=None, mask=None, x0=None, eta: float = 0.0):
    """DDIM (Song et al. 2021, eq. 12) through the fused ``ddim_step`` op, guidance folded in.

    sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
    (eq. 16); eta = 0 is the deterministic DDIM, eta = 1 the DDPM posterior's variance. eta
    must be in [0, 1]: above 1, sigma^2 can exceed 1 - abar_prev and the step's direction term
    would be silently clamped at 0; below 0, sigma would act as |eta|'s.
    """
    eta = check_real("eta", eta, 0.0, 1.0)
    extra_args = extra_args or {}
    a, a_prev = schedule.alphas, schedule.alphas_prev
    stochastic = eta != 0
    if stochastic:
        sig = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp(min=0).sqrt()
    blend = _known_region(mask, x0, schedule, generator)
    ddim_step = _ddim_step_for(x)
    for i in trange(len(schedule), disable=disable, desc="DDIM"):
        x = blend(x, i)
        t = schedule.timesteps[i]
        eps, eps_uncond, w = _split(model(x, t, **extra_args))
        noise = randn_like(x, generator) if stochastic else None
        x, denoised = ddim_step(x, eps.to(x.dtype), a[i], a_prev[i],
                                sig[i] if stochastic else 0.0, noise,
                                None if eps_uncond is None else eps_uncond.to(x.dtype), w)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": denoised})
    return x


@torch.no_grad()
def sample_ddpm(model, x, schedule: StepSchedule, extra_args=None, callback=None, disable=None,
                generator=None, mask=None, x0=None):
    """Ancestral sampling from the DDPM posterior (Ho et al. 2020, eqs. 6-7).

    Between visited timesteps t > t' the step uses beta = 1 - abar_t / abar_t' (so a schedule
    with fewer steps than training is a coarser chain with the same marginals), mean
    c1 x_0 + c2 x_t with c1 = sqrt(abar_t') beta / (1 - abar_t), c2 = sqrt(1 - beta)
    (1 - abar_t') / (1 - abar_t), and variance beta (1 - abar_t') / (1 - abar_t). The last
    step adds no noise.
    """
    extra_args = extra_args or {}
    dt = _coef_dtype(x)
    a, a_prev = schedule.alphas.to(dt), schedule.alphas_prev.to(dt)
    beta = 1 - a / a_prev
    c1 = (a_prev.sqrt() * beta / (1 - a)).to(x.dtype)
    c2 = ((1 - beta).sqrt() * (1 - a_prev) / (1 - a)).to(x.dtype)
    std = (beta * (1 - a_prev) / (1 - a)).clamp(min=1e-20).sqrt().to(x.dtype)
    n = len(schedule)
    blend = _known_region(mask, x0, schedule, generator)
    for i in trange(n, disable=disable, desc="DDPM"):
        x = blend(x, i)
        t = schedule.timesteps[i]
        eps = resolve(model(x, t, **extra_args)).to(x.dtype)
        denoised = x0_from_eps(x, eps, schedule.alphas[i])
        x = c1[i] * denoised + c2[i] * x
        if i < n - 1:
            x = x + std[i] * randn_like(x, generator)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": denoised})
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, schedule: StepSchedule, extra_args=None, callback=None,
                    disable=None, generator=None, mask=None, x0=None,
                    lower_order_final: bool = True):
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++", Algorithm 2), data prediction.

    With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t),
    h_i = lambda_{t_i} - lambda_{s_i}, r_i = h_{i-1} / h_i and D_i the x_0 prediction at step i:

        x_{t} = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D,
        D = (1 + 1 / (2 r)) D_i - 1 / (2 r) D_{i-1}    (D = D_i on first-order steps).

    The first step is first order; so is the last when ``lower_order_final`` (which also keeps
    a step to abar = 1, where h is infinite, finite: it lands on D_i). e^{-h} is computed as
    sigma_t alpha_s / (alpha_t sigma_s) so that it is exactly 0 there.
    """
    extra_args = extra_args or {}
    dt = _coef_dtype(x)
    a_s, a_t = schedule.alphas.to(dt), schedule.alphas_prev.to(dt)
    alpha_s, sigma_s = a_s.sqrt(), (1 - a_s).sqrt()
    alpha_t, sigma_t = a_t.sqrt(), (1 - a_t).sqrt()
    ratio = sigma_t / sigma_s
    c0 = alpha_t * (1 - sigma_t * alpha_s / (alpha_t * sigma_s))  # -alpha_t (e^{-h} - 1)
    h = torch.log(alpha_t / sigma_t) - torch.log(alpha_s / sigma_s)
    r = torch.cat([h[:1], h[:-1]]) / h
    n = len(schedule)
    step = torch.arange(n, device=a_s.device)
    second = step >= 1
    if lower_order_final:
        second &= step < n - 1
    b = torch.where(second, c0 * (1 + 1 / (2 * r)), c0).to(x.dtype)
    c = torch.where(second, -c0 / (2 * r), torch.zeros_like(c0)).to(x.dtype)
    ratio = ratio.to(x.dtype)
    blend = _known_region(mask, x0, schedule, generator)
    d_prev = None
    for i in trange(n, disable=disable, desc="DPM-Solver++(2M)"):
        x = blend(x, i)
        t = schedule.timesteps[i]
        eps = resolve(model(x, t, **extra_args)).to(x.dtype)
        denoised = x0_from_eps(x, eps, schedule.alphas[i])
        x = ratio[i] * x + b[i] * denoised
        if d_prev is not None:
            x = x + c[i] * d_prev
        d_prev = denoised
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": denoised})
    return x


SAMPLERS = {"ddim": sample_ddim, "ddpm": sample_ddpm, "dpmpp_2m": sample_dpmpp_2m}

# Each sampler's default discretisation (arguments of NoiseSchedule.steps): LDM's DDIM and
# Stable Diffusion's scheduler config for DDIM, diffusers' DDPMScheduler defaults for DDPM,
# and DPM-Solver's own (time-uniform, ending at the data) for DPM-Solver++.
DISCRETISATIONS = {
    "ddim": {"spacing": "leading", "offset": 1, "final_alpha": "first"},
    "ddpm": {"spacing": "leading", "offset": 0, "final_alpha": "one"},
    "dpmpp_2m": {"spacing": "linspace", "offset": 0, "final_alpha": "one"},
}


def get_sampler(name: str):
    """The sampler function and its default discretisation, by name."""
    if not isinstance(name, str):
        raise TypeError(f"sampler must be a name, one of {sorted(SAMPLERS)}; "
                        f"got {type(name).__name__} {name!r}")
    key = name.lower().replace("-", "_").replace("++", "pp")
    aliases = {"dpm": "dpmpp_2m", "dpmpp": "dpmpp_2m", "dpm_solver": "dpmpp_2m",
               "dpmsolver": "dpmpp_2m", "dpm_solverpp_2m": "dpmpp_2m"}
    key = aliases.get(key, key)
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[key], DISCRETISATIONS[key]


def check_sampler_args(sampler, steps, eta=0.0, num_train: int = 1000):
    """Checks a sampling call's sampler, step count and eta before any work is done; returns
    (sampler function, discretisation, steps, eta).

    steps runs from 1 to the training timesteps, less the offset of a leading discretisation:
    DDIM's timesteps are offset by 1 (LDM's and Stable Diffusion's choice), so its 1000th step
    would land on timestep 1000, past the last one (diffusers' DDIMScheduler and LDM's DDIM
    fail there too). eta is DDIM's, in [0, 1].
    """
    fn, disc = get_sampler(sampler)
    steps = check_int("steps", steps)
    top = num_train - disc["offset"] if disc["spacing"] == "leading" else num_train
    if not 1 <= steps <= top:
        why = f" for the {sampler!r} sampler" if top < num_train else ""
        if steps > top and why:
            why += (f" (its timesteps are offset by {disc['offset']}: step {num_train} would "
                    f"land past timestep {num_train - 1})")
        raise ValueError(f"steps must be between 1 and {top}{why}, got {steps}")
    eta = check_real("eta", eta, 0.0, 1.0)
    if eta and fn is not sample_ddim:
        raise ValueError(f"eta applies to the DDIM sampler only, not {sampler!r}")
    return fn, disc, steps, eta
