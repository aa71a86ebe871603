"""The diffusion process and its samplers: schedules, parameterisations, guidance, samplers.

Nothing here knows a network: samplers take the model as an argument (STYLE.md section 7).
"""
from .guidance import EpsModel, GuidedEps, resolve
from .samplers import (DISCRETISATIONS, SAMPLERS, get_sampler, sample_ddim, sample_ddpm,
                       sample_dpmpp_2m)
from .schedule import (NoiseSchedule, StepSchedule, eps_from_v, eps_from_x0, make_beta_schedule,
                       make_timesteps, to_eps, to_x0, training_target, v_from_eps_x0, x0_from_eps,
                       x0_from_v)

__all__ = [
    "EpsModel", "GuidedEps", "resolve", "DISCRETISATIONS", "SAMPLERS", "get_sampler",
    "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "NoiseSchedule", "StepSchedule",
    "eps_from_v", "eps_from_x0", "make_beta_schedule", "make_timesteps", "to_eps", "to_x0",
    "training_target", "v_from_eps_x0", "x0_from_eps", "x0_from_v",
]
