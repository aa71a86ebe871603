"""The fused ops the model layer calls, and the switch to their plain-PyTorch references.

Modules call ``group_norm_silu``, ``attention`` and ``geglu`` from here, never ``ldmfast.ops`` directly, so
one flag selects the implementation for the whole model layer: the compiled ops by default, the
references of ``ldmfast.ref`` when ``use_reference_ops(True)`` is in effect (the benchmark's
"ldmfast with reference ops" provider) or when the compiled library is not built (logged once); float64 inputs, and CUDA inputs
when only the CPU kernels were built, use the references too.
The choice is read when a module runs, i.e. at trace time under ``torch.compile``.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

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
                                          "LDMFAST_ATTENTION_SHORT_CTAS_PER_SM")))
