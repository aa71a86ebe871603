"""CUDA-graph sampling and decoding: the captured body, the cache, and (on a GPU) the graphs.

Without a GPU the graph path runs with ``eager_capture``: the same body, static buffers, keys
and output copies, with each "replay" executed eagerly. The real captures carry the ``cuda``
marker and are skipped, visibly, where there is no GPU.
"""
from __future__ import annotations

import contextlib
import weakref

import pytest
import torch

from ldmfast import graphs
from ldmfast.diffusion.samplers import get_sampler
from ldmfast.graphs import GraphCache, eager_capture
from ldmfast.pipeline import LatentDiffusion

configs = pytest.importorskip("ldmfast.configs")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def tiny_model():
    torch.manual_seed(0)
    model = LatentDiffusion.from_components(configs.build(configs.get("tiny")))
    with torch.no_grad():  # random weights give eps ~0.3; scale to ~1 as a trained model's
        model.unet.out[2].weight.mul_(3)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def inputs(model, b=2, seed=0, device="cpu", hw=None):
    g = torch.Generator().manual_seed(seed)
    hw = hw or (8, 8)  # small latents: the tests run the tiny U-Net many times on 2 cores
    ctx = model.config["unet"]["context_dim"]
    x_T = torch.randn(b, model.latent_channels, *hw, generator=g)
    cond = torch.randn(b, 7, ctx, generator=g)
    uncond = torch.randn(b, 7, ctx, generator=g)
    return x_T.to(device), cond.to(device), uncond.to(device)


class CountingCapture:
    """eager_capture that counts captures (the injected capture step)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn, static, pool=None, warmup=0):
        self.calls += 1
        return eager_capture(fn, static, pool, warmup)


class DetachedCapture:
    """eager_capture that, like a real CUDA graph, keeps no reference to the captured function:
    "replay" reaches it through a weak reference, so a body (with the tensors its closure made)
    that only the caller held is gone, and the replay fails instead of reading freed memory."""

    def __call__(self, fn, static, pool=None, warmup=0):
        out = fn(**static)
        ref = weakref.ref(fn)

        def replay():
            f = ref()
            assert f is not None, "the captured body was freed while its graph was kept"
            for dst, src in zip(graphs._tensors(out), graphs._tensors(f(**static))):
                dst.copy_(src)
        return replay, out


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------------- CPU: the body

@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_graph_body_run_eagerly_equals_sample(model, sampler):
    x_T, cond, uncond = inputs(model)
    ref = model.sample(cond, uncond, steps=3, guidance_scale=5.0, sampler=sampler, x_T=x_T,
                       progress=False)
    fn, _ = get_sampler(sampler)
    body = model.graph_body(fn, model.steps(3, sampler), {"eta": 0.0} if sampler == "ddim" else {})
    out = body(x_T.clone(), cond, uncond, torch.tensor(5.0))
    assert (ref - x_T).norm() > 0.1 * x_T.norm()  # the model moved the sample
    assert rel(out, ref) < 1e-6
    # no guidance: scale None
    ref1 = model.sample(cond, None, steps=2, guidance_scale=1.0, sampler=sampler, x_T=x_T,
                        progress=False)
    body1 = model.graph_body(fn, model.steps(2, sampler))
    assert rel(body1(x_T.clone(), cond), ref1) < 1e-6


def test_graph_path_with_eager_capture_matches_and_caches(model):
    cap = CountingCapture()
    model.set_graph_cache(GraphCache(capture=cap))
    try:
        x_T, cond, uncond = inputs(model)
        kw = dict(steps=2, progress=False)

        def both(**a):
            args = dict(kw, **a)
            return (model.sample(cuda_graph=True, **args), model.sample(**args))

        g, e = both(cond=cond, uncond=uncond, guidance_scale=7.5, x_T=x_T)
        assert cap.calls == 1 and rel(g, e) < 1e-6
        # new values of every input, same key: reused, eager result for those inputs
        x2, c2, u2 = inputs(model, seed=1)
        for a in (dict(cond=cond, uncond=uncond, guidance_scale=3.0, x_T=x_T),
                  dict(cond=c2, uncond=uncond, guidance_scale=7.5, x_T=x_T),
                  dict(cond=cond, uncond=u2, guidance_scale=7.5, x_T=x2)):
            g, e = both(**a)
            assert rel(g, e) < 1e-6
        assert cap.calls == 1 and len(model.graph_cache()) == 1
        # everything that changes the captured work makes a new entry
        changes = [dict(steps=3), dict(sampler="dpmpp_2m"), dict(guidance_scale=1.0, uncond=None),
                   dict(x_T=inputs(model, b=1)[0], cond=cond[:1], uncond=uncond[:1]),
                   dict(x_T=inputs(model, hw=(8, 12))[0]),
                   dict(cond=cond[:, :5], uncond=uncond[:, :5])]
        for i, ch in enumerate(changes):
            args = dict(dict(cond=cond, uncond=uncond, guidance_scale=7.5, x_T=x_T), **ch)
            g, e = both(**args)
            assert rel(g, e) < 1e-6, ch
            assert cap.calls == 2 + i, ch
        assert len(model.graph_cache()) == 1 + len(changes)
        # and the first key is still there and still right
        g, e = both(cond=cond, uncond=uncond, guidance_scale=2.0, x_T=x2)
        assert cap.calls == 1 + len(changes) and rel(g, e) < 1e-6
    finally:
        model.set_graph_cache(None)


def test_in_place_weight_update_is_seen_and_moved_weights_recapture(model):
    cap = CountingCapture()
    m = tiny_model()
    m.set_graph_cache(GraphCache(capture=cap))
    x_T, cond, uncond = inputs(m)
    kw = dict(cond=cond, uncond=uncond, guidance_scale=4.0, x_T=x_T, steps=2, progress=False)
    before = m.sample(cuda_graph=True, **kw)
    w = m.unet.out[2].weight
    with torch.no_grad():
        w.data.add_(0.05 * torch.randn_like(w))  # LoRA-style, in place
    after = m.sample(cuda_graph=True, **kw)
    assert cap.calls == 1 and rel(after, before) > 1e-3
    assert rel(after, m.sample(**kw)) < 1e-6
    w.data = w.data.clone()  # storage replaced: the graph would read the old one
    m.sample(cuda_graph=True, **kw)
    assert cap.calls == 2


def test_txt2img_graph_path_with_eager_capture(model):
    cap = CountingCapture()
    model.set_graph_cache(GraphCache(capture=cap))
    try:
        kw = dict(steps=2, guidance_scale=7.5, seed=0, height=16, width=16, progress=False,
                  output_type="tensor")
        graphed = model.txt2img("a red cat", cuda_graph=True, **kw)
        assert cap.calls == 2  # the denoising loop and the decode
        assert rel(graphed, model.txt2img("a red cat", **kw)) < 1e-5
    finally:
        model.set_graph_cache(None)


def test_decode_graph_path_with_eager_capture(model):
    cap = CountingCapture()
    model.set_graph_cache(GraphCache(capture=cap))
    try:
        z = torch.randn(1, 4, 8, 8)
        assert torch.equal(model.decode(z, cuda_graph=True), model.decode(z))
        z2 = torch.randn(1, 4, 8, 8)
        assert torch.equal(model.decode(z2, cuda_graph=True), model.decode(z2))
        assert cap.calls == 1
        model.decode(torch.randn(2, 4, 8, 8), cuda_graph=True)
        assert cap.calls == 2
    finally:
        model.set_graph_cache(None)


def test_cuda_graph_refusals(model):
    x_T, cond, uncond = inputs(model)
    kw = dict(cond=cond, uncond=uncond, x_T=x_T, steps=2, progress=False, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph.*CUDA device"):
        model.sample(**kw)
    with pytest.raises(ValueError, match="cuda_graph.*CUDA device"):
        model.decode(torch.randn(1, 4, 8, 8), cuda_graph=True)
    model.set_graph_cache(GraphCache(capture=eager_capture))
    try:
        with pytest.raises(ValueError, match="eta"):
            model.sample(eta=0.5, **kw)
        with pytest.raises(ValueError, match="ddpm"):
            model.sample(sampler="ddpm", **kw)
        with pytest.raises(ValueError, match="callback"):
            model.sample(callback=lambda d: None, **kw)
        with pytest.raises(ValueError, match="mask"):
            model.sample(mask=torch.ones_like(x_T), x0=x_T, **kw)
    finally:
        model.set_graph_cache(None)


def test_graph_keeps_what_it_reads_alive(model):
    """A graph reads memory it does not own: the step schedule made per call and the body's
    closure must live as long as the entry (a real graph would read freed, reused memory)."""
    model.set_graph_cache(GraphCache(capture=DetachedCapture()))
    try:
        x_T, cond, uncond = inputs(model)
        kw = dict(cond=cond, uncond=uncond, guidance_scale=5.0, x_T=x_T, steps=3, progress=False)
        model.sample(cuda_graph=True, **kw)
        (entry,) = model.graph_cache()._entries.values()
        sched = model.schedule.steps(3)
        for static, made in zip(entry.static["schedule"], (sched.timesteps, sched.alphas,
                                                           sched.alphas_prev)):
            assert torch.equal(static, made)  # the schedule is a graph input, copied per replay
        x2 = inputs(model, seed=2)[0]
        assert rel(model.sample(cuda_graph=True, **dict(kw, x_T=x2)), model.sample(**dict(kw, x_T=x2))) < 1e-6
        z = torch.randn(1, 4, 8, 8)
        model.decode(z, cuda_graph=True)
        assert rel(model.decode(z, cuda_graph=True), model.decode(z)) < 1e-6
    finally:
        model.set_graph_cache(None)


def test_graphs_under_inference_mode_and_autocast(model, monkeypatch):
    cap = CountingCapture()
    model.set_graph_cache(GraphCache(capture=cap))
    try:
        x_T, cond, uncond = inputs(model)
        kw = dict(cond=cond, uncond=uncond, guidance_scale=5.0, x_T=x_T, steps=2, progress=False)
        with torch.inference_mode():
            a = model.sample(cuda_graph=True, **kw)
        # Static buffers made under inference mode cannot take copies outside it: its own key.
        b = model.sample(cuda_graph=True, **kw)
        assert cap.calls == 2 and rel(a, b) < 1e-6
        z = torch.randn(1, 4, 8, 8)
        with torch.inference_mode():
            model.decode(z, cuda_graph=True)
        model.decode(z, cuda_graph=True)
        assert cap.calls == 4
    finally:
        model.set_graph_cache(None)
    # Autocast's cast cache would be captured and freed under the graph: refused (checked
    # before anything touches CUDA, so it shows here without a GPU).
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: True)
    with pytest.raises(RuntimeError, match="autocast"):
        GraphCache().run("k", lambda a: a + 1, {"a": torch.ones(2)})


def test_graph_cache_structures_and_eviction():
    cache = GraphCache(capture=CountingCapture(), max_entries=2)

    def f(a, b=None):
        return {"sum": a + b["x"], "n": (a * 2,)}
    a = torch.ones(3)
    out = cache.run("k1", f, {"a": a, "b": {"x": torch.full((3,), 2.0)}})
    assert torch.equal(out["sum"], torch.full((3,), 3.0)) and torch.equal(out["n"][0], 2 * a)
    out2 = cache.run("k1", f, {"a": 2 * a, "b": {"x": torch.zeros(3)}})
    assert torch.equal(out2["sum"], 2 * a) and torch.equal(out["sum"], torch.full((3,), 3.0))
    cache.run("k2", f, {"a": a, "b": {"x": a}})
    cache.run("k3", f, {"a": a, "b": {"x": a}})
    assert cache.keys() == ["k2", "k3"] and cache.captures == 3
    spec = graphs.tensor_spec(torch.empty(1, 4, 2, 2).to(memory_format=torch.channels_last))
    assert spec != graphs.tensor_spec(torch.empty(1, 4, 2, 2))
    with pytest.raises(TypeError, match="graph inputs"):
        cache.run("k4", f, {"a": 1.0})


def test_a_capture_that_fails_says_what_to_do_and_caches_nothing():
    def refuse(fn, static, pool=None, warmup=0):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
    cache = GraphCache(capture=refuse)
    with pytest.raises(RuntimeError, match=r"could not be captured in a CUDA graph \(CUDA error: operation "
                       r"not permitted when stream is capturing\); run it without cuda_graph=True"):
        cache.run(("sample", 8), lambda a: a + 1, {"a": torch.ones(2)})
    assert len(cache) == 0 and cache.captures == 0


def test_moved_watch_drops_every_graph_captured_on_it():
    cache = GraphCache(capture=CountingCapture())
    w = torch.nn.Parameter(torch.ones(3))
    other = torch.ones(3)

    def f(a):
        return a * w
    cache.run("small", f, {"a": torch.ones(3)}, watch=[w])
    cache.run("large", f, {"a": torch.ones(2, 3)}, watch=[w])
    cache.run("elsewhere", lambda a: a + other, {"a": torch.ones(3)}, watch=[other])
    w.data = w.data * 2  # moved, as by .to(): both graphs on w's old address go at once
    assert torch.equal(cache.run("small", f, {"a": torch.ones(3)}, watch=[w]), torch.full((3,), 2.0))
    assert cache.keys() == ["elsewhere", "small"] and cache.captures == 4


# --------------------------------------------------------------------------- GPU: real graphs

def _cuda_model(dtype=torch.float32):
    return tiny_model().to("cuda", dtype)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_cuda_graph_replay_equals_eager(sampler):
    m = _cuda_model()
    x_T, cond, uncond = inputs(m, device="cuda")
    kw = dict(steps=5, sampler=sampler, progress=False)
    g = m.sample(cond, uncond, guidance_scale=7.5, x_T=x_T, cuda_graph=True, **kw)
    e = m.sample(cond, uncond, guidance_scale=7.5, x_T=x_T, **kw)
    assert rel(g, e) < 1e-5
    cache = m.graph_cache()
    assert cache.captures == 1
    # new scale, prompt and noise: same graph, the eager result for those inputs
    x2, c2, u2 = inputs(m, seed=3, device="cuda")
    for a in (dict(cond=cond, uncond=uncond, guidance_scale=2.0, x_T=x_T),
              dict(cond=c2, uncond=u2, guidance_scale=7.5, x_T=x_T),
              dict(cond=cond, uncond=uncond, guidance_scale=7.5, x_T=x2)):
        assert rel(m.sample(cuda_graph=True, **a, **kw), m.sample(**a, **kw)) < 1e-5
    assert cache.captures == 1
    # a shape change captures a new graph; the old one still replays right
    x1 = inputs(m, b=1, hw=(8, 16), device="cuda")[0]
    a1 = dict(cond=cond[:1], uncond=uncond[:1], guidance_scale=7.5, x_T=x1)
    assert rel(m.sample(cuda_graph=True, **a1, **kw), m.sample(**a1, **kw)) < 1e-5
    assert cache.captures == 2
    assert rel(m.sample(cond, uncond, guidance_scale=7.5, x_T=x_T, cuda_graph=True, **kw), e) < 1e-5
    assert cache.captures == 2


@pytest.mark.cuda
@cuda
def test_cuda_graph_sees_in_place_weight_updates_and_decodes():
    m = _cuda_model()
    x_T, cond, uncond = inputs(m, device="cuda")
    kw = dict(cond=cond, uncond=uncond, guidance_scale=5.0, x_T=x_T, steps=3, progress=False)
    before = m.sample(cuda_graph=True, **kw)
    p = m.unet.out[2].weight
    with torch.no_grad():
        p.data.add_(0.05 * torch.randn_like(p))
    after = m.sample(cuda_graph=True, **kw)
    assert m.graph_cache().captures == 1 and rel(after, before) > 1e-3
    assert rel(after, m.sample(**kw)) < 1e-5
    z = torch.randn(2, 4, 8, 8, device="cuda")
    assert rel(m.decode(z, cuda_graph=True), m.decode(z)) < 1e-5
    z2 = torch.randn(2, 4, 8, 8, device="cuda")
    assert rel(m.decode(z2, cuda_graph=True), m.decode(z2)) < 1e-5


@pytest.mark.cuda
@cuda
def test_cuda_graph_fp16():
    m = _cuda_model(torch.float16)
    x_T, cond, uncond = inputs(m, device="cuda")
    kw = dict(cond=cond.half(), uncond=uncond.half(), guidance_scale=7.5, x_T=x_T.half(),
              steps=4, progress=False)
    g, e = m.sample(cuda_graph=True, **kw), m.sample(**kw)
    assert torch.isfinite(g).all() and rel(g, e) < 1e-3


def test_a_failed_capture_gives_back_the_stream_and_the_pool(monkeypatch):
    # torch.cuda.graph's exit raises from capture_end before it restores the caller's stream
    # (torch's own order, mimicked here without a GPU); `capturing` must restore it and, where
    # capture_end did not end the allocator's routing to the pool, end it and give back the
    # capture's use of a pool of the graph's own; otherwise leave the pool to the graph.
    from ldmfast.graphs import capturing

    current = ["caller"]
    routing = set()  # pools the allocator is routing the capture stream's allocations to
    calls = []

    @contextlib.contextmanager
    def stream(s):  # torch's StreamContext restores the stream on any exit
        before = current[0]
        current[0] = s
        try:
            yield
        finally:
            current[0] = before

    class graph:  # noqa: N801 - torch's name
        end_completes = False  # True: capture_end gets past endAllocateToPool, then fails

        def __init__(self, g, pool=None, stream=None):
            self.s, self.pool = stream, pool

        def __enter__(self):
            current[0] = self.s
            routing.add(self.pool)

        def __exit__(self, *exc):
            if graph.end_completes:
                routing.discard(self.pool)
            raise RuntimeError("operation not permitted when stream is capturing")  # before restoring

    def end(device, pool):
        if pool not in routing:
            raise RuntimeError("endAllocatePool: not currently recording to mempool_id")
        routing.discard(pool)
        calls.append(("end", device, pool))

    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 42))
    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", end, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_releasePool", lambda d, p: calls.append(("release", d, p)), raising=False)
    with pytest.raises(RuntimeError, match="not permitted"):
        with capturing(object(), "side"):
            assert current[0] == "side"
            torch.ones(1).item()  # an op that cannot be captured
    assert current[0] == "caller" and not routing
    assert calls == [("end", 0, (0, 42)), ("release", 0, (0, 42))]  # a handle made for the graph
    calls.clear()
    with pytest.raises(RuntimeError):
        with capturing(object(), "side", pool=(0, 3)):  # a shared pool (a GraphCache's)
            pass
    # routing ended; the use of a shared pool is kept (released, a pool at count zero with live
    # blocks would fail the next capture into it)
    assert current[0] == "caller" and calls == [("end", 0, (0, 3))]
    # capture_end ended the routing itself: the graph holds its use of the pool, nothing is released
    calls.clear()
    graph.end_completes = True
    with pytest.raises(RuntimeError):
        with capturing(object(), "side"):
            pass
    assert current[0] == "caller" and calls == []