"""Speed features of the model layer (issue 7): they must not change what the model computes.

Context K/V projected once per run (``prepare_context``), the fused self-attention QKV
projection, channels_last kept end to end, and the fp16-accumulation opt-in.
"""
from __future__ import annotations

import pytest
import torch

from ldmfast import configs
from ldmfast.models import PreparedContext, build_unet
from ldmfast.models.transformer import CrossAttention


def _randomise(u):
    with torch.no_grad():  # zero-initialised layers of the original would hide mistakes
        for p in u.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return u


def tiny_unet():
    torch.manual_seed(0)
    return _randomise(build_unet(configs.get("tiny")["unet"]).eval())


def sd_like_unet(**kw):
    # SD-1's structure (4 levels, 2 res blocks, 8 heads, depth-1 transformers) at a width that
    # runs in well under a second on CPU.
    cfg = dict(configs.get("sd1")["unet"], model_channels=32, context_dim=24)
    cfg.update(kw)
    torch.manual_seed(0)
    return _randomise(build_unet(cfg).eval())


UNETS = {
    "tiny": lambda: tiny_unet(),
    "sd-like": lambda: sd_like_unet(),
    # SD-2's linear projections and the self-attention-disabled variant (attn1 attends to the
    # context too, so it owns a slot).
    "sd2-like-disable-self": lambda: sd_like_unet(
        use_linear_in_transformer=True, num_heads=-1, num_head_channels=8,
        disable_self_attentions=[True, False, True, False]),
}


def _inputs(u, b=2, hw=16, t=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ctx_dim = u.config["context_dim"]
    return (torch.randn(b, u.in_channels, hw, hw, generator=g), torch.tensor([3, 900][:b]),
            torch.randn(b, t, ctx_dim, generator=g))


# ---- 1. conditioning K/V projected once per sampling run ---------------------------------------

@pytest.mark.parametrize("name", sorted(UNETS))
def test_prepared_context_gives_identical_outputs(name):
    u = UNETS[name]()
    x, t, c = _inputs(u)
    with torch.no_grad():
        want = u(x, t, c)
        prepared = u.prepare_context(c)
        got = u(x, t, context=prepared)
    assert isinstance(prepared, PreparedContext)
    n_layers = sum(isinstance(m, CrossAttention) and m.context_slot is not None for m in u.modules())
    assert len(prepared.kv) == n_layers > 0
    for k, v in prepared.kv:
        assert k.shape[:2] == (2, 7) and k.dim() == 4 and v.shape == k.shape
    assert torch.equal(got, want)
    # preparing an already prepared context is a no-op
    assert u.prepare_context(prepared) is prepared


def test_prepared_context_batches_like_guidance():
    # Classifier-free guidance evaluates [uncond; cond] as one batch.
    u = sd_like_unet()
    x, t, c = _inputs(u)
    g = torch.Generator().manual_seed(5)
    uncond = torch.randn(c.shape, generator=g)
    x2, t2 = torch.cat([x, x]), torch.cat([t, t])
    with torch.no_grad():
        want = u(x2, t2, torch.cat([uncond, c]))
        # preparing the concatenated batch: the same GEMMs as the unprepared call
        assert torch.equal(u(x2, t2, u.prepare_context(torch.cat([uncond, c]))), want)
        # concatenating two prepared contexts (each prepared once per run)
        both = PreparedContext.cat(u.prepare_context(uncond), u.prepare_context(c))
        got = u(x2, t2, both)
    assert both.batch_size == 4
    # A GEMM's rows do not depend on the other rows of the batch, so the K/V are the same
    # values however the batch was split.
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_prepared_context_under_torch_compile():
    # fullgraph: PreparedContext is a pytree (NamedTuple) and the choice is a Python type check
    u = tiny_unet()
    x, t, c = _inputs(u)
    with torch.no_grad():
        prepared = u.prepare_context(c)
        want = u(x, t, prepared)
        compiled = torch.compile(u, fullgraph=True, backend="aot_eager")
        got = compiled(x, t, prepared)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_prepared_context_from_another_model_is_refused():
    attn = CrossAttention(8, 4, heads=2, dim_head=4)
    prepared = PreparedContext(((torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2, 4)),))
    with pytest.raises(ValueError, match="no context slot"):
        attn(torch.zeros(1, 5, 8), prepared)
