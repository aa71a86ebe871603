"""attention: parity with the float64 reference (STYLE.md section 4), bad input, opcheck,
torch.compile and gradients.

Shapes: the SD U-Net's first (self-attention over a 64x64 latent, 4096 tokens, head dim 40,
and cross-attention to 77 CLIP tokens), its deeper levels (1024 tokens at d80, 256 at d160,
64 at d160), SD-2's head dim 64; then edge cases, each with the reason it is there; then a
seeded random sample. Heads and batch are kept small so the suite runs on a 2-core CPU.
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


def _qkv(B, Lq, Lk, H, D, dtype, device, seed=0, std=1.0):
    skip_large_under_sanitizer(B * H * Lq * Lk, device)
    g = torch.Generator().manual_seed(seed)
    mk = lambda L: (torch.randn(B, L, H, D, generator=g) * std).to(dtype).to(device)  # noqa: E731
    return mk(Lq), mk(Lk), mk(Lk)


CUDA_HEAD_DIMS = (32, 40, 64, 80, 96, 128, 160)  # what the CUDA kernels are instantiated for


def _check(q, k, v, scale=None, what=""):
    if q.is_cuda and q.shape[-1] not in CUDA_HEAD_DIMS:
        # The model layer sends these to SDPA on CUDA; the op itself must refuse them clearly.
        with pytest.raises(NotImplementedError, match=f"head dim D={q.shape[-1]} is not supported by the CUDA"):
            ops.attention(q, k, v, scale)
        return None
    out = ops.attention(q, k, v, scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    r = ref.attention(q, k, v, scale)
    r64 = ref.attention(q.double(), k.double(), v.double(), scale)
    assert_parity(out, r, r64, q.dtype, what or f"q{tuple(q.shape)} k{tuple(k.shape)} {q.dtype}")
    return out


# ---- real LDM shapes ----------------------------------------------------------------------------

LDM_SHAPES = [
    # (B, Lq, Lk, H, D)
    pytest.param(1, 4096, 4096, 1, 40, id="sd-self-64x64-d40"),
    pytest.param(1, 1024, 1024, 2, 80, id="sd-self-32x32-d80"),
    pytest.param(2, 256, 256, 2, 160, id="sd-self-16x16-d160"),
    pytest.param(2, 64, 64, 4, 160, id="sd-self-8x8-d160"),
    pytest.param(2, 4096, 77, 2, 40, id="sd-cross-64x64-d40"),
    pytest.param(2, 1024, 77, 2, 80, id="sd-cross-32x32-d80"),
    pytest.param(2, 256, 77, 2, 160, id="sd-cross-16x16-d160"),
    pytest.param(1, 1024, 1024, 2, 64, id="sd2-self-d64"),
    pytest.param(2, 1024, 77, 2, 64, id="sd2-cross-d64"),
    # The autoencoder's mid-block attention: one head of 512 channels over a 32x32 latent.
    pytest.param(1, 1024, 1024, 1, 512, id="vae-mid-32x32-d512"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Lq,Lk,H,D", LDM_SHAPES)
def test_ldm_shapes(device, B, Lq, Lk, H, D, dtype):
    if Lq * Lk >= 4096 * 4096 and dtype != torch.float32:
        pytest.skip("the 4096x4096 case runs in float32 only, to keep the suite fast on CPU; "
                    "the half types are covered at every other shape")
    _check(*_qkv(B, Lq, Lk, H, D, dtype, device))


# ---- edge cases ---------------------------------------------------------------------------------

EDGE = [
    # One key: softmax is exactly 1, the output is v (also the single-tile path).
    pytest.param(2, 10, 1, 2, 40, {}, id="lk-1"),
    # One query: a task with a single row, padded to the micro-kernel's row block.
    pytest.param(2, 1, 300, 2, 64, {}, id="lq-1"),
    # Lengths just past powers of two: partial query chunks and key tiles, key padding.
    pytest.param(1, 33, 65, 2, 40, {}, id="odd-33x65"),
    pytest.param(1, 129, 129, 2, 80, {}, id="odd-129x129"),
    pytest.param(1, 65, 257, 1, 64, {}, id="odd-65x257"),
    # Several key tiles with a short last one (128-key tiles for D <= 128).
    pytest.param(1, 40, 130, 1, 32, {}, id="two-key-tiles"),
    # D = 1 and head dims that are not a multiple of the vector width.
    pytest.param(2, 17, 19, 3, 1, {}, id="d1"),
    pytest.param(1, 31, 45, 2, 7, {}, id="d7"),
    pytest.param(1, 20, 33, 2, 100, {}, id="d100"),
    # 64-key tiles from D = 129 up, 32-key tiles past 256, up to the largest head dim (512).
    pytest.param(1, 70, 150, 2, 256, {}, id="d256"),
    pytest.param(1, 70, 150, 1, 384, {}, id="d384"),
    pytest.param(1, 37, 90, 1, 512, {}, id="d512"),
    # Peaked softmax (large scores): the running maximum must be tracked across key tiles.
    pytest.param(1, 64, 400, 2, 40, {"scale": 3.0}, id="peaked-scale-3"),
    # Tiny scale: nearly uniform softmax, sums of many similar terms.
    pytest.param(1, 64, 400, 2, 40, {"scale": 1e-3}, id="flat-scale"),
    # Negative and zero scales (the tensor-core kernels leave them to the SIMT kernel: their
    # softmax takes the largest scaled score from the largest raw one).
    pytest.param(1, 64, 400, 2, 64, {"scale": -0.5}, id="negative-scale"),
    pytest.param(1, 64, 150, 2, 40, {"scale": 0.0}, id="zero-scale"),
    # Large activations, as in an unnormalised attention input.
    pytest.param(1, 48, 200, 2, 64, {"std": 8.0}, id="large-inputs"),
    # More batch than heads, and many heads.
    pytest.param(5, 9, 12, 1, 16, {}, id="batch-5-head-1"),
    pytest.param(1, 12, 20, 16, 16, {}, id="heads-16"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_early_key_tiles_overflowing_to_minus_inf(device, dtype):
    # |q|, |k| near the float range (float32, bfloat16): every score of the first key tiles
    # (CPU 128 keys, CUDA 32 or 64) is -inf in float32 while the later keys' are finite. The
    # softmax is then over the later keys; a NaN would be the online softmax's -inf - -inf.
    q, k, v = _qkv(1, 9, 200, 2, 64, dtype, device)
    q[..., 0] = 1e20
    k[:, :130, :, 0] = -1e20
    k[:, 130:, :, 0] = 0
    _check(q, k, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Lq,Lk,H,D,kw", EDGE)
def test_edge_cases(device, B, Lq, Lk, H, D, kw, dtype):
    kw = dict(kw)
    scale = kw.pop("scale", None)
    _check(*_qkv(B, Lq, Lk, H, D, dtype, device, **kw), scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_qkv_slices(device, dtype):
    # q, k, v as views of one fused (B, L, 3, H, D) projection: strided in L by 3*H*D.
    B, L, H, D = 2, 96, 4, 40
    qkv = torch.randn(B, L, 3, H, D, generator=torch.Generator().manual_seed(3)).to(dtype).to(device)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    _check(q, k, v, what="fused qkv")


def test_permuted_layouts(device):
    # Views of (B, H, L, D) tensors transposed to (B, L, H, D), and a kv projection split from
    # one (B, L, 2, H, D) tensor: every stride but the last is unusual.
    B, Lq, Lk, H, D = 2, 50, 77, 3, 40
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, H, Lq, D, generator=g).to(device).transpose(1, 2)
    kv = torch.randn(B, Lk, 2, H, D, generator=g).to(device)
    k, v = kv[:, :, 0], kv[:, :, 1]
    _check(q, k, v, what="permuted")
    # A batch-strided view (every other sample) too.
    qq = torch.randn(2 * B, Lq, H, D, generator=g).to(device)[::2]
    _check(qq, k, v, what="batch-strided")


def test_non_unit_last_stride(device):
    # The kernel needs a unit-stride head dim; the binding copies anything else.
    q, k, v = _qkv(1, 20, 30, 2, 80, torch.float32, device)
    _check(q[..., ::2], k[..., ::2], v[..., ::2], what="strided head dim")


def test_empty_queries(device):
    # Lq = 0: nothing to compute, an empty result of the right shape.
    q, k, v = _qkv(2, 0, 5, 2, 40, torch.float32, device)  # a head dim the CUDA kernels take
    assert ops.attention(q, k, v).shape == (2, 0, 2, 40)


def test_deterministic_across_thread_counts():
    # Each query row sees the same key tiles in the same order whatever the chunking, so the
    # output is bit-identical for any thread count (the chunk size depends on it).
    q, k, v = _qkv(1, 300, 200, 2, 40, torch.float32, "cpu")
    threads = torch.get_num_threads()
    outs = []
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        outs.append(ops.attention(q, k, v))
    torch.set_num_threads(threads)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


# ---- every CUDA kernel ---------------------------------------------------------------------------

# LDMFAST_ATTENTION_KERNEL picks the kernel for float16 / bfloat16: each must pass on its own,
# on the LDM shapes, the short-context edges (Lk = 1, 16, 17, 77, 80, 81 around the 80-key
# limit of the short kernel) and odd query counts.
CUDA_KERNELS = ["simt", "mma", "mma_sync", "mma_wide", "fast", "wgmma", "wgmma_overlap", "wgmma_pingpong",
                "wgmma_pingpong_overlap", "wgmma_pingpong3", "wgmma_pingpong3_overlap"]
CUDA_KERNEL_SHAPES = [
    (2, 4096, 77, 2, 40), (2, 1024, 77, 2, 80), (2, 256, 77, 2, 160), (2, 1024, 77, 2, 64),
    (1, 1024, 1024, 2, 80), (2, 256, 256, 2, 160), (1, 1024, 1024, 2, 64), (1, 4096, 4096, 1, 40),
    (2, 10, 1, 2, 40), (1, 33, 16, 2, 32), (1, 300, 17, 3, 96), (2, 70, 80, 2, 128),
    (1, 65, 81, 2, 40), (1, 1, 77, 1, 160), (3, 129, 200, 2, 64),
]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,Lq,Lk,H,D", CUDA_KERNEL_SHAPES)
@pytest.mark.parametrize("kernel", CUDA_KERNELS)
def test_cuda_kernel_choice(monkeypatch, kernel, B, Lq, Lk, H, D, dtype):
    monkeypatch.setenv("LDMFAST_ATTENTION_KERNEL", kernel)
    q, k, v = _qkv(B, Lq, Lk, H, D, dtype, torch.device("cuda"))
    _check(q, k, v, what=f"{kernel} q{tuple(q.shape)} k{tuple(k.shape)} {dtype}")
    # Views of a fused (B, Lk, 3, H, D) projection whose storage starts 2 bytes past a 16-byte
    # boundary: row stride 3*H*D and no 16-byte loads, the kernels' scalar path.
    n = B * Lk * 3 * H * D
    kv = torch.randn(n + 1, device="cuda", dtype=dtype)[1:].view(B, Lk, 3, H, D)
    assert kv.data_ptr() % 16 != 0
    _check(q, kv[:, :, 1], kv[:, :, 2], what=f"{kernel} strided unaligned k/v")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,Lq,Lk,H,D", [
    (2, 4096, 77, 2, 40), (2, 1024, 77, 2, 80), (2, 300, 77, 3, 64),  # a last block of 12 rows
    (2, 10, 1, 2, 40), (1, 48, 16, 2, 32), (1, 1, 77, 1, 160)])       # D = 160: one tile anyway
@pytest.mark.parametrize("env", ["LDMFAST_ATTENTION_SHORT_ROWS=32", "LDMFAST_ATTENTION_SHORT_CTAS_PER_SM=8",
                                 "LDMFAST_ATTENTION_SHORT_CTAS_PER_SM=1"])
def test_cuda_short_kernel_variants(monkeypatch, env, B, Lq, Lk, H, D, dtype):
    # The short-context kernel's tuning knobs (bench_ops_cuda times them) keep parity.
    monkeypatch.setenv("LDMFAST_ATTENTION_KERNEL", "fast")
    monkeypatch.setenv(*env.split("="))
    q, k, v = _qkv(B, Lq, Lk, H, D, dtype, torch.device("cuda"))
    _check(q, k, v, what=f"fast {env} q{tuple(q.shape)} k{tuple(k.shape)} {dtype}")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("scale", [-0.5, 0.0])
@pytest.mark.parametrize("kernel", CUDA_KERNELS)
def test_cuda_kernel_choice_nonpositive_scale(monkeypatch, kernel, scale):
    # Every choice falls back to the SIMT kernel for these (see test_edge_cases).
    monkeypatch.setenv("LDMFAST_ATTENTION_KERNEL", kernel)
    q, k, v = _qkv(1, 200, 300, 2, 64, torch.float16, torch.device("cuda"))
    _check(q, k, v, scale=scale, what=f"{kernel} scale={scale}")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_kernel_choice_rejects_unknown(monkeypatch):
    monkeypatch.setenv("LDMFAST_ATTENTION_KERNEL", "fastest")
    q, k, v = _qkv(1, 8, 8, 1, 40, torch.float16, torch.device("cuda"))
    with pytest.raises(RuntimeError, match="LDMFAST_ATTENTION_KERNEL must be one of .* got 'fastest'"):
        ops.attention(q, k, v)


# ---- seeded random sample -----------------------------------------------------------------------

def _random_cases(n=12, seed=4321):
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        D = rng.choice([8, 16, 24, 40, 48, 64, 72, 80, 96, 128, 160, 200, 256])
        cases.append(pytest.param(rng.randint(1, 3), rng.randint(1, 300), rng.randint(1, 300),
                                  rng.randint(1, 4), D, rng.choice(DTYPES), id=f"rand{i}"))
    return cases


@pytest.mark.parametrize("B,Lq,Lk,H,D,dtype", _random_cases())
def test_random_shapes(device, B, Lq, Lk, H, D, dtype):
    _check(*_qkv(B, Lq, Lk, H, D, dtype, device))


# ---- bad input ----------------------------------------------------------------------------------

def _good(**kw):
    return _qkv(2, 8, 6, 2, 16, torch.float32, "cpu", **kw)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_rejects_wrong_rank(which):
    t = dict(zip("qkv", _good()))
    t[which] = t[which][0]
    with pytest.raises(ValueError, match=f"{which} must be \\(B, L, H, D\\)"):
        ops.attention(t["q"], t["k"], t["v"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_rejects_unsupported_dtype(dtype):
    q, k, v = (t.to(dtype) for t in _good())
    with pytest.raises(NotImplementedError, match="q has dtype"):
        ops.attention(q, k, v)


def test_rejects_mixed_dtypes():
    q, k, v = _good()
    with pytest.raises(ValueError, match="k has dtype"):
        ops.attention(q, k.half(), v)
    with pytest.raises(ValueError, match="v has dtype"):
        ops.attention(q, k, v.bfloat16())


def test_rejects_mismatched_shapes():
    q, k, v = _good()
    with pytest.raises(ValueError, match="batch sizes differ"):
        ops.attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="head counts differ"):
        ops.attention(q, k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match="head dims differ"):
        ops.attention(q, k[..., :8], v[..., :8])
    with pytest.raises(ValueError, match="k has length 6 but v has length 5"):
        ops.attention(q, k, v[:, :5])


def test_rejects_empty_keys_and_head_dim():
    q, k, v = _good()
    with pytest.raises(ValueError, match="Lk >= 1"):
        ops.attention(q, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="head dim D must be >= 1"):
        ops.attention(q[..., :0], k[..., :0], v[..., :0])


# 1e39: inf as a float32; 3e38: a float32, but inf times log2(e) in the tensor-core kernels
@pytest.mark.parametrize("scale", [float("inf"), float("nan"), 1e39, 3e38])
def test_rejects_bad_scale(scale):
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.attention(*_good(), scale=scale)


def test_rejects_head_dim_beyond_cpu_limit():
    q, k, v = _qkv(1, 4, 4, 1, 600, torch.float32, "cpu")
    with pytest.raises(NotImplementedError, match="head dim D=600 is not supported on CPU"):
        ops.attention(q, k, v)


def test_rejects_mixed_devices(device):
    if device.type == "cpu":
        pytest.skip("needs a second device: runs as the cuda case")
    q, k, v = _qkv(1, 4, 4, 1, 16, torch.float32, device)
    with pytest.raises(ValueError, match="k is on"):
        ops.attention(q, k.cpu(), v)


# ---- torch.library integration ------------------------------------------------------------------

FAST_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_opcheck(device):
    q, k, v = _qkv(2, 24, 77, 2, 40, torch.float32, device)
    qkv = torch.randn(2, 24, 3, 2, 32, device=device)
    cases = [
        ((q, k, v, None), True),                               # cross attention, default scale
        (tuple(qkv.unbind(2)) + (0.3,), False),                # fused-qkv views, explicit scale
        (tuple(t.half() for t in (q, k, v)) + (None,), False),  # float16
    ]
    for args, full in cases:
        args = tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a
                     for a in args)
        utils = FAST_OPCHECK + ("test_aot_dispatch_dynamic",) if full else FAST_OPCHECK
        torch.library.opcheck(torch.ops.ldmfast.attention.default, args, test_utils=utils)


def test_torch_compile_fullgraph(device):
    q, k, v = _qkv(2, 40, 77, 2, 40, torch.float32, device)

    def block(q, k, v):
        return ops.attention(q * 0.5, k, v) + q

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), block(q, k, v), rtol=0, atol=0)


@pytest.mark.parametrize("Lq,Lk,D", [(24, 77, 40), (33, 33, 32)])
def test_gradients_match_reference(device, Lq, Lk, D):
    # The ops take no float64, so gradcheck is not available: compare the op's float32
    # gradients with the reference's autograd gradients by the same parity rule.
    q, k, v = _qkv(2, Lq, Lk, 2, D, torch.float32, device)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(device)

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return torch.autograd.grad((out * g.to(dtype)).sum(), leaves)

    got = grads(ops.attention, torch.float32)
    want = grads(ref.attention, torch.float32)
    want64 = grads(ref.attention, torch.float64)
    for name, a, r, r64 in zip("qkv", got, want, want64):
        assert_parity(a, r, r64, torch.float32, f"grad {name}")


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [None, [[1.0]]], ids=["None", "list"])
def test_rejects_missing_or_non_tensor_inputs_by_name(which, bad):
    # None reached the C++ checks as an undefined tensor ("k must be (B, L, H, D), got a 1-d
    # tensor of shape [0]"); a missing input is named as such up front.
    q, k, v = _qkv(1, 5, 5, 2, 8, torch.float32, "cpu")
    args = {"q": q, "k": k, "v": v, which: bad}
    with pytest.raises(TypeError, match=f"attention: {which} must be a tensor, got {type(bad).__name__}"):
        ops.attention(args["q"], args["k"], args["v"])
