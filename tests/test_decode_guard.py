"""The fp16 decode guard: samples whose fp16 decode overflows are decoded again in float32.

The overflow is forced honestly on CPU (which runs fp16 convolutions): the decoder's first
convolution is scaled by 100 and one sample's latent by 2000, so that convolution's fp16 output
exceeds 65504 for that sample only (Inf, then NaN after GroupNorm), while float32 holds it.
"""
from __future__ import annotations

import logging

import pytest
import torch

from ldmfast.pipeline import LatentDiffusion

configs = pytest.importorskip("ldmfast.configs")


def fp16_model():
    torch.manual_seed(0)
    model = LatentDiffusion.from_components(configs.build(configs.get("tiny")))
    model.first_stage.half()
    with torch.no_grad():
        model.first_stage.decoder.conv_in.weight.mul_(100)
    return model


def test_non_finite_samples_are_redone_in_float32(caplog):
    model = fp16_model()
    fs = model.first_stage
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    z[1] *= 2000
    raw = model.decode(z, fp16_guard=False)
    finite = torch.isfinite(raw).flatten(1).all(1)
    assert finite.tolist() == [True, False, True]  # the overflow really happens in fp16
    weights = [p.clone() for p in fs.parameters()]
    with caplog.at_level(logging.WARNING, logger="ldmfast"):
        out = model.decode(z)
        model.decode(z)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert caplog.text.count("decoding them again in float32") == 1  # logged once
    # untouched samples are the fp16 decode, bit for bit
    assert torch.equal(out[0], raw[0]) and torch.equal(out[2], raw[2])
    # the redone one is the float32 decode of the same (fp16) weights
    ref = LatentDiffusion.from_components(configs.build(configs.get("tiny")))
    ref.first_stage.load_state_dict({k: v.float() for k, v in fs.state_dict().items()})
    want = ref.decode(z[1:2])[0]
    assert torch.isfinite(want).all()
    assert torch.equal(out[1], want.to(torch.float16))  # same fp32 arithmetic, then fp16 output
    # the module was never cast: same tensors, same values, still fp16
    for p, w in zip(fs.parameters(), weights):
        assert p.dtype == torch.float16 and torch.equal(p, w)


def test_guard_is_fp16_only_and_optional():
    model = fp16_model()
    z = torch.randn(1, 4, 8, 8) * 2000
    assert not torch.isfinite(model.decode(z, fp16_guard=False)).all()
    assert torch.isfinite(model.decode(z)).all()
    fp32 = LatentDiffusion.from_components(configs.build(configs.get("tiny")))
    x = fp32.decode(torch.randn(1, 4, 8, 8))
    assert x.dtype == torch.float32
