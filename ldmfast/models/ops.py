"""The fused ops the model layer calls, and the switch to their plain-PyTorch references.

Modules call ``group_norm_silu``, ``attention`` and ``geglu`` from here, never ``ldmfast.ops`` directly, so
one flag selects the implementation for the whole model layer: the compiled ops by default, the
references of ``ldmfast.ref`` when ``use_reference_ops(True)`` is in effect (the benchmark's
"ldmfast with reference ops" provider) or when the compiled library is not built (logged once); float64 inputs, and CUDA inputs
when only the CPU kernels were built, use the references too.
The choice is read when a module runs, i.e. at trace time under ``torch.compile``.
"""
from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from .. import ref as _ref

log = logging.getLogger("ldmfast")

_state = {"reference": False, "compiled": None, "warned": False}


def _compiled():
    if _state["compiled"] is None:
        try:
            from .. import ops as compiled
        # the extension is optional for the model layer; a library built for another torch
        # fails to load with OSError/RuntimeError rather than ImportError
        except (ImportError, OSError, RuntimeError) as e:
            compiled = False
            if not _state["warned"]:
                log.warning("ldmfast's compiled ops are unavailable (%s); the model layer uses "
                            "the plain-PyTorch references", e)
                _state["warned"] = True
        _state["compiled"] = compiled
    return _state["compiled"]


def _impl(x=None):
    # float64 (used by tests as ground truth) has no kernels, nor has CUDA in a CPU-only build;
    # dtype and device are static under tracing, so this is no data-dependent branch
    if _state["reference"] or (x is not None and x.dtype == torch.float64):
        return _ref
    compiled = _compiled()
    if not compiled:
        return _ref
    if x is not None and x.device.type == "cuda" and not compiled.cuda_available():
        return _ref
    return compiled


def using_reference_ops() -> bool:
    """Whether the model layer currently calls ``ldmfast.ref`` instead of ``ldmfast.ops``."""
    return _impl() is _ref


class use_reference_ops:
    """``use_reference_ops(True)`` switches the model layer, and the samplers' DDIM step, to
    ``ldmfast.ref`` (e.g. on a GPU older than the CUDA kernels' sm_80).

    Called plainly it sets the flag for good; used as ``with use_reference_ops(True): ...`` it
    restores the previous setting on exit.
    """

    def __init__(self, flag: bool = True):
        self._previous = _state["reference"]
        _state["reference"] = bool(flag)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _state["reference"] = self._previous
        return False


def group_norm_silu(x, weight, bias, num_groups: int, eps: float = 1e-5, silu: bool = True,
                    emb=None):
    """silu(GroupNorm(x + emb)) (``silu=False``: plain GroupNorm), float32 statistics."""
    return _impl(x).group_norm_silu(x, weight, bias, num_groups, eps, silu, emb)


# Head dims the compiled kernels take (csrc/include/ldmfast/attention.h): the CUDA kernel is
# instantiated for the U-Net's widths; the autoencoders' single 512-wide head and cin256's
# 192..960-wide ones go to PyTorch's fused attention instead. A static shape check, made once
# at trace time.
_CUDA_HEAD_DIMS = frozenset((32, 40, 64, 80, 96, 128, 160))
_CPU_MAX_HEAD_DIM = 512


def _kernel_takes(q) -> bool:
    d = q.shape[-1]
    return d in _CUDA_HEAD_DIMS if q.device.type == "cuda" else d <= _CPU_MAX_HEAD_DIM


def attention(q, k, v, scale=None):
    """softmax(scale q k^T) v with (B, L, H, D) tensors whose last dim is contiguous."""
    impl = _impl(q)
    if impl is _ref or _kernel_takes(q):
        return impl.attention(q, k, v, scale)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         scale=q.shape[-1] ** -0.5 if scale is None else scale)
    return out.transpose(1, 2)


def geglu(h):
    """h[..., :n] * gelu(h[..., n:]), the exact (erf) GELU: the FeedForward's GEGLU gate."""
    return _impl(h).geglu(h)


def group_norm(x, norm, silu: bool = False, emb=None):
    """Applies an ``nn.GroupNorm`` module's parameters through the fused op."""
    return group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu, emb)


# ---- nearest 2x upsampling followed by a 3x3 conv ------------------------------------------------
# Every output pixel of conv3x3(upsample2x(x)) sees only a 2x2 window of x: the 3x3 taps that land
# on the same source pixel can share one summed weight. Per output phase (row parity p, column
# parity q) that is a 2x2 conv of x, so one conv of x with 4x the output channels and a 2x2
# kernel (padding 1: output (H+1) x (W+1), phase p at row i reads rows i-1+p and i+p) does 16
# instead of 36 multiply-adds per output pixel and channel pair; one strided copy then
# interleaves the four phases. The upsampled tensor is never made. The same sums make one
# stride-2 transposed conv with a 4x4 kernel (the `transposed` method).
UPSAMPLE_CONV_METHODS = ("auto", "plain", "subpixel", "transposed")
# FLOP per byte of the device the `auto` rule is set for (an H100 in fp16: about 600 TFLOP/s of
# dense matmul over 3 TB/s). The summed weights are made at every call, so that in-place weight
# updates reach captured CUDA graphs: one GEMM per phase reads the 9 taps and writes 4, 52
# weights moved per channel pair. Where x is small (the U-Net's 8x8 and 16x16 levels at batch
# 2: 1280 channels, 170 MB of weights moved in fp16) that costs more than it saves.
_FLOP_PER_BYTE = 200.0
_TAPS = {}  # (dtype, device) -> the (2, 2, 3) tap table, made once outside graph capture


def upsample_conv_method() -> str:
    """``LDMFAST_UPSAMPLE_CONV``: auto (default), plain, subpixel or transposed."""
    method = os.environ.get("LDMFAST_UPSAMPLE_CONV", "auto") or "auto"
    if method not in UPSAMPLE_CONV_METHODS:
        raise ValueError(f"LDMFAST_UPSAMPLE_CONV must be one of {', '.join(UPSAMPLE_CONV_METHODS)}; "
                         f"got {method!r}")
    return method


def _subpixel_pays(x, weight) -> bool:
    n, _, h, w = x.shape
    saved = 2 * n * (36 * h * w - 16 * (h + 1) * (w + 1))  # FLOP per (out, in) channel pair
    return saved > 52 * weight.element_size() * _FLOP_PER_BYTE


def _make_taps(like):
    ar = functools.partial(torch.arange, device=like.device)
    p, a, d = ar(2).view(2, 1, 1), ar(2).view(1, 2, 1), ar(3).view(1, 1, 3)
    # upsampled row 2i+p+d-1 is x's row i + floor((p+d-1)/2)
    return (torch.div(p + d - 1, 2, rounding_mode="floor") == p + a - 1).to(like.dtype)


def _subpixel_taps(like):
    """taps[p, a, d] = 1 where 3x3 row d of output row 2i+p lands on x's row i-1+p+a (the
    same table serves columns). Made by kernels (arange), never copied from the host, so it can
    be made inside a CUDA-graph capture; kept only when made outside one (a tensor made during
    capture holds its values only once the graph replays). Under torch.compile it is part of the
    graph (constant-folded), and no capture query reaches the trace."""
    if torch.compiler.is_compiling():
        return _make_taps(like)
    key = (like.dtype, like.device)
    taps = _TAPS.get(key)
    if taps is None:
        with torch.inference_mode(False):  # a kept table must serve calls that train too
            taps = _make_taps(like)
        if not (like.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _TAPS[key] = taps
    return taps


def _subpixel_weight(weight, channels_last: bool):
    """(4 O, C, 2, 2) weight of the four phases (channel index (p, q, o)) from a (O, C, 3, 3)
    one, in the layout the conv reads."""
    o, c = weight.shape[:2]
    taps = _subpixel_taps(weight)
    if torch.is_grad_enabled() and weight.requires_grad:  # training: a differentiable path
        k = torch.einsum("pad,qbe,ocde->pqocab", taps, taps, weight).reshape(4 * o, c, 2, 2)
        return k.contiguous(memory_format=torch.channels_last) if channels_last else k
    # Inference: one small GEMM per phase, written where the conv reads it (no permute copy).
    m = torch.einsum("pad,qbe->pqabde", taps, taps).reshape(4, 4, 9)  # (phase, 2x2 tap, 3x3 tap)
    if channels_last:
        w9 = weight.permute(0, 2, 3, 1).reshape(o, 9, c)  # a view for a channels_last weight
        k = torch.empty((4, o, 4, c), dtype=weight.dtype, device=weight.device)
        for ph in range(4):
            torch.matmul(m[ph], w9, out=k[ph])
        return k.view(4 * o, 2, 2, c).permute(0, 3, 1, 2)
    w9 = weight.reshape(o * c, 9)
    k = torch.empty((4, o * c, 4), dtype=weight.dtype, device=weight.device)
    for ph in range(4):
        torch.mm(w9, m[ph].t(), out=k[ph])
    return k.view(4 * o, c, 2, 2)


def _is_channels_last(x) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _upsample_conv_subpixel(x, conv):
    n, _, h, w = x.shape
    o = conv.out_channels
    channels_last = _is_channels_last(x)
    bias = None if conv.bias is None else conv.bias.repeat(4)
    z = F.conv2d(x, _subpixel_weight(conv.weight, channels_last), bias, padding=1)
    # y[n, o, 2i+p, 2j+q] = z[n, (p, q, o), i+p, j+q]: a strided view of z, whatever its layout.
    sn, sc, sh, sw = z.stride()
    phases = z.as_strided((n, o, h, 2, w, 2), (sn, sc, sh, 2 * o * sc + sh, sw, o * sc + sw))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.empty((n, o, 2 * h, 2 * w), dtype=z.dtype, device=z.device, memory_format=fmt)
    y.view(n, o, h, 2, w, 2).copy_(phases)
    return y


def _upsample_conv_transposed(x, conv):
    # Tap k of the 4x4 kernel is the subpixel tap (p, a) = (1, 1), (0, 1), (1, 0), (0, 0).
    t = _subpixel_taps(conv.weight).reshape(4, 3)
    t = torch.stack((t[3], t[1], t[2], t[0]))
    k = torch.einsum("ad,be,ocde->coab", t, t, conv.weight)
    return F.conv_transpose2d(x, k, conv.bias, stride=2, padding=1)


def upsample_conv(x, conv):
    """``conv(F.interpolate(x, scale_factor=2, mode="nearest"))`` for a 4-D x and a 3x3,
    stride-1, padding-1 ``nn.Conv2d``, computed without the upsampled tensor where that pays
    (``LDMFAST_UPSAMPLE_CONV``: ``auto`` chooses by the rule above, ``plain`` always upsamples,
    ``subpixel`` and ``transposed`` always rewrite). The rewrites sum weights, so they differ
    from the plain path by rounding only. The references, float64 inputs and ``torch.export``
    (so ONNX and TensorRT) take the plain path, the original graph."""
    method = upsample_conv_method()
    plain = (method == "plain" or _impl(x) is _ref or x.dim() != 4 or torch.compiler.is_exporting()
             or conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1)
             or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros"
             or (method == "auto" and not _subpixel_pays(x, conv.weight)))
    if plain:
        return conv(F.interpolate(x, scale_factor=2, mode="nearest"))
    if method == "transposed":
        return _upsample_conv_transposed(x, conv)
    return _upsample_conv_subpixel(x, conv)


# ---- a conv plus a 1x1 skip conv ------------------------------------------------------------------
def conv_plus_skip(h, conv, x, skip):
    """``conv(h) + skip(x)`` (a ResBlock's output when its channel count changes) with ``skip`` a
    1x1, stride-1 ``nn.Conv2d``: its GEMM accumulates straight into conv's output (beta = 1, in
    place) and its bias joins conv's, so the sum is no pass of its own over the output (a read
    of two tensors and a write of one, 67 MB each at the VAE's 512x512 level). The plain sum
    where that does not apply: the references, float64, a gradient to keep (in-place updates
    and autograd), ``torch.export`` (the exported graph keeps each bias an initializer of its
    own, for TensorRT refit by state dict), other convs, or layouts that give no 2-D view."""
    plain = (_impl(x) is _ref or torch.is_grad_enabled() or x.dim() != 4 or torch.compiler.is_exporting()
             or skip.kernel_size != (1, 1) or skip.stride != (1, 1) or skip.padding != (0, 0)
             or skip.groups != 1 or not isinstance(conv, nn.Conv2d))
    if plain:
        return conv(h) + skip(x)
    bias = conv.bias if skip.bias is None else skip.bias if conv.bias is None else conv.bias + skip.bias
    out = conv._conv_forward(h, conv.weight, bias)
    n, cin, hh, ww = x.shape
    cout = out.shape[1]
    w = skip.weight.view(cout, cin)
    same_size = out.shape[2:] == x.shape[2:]
    if same_size and _is_channels_last(out) and _is_channels_last(x):
        out.permute(0, 2, 3, 1).view(-1, cout).addmm_(x.permute(0, 2, 3, 1).view(-1, cin), w.t())
        return out
    if same_size and out.is_contiguous() and x.is_contiguous():
        out.view(n, cout, hh * ww).baddbmm_(w.expand(n, cout, cin), x.view(n, cin, hh * ww))
        return out
    return out + F.conv2d(x, skip.weight)  # no common 2-D view: skip's bias is already in out


class fp16_accumulation:
    """``fp16_accumulation(True)`` lets cuBLAS accumulate float16 GEMMs in float16
    (``torch.backends.cuda.matmul.allow_fp16_accumulation``): faster on some GPUs, less accurate
    (float16 sums of 320..1280 products). Off by default; an explicit opt-in only.

    Called plainly it sets the flag for good; as ``with fp16_accumulation(True): ...`` it restores
    the previous setting on exit. Raises NotImplementedError where torch has no such flag.
    """

    def __init__(self, enabled: bool = True):
        matmul = torch.backends.cuda.matmul
        if not hasattr(matmul, "allow_fp16_accumulation"):
            raise NotImplementedError(f"torch {torch.__version__} has no "
                                      "torch.backends.cuda.matmul.allow_fp16_accumulation")
        self._previous = matmul.allow_fp16_accumulation
        matmul.allow_fp16_accumulation = bool(enabled)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_fp16_accumulation = self._previous
        return False


def fp16_accumulation_enabled() -> bool:
    matmul = torch.backends.cuda.matmul
    return bool(getattr(matmul, "allow_fp16_accumulation", False))


def graph_settings() -> tuple:
    """The process-wide choices a captured CUDA graph freezes: which ops the model layer calls,
    the cuBLAS/cuDNN math modes, and the kernel choices the CUDA binding reads from the
    environment. Part of every graph key (``ldmfast.pipeline``, ``ldmfast.dropin``), so changing
    one captures anew instead of replaying the old choice."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    return (using_reference_ops(), fp16_accumulation_enabled(), matmul.allow_tf32,
            getattr(matmul, "allow_fp16_reduced_precision_reduction", None),
            getattr(matmul, "allow_bf16_reduced_precision_reduction", None),
            cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic,
            *(os.environ.get(k) for k in ("LDMFAST_ATTENTION_KERNEL", "LDMFAST_GN_KERNEL",
                                          "LDMFAST_ATTENTION_SHORT_CTAS_PER_SM", "LDMFAST_ATTENTION_SHORT_ROWS",
                                          "LDMFAST_UPSAMPLE_CONV")))
