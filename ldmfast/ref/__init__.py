"""Plain-PyTorch references with exactly the LDM semantics.

Every kernel, fallback, ONNX decomposition and test derives from these. They import nothing of
the package (STYLE.md section 7) and compute in the dtype they are given, except where the
original model computes in float32 (GroupNorm statistics, softmax).
"""
from .ops import attention, ddim_step, geglu, group_norm_silu

__all__ = ["attention", "ddim_step", "geglu", "group_norm_silu"]
