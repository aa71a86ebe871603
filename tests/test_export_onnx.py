"""ONNX export: the fused ops' translations, the tiny preset's three graphs, fp16 safety, external
data, atomic writing, and an SD-1.5-shaped U-Net (slow).

onnxruntime (CPU) runs every graph. fp32 graphs must match PyTorch to a relative error below
1e-3 (max|ort - torch| / max|torch|). fp16 graphs follow the house parity rule with PyTorch's
own fp16 run as the same-dtype reference and the fp32 run as the high-precision one:
max|ort16 - torch32| <= 2 max|torch16 - torch32| + ATOL[fp16].
"""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from conftest import assert_parity  # noqa: E402

import ldmfast.ops  # noqa: E402,F401
from ldmfast import ref  # noqa: E402
from ldmfast.export import onnx as ldm_onnx  # noqa: E402
from ldmfast.export.onnx import export_onnx, load_manifest  # noqa: E402
from ldmfast.export.translations import resolve_forms, translation_table  # noqa: E402

FP32_RTOL = 1e-3


def _session(path_or_proto):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    src = path_or_proto if isinstance(path_or_proto, str) else path_or_proto.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _run(sess, feeds):
    return sess.run(None, {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in feeds.items()})


def _rel_err(out, expected):
    out = torch.as_tensor(np.asarray(out, dtype=np.float64))
    expected = expected.detach().to(torch.float64)
    return ((out - expected).abs().max() / expected.abs().max()).item()


def _domains(model):
    return {n.domain for n in model.graph.node}


# --- the fused ops on their own -----------------------------------------------------------------

class _Ops(torch.nn.Module):
    """Calls every torch.ops.ldmfast op the way the model layer and samplers do."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w1 = torch.nn.Parameter(1 + 0.1 * torch.randn(64, generator=g))
        self.b1 = torch.nn.Parameter(0.1 * torch.randn(64, generator=g))
        self.w2 = torch.nn.Parameter(1 + 0.1 * torch.randn(96, generator=g))
        self.b2 = torch.nn.Parameter(0.1 * torch.randn(96, generator=g))

    def forward(self, x, emb, x2, q, k, v, kc, vc, xd, e, u, n, a_t, hg):
        ops = torch.ops.ldmfast
        return (
            # the U-Net ResBlock: 32 groups, eps 1e-5, time embedding added inside, SiLU
            ops.group_norm_silu(x, self.w1, self.b1, 32, 1e-5, True, emb),
            # autoencoder eps 1e-6, no SiLU; 3 groups of 32 channels, odd spatial 5x7
            ops.group_norm_silu(x2, self.w2, self.b2, 3, 1e-6, False, None),
            ops.attention(q, k, v, None),            # self-attention, head dim 40 (SD level 1)
            ops.attention(q, kc, vc, 0.125),         # cross-attention to 7 tokens, given scale
            # DDIM with per-sample alpha_t, guidance and noise; then the plain float form
            *ops.ddim_step(xd, e, u, n, 0.0, 0.8, 0.1, 7.5, a_t, None, None, None),
            *ops.ddim_step(xd, e, None, None, 0.5, 0.7, 0.0, 1.0, None, None, None, None),
            ops.geglu(hg),                           # the FeedForward gate, odd half width 21
        )


def _ops_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    r = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g)).to(dtype)  # noqa: E731
    # x at magnitude ~300: its sum of squares per group (~6e6) overflows float16 unless the
    # statistics are computed in float32, which is the black-image bug this export avoids.
    return (r(2, 64, 8, 8, scale=300.0), r(2, 64), r(1, 96, 5, 7), r(2, 16, 8, 40, scale=3.0),
            r(2, 16, 8, 40), r(2, 16, 8, 40), r(2, 7, 8, 40), r(2, 7, 8, 40), r(2, 4, 8, 8),
            r(2, 4, 8, 8), r(2, 4, 8, 8), r(2, 4, 8, 8), torch.tensor([0.3, 0.9]),
            r(2, 5, 42, scale=2.0))


def _ops_reference(m, inputs, dtype):
    """The ref functions in dtype (ldmfast.ref casts to float32 where the model does)."""
    x, emb, x2, q, k, v, kc, vc, xd, e, u, n, a_t, hg = (t.to(dtype) if t.is_floating_point() else t
                                                      for t in inputs)
    w1, b1, w2, b2 = (p.detach().to(dtype) for p in (m.w1, m.b1, m.w2, m.b2))
    return (ref.group_norm_silu(x, w1, b1, 32, 1e-5, True, emb),
            ref.group_norm_silu(x2, w2, b2, 3, 1e-6, False, None),
            ref.attention(q, k, v), ref.attention(q, kc, vc, 0.125),
            *ref.ddim_step(xd, e, a_t.to(dtype), 0.8, 0.1, n, u, 7.5),
            *ref.ddim_step(xd, e, 0.5, 0.7, 0.0), ref.geglu(hg))


@pytest.mark.parametrize("opset,group_norm,attention", [(18, "instance", "matmul"),
                                                        (23, "group", "onnx")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_op_translations(opset, group_norm, attention, dtype):
    m = _Ops().to(dtype).eval()
    inputs = _ops_inputs(dtype)
    program = torch.onnx.export(m, inputs, dynamo=True, opset_version=opset, verbose=False,
                                custom_translation_table=translation_table(opset, group_norm,
                                                                           attention))
    model = program.model_proto
    assert _domains(model) <= {"", "ai.onnx"}, "custom-domain node left in the graph"
    kinds = {n.op_type for n in model.graph.node}
    assert ("InstanceNormalization" if group_norm == "instance" else "GroupNormalization") in kinds
    assert ("Softmax" if attention == "matmul" else "Attention") in kinds

    # fp32 islands: normalisation and softmax/attention see float32 inputs in an fp16 graph.
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    for node in inferred.graph.node:
        if node.op_type in ("InstanceNormalization", "GroupNormalization", "Softmax", "Attention"):
            assert types[node.input[0]] == onnx.TensorProto.FLOAT, f"{node.op_type} not in fp32"

    outs = _run(_session(model), {i.name: t for i, t in zip(model.graph.input, inputs)})
    refs = _ops_reference(m, inputs, dtype)
    refs64 = _ops_reference(m, [t.double() if t.is_floating_point() else t for t in inputs],
                            torch.float64)
    names = ["gn_silu_emb", "gn_plain", "self_attn", "cross_attn", "ddim_x_prev", "ddim_x0",
             "ddim2_x_prev", "ddim2_x0", "geglu"]
    assert len(outs) == len(names)
    for name, o, r, r64 in zip(names, outs, refs, refs64):
        assert_parity(torch.from_numpy(o), r, r64, dtype, f"{name} opset {opset} {dtype}")


def test_forms_need_their_opset():
    assert resolve_forms(18) == ("instance", "matmul")
    with pytest.raises(ValueError, match="opset >= 21"):
        resolve_forms(18, group_norm="group")
    with pytest.raises(ValueError, match="opset >= 23"):
        resolve_forms(21, attention="onnx")
    with pytest.raises(ValueError, match="group_norm must be"):
        resolve_forms(18, group_norm="layer")


# --- the tiny preset ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from ldmfast import configs
    from ldmfast.pipeline import LatentDiffusion

    torch.manual_seed(0)
    model = LatentDiffusion.from_components(configs.build("tiny")).eval()
    with torch.no_grad():  # biases start at zero; give every one a value so each is exercised
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05)
    return model


def _tiny_inputs(model, batch=2, h=8, w=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx_dim = model.unet.config["context_dim"]
    return {"sample": torch.randn(batch, 4, h, w, generator=g).to(dtype),
            "timestep": torch.tensor([999.0, 17.0, 500.0, 3.0][:batch]),
            "context": torch.randn(batch, 16, ctx_dim, generator=g).to(dtype),
            "latent": torch.randn(batch, 4, h, w, generator=g).to(dtype),
            "input_ids": torch.randint(0, 40, (batch, 16), generator=g)}


@pytest.fixture(scope="module")
def tiny_fp32(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny-fp32"
    # tiny's first stage has 3 levels: f = 4, so 32x32 pixels are 8x8 latents
    paths = export_onnx(tiny, out, height=32, width=32, batch=2, dtype="fp32")
    return out, paths


def test_tiny_export_files_and_manifest(tiny, tiny_fp32):
    out, paths = tiny_fp32
    assert set(paths) == {"unet", "vae_decoder", "text_encoder"}
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "text_encoder.onnx",
                                                    "unet.onnx", "vae_decoder.onnx"]
    assert not list(out.parent.glob(".tiny-fp32.tmp-*")), "staging directory left behind"
    man = load_manifest(out)
    assert man["latent"] == [8, 8] and man["dtype"] == "fp32" and man["opset"] == 18
    unet = man["components"]["unet"]
    assert [i["name"] for i in unet["inputs"]] == ["sample", "timestep", "context"]
    assert unet["inputs"][0]["shape"] == [2, 4, 8, 8] and unet["outputs"][0]["name"] == "eps"
    assert man["components"]["vae_decoder"]["outputs"][0]["shape"] == [2, 3, 32, 32]
    assert man["components"]["text_encoder"]["inputs"][0]["dtype"] == "int64"
    # every U-Net parameter is traceable to an initializer (TensorRT refit by state dict)
    sources = {e["source"] for e in unet["weights"].values()}
    assert sources == set(tiny.unet.state_dict())
    for name, path in paths.items():
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        assert _domains(model) <= {"", "ai.onnx"}
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["ldmfast.component"] == name and meta["ldmfast.dtype"] == "fp32"


def test_tiny_fp32_matches_pytorch(tiny, tiny_fp32):
    _, paths = tiny_fp32
    x = _tiny_inputs(tiny)
    with torch.no_grad():
        expected = {"unet": tiny.unet(x["sample"], x["timestep"], context=x["context"]),
                    "vae_decoder": tiny.first_stage.decode(x["latent"]),
                    "text_encoder": tiny.cond_stage(x["input_ids"])}
    for name, path in paths.items():
        sess = _session(str(path))
        (out,) = _run(sess, {i.name: x[i.name] for i in sess.get_inputs()})
        err = _rel_err(out, expected[name])
        assert err < FP32_RTOL, f"{name}: relative error {err:.3g}"


def test_tiny_fp16_finite_and_within_parity(tiny, tmp_path):
    paths = export_onnx(tiny, tmp_path / "fp16", height=32, width=32, batch=2, dtype="fp16",
                        components=["unet", "vae_decoder"])
    half = __import__("copy").deepcopy(tiny).to(torch.float16)
    x32 = _tiny_inputs(tiny)
    # The decoder also sees latents 8x larger than usual: activations whose GroupNorm
    # statistics overflow float16 unless they are kept in float32.
    x32["latent"] = x32["latent"] * 8
    x16 = {k: (v.half() if v.is_floating_point() and k != "timestep" else v)
           for k, v in x32.items()}
    with torch.no_grad():
        ref32 = {"unet": tiny.unet(x32["sample"], x32["timestep"], context=x32["context"]),
                 "vae_decoder": tiny.first_stage.decode(x32["latent"])}
        ref16 = {"unet": half.unet(x16["sample"], x16["timestep"], context=x16["context"]),
                 "vae_decoder": half.first_stage.decode(x16["latent"])}
    for name, path in paths.items():
        model = onnx.load(str(path))
        assert any(n.op_type == "Cast" for n in model.graph.node)
        sess = _session(str(path))
        assert sess.get_inputs()[0].type == "tensor(float16)"
        (out,) = _run(sess, {i.name: x16[i.name] for i in sess.get_inputs()})
        out = torch.from_numpy(out)
        assert out.dtype == torch.float16 and torch.isfinite(out).all(), f"{name}: NaN/inf"
        assert_parity(out, ref16[name], ref32[name], torch.float16, f"{name} fp16 graph")


def test_external_data_and_dynamic_batch(tiny, tmp_path):
    out = tmp_path / "ext"
    paths = export_onnx(tiny.unet, out, height=64, width=64, batch=2, downsampling_factor=8,
                        text_length=16, dynamic=True, external_data=True)
    path = paths["unet"]
    man = load_manifest(out)
    # all but the tiny (< 256 byte) tensors live in the .data file
    weights_bytes = man["components"]["unet"]["weights_bytes"]
    assert (out / "unet.onnx.data").stat().st_size > 0.95 * weights_bytes
    onnx.checker.check_model(str(path), full_check=True)
    assert man["components"]["unet"]["external_data"] == "unet.onnx.data"
    assert not isinstance(man["components"]["unet"]["inputs"][0]["shape"][0], int)
    sess = _session(str(path))
    for batch, hw in ((1, 8), (3, 8), (2, 12)):
        x = _tiny_inputs(tiny, batch=batch, h=hw, w=hw, seed=batch)
        with torch.no_grad():
            expected = tiny.unet(x["sample"], x["timestep"], context=x["context"])
        (got,) = _run(sess, {k: x[k] for k in ("sample", "timestep", "context")})
        assert got.shape == tuple(expected.shape)
        assert _rel_err(got, expected) < FP32_RTOL


def test_slim_keeps_results(tiny, tmp_path):
    paths = export_onnx(tiny, tmp_path / "slim", height=32, width=32, batch=2,
                        components=["text_encoder"], slim=True)
    assert load_manifest(tmp_path / "slim")["components"]["text_encoder"]["slimmed"]
    x = _tiny_inputs(tiny)
    with torch.no_grad():
        expected = tiny.cond_stage(x["input_ids"])
    (got,) = _run(_session(str(paths["text_encoder"])), {"input_ids": x["input_ids"]})
    assert _rel_err(got, expected) < FP32_RTOL


def test_clip_text_encoder(tmp_path):
    """SD's text encoder (transformers CLIPTextModel inside CLIPTextEmbedder), shrunk."""
    from ldmfast.models import CLIPTextEmbedder

    torch.manual_seed(0)
    enc = CLIPTextEmbedder({"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 128,
                            "num_hidden_layers": 2, "num_attention_heads": 4,
                            "max_position_embeddings": 77, "hidden_act": "quick_gelu"},
                           layer="penultimate").eval()
    paths = export_onnx(enc, tmp_path / "clip", batch=2)
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = enc(ids)
    (got,) = _run(_session(str(paths["text_encoder"])), {"input_ids": ids})
    assert got.shape == (2, 77, 64)
    assert _rel_err(got, expected) < FP32_RTOL


# --- atomic writing -------------------------------------------------------------------------------

def _fake_part(name, wrapper, args, input_names, output_names, dest, **kw):
    (dest / f"{name}.onnx").write_bytes(f"graph {name} {args[0].shape[-1]}".encode())
    info = {"file": f"{name}.onnx", "external_data": None, "inputs": [], "outputs": [],
            "weights": {}}
    if kw.get("external_data"):
        info["external_data"] = f"{name}.onnx.data"
        (dest / info["external_data"]).write_bytes(b"weights")
    return info


def test_refuses_existing_directory(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(ldm_onnx, "_export_part", _fake_part)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_onnx(tiny, out, height=32, width=32)
    with pytest.raises(FileExistsError, match="not an ldmfast export"):
        export_onnx(tiny, out, height=32, width=32, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_overwrite_keeps_what_it_does_not_write(tiny, tmp_path, monkeypatch, exchange):
    """--overwrite replaces the exported components' graphs and the manifest, nothing else: an
    engine built beside the graphs, the user's notes and the other components survive."""
    monkeypatch.setattr(ldm_onnx, "_export_part", _fake_part)
    if not exchange:
        monkeypatch.setattr(ldm_onnx._files, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    out.mkdir()  # an empty directory counts as absent
    export_onnx(tiny, out, height=32, width=32, external_data=True)
    (out / "NOTES.txt").write_text("mine")
    (out / "text_encoder.plan").write_bytes(b"engine")
    (out / "engines").mkdir()
    (out / "engines" / "unet.plan").write_bytes(b"engine 2")
    before = load_manifest(out)
    with pytest.raises(FileExistsError):
        export_onnx(tiny, out, height=32, width=32, components=["unet"])
    # other settings would leave the manifest describing the kept graphs wrongly
    with pytest.raises(FileExistsError, match=r"other settings: height 32 \(now 64\)"):
        export_onnx(tiny, out, height=64, width=32, components=["unet"], overwrite=True)
    paths = export_onnx(tiny, out, height=32, width=32, components=["unet"], overwrite=True)
    assert paths == {"unet": out / "unet.onnx"}
    assert {p.name for p in out.iterdir()} == {
        "manifest.json", "unet.onnx", "vae_decoder.onnx", "vae_decoder.onnx.data",
        "text_encoder.onnx", "text_encoder.onnx.data", "NOTES.txt", "text_encoder.plan",
        "engines"}  # unet.onnx.data belonged to the replaced unet graph
    assert (out / "NOTES.txt").read_text() == "mine"
    assert (out / "engines" / "unet.plan").read_bytes() == b"engine 2"
    assert (out / "vae_decoder.onnx.data").read_bytes() == b"weights"
    after = load_manifest(out)
    assert after["components"]["unet"]["external_data"] is None
    for name in ("vae_decoder", "text_encoder"):
        assert after["components"][name] == before["components"][name]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old folder left


def test_export_modes_follow_the_umask(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(ldm_onnx, "_export_part", _fake_part)
    out = tmp_path / "out"
    old = os.umask(0o027)
    try:
        export_onnx(tiny, out, height=32, width=32, components=["unet"])
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o750  # not mkdtemp's 0700
    assert (out / "manifest.json").stat().st_mode & 0o777 == 0o640
    os.chmod(out, 0o705)  # a replaced export keeps its folder's mode
    export_onnx(tiny, out, height=32, width=32, components=["unet"], overwrite=True)
    assert out.stat().st_mode & 0o777 == 0o705


def test_failure_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    calls = []

    def failing(name, *args, **kw):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("exporter failed")
        return _fake_part(name, *args, **kw)

    monkeypatch.setattr(ldm_onnx, "_export_part", failing)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_onnx(tiny, tmp_path / "out", height=32, width=32)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tiny, tmp_path):
    with pytest.raises(ValueError, match="multiple"):
        export_onnx(tiny, tmp_path / "a", height=30, width=32)
    with pytest.raises(ValueError, match="unknown components"):
        export_onnx(tiny, tmp_path / "a", height=32, width=32, components=["vae_encoder"])
    with pytest.raises(ValueError, match="dtype"):
        export_onnx(tiny, tmp_path / "a", height=32, width=32, dtype="int8")
    with pytest.raises(ValueError, match="opset >= 22"):
        export_onnx(tiny, tmp_path / "a", height=32, width=32, dtype="bf16")
    with pytest.raises(TypeError, match="cannot export"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"batch": -1}, r"^batch must be an integer >= 1, got -1"),
    ({"batch": 0}, r"^batch must"),
    ({"batch": 2.0}, r"^batch must"),
    ({"batch": 2000, "dynamic": True}, r"^batch must be an integer from 1 to 1024"),
    ({"height": -64}, r"^height must be an integer >= 1"),
    ({"height": 0}, r"^height must"),
    ({"width": True}, r"^width must"),
    # tiny: f = 4 and a U-Net that halves once, so 8 pixels per U-Net step
    ({"height": 36}, r"^height must be a multiple of 8 \(the first stage's downsampling "
                     r"factor 4 times the U-Net's 2\), got 36"),
    ({"width": 36, "components": ["vae_decoder"]}, None),  # the decoder alone needs only f
    ({"text_length": 0}, r"^text_length must"),
    ({"text_length": 17}, r"^text_length 17 exceeds the text encoder's 16 positions"),
    ({"opset": 10}, r"^opset must be an integer from 18 to 23, got 10"),
    ({"opset": 99}, r"^opset must"),
    ({"opset": 18.0}, r"^opset must"),
])
def test_bad_numbers_name_the_argument(tiny, tmp_path, monkeypatch, kwargs, message):
    monkeypatch.setattr(ldm_onnx, "_export_part", _fake_part)
    kwargs = {"height": 32, "width": 32, **kwargs}
    if message is None:
        export_onnx(tiny, tmp_path / "a", **kwargs)
        return
    with pytest.raises(ValueError, match=message):
        export_onnx(tiny, tmp_path / "a", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_progress_bar(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ldm_onnx, "_export_part", _fake_part)
    export_onnx(tiny, tmp_path / "a", height=32, width=32)
    err = capsys.readouterr().err
    assert "export onnx: 100%" in err and "3/3" in err
    export_onnx(tiny, tmp_path / "b", height=32, width=32, progress=False)
    assert "export onnx" not in capsys.readouterr().err


# --- command line ---------------------------------------------------------------------------------

def _cli(argv):
    from ldmfast.cli import build_parser

    args = build_parser({"export": "ldmfast.export.command"}).parse_args(argv)
    return args._command.run(args)


def test_cli_plumbing(tiny, tmp_path, monkeypatch):
    from ldmfast.pipeline import LatentDiffusion

    seen = {}
    monkeypatch.setattr(LatentDiffusion, "load", classmethod(lambda cls, p, **kw: tiny))
    monkeypatch.setattr(ldm_onnx, "export_onnx",
                        lambda model, out, **kw: seen.update(model=model, out=out, **kw) or {})
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(b"")
    assert _cli(["export", "onnx", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"),
                 "--height", "512", "--width", "512", "--batch", "2", "--dtype", "fp16",
                 "--components", "unet", "--no-progress"]) == 0
    assert seen["model"] is tiny and seen["batch"] == 2 and seen["dtype"] == "fp16"
    assert seen["components"] == ["unet"] and seen["height"] == 512 and not seen["dynamic"]
    assert seen["progress"] is False


@pytest.mark.parametrize("option, value, message", [
    ("--batch", "-1", "argument --batch: must be at least 1, got -1"),
    ("--height", "-64", "argument --height: must be at least 1, got -64"),
    ("--height", "0", "argument --height: must be at least 1, got 0"),
    ("--width", "x", "argument --width: invalid int value: 'x'"),
    ("--text-length", "0", "argument --text-length: must be at least 1, got 0"),
    ("--opset", "10", "argument --opset: invalid choice: 10"),
    ("--opset", "99", "argument --opset: invalid choice: 99"),
])
def test_cli_refuses_bad_numbers(tmp_path, capsys, option, value, message):
    """Refused at parse time, argparse-style: one line naming the option, exit status 2."""
    with pytest.raises(SystemExit) as exit_:
        _cli(["export", "onnx", "-c", str(tmp_path / "m.ckpt"), "-o", str(tmp_path / "o"),
              option, value])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_checks_sizes_against_the_model(tiny, tmp_path, monkeypatch):
    from ldmfast.pipeline import LatentDiffusion

    monkeypatch.setattr(LatentDiffusion, "load", classmethod(lambda cls, p, **kw: tiny))
    monkeypatch.setattr(ldm_onnx, "_export_part", _fake_part)
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(b"")
    base = ["export", "onnx", "-c", str(ckpt), "-o", str(tmp_path / "o"), "--no-progress"]
    with pytest.raises(ValueError, match=r"^--height must be a multiple of 8 "):
        _cli(base + ["--height", "36", "--width", "32"])
    with pytest.raises(ValueError, match=r"^--text-length 40 exceeds"):
        _cli(base + ["--text-length", "40", "--components", "text_encoder"])
    with pytest.raises(ValueError, match=r"^--components: unknown \['foo'\]"):
        _cli(base + ["--components", "unet,foo"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


# --- an SD-1.5-shaped U-Net: 859M parameters, 3.4 GB in fp32 -> external data ------------------

@pytest.mark.slow
def test_sd15_unet_external_data(tmp_path):
    from ldmfast import configs
    from ldmfast.models import build_unet

    t0 = time.time()
    torch.manual_seed(0)
    unet = build_unet(configs.get("sd1")["unet"]).eval()
    n_params = sum(p.numel() for p in unet.parameters())
    assert n_params > 850e6
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500.0])
    c = torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        expected = unet(x, t, context=c)
    paths = export_onnx(unet, tmp_path / "sd15", height=64, width=64, batch=1,
                        downsampling_factor=8)
    man = load_manifest(tmp_path / "sd15")["components"]["unet"]
    assert man["weights_bytes"] > 2 ** 31 and man["external_data"] == "unet.onnx.data"
    assert paths["unet"].stat().st_size < 50_000_000
    onnx.checker.check_model(str(paths["unet"]), full_check=True)  # path-based: > 2 GB
    del unet
    (got,) = _run(_session(str(paths["unet"])), {"sample": x, "timestep": t, "context": c})
    err = _rel_err(got, expected)
    assert err < FP32_RTOL, f"SD-1.5 U-Net relative error {err:.3g}"
    shutil.rmtree(tmp_path / "sd15")
    print(f"SD-1.5 U-Net export + check + run: {time.time() - t0:.0f} s, rel err {err:.2g}",
          json.dumps({"params": n_params}))


def _old_export(folder, files):
    folder.mkdir()
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def test_replacing_an_export_with_links_in_it(tmp_path):
    from ldmfast.export import _files
    out = tmp_path / "exp"
    _old_export(out, {"manifest.json": b"{}", "unet.onnx": b"old", "engines/unet.plan": b"e"})
    os.symlink("engines", out / "current")  # a link to a folder inside the export
    new = _files.staging_dir(out)
    (new / "manifest.json").write_bytes(b"{}")
    (new / "unet.onnx").write_bytes(b"new")
    _files.commit_dir(new, out, overwrite=True, owned={"unet.onnx"})
    assert (out / "unet.onnx").read_bytes() == b"new"
    assert (out / "current" / "unet.plan").read_bytes() == b"e"  # carried, link and all
    assert sorted(os.listdir(tmp_path)) == ["exp"]  # no staging or old folder left
    # The export folder given as a link: refused (the swap would replace the link and empty
    # the folder it points to through it).
    os.symlink("exp", tmp_path / "latest")
    with pytest.raises(FileExistsError, match="symbolic link"):
        _files.check_destination(tmp_path / "latest", overwrite=True)
    assert (out / "unet.onnx").read_bytes() == b"new"


def test_numpy_sizes_are_plain_ints_in_the_manifest(tiny, tmp_path):
    # They pass the checks, so they must not fail at the end, writing the JSON manifest.
    export_onnx(tiny, tmp_path / "o", height=np.int64(32), width=np.int64(32),
                batch=np.int64(1), components=["vae_decoder"], progress=False)
    m = load_manifest(tmp_path / "o")
    assert json.dumps(m) and (tmp_path / "o" / "vae_decoder.onnx").exists()


@pytest.mark.parametrize("method", ["subpixel", "transposed"])
def test_upsample_rewrite_is_not_exported(tiny, tmp_path, monkeypatch, method):
    # The model layer's upsample+conv rewrite (summed weights) stays out of exported graphs even
    # when forced: they keep the original Resize + Conv, whose weights are the state dict's
    # (TensorRT refit), and the outputs still match PyTorch.
    monkeypatch.setenv("LDMFAST_UPSAMPLE_CONV", method)
    paths = export_onnx(tiny, tmp_path / "up", height=32, width=32, batch=2, dtype="fp32")
    ops_used = {n.op_type for n in onnx.load(str(paths["vae_decoder"])).graph.node}
    assert "Resize" in ops_used and "ConvTranspose" not in ops_used
    x = _tiny_inputs(tiny)
    with torch.no_grad():
        expected = tiny.first_stage.decode(x["latent"])
    (out,) = _run(_session(str(paths["vae_decoder"])), {"latent": x["latent"]})
    assert _rel_err(out, expected) < FP32_RTOL
