"""Finds and loads the compiled op libraries into ``torch.ops.ldmfast``."""
from __future__ import annotations

import glob
import logging
import os

import torch

log = logging.getLogger("ldmfast")
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_state = {"cpu": None, "cuda": None}


def _find(stem: str):
    hits = sorted(glob.glob(os.path.join(_HERE, f"{stem}.*so")))
    return hits[0] if hits else None


def load() -> None:
    if _state["cpu"] is not None:
        return
    path = _find("_C")
    if path is None:
        raise ImportError(
            "ldmfast's compiled library (ldmfast/_C*.so) was not found: build it with "
            "`pip install --no-build-isolation -e .` from the source checkout")
    torch.ops.load_library(path)
    _state["cpu"] = path
    cuda_path = _find("_C_cuda")
    # The CUDA library links libtorch_cuda; a CPU build of torch cannot load it, and loading it
    # without a CUDA torch would fail anyway, so it is only tried where CUDA torch is present.
    if cuda_path is not None and torch.version.cuda is not None:
        try:
            torch.ops.load_library(cuda_path)
            _state["cuda"] = cuda_path
        except (OSError, RuntimeError) as exc:
            # Built against another torch or CUDA (an undefined symbol, a missing libcudart):
            # the CPU ops still work, CUDA tensors get the "without CUDA kernels" error.
            log.warning("ldmfast: could not load its CUDA kernels %s (%s); rebuild with "
                        "LDMFAST_CUDA=1 `pip install --no-build-isolation -e .` against this "
                        "torch", cuda_path, exc)
    elif cuda_path is None and torch.cuda.is_available():
        log.warning("ldmfast was built without CUDA kernels; CUDA tensors are not supported")


def cuda_loaded() -> bool:
    return _state["cuda"] is not None
