"""Shared test machinery: the device fixture, the tolerance table and the parity rule.

Parity rule (STYLE.md section 4, after flash-attention's tests): a kernel's output `out` is
compared with the reference computed in float64 (`ref64`) and with the reference computed in
the kernel's own dtype (`ref`):  max|out - ref64| <= 2 * max|ref - ref64| + ATOL[dtype].
"""
from __future__ import annotations

import json
import os

import pytest
import torch

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and ldmfast's CUDA kernels")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU")


def _device_params():
    params = [pytest.param("cpu", id="cpu")]
    params.append(pytest.param("cuda", id="cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]))
    return params


@pytest.fixture(params=_device_params())
def device(request):
    """CPU always; CUDA as a visibly skipped case where there is no GPU."""
    return torch.device(request.param)


def skip_large_under_sanitizer(size, device):
    """Under compute-sanitizer (scripts/gpu_check.sh sets LDMFAST_SANITIZER_SHAPES=1) the
    kernels run ~100x slower: CUDA cases above 4M elements (attention: scores) are skipped there,
    the smaller ones still reach every code path."""
    if os.environ.get("LDMFAST_SANITIZER_SHAPES") == "1" and torch.device(device).type == "cuda" \
            and size > 1 << 22:
        pytest.skip(f"size {size} skipped under compute-sanitizer (LDMFAST_SANITIZER_SHAPES=1)")


def assert_parity(out, ref, ref64, dtype, what=""):
    """The STYLE.md section 4 rule; NaNs anywhere fail (outputs are poisoned before a run)."""
    out64 = out.detach().to(torch.float64).cpu()
    ref64 = ref64.detach().to(torch.float64).cpu()
    ref_err = (ref.detach().to(torch.float64).cpu() - ref64).abs().max().item() if ref64.numel() else 0.0
    assert torch.isfinite(out64).all(), f"{what}: non-finite output"
    err = (out64 - ref64).abs().max().item() if ref64.numel() else 0.0
    bound = 2 * ref_err + ATOL[dtype]
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} (ref error {ref_err:.3g})"


def write_clip_tokenizer(folder):
    """A tiny CLIP BPE tokenizer (characters only, no merges) saved in ``folder``."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(letters + [c + "</w>" for c in letters]
                                        + ["<|startoftext|>", "<|endoftext|>"])}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                  pad_token="<|endoftext|>").save_pretrained(folder)
    return folder
