"""Samplers against diffusers' schedulers, their own formulas, and each other.

The models here are toy functions of (x, t), so that the tests isolate the samplers.
"""
from __future__ import annotations

import pytest
import torch

from ldmfast.diffusion import (EpsModel, GuidedEps, NoiseSchedule, get_sampler, make_beta_schedule,
                               sample_ddim, sample_ddpm, sample_dpmpp_2m)
from ldmfast.diffusion.samplers import check_sampler_args
from ldmfast.diffusion.schedule import x0_from_eps

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 4, 8, 8)
# The relative error budget of the diffusers comparisons (fp32). diffusers forms abar with a
# float32 cumulative product, we in float64; that difference alone is ~1e-6.
REL = 1e-4


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def toy_eps(x, t):
    """A smooth, t-dependent, nonlinear stand-in for a noise-prediction network."""
    s = (t.float() / 1000).reshape(-1, 1, 1, 1) if t.dim() else t.float() / 1000
    return 0.8 * torch.tanh(x) * (0.5 + s) + 0.1 * torch.sin(3 * x)


def toy_guided(x, t, w=5.0):
    return GuidedEps(toy_eps(x, t) + 0.05 * torch.cos(x), toy_eps(x, t), w)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(make_beta_schedule("linear"))


def ddim_scheduler(**kw):
    return diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, steps_offset=1, set_alpha_to_one=False,
                                   clip_sample=False, **kw)


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("guided", [False, True])
def test_ddim_matches_diffusers(schedule, eta, guided, device):
    steps = 20
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    sched = ddim_scheduler()
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(1)
    x = x_T.clone()
    for t in sched.timesteps:
        out = toy_guided(x, t) if guided else toy_eps(x, t)
        eps = out.combine() if guided else out
        x = sched.step(eps, t, x, eta=eta, generator=g).prev_sample
    model = toy_guided if guided else toy_eps
    ours = sample_ddim(model, x_T.to(device), schedule.steps(steps, "leading", 1, "first",
                                                             device=device),
                       disable=True, eta=eta, generator=torch.Generator().manual_seed(1))
    assert ours.device.type == device.type and rel_err(ours.cpu(), x) < REL


def test_ddpm_matches_diffusers(schedule):
    steps = 25
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, clip_sample=False)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(2)
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(toy_eps(x, t), t, x, generator=g).prev_sample
    ours = sample_ddpm(toy_eps, x_T.clone(), schedule.steps(steps, "leading", 0, "one"),
                       disable=True, generator=torch.Generator().manual_seed(2))
    assert rel_err(ours, x) < REL


def test_ddpm_full_chain_matches_ldm_p_sample(schedule):
    """All 1000 steps against LDM's p_sample, written with the schedule's posterior buffers
    (DDPM eqs. 6-7): x_{t-1} = c1_t x0 + c2_t x_t + exp(log_var_t / 2) z, no noise at t = 0."""
    shape = (1, 2, 4, 4)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(9)
    x = x_T.clone()
    buf = schedule._canonical
    for t in range(999, -1, -1):
        tt = torch.tensor(t)
        x0 = (buf["sqrt_recip_alphas_cumprod"][t] * x
              - buf["sqrt_recipm1_alphas_cumprod"][t] * toy_eps(x, tt))
        mean = buf["posterior_mean_coef1"][t] * x0 + buf["posterior_mean_coef2"][t] * x
        if t > 0:
            noise = torch.randn(shape, generator=g).double()  # the sampler draws float32
            mean = mean + torch.exp(0.5 * buf["posterior_log_variance_clipped"][t]) * noise
        x = mean
    st = schedule.steps(1000, "leading", 0, "one")
    ours = sample_ddpm(toy_eps, x_T.float(), st, disable=True,
                       generator=torch.Generator().manual_seed(9))
    assert rel_err(ours, x) < 1e-4


def test_ddpm_is_ddim_with_eta_one(schedule):
    # Song et al. 2021 section 4.1: eta = 1 gives the DDPM posterior. Both samplers draw one
    # noise per step in the same order; DDIM's last draw is multiplied by sigma = 0.
    st = schedule.steps(30, "leading", 0, "one")
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    a = sample_ddpm(toy_eps, x_T, st, disable=True, generator=torch.Generator().manual_seed(5))
    b = sample_ddim(toy_eps, x_T, st, disable=True, eta=1.0,
                    generator=torch.Generator().manual_seed(5))
    assert rel_err(a, b) < 1e-5


def dpmpp_2m_reference(model, x, ts, abar):
    """DPM-Solver++(2M) transcribed from Lu et al. 2022, Algorithm 2, in float64 with lambdas."""
    abar = abar.double()
    alphas = [abar[t].sqrt() for t in ts] + [torch.tensor(1.0, dtype=torch.float64)]
    sigmas = [(1 - abar[t]).sqrt() for t in ts] + [torch.tensor(0.0, dtype=torch.float64)]
    lam = [torch.log(a / s) for a, s in zip(alphas, sigmas)]
    x = x.double()
    prev = None
    for i, t in enumerate(ts):
        x0 = (x - sigmas[i] * model(x, torch.tensor(t))) / alphas[i]
        if i == len(ts) - 1:  # to sigma = 0: h is infinite, e^{-h} = 0
            x = x0
        else:
            h = lam[i + 1] - lam[i]
            if prev is None:
                d = x0
            else:
                r = (lam[i] - lam[i - 1]) / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev
            x = sigmas[i + 1] / sigmas[i] * x - alphas[i + 1] * torch.expm1(-h) * d
        prev = x0
    return x


@pytest.mark.parametrize("steps", [5, 20])
def test_dpmpp_2m_matches_reference_and_diffusers(schedule, steps):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    st = schedule.steps(steps, "linspace", 0, "one")
    ours = sample_dpmpp_2m(toy_eps, x_T.clone(), st, disable=True)
    ref = dpmpp_2m_reference(toy_eps, x_T, st.timesteps.tolist(), schedule.alphas_cumprod64)
    assert rel_err(ours, ref) < 1e-5
    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear",
                                                  beta_start=0.00085, beta_end=0.012)
    sched.set_timesteps(steps)
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(toy_eps(x, t), t, x).prev_sample
    assert rel_err(ours, x) < REL


@pytest.mark.parametrize("name", ["ddpm", "dpmpp_2m"])
@pytest.mark.parametrize("param", ["eps", "v", "x0"])
def test_point_mass_data_is_recovered_exactly(schedule, name, param):
    """With data a point mass c, the exact eps is (x_t - sqrt(abar) c) / sqrt(1 - abar); a
    sampler that ends at abar = 1 must land on c whatever the path and parameterisation."""
    c = torch.linspace(-1, 1, 4).reshape(1, 4, 1, 1).expand(*SHAPE).contiguous()
    abar = schedule.alphas_cumprod

    class Oracle(torch.nn.Module):
        def forward(self, x, t, context=None, y=None):
            a = abar[t].reshape(-1, 1, 1, 1)
            eps = (x - a.sqrt() * c) / (1 - a).sqrt()
            v = a.sqrt() * eps - (1 - a).sqrt() * c
            return {"eps": eps, "x0": c.expand_as(x), "v": v}[param]

    model = EpsModel(Oracle(), abar, param, conditioning_key=None)
    fn, disc = get_sampler(name)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    out = fn(model, x_T, schedule.steps(10, **disc), disable=True,
             generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, c, rtol=1e-4, atol=1e-4)


def test_guidance_runs_one_batch_and_converts_v_before_guiding(schedule):
    calls = []
    abar = schedule.alphas_cumprod

    class Net(torch.nn.Module):
        def forward(self, x, t, context=None, y=None):
            calls.append((x.shape[0], t.clone(), context.clone()))
            return torch.tanh(x) + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)

    cond, uncond = torch.ones(2, 3, 5), torch.zeros(2, 3, 5)
    x = torch.randn(SHAPE)
    t = torch.tensor(500)
    model = EpsModel(Net(), abar, "v", "crossattn")
    out = model(x, t, cond=cond, uncond=uncond, guidance_scale=7.5)
    assert len(calls) == 1 and calls[0][0] == 4  # one U-Net call at 2B
    assert torch.equal(calls[0][2][:2], uncond) and torch.equal(calls[0][2][2:], cond)
    assert torch.equal(calls[0][1], torch.full((4,), 500))
    a = abar[500]
    v_u, v_c = torch.tanh(x), torch.tanh(x) + 1
    v = v_u + 7.5 * (v_c - v_u)
    eps_ref = a.sqrt() * v + (1 - a).sqrt() * x  # guide in v, then convert
    torch.testing.assert_close(out.combine(), eps_ref, rtol=1e-5, atol=1e-5)
    both = model._pair[2]  # the 2B conditioning is concatenated once, not at every step
    model(x, torch.tensor(400), cond=cond, uncond=uncond, guidance_scale=7.5)
    assert model._pair[2] is both
    # guidance_scale 1 or no uncond: a single conditional pass of batch B
    calls.clear()
    model(x, t, cond=cond, uncond=uncond, guidance_scale=1.0)
    assert calls[0][0] == 2


def test_concat_conditioning_and_routing(schedule):
    seen = {}

    class Net(torch.nn.Module):
        def forward(self, x, t, context=None, y=None):
            seen.update(channels=x.shape[1], context=context, y=y)
            return x[:, :4]

    x, extra = torch.randn(SHAPE), torch.randn(2, 3, 8, 8)
    EpsModel(Net(), schedule.alphas_cumprod, "eps", "concat")(x, torch.tensor(10), concat=extra)
    assert seen["channels"] == 7 and seen["context"] is None
    labels = torch.tensor([3, 1])
    EpsModel(Net(), schedule.alphas_cumprod, "eps", "adm")(x, torch.tensor(10), cond=labels)
    assert torch.equal(seen["y"], labels)
    with pytest.raises(ValueError, match="takes no cond"):
        EpsModel(Net(), schedule.alphas_cumprod, "eps", "concat")(x, torch.tensor(1), cond=labels)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpmpp_2m"])
def test_seeds_callbacks_and_no_host_sync(schedule, name, monkeypatch, device):
    fn, disc = get_sampler(name)
    st = schedule.steps(6, **disc, device=device)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(device)
    opts = {"eta": 0.5} if name == "ddim" else {}
    seen = []

    def cb(d):
        assert set(d) == {"x", "i", "t", "denoised"}
        seen.append(d["i"])

    def no_sync(*a, **k):
        raise AssertionError("host sync in the sampling loop")

    with monkeypatch.context() as m:  # every way a loop could read a device value
        for attr in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
            m.setattr(torch.Tensor, attr, no_sync)
        a = fn(toy_guided, x_T, st, callback=cb, disable=True,
               generator=torch.Generator().manual_seed(1), **opts)
    assert seen == list(range(6))
    b = fn(toy_guided, x_T, st, disable=True, generator=torch.Generator().manual_seed(1), **opts)
    assert torch.equal(a, b)
    if name != "dpmpp_2m":  # the stochastic samplers depend on the seed
        c = fn(toy_guided, x_T, st, disable=True, generator=torch.Generator().manual_seed(2),
               **opts)
        assert not torch.allclose(a, c)


def test_known_region_is_replaced_by_noised_x0(schedule):
    """LDM's DDIM inpainting: before each step, x = mask * q_sample(x0, t) + (1 - mask) * x."""
    st = schedule.steps(4)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    inputs = []

    def model(x, t):
        inputs.append(x.clone())
        return toy_eps(x, t)

    sample_ddim(model, torch.randn(SHAPE), st, disable=True, mask=mask, x0=x0,
                generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(8)
    for i, x in enumerate(inputs):  # eta = 0: the blend's noise is the only draw per step
        a = st.alphas[i]
        known = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(SHAPE, generator=g)
        torch.testing.assert_close(x[..., :4], known[..., :4])
    with pytest.raises(ValueError, match="needs x0"):
        sample_ddim(toy_eps, torch.randn(SHAPE), st, disable=True, mask=mask)


def test_ddim_half_precision_runs(schedule):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    st = schedule.steps(5)
    ref = sample_ddim(toy_guided, x_T, st, disable=True)
    out = sample_ddim(lambda x, t: toy_guided(x.float(), t)._replace(
        cond=toy_guided(x.float(), t).cond.bfloat16(), uncond=toy_eps(x.float(), t).bfloat16()),
        x_T.bfloat16(), st, disable=True)
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), ref) < 5e-2


def test_get_sampler_names():
    assert get_sampler("DPM++ 2M".replace(" ", "_"))[0] is sample_dpmpp_2m
    assert get_sampler("ddim")[1]["offset"] == 1
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("euler")
    with pytest.raises(TypeError, match="sampler must be a name"):
        get_sampler(None)


@pytest.mark.parametrize("name,top", [("ddim", 999), ("ddpm", 1000), ("dpmpp_2m", 1000)])
def test_steps_range_is_each_samplers_true_limit(schedule, name, top):
    """The limit check_sampler_args states is the one the discretisation has: DDIM's offset of
    1 leaves 999 of the 1000 timesteps (diffusers' DDIMScheduler indexes past its table at
    1000)."""
    fn, disc, steps, eta = check_sampler_args(name, top)
    assert fn is get_sampler(name)[0] and steps == top and eta == 0.0
    st = schedule.steps(top, **disc)
    assert len(st) == top and int(st.timesteps.max()) <= 999
    with pytest.raises(ValueError, match=f"steps must be between 1 and {top}"):
        check_sampler_args(name, top + 1)
    with pytest.raises(ValueError, match=f"steps must be between 1 and {top}"):
        check_sampler_args(name, 0)
    with pytest.raises(TypeError, match="steps must be an integer, got float"):
        check_sampler_args(name, 10.0)


@pytest.mark.parametrize("eta", [float("nan"), float("inf"), -1.0, 1.5])
def test_eta_is_finite_and_in_0_1(schedule, eta):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    msg = f"eta must be a finite number between 0.0 and 1.0, got {eta}"
    with pytest.raises(ValueError, match=msg):
        sample_ddim(toy_eps, x_T, schedule.steps(3), disable=True, eta=eta)
    with pytest.raises(ValueError, match=msg):
        check_sampler_args("ddim", 3, eta)
    with pytest.raises(TypeError, match="eta must be a number"):
        check_sampler_args("ddim", 3, str(eta))
    assert check_sampler_args("ddim", 3, 1)[3] == 1.0  # the DDPM posterior's variance


def test_x0_from_eps_used_by_samplers_is_exact():
    x0, eps = torch.randn(2, *SHAPE, dtype=torch.float64)
    a = torch.tensor(0.3, dtype=torch.float64)
    torch.testing.assert_close(x0_from_eps(a.sqrt() * x0 + (1 - a).sqrt() * eps, eps, a), x0)


def test_guided_eps_without_uncond_is_plain_eps(schedule):
    # A model may return GuidedEps(cond, None, w): the fused step must agree with combine()
    # (no guidance) instead of refusing w != 1 for want of eps_uncond.
    from ldmfast.diffusion import GuidedEps
    st = schedule.steps(4)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    a = sample_ddim(lambda x, t: GuidedEps(toy_eps(x, t), None, 7.5), x_T, st, disable=True)
    b = sample_ddim(toy_eps, x_T, st, disable=True)
    assert torch.equal(a, b)
