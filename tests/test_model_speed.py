"""Speed features of the model layer (issue 7): they must not change what the model computes.

Context K/V projected once per run (``prepare_context``), the fused self-attention QKV
projection, channels_last kept end to end, and the fp16-accumulation opt-in.
"""
from __future__ import annotations

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from ldmfast import configs
from ldmfast.models import PreparedContext, build_first_stage, build_unet
from ldmfast.models.transformer import CrossAttention


@pytest.fixture(autouse=True)
def _one_thread():
    # whole-model runs on a shared 2-core machine: OpenMP teams waiting on each other cost more
    # than these small models take (as in test_unet's timing test)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def _inputs(u, b=2, hw=8, t=7, seed=1):
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


# ---- 3. fused QKV projection --------------------------------------------------------------------

def _self_attn_layers(u):
    return [m for m in u.modules() if isinstance(m, CrossAttention) and m.is_self_attention]


def test_fused_qkv_gives_identical_outputs_and_state_dict():
    u = sd_like_unet()
    x, t, c = _inputs(u)
    sd_before = {k: v.clone() for k, v in u.state_dict().items()}
    with torch.no_grad():
        want = u(x, t, c)
        assert u.fuse_qkv() == len(_self_attn_layers(u)) > 0
        got = u(x, t, c)
    sd_after = u.state_dict()
    assert list(sd_after) == list(sd_before)  # same keys, same order: CompVis files load strict
    for k in sd_before:
        assert torch.equal(sd_after[k], sd_before[k]), k
    for m in _self_attn_layers(u):
        assert m.qkv_fused and m.to_k.weight.untyped_storage().data_ptr() == \
            m._qkv_weight.untyped_storage().data_ptr()
    assert torch.equal(got, want)
    u.unfuse_qkv()
    with torch.no_grad():
        assert torch.equal(u(x, t, c), want)
    assert not any(m.qkv_fused for m in _self_attn_layers(u))


def test_cross_attention_layers_do_not_fuse():
    # attn2 takes its K/V from the context; with disable_self_attn attn1 does too
    u = UNETS["sd2-like-disable-self"]()
    u.fuse_qkv()
    for m in u.modules():
        if isinstance(m, CrossAttention):
            assert m.qkv_fused == m.is_self_attention
            assert m.is_self_attention == (m.context_slot is None)


def test_fused_qkv_sees_in_place_updates():
    u = tiny_unet()
    x, t, c = _inputs(u)
    u.fuse_qkv()
    layer = _self_attn_layers(u)[0]
    delta = 0.01 * torch.randn(layer.to_v.weight.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        layer.to_v.weight.data.add_(delta)  # a LoRA merge
        fused = u(x, t, c)
    ref = tiny_unet()
    with torch.no_grad():
        _self_attn_layers(ref)[0].to_v.weight.add_(delta)
        torch.testing.assert_close(fused, ref(x, t, c), rtol=0, atol=0)
        # load_state_dict copies in place: the buffer (a captured graph's input) is kept
        buf = layer._qkv_weight
        u.load_state_dict(tiny_unet().state_dict(), strict=True)
        assert layer._qkv_weight is buf
        torch.testing.assert_close(u(x, t, c), tiny_unet()(x, t, c), rtol=0, atol=0)
        # assign=True replaces the parameters: fusion is re-established on them
        u.load_state_dict(ref.state_dict(), strict=True, assign=True)
        assert layer.qkv_fused and layer._is_attached()
        torch.testing.assert_close(u(x, t, c), ref(x, t, c), rtol=0, atol=0)


def test_fused_qkv_survives_to():
    u = tiny_unet()
    x, t, c = _inputs(u)
    u.fuse_qkv()
    with torch.no_grad():
        want = u(x, t, c)
        u.to(torch.float64)
        for m in _self_attn_layers(u):
            assert m.qkv_fused and m._is_attached() and m._qkv_weight.dtype == torch.float64
        u.to(torch.float32)
        for m in _self_attn_layers(u):
            assert m.qkv_fused and m._is_attached()
        got = u(x, t, c)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fused_qkv_trains_through_the_unfused_path():
    # With gradients wanted the fused GEMM (on a buffer outside autograd) is not used, so the
    # parameters get their gradients as before.
    u = tiny_unet().train()
    x, t, c = _inputs(u)
    u.fuse_qkv()
    u(x, t, c).square().mean().backward()
    layer = _self_attn_layers(u)[0]
    assert layer.to_q.weight.grad is not None and layer.to_q.weight.grad.abs().sum() > 0


# ---- 5. fp16-accumulating GEMMs: an explicit opt-in --------------------------------------------

def test_fp16_accumulation_is_off_by_default_and_toggles():
    from ldmfast.models import ops as model_ops
    matmul = torch.backends.cuda.matmul
    assert hasattr(matmul, "allow_fp16_accumulation")
    assert matmul.allow_fp16_accumulation is False and not model_ops.fp16_accumulation_enabled()
    with model_ops.fp16_accumulation(True):
        assert matmul.allow_fp16_accumulation is True and model_ops.fp16_accumulation_enabled()
        with model_ops.fp16_accumulation(False):
            assert matmul.allow_fp16_accumulation is False
        assert matmul.allow_fp16_accumulation is True
    assert matmul.allow_fp16_accumulation is False
    try:
        model_ops.fp16_accumulation(True)  # plain call: set for good
        assert matmul.allow_fp16_accumulation is True
    finally:
        model_ops.fp16_accumulation(False)
    assert not model_ops.fp16_accumulation_enabled()


# ---- 4. channels_last end to end ----------------------------------------------------------------

class _LayoutAudit(TorchDispatchMode):
    """Counts layout copies of feature maps and image-path ops whose 4-d output is not
    channels_last: either would be a hidden NCHW round trip in the hot path."""

    COPIES = ("clone", "copy_", "_to_copy", "contiguous")
    IMAGE_OPS = ("convolution", "group_norm_silu", "add", "cat", "upsample_nearest2d", "mul",
                 "silu", "avg_pool2d")

    def __init__(self):
        super().__init__()
        self.copies, self.lost = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name in self.COPIES and first is not None and first.dim() >= 3:
            self.copies.append((name, tuple(first.shape)))
        if (name in self.IMAGE_OPS and isinstance(out, torch.Tensor) and out.dim() == 4
                and not out.is_contiguous(memory_format=torch.channels_last)):
            self.lost.append((name, tuple(out.shape)))
        return out


LAYOUT_MODELS = {
    "tiny-unet": lambda: tiny_unet(),
    # SD-2's linear projections: (B, C, H, W) -> (B, HW, C) must be a view of channels_last
    "sd2-like-unet": lambda: sd_like_unet(use_linear_in_transformer=True, num_heads=-1,
                                          num_head_channels=8),
    # ADM-style AttentionBlock (cin256/celebahq), the other attention of the model layer
    "attentionblock-unet": lambda: build_unet(dict(
        in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
        attention_resolutions=[1, 2], channel_mult=[1, 2], num_heads=-1, num_head_channels=16,
        resblock_updown=True, use_scale_shift_norm=True)).eval(),
}


@pytest.mark.parametrize("name", sorted(LAYOUT_MODELS))
def test_unet_keeps_channels_last(name):
    u = LAYOUT_MODELS[name]()
    # 16x16: the 1x1 bottom level an 8x8 input gives SD-1's four levels is both NCHW and
    # channels_last, and its upsampling picks NCHW; no real latent is that small
    x, t, c = (_inputs(u, hw=16) if u.config.get("context_dim")
               else (*_inputs_plain(u, hw=16), None))
    with torch.no_grad():
        want = u(x, t, c)
        u = u.to(memory_format=torch.channels_last)
        xcl = x.to(memory_format=torch.channels_last)
        with _LayoutAudit() as audit:
            got = u(xcl, t, c)
    assert audit.copies == [], f"layout copies in the hot path: {audit.copies}"
    assert audit.lost == [], f"ops that lost channels_last: {audit.lost}"
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # as test_unet's layout test


def _inputs_plain(u, b=2, hw=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, u.in_channels, hw, hw, generator=g), torch.tensor([3, 900][:b])


def test_vae_decoder_keeps_channels_last():
    # kl-f8's decoder structure (with its mid-block attention) at a small width
    cfg = configs.first_stage("kl-f8")
    cfg["ddconfig"] = dict(cfg["ddconfig"], ch=32, ch_mult=[1, 2, 2], num_res_blocks=1)
    torch.manual_seed(0)
    vae = _randomise(build_first_stage(cfg).eval())
    z = torch.randn(1, cfg["embed_dim"], 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = vae.decode(z)
        vae = vae.to(memory_format=torch.channels_last)
        zcl = z.to(memory_format=torch.channels_last)
        with _LayoutAudit() as audit:
            got = vae.decode(zcl)
    assert audit.copies == [], f"layout copies in the hot path: {audit.copies}"
    assert audit.lost == [], f"ops that lost channels_last: {audit.lost}"
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # as test_unet's layout test
