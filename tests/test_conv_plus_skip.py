"""conv_plus_skip: conv(h) + skip(x) with the 1x1 skip conv's GEMM accumulating into conv's output
(the model layer's ResBlocks that change channel count), against the plain sum in float64
(STYLE.md section 4)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_parity
from ldmfast.models import ops as model_ops


def _convs(cin, cout, dtype, device, bias=(True, True), seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cout, cout, 3, 1, 1, bias=bias[0])
    skip = nn.Conv2d(cin, cout, 1, bias=bias[1])
    for m in (conv, skip):
        with torch.no_grad():
            m.weight.mul_(2.0)
            if m.bias is not None:
                m.bias.normal_()
    return conv.to(device, dtype), skip.to(device, dtype)


def _inputs(n, cin, cout, s, dtype, device, channels_last, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, cout, s, s, generator=g).to(device, dtype)
    x = torch.randn(n, cin, s, s, generator=g).to(device, dtype)
    if channels_last:
        h, x = (t.contiguous(memory_format=torch.channels_last) for t in (h, x))
    return h, x


def _plain(h, conv, x, skip):
    return conv(h) + skip(x)


def _as64(m, device):
    m64 = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, bias=m.bias is not None)
    m64.load_state_dict(m.state_dict())
    return m64.to(device, torch.float64)


def _check(h, conv, x, skip, dtype, what):
    with torch.no_grad():
        out = model_ops.conv_plus_skip(h, conv, x, skip)
        ref = _plain(h, conv, x, skip)
        ref64 = _plain(h.double(), _as64(conv, h.device), x.double(), _as64(skip, h.device))
    assert out.shape == ref.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last) == model_ops._is_channels_last(h)
    assert_parity(out, ref, ref64, dtype, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", [
    # (N, Cin, Cout, size): SD U-Net up-path ResBlocks (960 -> 320 at 64x64, 2560 -> 1280 at 8x8),
    # the VAE decoder's 512 -> 256 nin shortcut, each with fewer pixels on CPU
    pytest.param((2, 960, 320, 8), id="unet-960-320"),
    pytest.param((2, 2560, 1280, 4), id="unet-2560-1280"),
    pytest.param((1, 512, 256, 8), id="vae-512-256"),
    pytest.param((3, 5, 7, 3), id="odd-sizes"),  # channel counts no vector width divides
])
def test_parity(device, case, channels_last, dtype):
    n, cin, cout, s = case
    if device.type == "cpu" and dtype != torch.float32:
        cin, cout = min(cin, 64), min(cout, 32)  # CPU half-precision convs are slow
    conv, skip = _convs(cin, cout, dtype, device)
    h, x = _inputs(n, cin, cout, s, dtype, device, channels_last)
    _check(h, conv, x, skip, dtype, f"{case} {dtype} {'cl' if channels_last else 'nchw'}")


@pytest.mark.parametrize("bias", [(True, False), (False, True), (False, False)], ids=str)
def test_missing_biases(bias):
    conv, skip = _convs(6, 4, torch.float32, "cpu", bias)
    h, x = _inputs(2, 6, 4, 5, torch.float32, "cpu", channels_last=True)
    _check(h, conv, x, skip, torch.float32, f"bias {bias}")


def _count_accumulates(monkeypatch):
    calls = []
    for name in ("addmm_", "baddbmm_"):
        fn = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, fn=fn, name=name, **k: calls.append(name) or fn(self, *a, **k))
    return calls


@pytest.mark.parametrize("channels_last, taken", [(True, ["addmm_"]), (False, ["baddbmm_"])])
def test_the_gemm_accumulates(monkeypatch, channels_last, taken):
    calls = _count_accumulates(monkeypatch)
    conv, skip = _convs(6, 4, torch.float32, "cpu")
    h, x = _inputs(2, 6, 4, 5, torch.float32, "cpu", channels_last)
    with torch.no_grad():
        model_ops.conv_plus_skip(h, conv, x, skip)
    assert calls == taken


def test_plain_sum_where_it_does_not_apply(monkeypatch):
    calls = _count_accumulates(monkeypatch)
    conv, skip = _convs(6, 4, torch.float32, "cpu")
    h, x = _inputs(2, 6, 4, 5, torch.float32, "cpu", channels_last=True)
    three = nn.Conv2d(6, 4, 3, 1, 1)
    mixed = x.contiguous()  # h channels_last, x NCHW: no common 2-D view (skip's bias once)
    with torch.no_grad():
        torch.testing.assert_close(model_ops.conv_plus_skip(h, conv, x, three), _plain(h, conv, x, three))
        torch.testing.assert_close(model_ops.conv_plus_skip(h, conv, mixed, skip), _plain(h, conv, mixed, skip),
                                   rtol=1e-5, atol=1e-5)
        with model_ops.use_reference_ops(True):
            model_ops.conv_plus_skip(h, conv, x, skip)
        # torch.export: each bias stays an initializer of its own (TensorRT refit; the manifest
        # test of test_export_onnx.py checks the exported graph itself)
        with monkeypatch.context() as m:
            m.setattr(torch.compiler, "is_exporting", lambda: True)
            model_ops.conv_plus_skip(h, conv, x, skip)
    # with a gradient to keep: the plain sum, and the gradients are the plain path's
    out = model_ops.conv_plus_skip(h, conv, x, skip)
    out.sum().backward()
    assert calls == [] and conv.weight.grad is not None and skip.weight.grad is not None


def test_weights_are_read_at_every_call():
    # Nothing is cached: an in-place update of either conv (a merged LoRA) shows in the next call.
    conv, skip = _convs(6, 4, torch.float32, "cpu")
    h, x = _inputs(2, 6, 4, 5, torch.float32, "cpu", channels_last=True)
    with torch.no_grad():
        model_ops.conv_plus_skip(h, conv, x, skip)
        skip.weight.add_(1.0)
        skip.bias.sub_(0.5)
        torch.testing.assert_close(model_ops.conv_plus_skip(h, conv, x, skip), _plain(h, conv, x, skip))


def test_models_use_it(monkeypatch):
    # The U-Net's and the autoencoder's channel-changing ResBlocks take the fused sum, and the
    # models' outputs are the plain sums' (float32, both layouts).
    from ldmfast.models import AutoencoderKL
    from test_autoencoder import tiny_dd
    from test_unet import inputs, tiny

    u = tiny()
    ae = AutoencoderKL(tiny_dd(), embed_dim=4).eval()
    x, t, ctx = inputs()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for fmt in (torch.contiguous_format, torch.channels_last):
            u, ae = u.to(memory_format=fmt), ae.to(memory_format=fmt)
            xf, zf = x.contiguous(memory_format=fmt), z.contiguous(memory_format=fmt)
            calls = _count_accumulates(monkeypatch)
            got = (u(xf, t, context=ctx), ae.decode(zf))
            monkeypatch.undo()
            assert len(calls) >= 2, calls
            with model_ops.use_reference_ops(True):
                want = (u(xf, t, context=ctx), ae.decode(zf))
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
