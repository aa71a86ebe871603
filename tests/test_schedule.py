"""Noise schedules, discretisations and parameterisations against diffusers and the algebra."""
from __future__ import annotations

import pytest
import torch

from ldmfast.diffusion import schedule as S

diffusers = pytest.importorskip("diffusers")

# diffusers computes betas and their cumulative product in float32; ours are float64, stored
# as float32. The bounds below are float32 rounding of one value and of a 1000-term product.
RTOL_BETAS = 2e-6
RTOL_CUMPROD = 2e-5


@pytest.mark.parametrize("ours,theirs", [("linear", "scaled_linear"), ("sqrt_linear", "linear"),
                                         ("cosine", "squaredcos_cap_v2")])
def test_betas_match_diffusers(ours, theirs):
    sched = diffusers.DDPMScheduler(beta_schedule=theirs, beta_start=0.00085, beta_end=0.012)
    betas = S.make_beta_schedule(ours, 1000, 0.00085, 0.012)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    torch.testing.assert_close(betas.float(), sched.betas, rtol=RTOL_BETAS, atol=1e-9)
    ns = S.NoiseSchedule(betas)
    torch.testing.assert_close(ns.alphas_cumprod, sched.alphas_cumprod, rtol=RTOL_CUMPROD, atol=0)


def test_linear_is_stable_diffusion_scaled_linear():
    betas = S.make_beta_schedule("linear")
    ref = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(betas, ref, rtol=0, atol=0)
    assert betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)


def test_schedule_buffers_follow_ddpm_posterior():
    ns = S.NoiseSchedule(S.make_beta_schedule("linear"))
    b = ns._canonical["betas"]
    abar = torch.cumprod(1 - b, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    # DDPM eq. 7 through its coefficients: mean of q(x_{t-1} | x_t, x_0) for x_t = q_sample(x_0).
    x0, eps = torch.randn(2, 1000, dtype=torch.float64)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    mean = ns._canonical["posterior_mean_coef1"] * x0 + ns._canonical["posterior_mean_coef2"] * xt
    ref = (abar_prev.sqrt() * b * x0 + (1 - b).sqrt() * (1 - abar_prev) * xt) / (1 - abar)
    torch.testing.assert_close(mean, ref)
    assert ns.posterior_variance[0] == 0 and torch.isfinite(ns.posterior_log_variance_clipped).all()


def test_unknown_schedule_and_parameterization():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        S.make_beta_schedule("quadratic")
    with pytest.raises(ValueError, match="parameterization"):
        S.NoiseSchedule(S.make_beta_schedule("linear"), "score")


def test_buffers_stay_float32_when_the_model_is_cast():
    ns = S.NoiseSchedule(S.make_beta_schedule("linear"))
    ref = ns.alphas_cumprod.clone()
    ns.half()
    assert ns.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(ns.alphas_cumprod, ref, rtol=0, atol=0)
    ns.to(torch.bfloat16)
    assert all(b.dtype == torch.float32 for b in ns.buffers())


@pytest.mark.parametrize("steps", [1, 10, 50, 250])
def test_leading_timesteps_match_ddim_scheduler(steps):
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, steps_offset=1, set_alpha_to_one=False)
    sched.set_timesteps(steps)
    assert S.make_timesteps(1000, steps, "leading", 1) == sched.timesteps.tolist()
    # abar_prev: the next visited timestep, then abar_0 (set_alpha_to_one=False, LDM's choice)
    ns = S.NoiseSchedule(S.make_beta_schedule("linear"))
    st = ns.steps(steps, "leading", 1, "first")
    ref_prev = [sched.alphas_cumprod[t - 1000 // steps] if t - 1000 // steps >= 0
                else sched.final_alpha_cumprod for t in sched.timesteps.tolist()]
    torch.testing.assert_close(st.alphas_prev, torch.stack(ref_prev), rtol=RTOL_CUMPROD, atol=0)


@pytest.mark.parametrize("steps", [7, 20, 50])
def test_other_spacings_match_diffusers(steps):
    ddpm = diffusers.DDPMScheduler()
    ddpm.set_timesteps(steps)
    assert S.make_timesteps(1000, steps, "leading", 0) == ddpm.timesteps.tolist()
    dpm = diffusers.DPMSolverMultistepScheduler()
    dpm.set_timesteps(steps)
    assert S.make_timesteps(1000, steps, "linspace") == dpm.timesteps.tolist()
    ddim = diffusers.DDIMScheduler(timestep_spacing="trailing")
    ddim.set_timesteps(steps)
    assert S.make_timesteps(1000, steps, "trailing") == ddim.timesteps.tolist()


def test_timestep_errors():
    with pytest.raises(ValueError, match="between 1 and 1000"):
        S.make_timesteps(1000, 0)
    with pytest.raises(ValueError, match="past 999"):
        S.make_timesteps(1000, 1000, "leading", 1)
    with pytest.raises(ValueError, match="spacing"):
        S.make_timesteps(1000, 10, "karras")


def test_parameterization_conversions_are_consistent():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    a = torch.tensor([0.999, 0.5, 0.05, 0.0047], dtype=torch.float64)  # per-sample abar
    ab = a.reshape(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    v = S.v_from_eps_x0(eps, x0, a)
    torch.testing.assert_close(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0)
    torch.testing.assert_close(S.x0_from_eps(xt, eps, a), x0)
    torch.testing.assert_close(S.eps_from_x0(xt, x0, a), eps)
    torch.testing.assert_close(S.eps_from_v(xt, v, a), eps)
    torch.testing.assert_close(S.x0_from_v(xt, v, a), x0)
    for p, out in (("eps", eps), ("x0", x0), ("v", v)):
        torch.testing.assert_close(S.to_eps(out, xt, a, p), eps)
        torch.testing.assert_close(S.to_x0(out, xt, a, p), x0)
        torch.testing.assert_close(S.training_target(x0, eps, a, p), out)
    # scalars broadcast too
    torch.testing.assert_close(S.x0_from_eps(xt[:1], eps[:1], 0.999), x0[:1])


def test_q_sample_and_velocity_match_diffusers():
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012)
    ns = S.NoiseSchedule(S.make_beta_schedule("linear"), "v")
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(ns.q_sample(x0, t, noise), sched.add_noise(x0, noise, t),
                               rtol=RTOL_CUMPROD, atol=1e-6)
    torch.testing.assert_close(ns.training_target(x0, noise, t),
                               sched.get_velocity(x0, noise, t), rtol=RTOL_CUMPROD, atol=1e-6)


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_training_loss(param):
    ns = S.NoiseSchedule(S.make_beta_schedule("linear"), param)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([1, 10, 100, 999])
    target = ns.training_target(x0, noise, t)

    def oracle(x_t, tt):  # knows the answer: zero loss
        assert torch.equal(tt, t)
        return target

    assert ns.loss(oracle, x0, t, noise).item() == pytest.approx(0.0, abs=1e-12)
    zero = ns.loss(lambda x_t, tt: torch.zeros_like(x_t), x0, t, noise)
    assert zero.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-6)
    # default t and noise come from the generator: reproducible
    l1 = ns.loss(lambda x_t, tt: x_t, x0, generator=torch.Generator().manual_seed(3))
    l2 = ns.loss(lambda x_t, tt: x_t, x0, generator=torch.Generator().manual_seed(3))
    assert l1.item() == l2.item()


def test_from_config():
    ns = S.NoiseSchedule.from_config({"beta_schedule": "cosine", "timesteps": 100,
                                      "parameterization": "v"})
    assert ns.num_timesteps == 100 and ns.parameterization == "v"
    assert len(ns.steps(10)) == 10
