"""ONNX translations of ldmfast's fused ops, for the dynamo exporter's ``custom_translation_table``.

Each function rebuilds one ``torch.ops.ldmfast.*`` op from standard ONNX ops (default domain
only, so any runtime or TensorRT parser reads the graph) and follows ``ldmfast.ref.ops``
exactly: the same float32 compute regions, entered and left with Cast nodes, so a float16
graph keeps GroupNorm statistics, attention scores and softmax in float32. That is the whole
fix for the "fp16 VAE/U-Net gives NaN, black images" failure: the sums of squares of a GroupNorm
over 64x64x32 activations and the unnormalised attention logits are what overflow float16.

The functions are traced (onnxscript "trace-only"): the exporter calls them with symbolic tensors
and the op's Python scalars, so shapes, ranks and attributes are ordinary Python values here.

GroupNorm has two forms:
- ``"group"``: ``GroupNormalization`` with per-channel scale/bias, which is the opset-21 definition
  (opset 18's version had per-group scale and is deprecated), so it needs opset >= 21.
- ``"instance"``: Reshape (N, G, -1) -> ``InstanceNormalization`` -> Reshape -> Mul/Add, valid at
  every opset this package exports; it is the pattern TensorRT's ONNX importer and its Myelin
  fusions turn back into one GroupNorm kernel.
Attention has two forms:
- ``"matmul"``: Transpose, MatMul, Mul(scale), Softmax, MatMul, Transpose (all opsets; the pattern
  TensorRT fuses into its fused multi-head attention).
- ``"onnx"``: the opset-23 ``Attention`` op on (B, H, L, D) tensors.
"""
from __future__ import annotations

from onnxscript import ir
from onnxscript import opset18 as op

__all__ = ["GROUP_NORM_FORMS", "ATTENTION_FORMS", "translation_table", "resolve_forms"]

GROUP_NORM_FORMS = ("instance", "group")
ATTENTION_FORMS = ("matmul", "onnx")

_F32 = ir.DataType.FLOAT
_F64 = ir.DataType.DOUBLE


def _compute_type(x):
    # The reference computes in float32, or float64 for float64 inputs (its own test path).
    return _F64 if x.dtype == _F64 else _F32


def _to(x, dtype):
    return x if x.dtype == dtype else op.Cast(x, to=dtype)


def _const(value, dtype):
    return op.Constant(value=ir.tensor([value], dtype=dtype))


def _channel_shape(rank: int):
    """A shape that broadcasts a (C,) vector against (N, C, *spatial)."""
    return op.Constant(value_ints=[-1] + [1] * (rank - 2))


def _group_norm_affine_silu(y, weight, bias, rank, silu, f):
    y = op.Mul(y, op.Reshape(_to(weight, f), _channel_shape(rank)))
    y = op.Add(y, op.Reshape(_to(bias, f), _channel_shape(rank)))
    if silu:
        # Sigmoid * x rather than the opset-22 HardSwish-like fused op: every runtime has both.
        y = op.Mul(y, op.Sigmoid(y))
    return y


def _group_norm_input(x, emb, f):
    xf = _to(x, f)
    if emb is not None:
        # emb (N, C) added per channel; done in the compute type, never overflows float16.
        spatial = op.Constant(value_ints=list(range(2, len(x.shape))))
        xf = op.Add(xf, op.Unsqueeze(_to(emb, f), spatial))
    return xf


def group_norm_silu_instance(x, weight, bias, num_groups: int, eps: float = 1e-5,
                             silu: bool = True, emb=None):
    """ldmfast::group_norm_silu as Reshape-InstanceNormalization-Reshape-affine(-SiLU)."""
    f = _compute_type(x)
    rank = len(x.shape)
    xf = _group_norm_input(x, emb, f)
    grouped = op.Reshape(xf, op.Constant(value_ints=[0, num_groups, -1]))
    ones = op.Constant(value=ir.tensor([1.0] * num_groups, dtype=f))
    zeros = op.Constant(value=ir.tensor([0.0] * num_groups, dtype=f))
    y = op.InstanceNormalization(grouped, ones, zeros, epsilon=eps)
    y = op.Reshape(y, op.Shape(xf))
    y = _group_norm_affine_silu(y, weight, bias, rank, silu, f)
    return op.CastLike(y, x)


def group_norm_silu_group(x, weight, bias, num_groups: int, eps: float = 1e-5,
                          silu: bool = True, emb=None):
    """ldmfast::group_norm_silu as the opset-21 GroupNormalization (+ SiLU)."""
    from onnxscript import opset21

    f = _compute_type(x)
    xf = _group_norm_input(x, emb, f)
    # stash_type=1 (float32) is the default; the input is already in the compute type anyway.
    y = opset21.GroupNormalization(xf, _to(weight, f), _to(bias, f), epsilon=eps,
                                   num_groups=num_groups)
    if silu:
        y = op.Mul(y, op.Sigmoid(y))
    return op.CastLike(y, x)


def _scale(q, scale):
    return float(q.shape[-1]) ** -0.5 if scale is None else float(scale)


def attention_matmul(q, k, v, scale=None):
    """ldmfast::attention on (B, L, H, D): scores and softmax in float32, as the reference."""
    f = _compute_type(q)
    s = _scale(q, scale)
    qh = _to(op.Transpose(q, perm=[0, 2, 1, 3]), f)   # (B, H, Lq, D)
    kt = _to(op.Transpose(k, perm=[0, 2, 3, 1]), f)   # (B, H, D, Lk)
    vh = _to(op.Transpose(v, perm=[0, 2, 1, 3]), f)   # (B, H, Lk, D)
    scores = op.Mul(op.MatMul(qh, kt), _const(s, f))
    w = op.Softmax(scores, axis=-1)
    out = op.Transpose(op.MatMul(w, vh), perm=[0, 2, 1, 3])
    return op.CastLike(out, q)


def attention_onnx(q, k, v, scale=None):
    """ldmfast::attention as the opset-23 Attention op, fed float32 like the reference."""
    from onnxscript import opset23

    f = _compute_type(q)
    s = _scale(q, scale)
    qh, kh, vh = (_to(op.Transpose(t, perm=[0, 2, 1, 3]), f) for t in (q, k, v))
    # Attention-23 always declares four outputs (Y, present K/V, QK^T); only Y is used.
    out, _, _, _ = opset23.Attention(qh, kh, vh, scale=s, softmax_precision=int(f))
    return op.CastLike(op.Transpose(out, perm=[0, 2, 1, 3]), q)


def ddim_step(x, eps, eps_uncond, noise, alpha_t: float, alpha_prev: float, sigma_t: float,
              guidance_scale: float, alpha_t_t=None, alpha_prev_t=None, sigma_t_t=None,
              guidance_scale_t=None):
    """ldmfast::ddim_step (Song et al. 2021, eq. 12) in the compute type; returns (x_prev, x0)."""
    f = _compute_type(x)
    rank = len(x.shape)

    def scalar(value, tensor):
        if tensor is None:
            return _const(value, f)
        t = _to(tensor, f)
        if len(tensor.shape) == 1:  # per-sample (N,) -> (N, 1, ...)
            t = op.Reshape(t, op.Constant(value_ints=[-1] + [1] * (rank - 1)))
        return t

    xf, e = _to(x, f), _to(eps, f)
    if eps_uncond is not None:
        u = _to(eps_uncond, f)
        e = op.Add(u, op.Mul(scalar(guidance_scale, guidance_scale_t), op.Sub(e, u)))
    a_t = scalar(alpha_t, alpha_t_t)
    a_prev = scalar(alpha_prev, alpha_prev_t)
    sig = scalar(sigma_t, sigma_t_t)
    one, zero = _const(1.0, f), _const(0.0, f)
    pred_x0 = op.Div(op.Sub(xf, op.Mul(op.Sqrt(op.Sub(one, a_t)), e)), op.Sqrt(a_t))
    # 1 - a_prev - sigma^2 is clamped at 0 as in the reference: rounding must not make it < 0.
    direction = op.Sqrt(op.Max(op.Sub(op.Sub(one, a_prev), op.Mul(sig, sig)), zero))
    x_prev = op.Add(op.Mul(op.Sqrt(a_prev), pred_x0), op.Mul(direction, e))
    if noise is not None:
        x_prev = op.Add(x_prev, op.Mul(sig, _to(noise, f)))
    return op.CastLike(x_prev, x), op.CastLike(pred_x0, x)


def geglu(h):
    """ldmfast::geglu: h[..., :n] * gelu(h[..., n:]) with the exact (erf) GELU, in the compute
    type (Split into halves needs opset 18, the exporter's minimum here)."""
    f = _compute_type(h)
    a, gate = op.Split(_to(h, f), axis=-1, num_outputs=2)
    half, one = _const(0.5, f), _const(1.0, f)
    gelu = op.Mul(op.Mul(half, gate), op.Add(one, op.Erf(op.Mul(gate, _const(0.7071067811865476, f)))))
    return op.CastLike(op.Mul(a, gelu), h)


def resolve_forms(opset: int, group_norm: str = "auto", attention: str = "auto"):
    """The (group_norm, attention) forms for an opset; "auto" picks the widely fused ones."""
    if group_norm == "auto":
        # InstanceNormalization everywhere: TensorRT 8.6+ and onnxruntime both fuse it, and it
        # keeps one graph valid from opset 18 up. GroupNormalization is opt-in at opset >= 21.
        group_norm = "instance"
    if attention == "auto":
        attention = "matmul"
    if group_norm not in GROUP_NORM_FORMS:
        raise ValueError(f"group_norm must be one of {GROUP_NORM_FORMS} or 'auto', "
                         f"not {group_norm!r}")
    if attention not in ATTENTION_FORMS:
        raise ValueError(f"attention must be one of {ATTENTION_FORMS} or 'auto', not {attention!r}")
    if group_norm == "group" and opset < 21:
        raise ValueError("group_norm='group' needs opset >= 21 (GroupNormalization with "
                         f"per-channel scale); opset {opset} was requested")
    if attention == "onnx" and opset < 23:
        raise ValueError(f"attention='onnx' needs opset >= 23 (the Attention op); opset {opset} "
                         "was requested")
    return group_norm, attention


def translation_table(opset: int = 18, group_norm: str = "auto", attention: str = "auto"):
    """{torch.ops.ldmfast.<op>.default: onnxscript function} for ``torch.onnx.export``."""
    import torch

    import ldmfast.ops  # noqa: F401  (registers torch.ops.ldmfast)

    gn_form, attn_form = resolve_forms(opset, group_norm, attention)
    ops = torch.ops.ldmfast
    return {
        ops.group_norm_silu.default:
            group_norm_silu_instance if gn_form == "instance" else group_norm_silu_group,
        ops.attention.default: attention_matmul if attn_form == "matmul" else attention_onnx,
        ops.ddim_step.default: ddim_step,
        ops.geglu.default: geglu,
    }
