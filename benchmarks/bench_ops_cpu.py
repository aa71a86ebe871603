"""CPU kernel benchmarks: ldmfast's ops against what a plain PyTorch LDM runs in their place.

    python -m pytest benchmarks/bench_ops_cpu.py --benchmark-columns=median,iqr,rounds \
        --benchmark-group-by=group --benchmark-sort=name

Each group holds one shape with one row per implementation:
  group_norm_silu  ldmfast vs F.silu(F.group_norm(x)) (what GroupNorm32 + SiLU cost), both layouts
  attention        ldmfast vs F.scaled_dot_product_attention on the same (B, L, H, D) memory
                   (SDPA gets transposed views, as a model holding (B, L, H, D) projections would
                   pass them)
  ddim_step        ldmfast vs the plain-torch reference step (ldmfast.ref.ddim_step)
  geglu            ldmfast vs a * F.gelu(gate) of the two halves (the original GEGLU)
  upsample_conv    the model layer's conv3x3(upsample2x(x)) (LDMFAST_UPSAMPLE_CONV's auto choice,
                   and the subpixel rewrite forced) vs F.interpolate then the conv
Medians of many rounds after warm-up; shapes are the SD / autoencoder ones, sized for a 2-core
CPU, with inputs larger than L2. extra_info carries GB/s (bytes read + written once) for the
memory-bound ops and TFLOP/s (4 B H Lq Lk D) for attention, computed from the median.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ldmfast.ops as ops
import ldmfast.ref as ref

pytest.importorskip("pytest_benchmark")

IMPLS = ["ldmfast", "torch"]


def _run(benchmark, fn, rounds):
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=2, iterations=1)
    return benchmark.stats.stats.median


# ---- group_norm_silu ----------------------------------------------------------------------------

GN_CASES = [
    pytest.param((2, 320, 64, 64), 32, 1e-5, id="unet-2x320x64x64"),
    pytest.param((2, 1280, 16, 16), 32, 1e-5, id="unet-2x1280x16x16"),
    pytest.param((1, 512, 64, 64), 32, 1e-6, id="vae-1x512x64x64"),
    pytest.param((1, 128, 256, 256), 32, 1e-6, id="vae-1x128x256x256"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,groups,eps", GN_CASES)
def test_group_norm_silu(benchmark, shape, groups, eps, channels_last, impl):
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    if impl == "ldmfast":
        fn = lambda: ops.group_norm_silu(x, w, b, groups, eps)  # noqa: E731
    else:
        fn = lambda: F.silu(F.group_norm(x, groups, w, b, eps))  # noqa: E731
    benchmark.group = f"group_norm_silu {'x'.join(map(str, shape))} {'nhwc' if channels_last else 'nchw'}"
    median = _run(benchmark, fn, rounds=20)
    benchmark.extra_info["GB/s"] = round(2 * x.numel() * x.element_size() / median / 1e9, 2)


# ---- attention ----------------------------------------------------------------------------------

ATTN_CASES = [
    # (B, Lq, Lk, H, D)
    pytest.param(2, 1024, 1024, 8, 40, id="self-2x1024x8xd40"),
    pytest.param(2, 1024, 77, 8, 40, id="cross-2x1024x77x8xd40"),
    pytest.param(1, 4096, 4096, 2, 40, id="self-1x4096x2xd40"),
    pytest.param(2, 4096, 77, 8, 40, id="cross-2x4096x77x8xd40"),
    pytest.param(2, 256, 256, 8, 160, id="self-2x256x8xd160"),
    pytest.param(2, 1024, 1024, 5, 64, id="sd2-self-2x1024x5xd64"),
    # the built-in model's (benchmarks/throughput.py on CPU): small, overhead shows
    pytest.param(2, 256, 256, 1, 32, id="builtin-self-2x256x1xd32"),
    pytest.param(2, 256, 12, 1, 32, id="builtin-cross-2x256x12x1xd32"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,Lq,Lk,H,D", ATTN_CASES)
def test_attention(benchmark, B, Lq, Lk, H, D, impl):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, L, H, D, generator=g) for L in (Lq, Lk, Lk))
    if impl == "ldmfast":
        fn = lambda: ops.attention(q, k, v)  # noqa: E731
    else:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        fn = lambda: F.scaled_dot_product_attention(qt, kt, vt)  # noqa: E731
    benchmark.group = f"attention B{B} Lq{Lq} Lk{Lk} H{H} D{D}"
    median = _run(benchmark, fn, rounds=10)
    benchmark.extra_info["TFLOP/s"] = round(4 * B * H * Lq * Lk * D / median / 1e12, 4)


# ---- ddim_step ----------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg+noise"])
def test_ddim_step(benchmark, guided, impl):
    shape = (8, 4, 128, 128)  # a batch of SD-2 768px latents: 2 MiB per tensor
    g = torch.Generator().manual_seed(0)
    x, eps, unc, noise = (torch.randn(shape, generator=g) for _ in range(4))
    unc, noise, sigma = (unc, noise, 0.1) if guided else (None, None, 0.0)
    step = ops.ddim_step if impl == "ldmfast" else ref.ddim_step
    fn = lambda: step(x, eps, 0.4, 0.5, sigma, noise, unc, 7.5 if guided else 1.0)  # noqa: E731
    benchmark.group = f"ddim_step {'x'.join(map(str, shape))} {'cfg+noise' if guided else 'plain'}"
    median = _run(benchmark, fn, rounds=30)
    tensors = (4 if guided else 2) + 2  # inputs read + two outputs written
    benchmark.extra_info["GB/s"] = round(tensors * x.numel() * x.element_size() / median / 1e9, 2)


# ---- geglu --------------------------------------------------------------------------------------

GEGLU_CASES = [
    # (tokens, 2n): SD FeedForward gates, n = 4C; token counts cut to a 2-core CPU's scale
    pytest.param((1024, 2 * 1280), id="sd-c320-1024tok"),
    pytest.param((512, 2 * 5120), id="sd-c1280-512tok"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", GEGLU_CASES)
def test_geglu(benchmark, shape, dtype, impl):
    h = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    if impl == "ldmfast":
        fn = lambda: ops.geglu(h)  # noqa: E731
    else:
        def fn():  # the original GEGLU: chunk, gelu, multiply
            a, gate = h.chunk(2, dim=-1)
            return a * F.gelu(gate)
    benchmark.group = f"geglu {'x'.join(map(str, shape))} {str(dtype)[6:]}"
    median = _run(benchmark, fn, rounds=20)
    # h read once, out (half of h) written once
    benchmark.extra_info["GB/s"] = round(1.5 * h.numel() * h.element_size() / median / 1e9, 2)


# ---- upsample_conv (the model layer's rewrite of upsample + conv, no kernel of its own) ---------

UPSAMPLE_CASES = [
    # (N, C, input size): the U-Net's 32->64 upsampler (640 channels, batch 2) at half its height
    # and width, the VAE decoder's 128->256 and 256->512 upsamplers at a quarter of their height
    # and width
    pytest.param((2, 640, 16), id="unet-2x640x16"),
    pytest.param((1, 512, 32), id="vae-1x512x32"),
    pytest.param((1, 256, 64), id="vae-1x256x64"),
]


@pytest.mark.parametrize("impl", ["ldmfast", "ldmfast_subpixel", "torch"])
@pytest.mark.parametrize("shape", UPSAMPLE_CASES)
def test_upsample_conv(benchmark, monkeypatch, shape, impl):
    from ldmfast.models import ops as model_ops

    n, c, s = shape
    torch.manual_seed(0)
    x = torch.randn(n, c, s, s)
    conv = torch.nn.Conv2d(c, c, 3, 1, 1).requires_grad_(False)
    if impl.startswith("ldmfast"):
        # auto's rule is set for a GPU's FLOP per byte: on CPU in fp32 it keeps the plain path
        # at these sizes; ldmfast_subpixel forces the rewrite
        monkeypatch.setenv("LDMFAST_UPSAMPLE_CONV", "subpixel" if impl == "ldmfast_subpixel" else "auto")
        fn = lambda: model_ops.upsample_conv(x, conv)  # noqa: E731
    else:
        fn = lambda: conv(F.interpolate(x, scale_factor=2, mode="nearest"))  # noqa: E731
    benchmark.group = f"upsample_conv {n}x{c}x{s}x{s}"
    with torch.no_grad():
        median = _run(benchmark, fn, rounds=5)
    # the plain conv's work, so the rewrite's figure is the rate it stands in for
    benchmark.extra_info["TFLOP/s"] = round(2 * n * 4 * s * s * c * c * 9 / median / 1e12, 4)
