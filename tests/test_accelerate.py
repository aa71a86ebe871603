"""ldmfast.accelerate (ldmfast/dropin.py): a diffusers pipeline with ldmfast's U-Net and decoder over shared weights.

The pipeline is test_pipeline's offline random one (tiny U-Net, VAE, CLIP), in float32 on CPU.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch

import ldmfast
import ldmfast.dropin as acc

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from test_pipeline import _embeds, make_sd_pipeline  # noqa: E402

REL = 1e-4


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return make_sd_pipeline(str(tmp_path_factory.mktemp("tok")))


def run(pipe, steps=2):
    cond, uncond, x_T = _embeds(b=1)
    # Latents in the U-Net's dtype: diffusers moves given latents to the device but keeps their dtype.
    return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=x_T.to(pipe.unet.dtype, copy=True),
                num_inference_steps=steps, guidance_scale=7.5, output_type="pt").images


def unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor(601),
            torch.randn(2, 77, 32, generator=g))


def diffusers_unet(unet, x, t, ctx, **kw):
    return type(unet).forward(unet, x, t, encoder_hidden_states=ctx, **kw).sample


def test_pipeline_outputs_agree_and_restore_is_exact(pipe):
    ref = run(pipe)
    ldmfast.accelerate(pipe)  # the public entry point
    try:
        assert acc.is_accelerated(pipe.unet) and acc.is_accelerated(pipe.vae)
        out = run(pipe)
        assert out.shape == ref.shape and rel(out, ref) < REL
        # the pipeline sees the same module, config and attributes
        assert type(pipe.unet).__name__ == "UNet2DConditionModel"
        assert pipe.unet.config.in_channels == 4 and pipe.vae.config.scaling_factor == 0.18215
        assert pipe.unet.dtype == torch.float32 and pipe.unet.device.type == "cpu"
        # the accelerated calls went through ldmfast: the adapters are the forward/decode
        assert isinstance(pipe.unet.__dict__["forward"], acc._UNetForward)
        assert isinstance(pipe.vae.__dict__["decode"], acc._VAEDecode)
        assert acc.accelerate(pipe) is pipe  # idempotent
    finally:
        ldmfast.accelerate(pipe, restore=True)
    assert not acc.is_accelerated(pipe.unet) and "forward" not in pipe.unet.__dict__
    assert "decode" not in pipe.vae.__dict__
    assert torch.equal(run(pipe), ref)


def test_weights_are_shared_not_copied(pipe):
    acc.accelerate(pipe)
    try:
        for src in (pipe.unet, pipe.vae):
            fast = acc.fast_module(src)
            ptrs = {p.data_ptr() for p in src.parameters()}
            objs = {id(p) for p in src.parameters()}
            fast_params = list(fast.parameters())
            assert fast_params and all(p.data_ptr() in ptrs for p in fast_params)
            n_same = sum(id(p) in objs for p in fast_params)
            # the U-Net's are the very objects; the VAE's reshaped attention weights are views
            assert n_same == len(fast_params) if src is pipe.unet else n_same >= len(fast_params) - 8
        assert acc.fast_module(pipe.unet).out[2].weight is pipe.unet.conv_out.weight
        q = acc.fast_module(pipe.vae).decoder.mid.attn_1.q.weight
        assert q.data_ptr() == pipe.vae.decoder.mid_block.attentions[0].to_q.weight.data_ptr()
    finally:
        acc.accelerate(pipe, restore=True)


def test_in_place_updates_are_seen(tmp_path):
    p = make_sd_pipeline(str(tmp_path))
    acc.accelerate(p)
    x, t, ctx = unet_inputs()
    unet, vae = p.unet, p.vae
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=ctx).sample
        assert rel(before, diffusers_unet(unet, x, t, ctx)) < REL
        w = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight
        w.data.add_(0.5 * torch.randn_like(w))  # LoRA-style merge, in place
        after = unet(x, t, encoder_hidden_states=ctx).sample
        assert rel(after, before) > 1e-3
        assert rel(after, diffusers_unet(unet, x, t, ctx)) < REL
        z = torch.randn(1, 4, 8, 8)
        v = vae.decoder.mid_block.attentions[0].to_v.weight  # a shared view in ldmfast
        d0 = vae.decode(z).sample
        v.data.mul_(1.5)
        d1 = vae.decode(z).sample
        ref = type(vae).decode(vae, z).sample
        assert rel(d1, d0) > 1e-4 and rel(d1, ref) < REL
        # a replaced parameter object is noticed and shared again
        unet.conv_out.weight = torch.nn.Parameter(unet.conv_out.weight.detach() * 2)
        out = unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
        assert rel(out, diffusers_unet(unet, x, t, ctx)) < REL
        assert acc.fast_module(unet).out[2].weight is unet.conv_out.weight
        # dtype moves through .to(): same objects for the U-Net, views rebuilt for the VAE
        p.to(torch.float64)
        assert unet(x.double(), t, encoder_hidden_states=ctx.double()).sample.dtype == torch.float64
        assert rel(vae.decode(z.double(), return_dict=False)[0],
                   type(vae).decode(vae, z.double()).sample) < 1e-10


def test_what_cannot_be_honoured_goes_to_diffusers(pipe, caplog):
    acc.accelerate(pipe)
    try:
        x, t, ctx = unet_inputs(1)
        unet = pipe.unet
        with torch.no_grad(), caplog.at_level(logging.WARNING, logger="ldmfast"):
            kw = dict(cross_attention_kwargs={"scale": 0.5})
            assert torch.equal(unet(x, t, encoder_hidden_states=ctx, **kw).sample,
                               diffusers_unet(unet, x, t, ctx, **kw))
            assert "cross_attention_kwargs" in caplog.text
            odd = torch.randn(1, 4, 15, 16)  # not a multiple of the U-Net's 2x down-sampling
            assert torch.equal(unet(odd, t, encoder_hidden_states=ctx[:1]).sample,
                               diffusers_unet(unet, odd, t, ctx[:1]))
            # a custom attention processor: diffusers computes it
            from diffusers.models.attention_processor import AttnProcessor2_0

            class Scaled(AttnProcessor2_0):
                def __call__(self, attn, hidden_states, *a, **k):
                    return 0.5 * super().__call__(attn, hidden_states, *a, **k)
            old = unet.attn_processors
            unet.set_attn_processor(Scaled())
            try:
                assert torch.equal(unet(x, t, encoder_hidden_states=ctx).sample,
                                   diffusers_unet(unet, x, t, ctx))
                assert "attention processor Scaled" in caplog.text
            finally:
                unet.set_attn_processor(old)
            assert rel(unet(x, t, encoder_hidden_states=ctx).sample,
                       diffusers_unet(unet, x, t, ctx)) < REL
            # tiled decode stays diffusers'
            pipe.vae.enable_slicing()
            try:
                z = torch.randn(2, 4, 8, 8)
                assert torch.equal(pipe.vae.decode(z).sample, type(pipe.vae).decode(pipe.vae, z).sample)
            finally:
                pipe.vae.disable_slicing()
    finally:
        acc.accelerate(pipe, restore=True)


def test_unsupported_modules_are_refused(pipe):
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, class_embed_type="timestep")
    with pytest.raises(ValueError, match="class_embed_type"):
        acc.accelerate(unet)
    assert not acc.is_accelerated(unet) and "forward" not in unet.__dict__
    with pytest.raises(ValueError, match="not supported"):
        acc.accelerate(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="neither"):
        acc.accelerate(object())
    # a pipeline whose VAE is refused leaves its U-Net untouched too
    vae = diffusers.AutoencoderKL(block_out_channels=[32, 64], latent_channels=4,
                                  down_block_types=["DownEncoderBlock2D"] * 2,
                                  up_block_types=["UpDecoderBlock2D"] * 2, use_quant_conv=False)
    bad = copy.copy(pipe)
    bad.__dict__["vae"] = vae
    with pytest.raises(ValueError, match="use_quant_conv"):
        acc.accelerate(bad)
    assert not acc.is_accelerated(pipe.unet) and "forward" not in pipe.unet.__dict__


def test_bare_modules_and_output_types(pipe):
    vae = acc.accelerate(pipe.vae)
    try:
        z = torch.randn(1, 4, 8, 8)
        out = vae.decode(z)
        assert type(out).__name__ == "DecoderOutput"
        tup = vae.decode(z, return_dict=False)
        assert isinstance(tup, tuple) and torch.equal(tup[0], out.sample)
        assert rel(out.sample, type(vae).decode(vae, z).sample) < REL
        assert "encode" not in vae.__dict__  # encode stays diffusers'
        x, t, ctx = unet_inputs()
        unet = acc.accelerate(pipe.unet)
        o = unet(x, 601, encoder_hidden_states=ctx)  # a Python int timestep
        assert type(o).__name__ == "UNet2DConditionOutput"
        assert rel(o.sample, diffusers_unet(unet, x, t, ctx)) < REL
        o2 = unet(x, torch.tensor([601, 601]), ctx, return_dict=False)[0]
        assert torch.equal(o2, o.sample)
    finally:
        acc.accelerate(pipe.vae, restore=True)
        acc.accelerate(pipe.unet, restore=True)


# ------------------------------------------------------------------ accelerate(cuda_graph=...)
# On CPU the graph path runs with ldmfast.graphs.eager_capture: keys, static copies, recaptures
# and output copies as with real graphs, each "replay" computed eagerly. Real captures: the
# cuda-marked test below.

def _unet_keys(cache):
    return sum(k[2] == "unet" for k in cache.keys())


def test_graph_path_keys_replays_and_recaptures(tmp_path, caplog):
    import ldmfast.graphs as graphs_mod
    from ldmfast.graphs import GraphCache, eager_capture

    p = make_sd_pipeline(str(tmp_path))
    ref = run(p)
    acc.accelerate(p)
    eager = run(p)
    cache = GraphCache(capture=eager_capture)
    # a shared cache: accelerate must leave another user's graph alone
    cache._entries["someone else's"] = graphs_mod._Entry(None, None, None, (), (), None)
    ldmfast.accelerate(p, cuda_graph=cache)  # switches graphs on for the accelerated pipeline
    unet, vae = p.unet, p.vae
    try:
        out = run(p)
        assert torch.equal(out, eager) and rel(out, ref) < REL
        assert sorted(k[2] for k in cache.keys() if k != "someone else's") == ["decode", "unet"]
        assert cache.captures == 2
        assert torch.equal(run(p), out) and cache.captures == 2  # same shapes: replays only
        acc.accelerate(p)  # cuda_graph=None: the setting stays, and so do the graphs
        assert torch.equal(run(p), out) and cache.captures == 2
        _, t, ctx = unet_inputs()
        x = torch.randn(2, 4, 24, 24)
        with torch.no_grad():
            a = unet(x, t, encoder_hidden_states=ctx).sample  # 24x24 latents: a new graph
            assert cache.captures == 3
            assert rel(a, diffusers_unet(unet, x, t, ctx)) < REL
            w = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_v.weight
            w.data.add_(0.5 * torch.randn_like(w))  # in place: the same graph reads it
            b = unet(x, t, encoder_hidden_states=ctx).sample
            assert cache.captures == 3 and rel(b, a) > 1e-3
            assert rel(b, diffusers_unet(unet, x, t, ctx)) < REL
            # a global setting a graph would freeze is part of the key
            with ldmfast.models.use_reference_ops(True):
                assert rel(unet(x, t, encoder_hidden_states=ctx).sample, b) < REL
            assert cache.captures == 4
            # a replaced parameter object: the module is rebuilt and all its graphs dropped
            unet.conv_out.bias = torch.nn.Parameter(unet.conv_out.bias.detach() + 1)
            c = unet(x, t, encoder_hidden_states=ctx).sample
            assert cache.captures == 5 and _unet_keys(cache) == 1
            assert rel(c, diffusers_unet(unet, x, t, ctx)) < REL
            # .to() moves the storage under the same objects: the graphs go, new ones come
            p.to(torch.float64)
            d = unet(x.double(), t, encoder_hidden_states=ctx.double()).sample
            assert cache.captures == 6 and _unet_keys(cache) == 1 and d.dtype == torch.float64
            assert rel(d, diffusers_unet(unet, x.double(), t, ctx.double())) < 1e-10
            p.to(torch.float32)
        with caplog.at_level(logging.WARNING, logger="ldmfast"):
            e = unet(x, t, encoder_hidden_states=ctx).sample  # autograd on: eager, said once
            assert "autograd is recording" in caplog.text
        assert e.requires_grad and cache.captures == 6
        with torch.inference_mode():  # inference tensors: a graph of their own ...
            f = unet(x, t, encoder_hidden_states=ctx).sample
        with torch.no_grad():  # ... that no_grad calls never replay
            g = unet(x, t, encoder_hidden_states=ctx).sample
        assert cache.captures == 8 and torch.equal(f, g) and rel(g, e.detach()) < REL
        assert rel(g, diffusers_unet(unet, x, t, ctx)) < REL
        acc.accelerate(p, cuda_graph=False)  # off: this pipeline's graphs go, others' stay
        assert cache.keys() == ["someone else's"]
        acc.accelerate(p, cuda_graph=cache)
        run(p)
        assert len(cache) == 3
    finally:
        acc.accelerate(p, restore=True)
    assert cache.keys() == ["someone else's"]  # restore drops the graphs


def test_graph_arguments_are_checked(pipe):
    with pytest.raises(TypeError, match="cuda_graph must be"):
        acc.accelerate(pipe, cuda_graph="yes")
    with pytest.raises(ValueError, match="cuda_graph has no meaning with restore"):
        acc.accelerate(pipe, restore=True, cuda_graph=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graph needs CUDA"):
            acc.accelerate(pipe, cuda_graph=True)
        with pytest.raises(ValueError, match="not supported"):  # the object is checked first
            acc.accelerate(torch.nn.Linear(2, 2), cuda_graph=True)
    assert not acc.is_accelerated(pipe.unet)


def test_failed_call_keeps_what_was_accelerated(pipe):
    from ldmfast.graphs import GraphCache, eager_capture

    cache = GraphCache(capture=eager_capture)
    acc.accelerate(pipe.unet, cuda_graph=cache)
    try:
        # an empty cache is still the one in use (it is falsy: it has a length)
        acc.accelerate(pipe.unet, cuda_graph=True)
        assert pipe.unet.__dict__["forward"].graphs is cache
        with pytest.raises(ValueError, match="no meaning with restore"):
            acc.accelerate(pipe.unet, restore=True, cuda_graph=GraphCache(capture=eager_capture))
        x, t, ctx = unet_inputs()
        with torch.no_grad():
            pipe.unet(x, t, encoder_hidden_states=ctx)
        assert len(cache) == 1
        bad = copy.copy(pipe)
        bad.__dict__["vae"] = diffusers.AutoencoderKL(
            block_out_channels=[32, 64], latent_channels=4, use_quant_conv=False,
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
        with pytest.raises(ValueError, match="use_quant_conv"):
            acc.accelerate(bad, cuda_graph=GraphCache(capture=eager_capture))
        # the U-Net accelerated before keeps its adapter, its cache and its graph
        assert acc.is_accelerated(pipe.unet) and pipe.unet.__dict__["forward"].graphs is cache
        assert len(cache) == 1 and not acc.is_accelerated(bad.vae)
    finally:
        acc.accelerate(pipe.unet, restore=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_graphs_replay_what_eager_computes(tmp_path):
    p = make_sd_pipeline(str(tmp_path)).to("cuda", torch.float16)
    acc.accelerate(p)
    eager = run(p, steps=3)  # the pipeline loop: a new 0-d timestep each step, guidance batch 2
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(2, 4, 16, 16, generator=g).to("cuda", torch.float16) for _ in range(2)]
    _, t, ctx = unet_inputs()
    ctx = ctx.to("cuda", torch.float16)
    unet = p.unet
    with torch.no_grad():
        eager_x = [unet(x, t, encoder_hidden_states=ctx).sample for x in xs]
        acc.accelerate(p, cuda_graph=True)
        cache = unet.__dict__["forward"].graphs
        assert p.vae.__dict__["decode"].graphs is cache
        try:
            assert rel(run(p, steps=3), eager) < 1e-3  # captures, then replays, in the loop
            assert cache.captures == 2
            # replays take new inputs, and an earlier output survives a later replay
            first = unet(xs[0], t, encoder_hidden_states=ctx).sample
            second = unet(xs[1], t, encoder_hidden_states=ctx).sample
            assert rel(first, eager_x[0]) < 1e-3 and rel(second, eager_x[1]) < 1e-3
            # LoRA-style in-place update: seen by the next replay, without a new capture
            w = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_v.weight
            w.data.add_(0.5 * torch.randn_like(w))
            after = unet(xs[0], t, encoder_hidden_states=ctx).sample
            expected = acc.fast_module(unet)(xs[0], t.cuda().expand(2), context=ctx)
            assert cache.captures == 2
            assert rel(after, first) > 1e-3 and rel(after, expected) < 1e-3
        finally:
            acc.accelerate(p, restore=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_fp16_pipeline_agrees_with_diffusers(tmp_path):
    # Issue 7's parity on the GPU: the accelerated fp16 pipeline (ldmfast's CUDA kernels) against
    # the same pipeline unpatched, from the same latents, within fp16 tolerance.
    p = make_sd_pipeline(str(tmp_path)).to("cuda", torch.float16)
    ref = run(p, steps=3)
    acc.accelerate(p)
    try:
        out = run(p, steps=3)
    finally:
        acc.accelerate(p, restore=True)
    assert out.dtype == ref.dtype and out.device.type == "cuda"
    assert torch.isfinite(out).all() and rel(out, ref) < 1e-2
