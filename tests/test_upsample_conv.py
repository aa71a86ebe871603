"""upsample_conv: conv3x3(nearest 2x upsample(x)) without the upsampled tensor (the model layer's
rewrite in ``ldmfast.models.ops``), against the plain path in float64 (STYLE.md section 4).

Shapes: the SD U-Net's and VAE decoder's upsampling convs first (their channel counts, fewer
pixels on CPU: the rewrite is the same per pixel), then edge cases, each with its reason.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_parity, skip_large_under_sanitizer
from ldmfast.models import ops as model_ops

REWRITES = {"subpixel": model_ops._upsample_conv_subpixel,
            "transposed": model_ops._upsample_conv_transposed}


@pytest.fixture(autouse=True)
def _nan_empty():
    # torch.empty is NaN-filled under deterministic mode, so an output element the rewrite never
    # writes fails parity (CPU; conv_transpose2d has no deterministic CUDA backward, unused here).
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def _conv(cin, cout, dtype, device, bias=True, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=bias)
    with torch.no_grad():
        conv.weight.mul_(3.0)  # default init is small; a wider spread tests the summed weights
        if bias:
            conv.bias.normal_()
    return conv.to(device, dtype).requires_grad_(False)


def _x(shape, dtype, device, channels_last, seed=1):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _plain(x, conv):
    return conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _check(method, x, conv, dtype, what):
    out = REWRITES[method](x, conv)
    n, _, h, w = x.shape
    assert out.shape == (n, conv.out_channels, 2 * h, 2 * w) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last) == model_ops._is_channels_last(x)
    conv64 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=conv.bias is not None)
    conv64.load_state_dict(conv.state_dict())
    conv64 = conv64.to(x.device, torch.float64)
    assert_parity(out, _plain(x, conv), _plain(x.double(), conv64), dtype, what)
    return out


SD_SHAPES = [
    # (batch, channels, input size): SD-1.x U-Net upsamplers at 8->16, 16->32, 32->64 latents
    # (batch 2 with guidance), the VAE decoder's at 64->128, 128->256 (512 ch), 256->512 (256 ch)
    pytest.param((2, 1280, 8), id="unet-c1280-8"),
    pytest.param((2, 1280, 16), id="unet-c1280-16"),
    pytest.param((2, 640, 32), id="unet-c640-32"),
    pytest.param((1, 512, 64), id="vae-c512-64"),
    pytest.param((1, 512, 128), id="vae-c512-128"),
    pytest.param((1, 256, 256), id="vae-c256-256"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("method", sorted(REWRITES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SD_SHAPES)
def test_sd_shapes(device, shape, dtype, method):
    n, c, s = shape
    if device.type == "cpu":
        # the channel counts of SD, fewer pixels (and channels in half precision: CPU convs in
        # float16/bfloat16 are slow)
        c, s = (c, min(s, 8)) if dtype == torch.float32 else (min(c, 256), min(s, 8))
    skip_large_under_sanitizer(n * c * 4 * s * s, device)
    x = _x((n, c, s, s), dtype, device, channels_last=True)
    _check(method, x, _conv(c, c, dtype, device), dtype, f"{method} {(n, c, s, s)} {dtype}")


@pytest.mark.parametrize("method", sorted(REWRITES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", [
    pytest.param(((2, 8, 5, 7), 6, True), id="odd-h-w"),        # rows and columns differ, odd
    pytest.param(((1, 3, 1, 1), 4, True), id="one-pixel"),      # every tap but one reads padding
    pytest.param(((3, 16, 4, 4), 16, False), id="no-bias"),     # bias=None
    pytest.param(((1, 4, 6, 3), 12, True), id="cout-gt-cin"),   # O != C: the phase index (p, q, o)
])
def test_edge_cases(device, case, channels_last, method):
    shape, cout, bias = case
    x = _x(shape, torch.float32, device, channels_last)
    _check(method, x, _conv(shape[1], cout, torch.float32, device, bias), torch.float32, str(case))


@pytest.mark.parametrize("method", sorted(REWRITES))
def test_float64_is_exact_up_to_rounding(method):
    # The summed weights give the same sums in another order: float64 agrees to ~1e-15.
    x = _x((2, 8, 6, 5), torch.float64, "cpu", channels_last=False)
    conv = _conv(8, 8, torch.float64, "cpu")
    ref = _plain(x, conv)
    err = (REWRITES[method](x, conv) - ref).abs().max().item()
    assert err <= 1e-12 * ref.abs().max().item()


@pytest.mark.parametrize("method", sorted(REWRITES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradients_match_the_plain_path(method, channels_last):
    conv = _conv(6, 5, torch.float64, "cpu").requires_grad_(True)
    x = _x((2, 6, 4, 5), torch.float64, "cpu", channels_last).requires_grad_(True)
    g = torch.randn(2, 5, 8, 10, dtype=torch.float64)
    grads = []
    for fn in (_plain, REWRITES[method]):
        x.grad = None
        conv.zero_grad()
        (fn(x, conv) * g).sum().backward()
        grads.append((x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["subpixel", "transposed"])
def test_in_place_weight_updates_are_seen(device, monkeypatch, method):
    # The summed weights are made at every call (a captured CUDA graph must see LoRA merges).
    monkeypatch.setenv("LDMFAST_UPSAMPLE_CONV", method)
    conv = _conv(4, 4, torch.float32, device)
    x = _x((1, 4, 5, 5), torch.float32, device, channels_last=False)
    before = model_ops.upsample_conv(x, conv)
    with torch.no_grad():
        conv.weight.add_(1.0)
        conv.bias.sub_(2.0)
    after = model_ops.upsample_conv(x, conv)
    torch.testing.assert_close(after, _plain(x, conv), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(before, after)


def _count_calls(monkeypatch):
    calls = []
    for name in ("_upsample_conv_subpixel", "_upsample_conv_transposed"):
        fn = getattr(model_ops, name)
        monkeypatch.setattr(model_ops, name, lambda x, c, fn=fn, name=name: calls.append(name) or fn(x, c))
    return calls


@pytest.mark.parametrize("env, shape, taken", [
    ("plain", (1, 8, 64, 64), []),
    ("subpixel", (1, 8, 2, 2), ["_upsample_conv_subpixel"]),
    ("transposed", (1, 8, 2, 2), ["_upsample_conv_transposed"]),
    ("", (1, 8, 64, 64), ["_upsample_conv_subpixel"]),   # unset: auto
    ("auto", (2, 8, 16, 16), []),                        # the U-Net's 16x16 level at batch 2
    ("auto", (2, 8, 32, 32), ["_upsample_conv_subpixel"]),
])
def test_method_choice(monkeypatch, env, shape, taken):
    monkeypatch.setenv("LDMFAST_UPSAMPLE_CONV", env)
    calls = _count_calls(monkeypatch)
    conv = _conv(8, 8, torch.float16, "cpu")
    x = _x(shape, torch.float16, "cpu", channels_last=True)
    out = model_ops.upsample_conv(x, conv)
    assert calls == taken
    assert out.shape == (shape[0], 8, 2 * shape[2], 2 * shape[3])


def test_auto_rule_on_the_sd_shapes():
    # fp16: the U-Net's 8x8 and 16x16 levels at batch 2 keep the plain path (the weight sums
    # would cost more than they save); its 32x32 level and the VAE decoder's are rewritten.
    w = torch.empty(1, 1, 3, 3, dtype=torch.float16)
    pays = {s: model_ops._subpixel_pays(torch.empty(n, 1, s, s), w) for n, s in
            [(2, 8), (2, 16), (2, 32), (1, 64), (1, 128), (1, 256)]}
    assert pays == {8: False, 16: False, 32: True, 64: True, 128: True, 256: True}


def test_plain_where_the_rewrite_does_not_apply(monkeypatch):
    monkeypatch.setenv("LDMFAST_UPSAMPLE_CONV", "subpixel")
    calls = _count_calls(monkeypatch)
    x = _x((1, 4, 5, 5), torch.float32, "cpu", channels_last=False)
    strided = nn.Conv2d(4, 4, 3, 2, 1)
    one = nn.Conv2d(4, 4, 1)
    for conv in (strided, one):
        torch.testing.assert_close(model_ops.upsample_conv(x, conv), _plain(x, conv))
    with model_ops.use_reference_ops(True):
        model_ops.upsample_conv(x, _conv(4, 4, torch.float32, "cpu"))
    model_ops.upsample_conv(x.double(), _conv(4, 4, torch.float64, "cpu"))  # float64: reference
    assert calls == []


def test_bad_method_names_the_variable(monkeypatch):
    monkeypatch.setenv("LDMFAST_UPSAMPLE_CONV", "bicubic")
    with pytest.raises(ValueError, match="LDMFAST_UPSAMPLE_CONV"):
        model_ops.upsample_conv(torch.zeros(1, 1, 2, 2), nn.Conv2d(1, 1, 3, 1, 1))


def test_graph_settings_include_the_method(monkeypatch):
    monkeypatch.setenv("LDMFAST_UPSAMPLE_CONV", "plain")
    a = model_ops.graph_settings()
    monkeypatch.setenv("LDMFAST_UPSAMPLE_CONV", "subpixel")
    assert model_ops.graph_settings() != a


@pytest.mark.parametrize("method", ["subpixel", "transposed"])
def test_models_match_the_plain_path(monkeypatch, method):
    # Both upsamplers of the model layer (U-Net and autoencoder decoder) take the rewrite.
    from ldmfast.models import AutoencoderKL
    from test_autoencoder import tiny_dd
    from test_unet import inputs, tiny

    u = tiny()
    ae = AutoencoderKL(tiny_dd(), embed_dim=4).eval()
    x, t, ctx = inputs()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    outs = {}
    for env in ("plain", method):
        monkeypatch.setenv("LDMFAST_UPSAMPLE_CONV", env)
        calls = _count_calls(monkeypatch) if env == method else []
        with torch.no_grad():
            outs[env] = (u(x, t, context=ctx), ae.decode(z))
        if env == method:
            assert len(calls) >= 2, calls
        monkeypatch.undo()
    for a, b in zip(outs["plain"], outs[method]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_torch_compile_fullgraph(device, monkeypatch):
    # The rewrite traces as one graph (no host value read, e.g. z's storage offset, and no CUDA
    # capture query) and inductor keeps the strides the interleaving view reads; both layouts,
    # from an empty tap cache.
    monkeypatch.setenv("LDMFAST_UPSAMPLE_CONV", "subpixel")
    monkeypatch.setattr(model_ops, "_TAPS", {})
    conv = _conv(8, 6, torch.float32, device)
    f = torch.compile(lambda x: model_ops.upsample_conv(x, conv), fullgraph=True)
    for channels_last in (False, True):
        x = _x((2, 8, 6, 5), torch.float32, device, channels_last)
        torch.testing.assert_close(f(x), _plain(x, conv), rtol=1e-5, atol=1e-5)


def test_tap_table_made_in_inference_mode_serves_training(monkeypatch):
    # The first call for a dtype may come under inference_mode; the kept table is a normal tensor.
    monkeypatch.setattr(model_ops, "_TAPS", {})
    x = _x((1, 4, 5, 5), torch.float64, "cpu", channels_last=False)
    with torch.inference_mode():
        REWRITES["subpixel"](x, _conv(4, 4, torch.float64, "cpu"))
    assert not any(t.is_inference() for t in model_ops._TAPS.values())
    conv = _conv(4, 4, torch.float64, "cpu").requires_grad_(True)
    REWRITES["subpixel"](x, conv).sum().backward()
    assert conv.weight.grad is not None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("method", ["subpixel", "transposed"])
def test_cuda_graph_capture_and_weight_update(monkeypatch, method):
    # Captured from an empty tap cache (the table is made inside the capture, not kept), replayed
    # after an in-place weight update: the replay reads the new weights.
    monkeypatch.setenv("LDMFAST_UPSAMPLE_CONV", method)
    monkeypatch.setattr(model_ops, "_TAPS", {})
    conv = _conv(64, 64, torch.float16, "cuda").to(memory_format=torch.channels_last)
    x = _x((2, 64, 16, 16), torch.float16, "cuda", channels_last=True)
    side = torch.cuda.Stream()  # warm-up off the capture (cuDNN's first call), then an empty cache
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        model_ops.upsample_conv(x, conv)
    torch.cuda.current_stream().wait_stream(side)
    model_ops._TAPS.clear()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = model_ops.upsample_conv(x, conv)
    assert not model_ops._TAPS
    with torch.no_grad():
        conv.weight.mul_(-0.5)
        conv.bias.add_(1.0)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    conv64 = nn.Conv2d(64, 64, 3, 1, 1).to("cuda", torch.float64)
    conv64.load_state_dict(conv.state_dict())
    assert_parity(y, _plain(x, conv), _plain(x.double(), conv64), torch.float16, f"graph {method}")
