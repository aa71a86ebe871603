"""ddim_step: parity with the float64 reference (STYLE.md section 4), every way of passing the
scalars, agreement with diffusers' DDIMScheduler, bit-exact storage conversions, bad input,
opcheck, torch.compile and gradients.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import ldmfast.ops as ops
import ldmfast.ref as ref
from conftest import assert_parity, skip_large_under_sanitizer

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # Outputs are filled with NaN before the kernel runs, so an element it skips fails parity.
    monkeypatch.setenv("LDMFAST_POISON_OUTPUTS", "1")


def _sd_alphas():
    # The SD schedule: "scaled_linear" betas from 0.00085 to 0.012 over 1000 steps.
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def _tensors(shape, dtype, device, *, uncond=False, noise=False, seed=0, channels_last=False):
    skip_large_under_sanitizer(math.prod(shape), device)
    g = torch.Generator().manual_seed(seed)
    mk = lambda: torch.randn(shape, generator=g).to(dtype).to(device)  # noqa: E731
    ts = [mk(), mk(), mk() if uncond else None, mk() if noise else None]
    if channels_last:
        ts = [None if t is None else t.to(memory_format=torch.channels_last) for t in ts]
    return ts


def _as64(s):
    return s.double() if isinstance(s, torch.Tensor) else s


def _check(x, eps, alpha_t, alpha_prev, sigma_t=0.0, noise=None, eps_uncond=None, guidance_scale=1.0,
           what=""):
    x_prev, pred_x0 = ops.ddim_step(x, eps, alpha_t, alpha_prev, sigma_t, noise, eps_uncond, guidance_scale)
    for t in (x_prev, pred_x0):
        assert t.shape == x.shape and t.dtype == x.dtype and t.device == x.device
    r = ref.ddim_step(x, eps, alpha_t, alpha_prev, sigma_t, noise, eps_uncond, guidance_scale)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    r64 = ref.ddim_step(d(x), d(eps), _as64(alpha_t), _as64(alpha_prev), _as64(sigma_t), d(noise),
                        d(eps_uncond), _as64(guidance_scale))
    assert_parity(x_prev, r[0], r64[0], x.dtype, f"{what} x_prev")
    assert_parity(pred_x0, r[1], r64[1], x.dtype, f"{what} pred_x0")
    return x_prev, pred_x0


# ---- real LDM shapes and schedules --------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("eta", [0.0, 1.0], ids=["eta0", "eta1"])
@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (1, 4, 96, 64), (3, 3, 64, 64)],
                         ids=["sd-latent", "sd-768x512", "ldm-3ch"])
def test_sd_schedule(device, shape, eta, guided, dtype):
    # One step of a 50-step DDIM schedule on the SD beta schedule, early, middle and late.
    a = _sd_alphas()
    for t, t_prev in [(981, 961), (501, 481), (21, 1)]:
        at, ap = a[t].item(), a[t_prev].item()
        sigma = eta * math.sqrt((1 - ap) / (1 - at) * (1 - at / ap))
        x, eps, unc, noise = _tensors(shape, dtype, device, uncond=guided, noise=eta > 0, seed=t)
        _check(x, eps, at, ap, sigma, noise, unc, 7.5 if guided else 1.0, what=f"t={t}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scalar_kinds(device, dtype):
    # Each scalar may be a Python float, a 0-d tensor, a (1,) tensor or a per-sample (N,) one,
    # in any mix; tensors may be float64 or float16 (the binding converts them to float32).
    N = 3
    x, eps, unc, noise = _tensors((N, 4, 16, 16), dtype, device, uncond=True, noise=True)
    a = _sd_alphas()
    at_n = a[[900, 500, 100]].float().to(device)
    ap_n = a[[880, 480, 80]].float().to(device)
    sig_n = torch.tensor([0.1, 0.0, 0.05], device=device)
    g_n = torch.tensor([7.5, 1.0, 3.0], device=device)
    variants = [
        (0.5, 0.6, 0.0, 1.0),
        (torch.tensor(0.5, device=device), torch.tensor(0.6, device=device), 0.0, 7.5),
        (torch.tensor([0.5], device=device), 0.6, torch.tensor(0.2, device=device), torch.tensor([2.0], device=device)),
        (at_n, ap_n, sig_n, g_n),
        (at_n.double(), 0.9, 0.0, g_n.half()),
        (0.3, ap_n, sig_n, 5.0),
    ]
    for i, (at, ap, sig, g) in enumerate(variants):
        _check(x, eps, at, ap, sig, noise, unc, g, what=f"variant {i}")
        _check(x, eps, at, ap, sig, noise, None, 1.0, what=f"variant {i} unguided")


def test_per_sample_scalars_are_per_sample(device):
    # Each sample must use its own alpha: compare with N separate batch-1 steps.
    x, eps, _, _ = _tensors((3, 4, 8, 8), torch.float32, device)
    at = torch.tensor([0.2, 0.5, 0.9], device=device)
    ap = torch.tensor([0.3, 0.6, 0.95], device=device)
    xp, x0 = ops.ddim_step(x, eps, at, ap)
    for n in range(3):
        xp1, x01 = ops.ddim_step(x[n:n + 1], eps[n:n + 1], at[n].item(), ap[n].item())
        torch.testing.assert_close(xp[n:n + 1], xp1, rtol=0, atol=0)
        torch.testing.assert_close(x0[n:n + 1], x01, rtol=0, atol=0)


# ---- edge cases ---------------------------------------------------------------------------------

def test_last_step_to_alpha_one(device):
    # The final step goes to alpha_prev = 1 (set_alpha_to_one): x_prev is pred_x0 exactly.
    x, eps, _, _ = _tensors((2, 4, 8, 8), torch.float32, device)
    xp, x0 = _check(x, eps, 0.9, 1.0)
    torch.testing.assert_close(xp, x0, rtol=0, atol=0)


def test_direction_term_clamped(device):
    # 1 - a_prev - sigma^2 slightly negative by rounding must give 0, not NaN.
    x, eps, _, noise = _tensors((1, 4, 8, 8), torch.float32, device, noise=True)
    ap = 0.6
    sigma = math.sqrt(1 - ap) * (1 + 1e-6)
    _check(x, eps, 0.5, ap, sigma, noise)


def test_noise_with_zero_sigma(device):
    # Noise given but sigma_t = 0 (eta = 0 in a loop that always draws noise): no noise term.
    x, eps, _, noise = _tensors((2, 4, 8, 8), torch.float32, device, noise=True)
    a, _ = ops.ddim_step(x, eps, 0.5, 0.7, 0.0, noise)
    b, _ = ops.ddim_step(x, eps, 0.5, 0.7)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (2, 7, 13), (1, 4, 1, 1), (2, 4, 5, 3, 7)],
                         ids=["one-element", "2d", "3d-odd", "spatial-1", "5d"])
def test_odd_shapes(device, shape):
    # Sizes that leave vector-loop tails, and ranks other than 4.
    x, eps, unc, noise = _tensors(shape, torch.float16, device, uncond=True, noise=True)
    _check(x, eps, 0.4, 0.55, 0.1, noise, unc, 4.0)


def test_channels_last_and_strided_inputs(device):
    # channels_last inputs give channels_last outputs (the fake impl relies on it); a strided view
    # is computed from a contiguous copy.
    x, eps, unc, noise = _tensors((2, 4, 16, 16), torch.float32, device, uncond=True, noise=True,
                                  channels_last=True)
    xp, x0 = _check(x, eps, 0.4, 0.55, 0.1, noise, unc, 4.0)
    assert xp.is_contiguous(memory_format=torch.channels_last)
    assert x0.is_contiguous(memory_format=torch.channels_last)
    big = torch.randn(2, 4, 16, 32, device=device)
    _check(big[..., ::2], eps.contiguous(), 0.4, 0.55, what="strided x")


def test_empty_batch(device):
    x = torch.empty(0, 4, 8, 8, device=device)
    xp, x0 = ops.ddim_step(x, x, 0.5, 0.6)
    assert xp.shape == x0.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_storage_conversions_bit_exact(device, dtype):
    # With alpha_t = 1 and eps = 0, pred_x0 is x itself, so it exercises the 16-bit -> float ->
    # 16-bit round trip on all 65536 bit patterns; x_prev = sqrt(a_prev) x in float32, rounded
    # back, must equal torch's rounding of the same float32 product (round to nearest even,
    # subnormals, overflow to inf). NaNs must stay NaN.
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(1, -1)
    x = x.to(device)
    eps = torch.zeros_like(x)
    for ap in (1.0, 0.7, 0.123, 0.999):
        xp, x0 = ops.ddim_step(x, eps, 1.0, ap)
        f32 = lambda v: torch.sqrt(torch.tensor(v, dtype=torch.float32))  # noqa: E731
        # The direction term's + sqrt(1 - a_prev) * 0 turns -0 into +0, so it is kept here too.
        want = (f32(ap) * x.float() + f32(1 - ap) * eps.float()).to(dtype)
        nan = torch.isnan(x)
        assert torch.equal(torch.isnan(x0), nan) and torch.equal(torch.isnan(xp), torch.isnan(want))
        assert torch.equal(x0[~nan].view(torch.int16), x[~nan].view(torch.int16)), "round trip"
        ok = ~torch.isnan(want)
        assert torch.equal(xp[ok].view(torch.int16), want[ok].view(torch.int16)), f"rounding, a_prev={ap}"


# ---- diffusers --------------------------------------------------------------------------------

@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_matches_diffusers_ddim_scheduler(eta):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(11)
    x, eps, noise = (torch.randn(2, 4, 32, 32, generator=g) for _ in range(3))
    for t in (sched.timesteps[0], sched.timesteps[25], sched.timesteps[-1]):
        t = int(t)
        prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
        at = sched.alphas_cumprod[t].item()
        ap = (sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod).item()
        sigma = eta * sched._get_variance(t, prev_t).item() ** 0.5
        out = sched.step(eps, t, x, eta=eta, variance_noise=noise if eta > 0 else None)
        n = noise if eta > 0 else None
        xp, x0 = ops.ddim_step(x, eps, at, ap, sigma, n)
        r64 = ref.ddim_step(x.double(), eps.double(), at, ap, sigma, None if n is None else n.double())
        assert_parity(xp, out.prev_sample, r64[0], torch.float32, f"diffusers prev_sample t={t}")
        assert_parity(x0, out.pred_original_sample, r64[1], torch.float32, f"diffusers pred_x0 t={t}")


# ---- seeded random sample -----------------------------------------------------------------------

def _random_cases(n=10, seed=999):
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        shape = (rng.randint(1, 4),) + tuple(rng.randint(1, 40) for _ in range(rng.choice([1, 2, 3])))
        at = rng.uniform(0.01, 0.99)
        ap = rng.uniform(at, 1.0)
        sig = rng.choice([0.0, rng.uniform(0, math.sqrt(1 - ap))])
        cases.append(pytest.param(shape, rng.choice(DTYPES), at, ap, sig, rng.random() < 0.5,
                                  rng.uniform(1.0, 10.0), id=f"rand{i}"))
    return cases


@pytest.mark.parametrize("shape,dtype,at,ap,sigma,guided,g", _random_cases())
def test_random_shapes(device, shape, dtype, at, ap, sigma, guided, g):
    x, eps, unc, noise = _tensors(shape, dtype, device, uncond=guided, noise=sigma > 0, seed=len(shape))
    _check(x, eps, at, ap, sigma, noise, unc, g if guided else 1.0)


# ---- bad input ----------------------------------------------------------------------------------

def _good(N=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 4, 8, 8, generator=g), torch.randn(N, 4, 8, 8, generator=g)


def test_rejects_0d_x():
    with pytest.raises(ValueError, match="x must have a batch dim"):
        ops.ddim_step(torch.tensor(1.0), torch.tensor(1.0), 0.5, 0.6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_rejects_unsupported_dtype(dtype):
    x, eps = _good()
    with pytest.raises(NotImplementedError, match="x has dtype"):
        ops.ddim_step(x.to(dtype), eps.to(dtype), 0.5, 0.6)


def test_rejects_mismatched_tensors():
    x, eps = _good()
    with pytest.raises(ValueError, match="eps has shape"):
        ops.ddim_step(x, eps[:1], 0.5, 0.6)
    with pytest.raises(ValueError, match="eps has dtype"):
        ops.ddim_step(x, eps.half(), 0.5, 0.6)
    with pytest.raises(ValueError, match="eps_uncond has shape"):
        ops.ddim_step(x, eps, 0.5, 0.6, eps_uncond=eps[..., :4])
    with pytest.raises(ValueError, match="noise has dtype"):
        ops.ddim_step(x, eps, 0.5, 0.6, 0.1, noise=eps.bfloat16())


@pytest.mark.parametrize("name,kwargs", [
    ("alpha_t", {"alpha_t": 0.0}), ("alpha_t", {"alpha_t": 1.5}), ("alpha_t", {"alpha_t": float("nan")}),
    ("alpha_prev", {"alpha_prev": -0.1}), ("alpha_prev", {"alpha_prev": 1.01}),
    ("sigma_t", {"sigma_t": -0.1}), ("guidance_scale", {"guidance_scale": float("inf")}),
])
def test_rejects_bad_scalar_values(name, kwargs):
    x, eps = _good()
    args = {"alpha_t": 0.5, "alpha_prev": 0.6, "sigma_t": 0.0, "guidance_scale": 1.0, **kwargs}
    noise = torch.zeros_like(x)
    with pytest.raises(ValueError, match=name):
        ops.ddim_step(x, eps, args["alpha_t"], args["alpha_prev"], args["sigma_t"], noise,
                      guidance_scale=args["guidance_scale"])


def test_rejects_sigma_without_noise():
    x, eps = _good()
    with pytest.raises(ValueError, match="sigma_t=0.1 > 0 needs noise"):
        ops.ddim_step(x, eps, 0.5, 0.6, 0.1)


@pytest.mark.parametrize("name", ["alpha_t", "alpha_prev", "sigma_t", "guidance_scale"])
def test_rejects_per_sample_scalar_of_wrong_length(name):
    x, eps = _good(N=2)
    args = {"alpha_t": 0.5, "alpha_prev": 0.6, "sigma_t": 0.0, "guidance_scale": 1.0}
    args[name] = torch.full((3,), 0.5)
    with pytest.raises(ValueError, match=f"{name} must be a scalar, a 0-d tensor or a per-sample"):
        ops.ddim_step(x, eps, args["alpha_t"], args["alpha_prev"], args["sigma_t"], torch.zeros_like(x),
                      eps_uncond=eps, guidance_scale=args["guidance_scale"])
    args[name] = torch.full((2, 1), 0.5)  # right count, wrong rank
    with pytest.raises(ValueError, match=name):
        ops.ddim_step(x, eps, args["alpha_t"], args["alpha_prev"], args["sigma_t"], torch.zeros_like(x),
                      eps_uncond=eps, guidance_scale=args["guidance_scale"])


def test_rejects_integer_scalar_tensor():
    x, eps = _good()
    with pytest.raises(ValueError, match="alpha_t must be a floating-point tensor"):
        ops.ddim_step(x, eps, torch.tensor(1), 0.6)


def test_rejects_mixed_devices(device):
    if device.type == "cpu":
        pytest.skip("needs a second device: runs as the cuda case")
    x, eps = (t.to(device) for t in _good())
    with pytest.raises(ValueError, match="eps is on"):
        ops.ddim_step(x, eps.cpu(), 0.5, 0.6)
    with pytest.raises(ValueError, match="alpha_t is on"):
        ops.ddim_step(x, eps, torch.tensor(0.5), 0.6)


# ---- torch.library integration ------------------------------------------------------------------

FAST_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_opcheck(device):
    x, eps, unc, noise = _tensors((2, 4, 6, 5), torch.float32, device, uncond=True, noise=True)
    xcl, ecl, _, _ = _tensors((2, 4, 6, 5), torch.float32, device, channels_last=True)
    at = torch.tensor([0.4, 0.6], device=device)
    t0 = torch.tensor(0.7, device=device)
    op = torch.ops.ldmfast.ddim_step.default
    cases = [
        # (x, eps, eps_uncond, noise, a_t, a_prev, sigma, g, a_t_t, a_prev_t, sigma_t_t, g_t)
        ((x, eps, unc, noise, 0.5, 0.6, 0.1, 7.5, None, None, None, None), True),
        ((x, eps, None, None, 0.0, 0.0, 0.0, 1.0, at, t0, None, None), False),
        ((xcl, ecl, None, None, 0.5, 0.6, 0.0, 1.0, None, None, None, None), False),
        ((x.half(), eps.half(), unc.half(), noise.half(), 0.0, 0.6, 0.0, 0.0, at, None, at * 0.1, at * 10), False),
    ]
    for args, full in cases:
        args = tuple(a.detach().clone().requires_grad_(i < 4) if isinstance(a, torch.Tensor) else a
                     for i, a in enumerate(args))
        utils = FAST_OPCHECK + ("test_aot_dispatch_dynamic",) if full else FAST_OPCHECK
        torch.library.opcheck(op, args, test_utils=utils)


def test_torch_compile_fullgraph(device):
    x, eps, unc, noise = _tensors((2, 4, 8, 8), torch.float32, device, uncond=True, noise=True)
    at = torch.tensor([0.4, 0.6], device=device)

    def step(x, eps, unc, noise, at):
        xp, x0 = ops.ddim_step(x, eps, at, 0.7, 0.05, noise, unc, 7.5)
        return xp * 2, x0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(x, eps, unc, noise, at), step(x, eps, unc, noise, at)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("guided,with_noise,tensor_scalars", [(False, False, False), (True, True, False),
                                                              (True, True, True)])
def test_gradients_match_reference(device, guided, with_noise, tensor_scalars):
    # The ops take no float64, so gradcheck is not available: compare the op's float32
    # gradients with the reference's autograd gradients by the same parity rule.
    x, eps, unc, noise = _tensors((2, 4, 6, 6), torch.float32, device, uncond=guided, noise=with_noise)
    scal = [0.4, 0.6, 0.2 if with_noise else 0.0, 5.0 if guided else 1.0]
    if tensor_scalars:
        scal = [torch.tensor([s, s * 0.9], device=device) for s in scal]
    g1, g2 = (torch.randn(x.shape, generator=torch.Generator().manual_seed(s)).to(device) for s in (1, 2))

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, eps, unc, noise)]
        s = [t.to(dtype) if isinstance(t, torch.Tensor) else t for t in scal]
        xp, x0 = fn(leaves[0], leaves[1], s[0], s[1], s[2], leaves[3], leaves[2], s[3])
        loss = (xp * g1.to(dtype)).sum() + (x0 * g2.to(dtype)).sum()
        return torch.autograd.grad(loss, [t for t in leaves if t is not None])

    got = grads(ops.ddim_step, torch.float32)
    want = grads(ref.ddim_step, torch.float32)
    want64 = grads(ref.ddim_step, torch.float64)
    for a, r, r64 in zip(got, want, want64):
        assert_parity(a, r, r64, torch.float32, "grad")


def test_samplers_follow_the_reference_switch():
    """use_reference_ops(True) (the way round GPUs the kernels do not run on) covers the
    samplers' DDIM step as well as the model layer's ops."""
    from ldmfast.diffusion import samplers
    from ldmfast.models import use_reference_ops

    x = torch.zeros(1, 4, 8, 8)
    assert samplers._ddim_step_for(x) is ops.ddim_step
    with use_reference_ops(True):
        assert samplers._ddim_step_for(x) is ref.ddim_step
    assert samplers._ddim_step_for(x) is ops.ddim_step


# ---- input checks, in the op (a tensor scalar is never read on the host) ------------------------

def test_direct_op_callers_get_the_same_checks():
    # torch.ops.ldmfast.ddim_step without the wrapper: a term asked for without its tensor was
    # dropped silently (the kernel reads noise and eps_uncond only where they are given).
    x, eps = _good()
    op = torch.ops.ldmfast.ddim_step
    with pytest.raises(ValueError, match="tensor sigma_t needs noise"):
        op(x, eps, None, None, 0.5, 0.6, 0.0, 1.0, None, None, torch.tensor(0.1), None)
    with pytest.raises(ValueError, match="tensor guidance_scale needs eps_uncond"):
        op(x, eps, None, None, 0.5, 0.6, 0.0, 0.0, None, None, None, torch.tensor(7.5))
    with pytest.raises(ValueError, match="guidance_scale=7.5 needs eps_uncond"):
        op(x, eps, None, None, 0.5, 0.6, 0.0, 7.5, None, None, None, None)
    with pytest.raises(ValueError, match=r"sigma_t=0.9 exceeds sqrt\(1 - alpha_prev\)"):
        op(x, eps, None, torch.zeros_like(x), 0.5, 0.6, 0.9, 1.0, None, None, None, None)
    got = op(x, eps, eps, None, 0.5, 0.6, 0.0, 7.5, None, None, None, None)[0]
    torch.testing.assert_close(got, ops.ddim_step(x, eps, 0.5, 0.6)[0], rtol=0, atol=0)

def test_rejects_tensor_sigma_without_noise():
    # A tensor sigma_t's value cannot be checked without a device sync, so it always needs noise;
    # before, the noise term was dropped silently (and the direction term still shrunk).
    x, eps = _good()
    with pytest.raises(ValueError, match="tensor sigma_t needs noise.*zeros_like"):
        ops.ddim_step(x, eps, 0.5, 0.6, torch.tensor(0.1))
    # the documented way round, for a deterministic step with a tensor sigma_t
    got, _ = ops.ddim_step(x, eps, 0.5, 0.6, torch.tensor(0.0), torch.zeros_like(x))
    torch.testing.assert_close(got, ops.ddim_step(x, eps, 0.5, 0.6)[0], rtol=0, atol=0)


@pytest.mark.parametrize("g", [7.5, 0.0, torch.tensor(7.5), torch.tensor(1.0)], ids=["7.5", "0", "t7.5", "t1"])
def test_rejects_guidance_without_uncond(g):
    # guidance_scale != 1 without eps_uncond used to be ignored; a tensor scale is refused whatever
    # its value (reading it would sync).
    x, eps = _good()
    with pytest.raises(ValueError, match="guidance_scale.* needs eps_uncond"):
        ops.ddim_step(x, eps, 0.5, 0.6, guidance_scale=g)
    ops.ddim_step(x, eps, 0.5, 0.6, guidance_scale=1.0)  # no guidance: fine
    ops.ddim_step(x, eps, 0.5, 0.6, eps_uncond=eps, guidance_scale=g)


def test_rejects_float_sigma_above_the_direction_bound():
    # sigma_t^2 > 1 - alpha_prev was clamped silently; for floats it is refused (a few float32
    # ulps of slack are allowed, test_direction_term_clamped), for tensors the clamp stays.
    x, eps = _good()
    noise = torch.zeros_like(x)
    with pytest.raises(ValueError, match=r"sigma_t=0.9 exceeds sqrt\(1 - alpha_prev\)"):
        ops.ddim_step(x, eps, 0.5, 0.6, 0.9, noise)
    ops.ddim_step(x, eps, 0.5, 0.6, math.sqrt(0.4), noise)  # on the bound
    xp, _ = ops.ddim_step(x, eps, 0.5, 0.6, torch.tensor(0.9), noise)
    assert torch.isfinite(xp).all()


@pytest.mark.parametrize("name", ["alpha_t", "alpha_prev", "sigma_t", "guidance_scale"])
@pytest.mark.parametrize("bad", ["a", [0.5, 0.5], None, True], ids=["str", "list", "None", "bool"])
def test_rejects_non_number_scalars_by_name(name, bad):
    x, eps = _good()
    args = {"alpha_t": 0.5, "alpha_prev": 0.6, "sigma_t": 0.0, "guidance_scale": 1.0, name: bad}
    with pytest.raises(TypeError, match=f"ddim_step: {name} must be a float or a float tensor, got "
                                        f"{type(bad).__name__}"):
        ops.ddim_step(x, eps, args["alpha_t"], args["alpha_prev"], args["sigma_t"], torch.zeros_like(x),
                      eps, args["guidance_scale"])


@pytest.mark.parametrize("name", ["x", "eps", "noise", "eps_uncond"])
def test_rejects_non_tensor_inputs_by_name(name):
    x, eps = _good()
    args = {"x": x, "eps": eps, "noise": torch.zeros_like(x), "eps_uncond": eps,
            name: None if name in ("x", "eps") else x.numpy()}
    with pytest.raises(TypeError, match=f"ddim_step: {name} must be a tensor"):
        ops.ddim_step(args["x"], args["eps"], 0.5, 0.6, 0.1, args["noise"], args["eps_uncond"], 2.0)
