"""Deployment export: ONNX graphs of a LatentDiffusion's networks and TensorRT engines.

    from ldmfast.export import export_onnx
    paths = export_onnx(model, "out/sd15", height=512, width=512, batch=2, dtype="fp16")

``ldmfast.export.tensorrt`` builds and runs engines from those graphs; it imports TensorRT only
when used, so this package (and ``import ldmfast``) works without it. See docs/export.md.
"""
from __future__ import annotations

__all__ = ["export_onnx", "load_manifest", "translation_table", "build_engine", "TensorRTModule",
           "OPSETS"]

# The ONNX opsets export_onnx writes: the dynamo exporter's first (18) to the newest whose op
# forms translations.py knows (23). Here, not in onnx.py, so the command line's --opset check
# needs no torch import.
OPSETS = range(18, 24)


def __getattr__(name):
    if name in ("export_onnx", "load_manifest"):
        from . import onnx as _onnx
        return getattr(_onnx, name)
    if name == "translation_table":
        from .translations import translation_table
        return translation_table
    if name in ("build_engine", "TensorRTModule"):
        from . import tensorrt as _trt
        return getattr(_trt, name)
    raise AttributeError(f"module 'ldmfast.export' has no attribute {name!r}")
