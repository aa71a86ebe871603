"""group_norm_silu: parity with the float64 reference (STYLE.md section 4), bad input, opcheck,
torch.compile and gradients.

Shapes: the real LDM ones first (SD U-Net ResBlocks at 64/32/16/8 latents with 32 groups and
eps 1e-5, the autoencoder's 512- and 128-channel blocks with eps 1e-6), then edge cases, each
with the reason it is there, then a seeded random sample.
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


def _inputs(shape, dtype, device, *, param_dtype=torch.float32, mean=0.0, std=1.0, emb=False,
            channels_last=False, seed=0):
    skip_large_under_sanitizer(math.prod(shape), device)
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = (torch.randn(shape, generator=g) * std + mean).to(dtype)
    w = (1 + 0.5 * torch.randn(C, generator=g)).to(param_dtype)
    b = (0.5 * torch.randn(C, generator=g)).to(param_dtype)
    e = torch.randn(shape[0], C, generator=g).to(dtype) if emb else None
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(x), move(w), move(b), move(e)


def _check(shape, groups, dtype, device, *, eps=1e-5, silu=True, what="", **kw):
    x, w, b, e = _inputs(shape, dtype, device, **kw)
    out = ops.group_norm_silu(x, w, b, groups, eps, silu, e)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    if kw.get("channels_last") and x.dim() >= 4:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert out.is_contiguous(memory_format=fmt), f"{what}: output lost channels_last"
    r = ref.group_norm_silu(x, w, b, groups, eps, silu, e)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    r64 = ref.group_norm_silu(d(x), d(w), d(b), groups, eps, silu, d(e))
    assert_parity(out, r, r64, dtype, what or f"{shape} G={groups} {dtype}")
    return out, r64


# ---- real LDM shapes ----------------------------------------------------------------------------

LDM_SHAPES = [
    pytest.param((2, 320, 64, 64), 32, 1e-5, id="unet-320x64x64"),
    pytest.param((2, 640, 32, 32), 32, 1e-5, id="unet-640x32x32"),
    pytest.param((2, 1280, 16, 16), 32, 1e-5, id="unet-1280x16x16"),
    pytest.param((2, 1280, 8, 8), 32, 1e-5, id="unet-1280x8x8"),
    pytest.param((1, 512, 64, 64), 32, 1e-6, id="vae-512x64x64"),
    # 4 channels x 65536 positions per group: the largest groups the autoencoder has.
    pytest.param((1, 128, 256, 256), 32, 1e-6, id="vae-128x256x256"),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups,eps", LDM_SHAPES)
def test_ldm_shapes(device, shape, groups, eps, dtype, channels_last):
    if shape[2] >= 256 and dtype != torch.float32:
        pytest.skip("the 8M-element VAE shape runs in float32 only, to keep the suite fast on CPU; "
                    "the half types are covered at every other shape")
    _check(shape, groups, dtype, device, eps=eps, channels_last=channels_last)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_resblock_time_embedding(device, dtype):
    # The U-Net ResBlock adds the projected time embedding per (n, c) before its second norm.
    _check((2, 320, 32, 32), 32, dtype, device, emb=True)
    _check((2, 320, 32, 32), 32, dtype, device, emb=True, channels_last=True)


# ---- edge cases ---------------------------------------------------------------------------------

EDGE = [
    # One group: the whole image is one normalisation set (and few tasks to share out).
    pytest.param((2, 64, 16, 16), 1, {}, id="one-group"),
    # One channel per group: GroupNorm degenerates to InstanceNorm.
    pytest.param((2, 32, 8, 8), 32, {}, id="instance-norm"),
    # C/G = 3 and C = 12: neither is a multiple of the vector width.
    pytest.param((2, 12, 9, 9), 4, {}, id="c12-g4"),
    # S = 1: a single position per channel, so the variance comes from channels alone.
    pytest.param((3, 64, 1, 1), 8, {}, id="spatial-1"),
    # Odd spatial sizes: tails in every vector loop.
    pytest.param((2, 24, 7, 5), 6, {}, id="odd-7x5"),
    # Batch of one.
    pytest.param((1, 96, 13, 11), 4, {}, id="batch-1"),
    # 3-d input (N, C, L), as a 1-d conv block would use.
    pytest.param((2, 64, 37), 8, {}, id="rank-3"),
    # 5-d input (N, C, T, H, W); the video autoencoder case.
    pytest.param((1, 32, 3, 6, 5), 8, {}, id="rank-5"),
    # 5-d channels_last_3d keeps its memory format.
    pytest.param((1, 32, 3, 6, 5), 8, {"channels_last": True}, id="rank-5-cl3d"),
    # Large mean, small spread: naive sum-of-squares statistics cancel catastrophically here.
    pytest.param((2, 64, 16, 16), 8, {"mean": 1000.0, "std": 1.0}, id="mean-1000"),
    pytest.param((2, 64, 16, 16), 8, {"mean": -3000.0, "std": 0.1, "channels_last": True},
                 id="mean-minus-3000-nhwc"),
    # Constant input: zero variance, the output is the bias (through SiLU); eps keeps it finite.
    pytest.param((1, 16, 4, 4), 4, {"std": 0.0, "mean": 2.0}, id="constant"),
    # Parameters in x's dtype rather than float32.
    pytest.param((2, 64, 8, 8), 8, {"param_dtype": "same"}, id="params-same-dtype"),
    # Plain GroupNorm (silu=False), both layouts.
    pytest.param((2, 64, 8, 8), 8, {"silu": False}, id="no-silu"),
    pytest.param((2, 64, 8, 8), 8, {"silu": False, "channels_last": True}, id="no-silu-nhwc"),
    # Large-magnitude activations: SiLU must not overflow to inf or NaN in exp(-x).
    pytest.param((1, 16, 8, 8), 4, {"std": 200.0}, id="large-activations"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups,kw", EDGE)
def test_edge_cases(device, shape, groups, kw, dtype):
    kw = dict(kw)
    if kw.get("param_dtype") == "same":
        kw["param_dtype"] = dtype
    silu = kw.pop("silu", True)
    if dtype != torch.float32 and abs(kw.get("mean", 0.0)) >= 1000:
        # float16/bfloat16 cannot hold 1000 + N(0, 1) to better than 0.5 or 4: the input is
        # mostly quantisation noise; the float32 case is the one that tests the statistics.
        kw["std"] = kw.get("std", 1.0) * 50
    _check(shape, groups, dtype, device, silu=silu, **kw)


def test_large_mean_is_accurate(device):
    # Parity alone would pass a kernel as inaccurate as the float32 reference (whose error at
    # mean 1000 is about 6e-5); the kernel should do better than naive float statistics.
    for cl in (False, True):
        out, r64 = _check((2, 64, 16, 16), 8, torch.float32, device, mean=1000.0, channels_last=cl)
        assert (out.double().cpu() - r64.cpu()).abs().max().item() < 5e-6


def test_non_contiguous_input(device):
    # A strided view that is neither contiguous nor channels_last is computed from a copy.
    x, w, b, _ = _inputs((2, 32, 16, 24), torch.float32, device)
    xs = x[:, :, :, ::2]
    out = ops.group_norm_silu(xs, w, b, 8)
    assert_parity(out, ref.group_norm_silu(xs, w, b, 8),
                  ref.group_norm_silu(xs.double(), w.double(), b.double(), 8), torch.float32, "strided")


def test_emb_with_trailing_unit_dims(device):
    # The ResBlock produces emb as (N, C, 1, 1); the op accepts that as well as (N, C).
    x, w, b, e = _inputs((2, 32, 8, 8), torch.float32, device, emb=True)
    a = ops.group_norm_silu(x, w, b, 8, emb=e)
    c = ops.group_norm_silu(x, w, b, 8, emb=e[:, :, None, None])
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_empty_batch(device):
    x = torch.empty(0, 32, 8, 8, device=device)
    w, b = torch.ones(32, device=device), torch.zeros(32, device=device)
    assert ops.group_norm_silu(x, w, b, 8).shape == x.shape


def test_deterministic_across_thread_counts():
    # Pieces have bounds from the shape alone and are combined in a fixed order, so the result
    # is bit-identical with any number of threads.
    threads = torch.get_num_threads()
    for cl in (False, True):
        x, w, b, e = _inputs((2, 64, 33, 31), torch.float32, "cpu", emb=True, channels_last=cl)
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(ops.group_norm_silu(x, w, b, 8, emb=e))
        torch.set_num_threads(threads)
        for o in outs[1:]:
            assert torch.equal(o, outs[0])


# ---- seeded random sample -----------------------------------------------------------------------

def _random_cases(n=12, seed=1234):
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        groups = rng.choice([1, 2, 4, 8, 32])
        per_group = rng.randint(1, 12)
        spatial = tuple(rng.randint(1, 40) for _ in range(rng.choice([1, 2, 2, 2, 3])))
        shape = (rng.randint(1, 3), groups * per_group) + spatial
        cases.append(pytest.param(shape, groups, rng.choice(DTYPES), rng.random() < 0.5,
                                  rng.random() < 0.5, rng.choice([1e-5, 1e-6]), id=f"rand{i}"))
    return cases


@pytest.mark.parametrize("shape,groups,dtype,channels_last,emb,eps", _random_cases())
def test_random_shapes(device, shape, groups, dtype, channels_last, emb, eps):
    _check(shape, groups, dtype, device, eps=eps, emb=emb,
           channels_last=channels_last and len(shape) in (4, 5), mean=0.3, std=2.0)


# ---- bad input ----------------------------------------------------------------------------------

def _good(device="cpu"):
    x = torch.randn(2, 8, 4, 4, device=device)
    return x, torch.ones(8, device=device), torch.zeros(8, device=device)


def test_rejects_low_rank():
    x, w, b = _good()
    with pytest.raises(ValueError, match="x must be"):
        ops.group_norm_silu(x[0, 0, 0], w, b, 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_rejects_unsupported_dtype(dtype):
    x, w, b = _good()
    with pytest.raises(NotImplementedError, match="x has dtype"):
        ops.group_norm_silu(x.to(dtype), w.to(dtype), b.to(dtype), 2)


def test_rejects_bad_groups():
    x, w, b = _good()
    with pytest.raises(ValueError, match="num_groups"):
        ops.group_norm_silu(x, w, b, 3)  # 8 channels are not divisible by 3
    with pytest.raises(ValueError, match="num_groups"):
        ops.group_norm_silu(x, w, b, 0)


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf")])
def test_rejects_bad_eps(eps):
    x, w, b = _good()
    with pytest.raises(ValueError, match="eps"):
        ops.group_norm_silu(x, w, b, 2, eps)


def test_rejects_bad_weight_and_bias():
    x, w, b = _good()
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.group_norm_silu(x, w[:4], b, 2)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.group_norm_silu(x, w, b[None], 2)
    with pytest.raises(ValueError, match="weight has dtype"):
        ops.group_norm_silu(x, w.double(), b, 2)  # neither x's dtype nor float32
    xh = x.half()
    with pytest.raises(ValueError, match="weight .* and bias .* must have the same dtype"):
        ops.group_norm_silu(xh, w.half(), b, 2)


def test_rejects_bad_emb():
    x, w, b = _good()
    with pytest.raises(ValueError, match="emb must be"):
        ops.group_norm_silu(x, w, b, 2, emb=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="emb must be"):
        ops.group_norm_silu(x, w, b, 2, emb=torch.zeros(2, 8, 2))
    with pytest.raises(ValueError, match="emb has dtype"):
        ops.group_norm_silu(x, w, b, 2, emb=torch.zeros(2, 8, dtype=torch.float16))


def test_rejects_mixed_devices(device):
    if device.type == "cpu":
        pytest.skip("needs a second device: runs as the cuda case")
    x, w, b = _good(device)
    with pytest.raises(ValueError, match="weight is on"):
        ops.group_norm_silu(x, w.cpu(), b, 2)
    with pytest.raises(ValueError, match="emb is on"):
        ops.group_norm_silu(x, w, b, 2, emb=torch.zeros(2, 8))


# ---- torch.library integration ------------------------------------------------------------------

def _opcheck_cases(device):
    x, w, b, e = _inputs((2, 16, 5, 6), torch.float32, device, emb=True)
    xh, wf, bf, eh = _inputs((2, 16, 5, 6), torch.float16, device, emb=True)
    xcl = x.to(memory_format=torch.channels_last)
    return [
        (x, w, b, 4, 1e-5, True, None),
        (x, w, b, 4, 1e-6, False, e),
        (xcl, w, b, 8, 1e-5, True, e),
        (xh, wf, bf, 4, 1e-5, True, eh),
    ]


# The AOT-dispatch check traces forward and backward and costs seconds per case on a 2-core CPU,
# so it runs on the richest case (channels_last with emb); the others get the cheaper checks.
FAST_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_opcheck(device):
    for i, args in enumerate(_opcheck_cases(device)):
        args = tuple(a.clone().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor)
                     else a for a in args)
        utils = FAST_OPCHECK + ("test_aot_dispatch_dynamic",) if i == 2 else FAST_OPCHECK
        torch.library.opcheck(torch.ops.ldmfast.group_norm_silu.default, args, test_utils=utils)


def test_torch_compile_fullgraph(device):
    x, w, b, e = _inputs((2, 16, 8, 8), torch.float32, device, emb=True)

    def block(x, w, b, e):
        h = ops.group_norm_silu(x * 2.0, w, b, 4, 1e-5, True, e)
        return h + x

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, b, e), block(x, w, b, e), rtol=0, atol=0)
    xcl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(compiled(xcl, w, b, e), block(xcl, w, b, e), rtol=0, atol=0)


@pytest.mark.parametrize("channels_last,emb,silu", [(False, False, True), (True, True, True),
                                                    (False, True, False)])
def test_gradients_match_reference(device, channels_last, emb, silu):
    # The ops take no float64, so gradcheck is not available: compare the op's float32
    # gradients with the reference's autograd gradients by the same parity rule.
    x, w, b, e = _inputs((2, 16, 6, 5), torch.float32, device, emb=emb, channels_last=channels_last)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(device)

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, w, b, e)]
        out = fn(leaves[0], leaves[1], leaves[2], 4, 1e-5, silu, leaves[3])
        return torch.autograd.grad((out * g.to(dtype)).sum(), [t for t in leaves if t is not None])

    got = grads(ops.group_norm_silu, torch.float32)
    want = grads(ref.group_norm_silu, torch.float32)
    want64 = grads(ref.group_norm_silu, torch.float64)
    for name, a, r, r64 in zip(["x", "weight", "bias", "emb"], got, want, want64):
        assert_parity(a, r, r64, torch.float32, f"grad {name}")


# ---- every CUDA kernel ---------------------------------------------------------------------------

# LDMFAST_GN_KERNEL picks how large channels_last groups are normalised on CUDA (groups: a
# cluster per group; rows: coalesced pixel rows through a workspace; held: x read once into the
# registers and shared memory of one cooperative grid, the rest streamed through L2 where that is
# at most L2's size). Each must pass on its own, on the channels_last LDM shapes over the one-CTA
# limit, odd sizes, emb, and a large mean; and auto must give the same bits as the kernel it picks.
CUDA_GN_SHAPES = [
    ((2, 320, 64, 64), 32, {}), ((2, 640, 32, 32), 32, {"emb": True}), ((1, 512, 64, 64), 32, {}),
    ((1, 128, 256, 256), 32, {}), ((1, 256, 128, 128), 32, {"param_dtype": "dtype"}),
    ((2, 960, 64, 64), 32, {"emb": True}), ((3, 24, 37, 41), 1, {"emb": True}),
    ((1, 64, 97, 101), 4, {"mean": 300.0}),
    # 67 MB in 16 bits: past what the held kernel holds on an H100 (41 MB), streamed
    ((1, 128, 512, 512), 32, {"emb": True}),
]
HELD_BYTES_PER_SM = 512 * (14 + 24) * 16  # one held CTA's registers and slots (group_norm_silu_held.cu)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups,kw", CUDA_GN_SHAPES)
def test_cuda_gn_kernel_choice(monkeypatch, shape, groups, kw, dtype):
    kw = dict(kw, channels_last=True)
    if kw.get("param_dtype") == "dtype":
        kw["param_dtype"] = dtype
    outs = {}
    for kernel in ("groups", "rows", "held", "auto"):
        monkeypatch.setenv("LDMFAST_GN_KERNEL", kernel)
        try:
            outs[kernel], _ = _check(shape, groups, dtype, "cuda", what=f"{kernel} {shape} G={groups} {dtype}", **kw)
        except RuntimeError as e:  # held refuses x its resident CTAs cannot hold
            if kernel != "held" or "operation not supported" not in str(e):
                raise
    # held must run where x takes at most half of what one CTA per SM holds (the rounding of
    # pixel rows to CTAs never costs that much).
    nbytes = torch.Size(shape).numel() * torch.finfo(dtype).bits // 8
    if nbytes <= torch.cuda.get_device_properties(0).multi_processor_count * HELD_BYTES_PER_SM // 2:
        assert "held" in outs, f"the held kernel refused {shape} {dtype} ({nbytes} bytes)"
    # auto takes held where it runs, else the rows kernels from 256 x 256 pixels up, else groups.
    chosen = "held" if "held" in outs else "rows" if shape[2] * shape[3] >= 256 * 256 else "groups"
    assert torch.equal(outs["auto"], outs[chosen])


# The model captures its U-Net and decoder in CUDA graphs, and the default kernels include a
# cooperative launch (held, channels_last) and register-held NCHW items. A capture must take them
# and a replay must give the eager bits, also after the input changes in place.
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("kernel", ["auto", "held"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_gn_in_cuda_graph(monkeypatch, kernel, channels_last):
    if kernel == "held" and not channels_last:
        pytest.skip("the held kernel is channels_last only")
    monkeypatch.setenv("LDMFAST_GN_KERNEL", kernel)
    x, w, b, e = _inputs((2, 320, 64, 64), torch.float16, "cuda", emb=True, channels_last=channels_last)
    eager = ops.group_norm_silu(x, w, b, 32, 1e-5, True, e)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capturing stream (workspace, attributes)
        ops.group_norm_silu(x, w, b, 32, 1e-5, True, e)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.group_norm_silu(x, w, b, 32, 1e-5, True, e)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    x.mul_(-2.0).add_(1.0)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ops.group_norm_silu(x, w, b, 32, 1e-5, True, e))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_gn_kernel_choice_rejects_unknown(monkeypatch):
    monkeypatch.setenv("LDMFAST_GN_KERNEL", "fastest")
    x, w, b, _ = _inputs((1, 32, 4, 4), torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="LDMFAST_GN_KERNEL must be one of .* got 'fastest'"):
        ops.group_norm_silu(x, w, b, 8)


# NCHW groups of 16-byte items past what a thread's registers hold: the rest of its share in
# shared memory (1x256x256x256: 32 items a thread at K = 4, one wave), and where even that is too
# little, more CTAs per group over more waves (1x128x512x512: K = 8 on Hopper instead of 4).
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 256, 256, 256), (1, 128, 512, 512)], ids=str)
def test_cuda_gn_nchw_large_groups(shape, dtype):
    _check(shape, 32, dtype, "cuda", eps=1e-6, emb=True)


# Few, large groups: on Hopper the groups kernel splits each group over a cluster of CTAs (up to
# 8) that exchange partial statistics through distributed shared memory. The combination order is
# fixed, so two runs must give the same bits, and both must match the reference.
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_gn_cluster_split_is_deterministic(monkeypatch, dtype, channels_last):
    # "cluster": the split itself, K >= 2 CTAs (with "groups" a K of 1 would pass unseen); an
    # error where the device cannot launch it, as an H100 must.
    monkeypatch.setenv("LDMFAST_GN_KERNEL", "cluster")
    shape, groups = (1, 64, 128, 128), 4  # 4 groups of 262144 elements
    first, _ = _check(shape, groups, dtype, "cuda", channels_last=channels_last, mean=3.0)
    again, _ = _check(shape, groups, dtype, "cuda", channels_last=channels_last, mean=3.0)
    assert torch.equal(first, again)


@pytest.mark.parametrize("name", ["x", "weight", "bias", "emb"])
def test_rejects_missing_or_non_tensor_inputs_by_name(name):
    # None reached the C++ checks as an undefined tensor ("weight must have shape (C,) = (8,),
    # got [0]"); it and other non-tensors are named as such up front.
    x, w, b, e = _inputs((2, 8, 4, 4), torch.float32, "cpu", emb=True)
    args = {"x": x, "weight": w, "bias": b, "emb": e}
    for bad in ([None] if name != "emb" else []) + [args[name].numpy()]:
        args[name] = bad
        with pytest.raises(TypeError, match=f"group_norm_silu: {name} must be a tensor, got {type(bad).__name__}"):
            ops.group_norm_silu(args["x"], args["weight"], args["bias"], 4, emb=args["emb"])
    ops.group_norm_silu(x, w, b, 4, emb=None)  # emb is optional


@pytest.mark.parametrize("call,match", [
    (lambda x: ops.group_norm_silu(x, torch.ones(6), torch.zeros(8), 2), r"weight must have shape \(C,\) = \(8,\)"),
    (lambda x: ops.group_norm_silu(x, torch.ones(8), torch.zeros(8), 3), "not divisible by num_groups=3"),
    (lambda x: ops.group_norm_silu(x, torch.ones(8), torch.zeros(8), 2, emb=torch.ones(2, 7)), r"emb must be \(N, C\)"),
    (lambda x: ops.attention(torch.randn(1, 5, 2, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8)), "batch sizes differ"),
    (lambda x: ops.attention(torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 4, 2, 8)), "k has length 5 but v"),
    (lambda x: ops.ddim_step(x, torch.randn(2, 8, 4, 5), 0.5, 0.6), "eps has shape"),
], ids=["gn-weight", "gn-groups", "gn-emb", "attn-batch", "attn-length", "ddim-eps"])
def test_fake_kernels_check_shapes_when_traced(call, match):
    # torch.compile / torch.export trace with fake tensors: a bad shape must fail there, with the
    # runtime's message, not only when the compiled graph first runs.
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.randn(2, 8, 4, 4)
        with pytest.raises(ValueError, match=match):
            call(x)
    with pytest.raises(ValueError, match=match):  # the same call, run for real
        call(torch.randn(2, 8, 4, 4))
