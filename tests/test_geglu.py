"""geglu: parity with the float64 reference (STYLE.md section 4), edge cases, bad input, opcheck,
torch.compile and gradients.

Shapes: the SD FeedForward gates first (B*L tokens x 2 * 4C for C = 320/640/1280 at the 64/32/16/8
latent levels; fewer tokens than a 512x512 image has, to keep the CPU run short: the op is the
same per row), then edge cases, each with the reason it is there, then a seeded random sample.
"""
from __future__ import annotations

import random

import pytest
import torch

import ldmfast.ops as ops
import ldmfast.ref as ref
from conftest import assert_parity

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # Outputs are filled with NaN before the kernel runs, so an element it skips fails parity.
    monkeypatch.setenv("LDMFAST_POISON_OUTPUTS", "1")


def _h(shape, dtype, device, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std).to(dtype).to(device)


def _check(h, dtype, what=""):
    out = ops.geglu(h)
    n = h.shape[-1] // 2
    assert out.shape == h.shape[:-1] + (n,) and out.dtype == dtype and out.device == h.device
    assert out.is_contiguous()
    assert_parity(out, ref.geglu(h), ref.geglu(h.double()), dtype, what or f"{tuple(h.shape)} {dtype}")
    return out


# ---- real LDM shapes ----------------------------------------------------------------------------

SD_SHAPES = [
    # (B, tokens, 2 * inner): inner = 4C; the 64x64 level has 4096 tokens in SD, here 256
    pytest.param((2, 256, 2 * 1280), id="sd-c320-64x64"),
    pytest.param((2, 256, 2 * 2560), id="sd-c640-32x32"),
    pytest.param((2, 256, 2 * 5120), id="sd-c1280-16x16"),
    pytest.param((2, 64, 2 * 5120), id="sd-c1280-8x8"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SD_SHAPES)
def test_sd_shapes(device, shape, dtype):
    _check(_h(shape, dtype, device), dtype)


# ---- edge cases ---------------------------------------------------------------------------------

EDGE = [
    # n = 1: one value and one gate per row.
    pytest.param((5, 2), {}, id="n-1"),
    # Odd n: the halves start at an odd offset, so no vector access is aligned for both.
    pytest.param((3, 7, 2 * 37), {}, id="odd-n-37"),
    # n not a multiple of any vector width, one row.
    pytest.param((2 * 1001,), {}, id="1d-n-1001"),
    # Many narrow rows: tasks are mostly rows.
    pytest.param((4099, 2 * 3), {}, id="many-rows"),
    # One row wider than a CPU task block (8192): the row is split.
    pytest.param((1, 2 * 20000), {}, id="wide-row"),
    # Large magnitudes: the erfc tail and the clamp beyond |g| = 14 must stay finite and exact
    # enough; half types overflow to inf at 200^2 products, so only a moderate spread there.
    pytest.param((2, 33, 2 * 64), {"std": 30.0}, id="large-values"),
    # Small magnitudes: GELU near 0 is g/2 + g^2/sqrt(2 pi); the erf fit's low range.
    pytest.param((2, 33, 2 * 64), {"std": 1e-3}, id="small-values"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kw", EDGE)
def test_edge_cases(device, shape, kw, dtype):
    _check(_h(shape, dtype, device, **kw), dtype)


def test_gelu_accuracy_over_the_whole_range(device):
    # Parity alone would let the CPU erf approximation be as bad as float32 rounding of the
    # reference allows; sweep the gate over every regime (erf fit, erfc tail, clamp) with a
    # unit value and hold the result to a few float32 ulps of the exact GELU.
    g = torch.linspace(-20, 20, 400001, dtype=torch.float64)
    h = torch.stack([torch.ones_like(g), g], dim=0).reshape(1, -1)  # one row: [1 ... 1, g ...]
    out = ops.geglu(h.float().to(device)).double().cpu()
    # The exact GELU of the gates as float32 holds them, written with erfc: the float64
    # reference's 1 + erf cancels to 0 below g = -8.3, where float32 still has 1e-16.
    g32 = g.float().double()
    exact = (0.5 * g32 * torch.special.erfc(-g32 * 0.5 ** 0.5))[None]
    err = (out - exact).abs()
    assert err.max().item() < 2e-6
    # relative on the negative tail, where GELU is tiny and 1 + erf would cancel, as far as
    # float32 has normal numbers (below that the output is a subnormal or zero)
    tail = (g32 < -3) & (exact[0].abs() > 1e-36)
    rel = err[0][tail] / exact[0][tail].abs()
    assert rel.max().item() < 1e-6


def test_non_contiguous_leading_dims(device):
    # A slice along the tokens: rows are a constant stride apart, taken without a copy.
    h = _h((2, 20, 2 * 24), torch.float32, device)
    _check(h[:, ::3], torch.float32, "token slice")
    # A transposed pair of leading dims: rows have no single stride, computed from a copy.
    _check(h.transpose(0, 1), torch.float32, "transposed leading dims")
    # A last dim without unit stride is copied first.
    t = _h((2, 2 * 24, 20), torch.float32, device).transpose(1, 2)
    _check(t, torch.float32, "strided last dim")


def test_empty(device):
    assert ops.geglu(torch.empty(0, 8, device=device)).shape == (0, 4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_error_pending_from_earlier_cuda_work_is_not_blamed_on_the_launch():
    import ctypes

    h = _h((4, 64), torch.float16, "cuda")
    # The CUDA runtime the process loaded (torch's and the kernels' are one library by soname).
    libs = {line.split()[-1] for line in open("/proc/self/maps") if "libcudart.so" in line}
    if len(libs) != 1:
        pytest.skip(f"expected one CUDA runtime library loaded, found {sorted(libs)}")
    rt = ctypes.CDLL(libs.pop())
    assert rt.cudaSetDevice(ctypes.c_int(1 << 20)) != 0  # an invalid device: leaves a pending error
    with pytest.raises(RuntimeError, match="ldmfast.geglu: a CUDA error from earlier work was pending "
                                           "before this call \\(cudaErrorInvalidDevice"):
        ops.geglu(h)
    _check(h, torch.float16)  # taken, not left behind: the next call runs


def test_deterministic_across_thread_counts():
    threads = torch.get_num_threads()
    h = _h((37, 2 * 9000), torch.float32, "cpu")
    outs = []
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        outs.append(ops.geglu(h))
    torch.set_num_threads(threads)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


# ---- seeded random sample -----------------------------------------------------------------------

def _random_cases(n=10, seed=4321):
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        lead = tuple(rng.randint(1, 9) for _ in range(rng.choice([0, 1, 2, 3])))
        cases.append(pytest.param(lead + (2 * rng.randint(1, 700),), rng.choice(DTYPES),
                                  rng.choice([0.5, 1.0, 4.0]), id=f"rand{i}"))
    return cases


@pytest.mark.parametrize("shape,dtype,std", _random_cases())
def test_random_shapes(device, shape, dtype, std):
    _check(_h(shape, dtype, device, std=std), dtype)


# ---- bad input ----------------------------------------------------------------------------------

def test_rejects_odd_last_dim():
    with pytest.raises(ValueError, match="last dim of h must be even"):
        ops.geglu(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="last dim of h must be even"):
        ops.geglu(torch.zeros(2, 0))


def test_rejects_scalar():
    with pytest.raises(ValueError, match="0-d"):
        ops.geglu(torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_rejects_unsupported_dtype(dtype):
    with pytest.raises(NotImplementedError, match="h has dtype"):
        ops.geglu(torch.zeros(2, 8, dtype=dtype))


# ---- torch.library integration ------------------------------------------------------------------

def test_opcheck(device):
    cases = [_h((2, 5, 2 * 12), torch.float32, device), _h((3, 2 * 7), torch.float16, device),
             _h((2, 6, 2 * 8), torch.float32, device)[:, ::2]]
    for i, h in enumerate(cases):
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
        if i == 0:
            utils += ("test_aot_dispatch_dynamic",)
        torch.library.opcheck(torch.ops.ldmfast.geglu.default,
                              (h.clone().requires_grad_(),), test_utils=utils)


def test_torch_compile_fullgraph(device):
    h = _h((2, 9, 2 * 16), torch.float32, device)

    def ff(h):
        return ops.geglu(h * 2.0) + 1.0

    compiled = torch.compile(ff, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(h), ff(h), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 5, 2 * 12), (3, 2 * 1)], ids=["sd-like", "n-1"])
def test_gradients_match_reference(device, shape):
    # The op takes no float64, so gradcheck is not available: compare the op's float32
    # gradient with the reference's autograd gradient by the same parity rule.
    h = _h(shape, torch.float32, device, std=2.0)
    g = torch.randn(shape[:-1] + (shape[-1] // 2,), generator=torch.Generator().manual_seed(7)).to(device)

    def grad(fn, dtype):
        leaf = h.detach().to(dtype).requires_grad_()
        (gh,) = torch.autograd.grad((fn(leaf) * g.to(dtype)).sum(), [leaf])
        return gh

    assert_parity(grad(ops.geglu, torch.float32), grad(ref.geglu, torch.float32),
                  grad(ref.geglu, torch.float64), torch.float32, "grad h")


def test_model_layer_routes_to_the_op_and_the_reference():
    from ldmfast.models import ops as model_ops
    from ldmfast.models import use_reference_ops
    from ldmfast.models.transformer import GEGLU

    torch.manual_seed(0)
    layer = GEGLU(16, 24).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        fused = layer(x)
        with use_reference_ops(True):
            assert model_ops._impl(x) is ref
            reference = layer(x)
        a, gate = layer.proj(x).chunk(2, dim=-1)
        original = a * torch.nn.functional.gelu(gate)  # the CompVis GEGLU, verbatim
    torch.testing.assert_close(fused, original, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(reference, original, rtol=0, atol=0)
