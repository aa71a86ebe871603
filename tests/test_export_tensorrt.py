"""TensorRT: the package is optional, its absence is reported clearly, and (with TensorRT 10 and a
GPU) engines built from the tiny preset's graphs match PyTorch, refit, and sample.

The tests that need TensorRT call ``pytest.importorskip("tensorrt")`` and are skipped, visibly,
where it is not installed; the CUDA ones carry the ``cuda`` marker.
"""
from __future__ import annotations

import copy
import importlib
import json
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

from conftest import assert_parity

FP32_RTOL = 1e-3


def _have_tensorrt():
    return importlib.util.find_spec("tensorrt") is not None


# --- without TensorRT -----------------------------------------------------------------------------

def test_import_needs_no_tensorrt():
    code = ("import sys, ldmfast, ldmfast.export, ldmfast.export.tensorrt, ldmfast.export.command;"
            "from ldmfast.export import export_onnx, TensorRTModule, build_engine;"
            "assert 'tensorrt' not in sys.modules, 'tensorrt imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(_have_tensorrt(), reason="TensorRT is installed here")
def test_missing_tensorrt_is_named(tmp_path):
    from ldmfast.export.tensorrt import TensorRTModule, build_engine

    with pytest.raises(ImportError, match=r"TensorRT 10 \(the Python package `tensorrt`"):
        build_engine(tmp_path / "unet.onnx", tmp_path / "unet.plan")
    with pytest.raises(ImportError, match="`tensorrt`"):
        TensorRTModule(tmp_path / "unet.plan")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(_have_tensorrt(), reason="TensorRT is installed here")
def test_cli_reports_missing_tensorrt(tmp_path, capsys):
    from ldmfast.cli import build_parser

    parser = build_parser({"export": "ldmfast.export.command"})
    args = parser.parse_args(["export", "tensorrt", "--onnx", str(tmp_path)])
    assert args._command.run(args) == 1
    err = capsys.readouterr().err
    assert "ldmfast export tensorrt: error:" in err and "`tensorrt`" in err


def test_engine_file_written_atomically(tmp_path):
    from ldmfast.export._files import write_file_atomic

    path = tmp_path / "unet.plan"
    old = os.umask(0o027)
    try:
        write_file_atomic(path, b"engine-1", overwrite=False)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640  # the umask's mode, not mkstemp's 0600
    with pytest.raises(FileExistsError, match="overwrite"):
        write_file_atomic(path, b"engine-2", overwrite=False)
    write_file_atomic(path, bytearray(b"engine-2"), overwrite=True)
    assert path.read_bytes() == b"engine-2"
    assert [p.name for p in tmp_path.iterdir()] == ["unet.plan"]


# --- ldmfast's file handling around a stand-in `tensorrt` (no GPU needed) -----------------------

@pytest.fixture
def fake_trt(monkeypatch):
    """A stand-in `tensorrt` module: parsing and building succeed (the engine is b"ENGINE"), and
    a timing cache loads from b"" or bytes starting b"CACHE" and serialises as b"CACHE-new"."""
    from ldmfast.export import tensorrt as ldm_trt

    trt = mock.MagicMock(__version__="10.0.0")

    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING, INFO = range(4)

        def __init__(self):
            pass

    trt.ILogger = ILogger
    builder = trt.Builder.return_value
    builder.build_serialized_network.return_value = b"ENGINE"
    trt.OnnxParser.return_value.parse_from_file.return_value = True
    config = builder.create_builder_config.return_value
    config.create_timing_cache.side_effect = \
        lambda blob: mock.MagicMock() if blob == b"" or blob.startswith(b"CACHE") else None
    config.set_timing_cache.return_value = True
    config.get_timing_cache.return_value.serialize.return_value = b"CACHE-new"
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(ldm_trt._Logger, "instance", None)  # not one bound to the stand-in
    return trt


def _export_dir(tmp_path):
    """A one-graph export: unet.onnx with its weights in unet.onnx.data, and a manifest."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = tmp_path / "export"
    out.mkdir()
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["sample", "w"], ["eps"])], "g",
                              [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("eps", TensorProto.FLOAT, [1, 4])],
                              [w])
    onnx.save_model(helper.make_model(graph), str(out / "unet.onnx"), save_as_external_data=True,
                    location="unet.onnx.data", size_threshold=0)
    (out / "manifest.json").write_text('{"components": {}}')
    return out


def _contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_engine_never_written_over_an_input(fake_trt, tmp_path):
    from ldmfast.export.tensorrt import build_engine

    out = _export_dir(tmp_path)
    graph, before = out / "unet.onnx", _contents(out)
    # the graph, its external data, the manifest (also as the engine's .json sidecar)
    for target in ("unet.onnx", "unet.onnx.data", "manifest.json", "manifest"):
        with pytest.raises(ValueError, match=r"engine_path.*refusing to write over it \(even "):
            build_engine(graph, out / target, overwrite=True)
    for target in ("unet.onnx", "unet.onnx.data", "manifest.json"):
        with pytest.raises(ValueError, match=r"^timing_cache: .* refusing to write over it"):
            build_engine(graph, out / "unet.plan", timing_cache=out / target, overwrite=True)
    with pytest.raises(ValueError, match="timing_cache: .* is the engine;"):
        build_engine(graph, out / "unet.plan", timing_cache=out / "unet.plan")
    assert _contents(out) == before
    assert build_engine(graph, out / "unet.plan") == out / "unet.plan"
    assert (out / "unet.plan").read_bytes() == b"ENGINE"
    assert json.loads((out / "unet.plan.json").read_text())["onnx"] == str(graph.resolve())


def test_cli_refuses_an_engine_over_the_graph(fake_trt, tmp_path):
    from ldmfast.cli import build_parser

    out = _export_dir(tmp_path)
    graph, before = out / "unet.onnx", _contents(out)
    parser = build_parser({"export": "ldmfast.export.command"})
    for extra in (["--out", str(graph)], ["--timing-cache", str(out / "unet.onnx.data")]):
        args = parser.parse_args(["export", "tensorrt", "--onnx", str(graph), "--overwrite",
                                  "--no-progress"] + extra)
        with pytest.raises(ValueError, match=f"^{extra[0]}: .* refusing to write over it"):
            args._command.run(args)
    assert _contents(out) == before


def test_timing_cache_updated_only_when_it_is_one(fake_trt, tmp_path):
    from ldmfast.export.tensorrt import build_engine

    graph = _export_dir(tmp_path) / "unet.onnx"
    cache = tmp_path / "trt.cache"
    build_engine(graph, tmp_path / "a.plan", timing_cache=cache)  # a new cache is written
    assert cache.read_bytes() == b"CACHE-new"
    cache.write_bytes(b"CACHE-old")  # a cache TensorRT loads is updated without overwrite
    build_engine(graph, tmp_path / "b.plan", timing_cache=cache)
    assert cache.read_bytes() == b"CACHE-new"
    cache.write_bytes(b"my notes")  # anything else is not ours to replace
    with pytest.raises(FileExistsError, match=r"^timing_cache: .* cannot load it as a timing "):
        build_engine(graph, tmp_path / "c.plan", timing_cache=cache)
    assert cache.read_bytes() == b"my notes" and not (tmp_path / "c.plan").exists()
    build_engine(graph, tmp_path / "c.plan", timing_cache=cache, overwrite=True)
    assert cache.read_bytes() == b"CACHE-new"


def test_timing_cache_written_meanwhile_is_kept(fake_trt, tmp_path, caplog):
    """A cache file that appears while the engine builds (a parallel build) is neither replaced
    nor an error once the engine is written: a warning says this build's cache was not saved."""
    from ldmfast.export.tensorrt import build_engine

    graph = _export_dir(tmp_path) / "unet.onnx"
    cache = tmp_path / "trt.cache"

    def build(network, config):
        cache.write_bytes(b"CACHE-other")
        return b"ENGINE"
    fake_trt.Builder.return_value.build_serialized_network.side_effect = build
    with caplog.at_level("WARNING", logger="ldmfast"):
        build_engine(graph, tmp_path / "a.plan", timing_cache=cache)
    assert (tmp_path / "a.plan").read_bytes() == b"ENGINE"
    assert cache.read_bytes() == b"CACHE-other"
    assert "appeared during the build" in caplog.text


def test_cli_tensorrt_progress_bar(fake_trt, tmp_path, capsys):
    from ldmfast.cli import build_parser

    out = _export_dir(tmp_path)
    parser = build_parser({"export": "ldmfast.export.command"})
    args = parser.parse_args(["export", "tensorrt", "--onnx", str(out)])
    assert args._command.run(args) == 0
    assert (out / "unet.plan").read_bytes() == b"ENGINE"
    err = capsys.readouterr().err
    assert "export tensorrt: 100%" in err and "1/1" in err


# --- with TensorRT and a GPU ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trt_env():
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT tests need a CUDA GPU")
    # The fp32 engines are built without TF32; PyTorch's cuDNN convolutions use it by default,
    # which alone would move the reference by about FP32_RTOL.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = tf32


@pytest.fixture(scope="module")
def tiny_model():
    from ldmfast import configs
    from ldmfast.pipeline import LatentDiffusion

    torch.manual_seed(0)
    model = LatentDiffusion.from_components(configs.build("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05)
    return model


def _unet_inputs(model, device, dtype=torch.float32, batch=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 8, 8, generator=g).to(device, dtype)
    t = torch.tensor([999, 17, 500, 3][:batch], device=device)
    c = torch.randn(batch, 16, model.unet.config["context_dim"], generator=g).to(device, dtype)
    return x, t, c


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.cuda
def test_fp32_engine_matches_pytorch_and_refits(trt_env, tiny_model, tmp_path):
    from ldmfast.export import export_onnx
    from ldmfast.export.tensorrt import TensorRTModule, build_engine

    paths = export_onnx(tiny_model, tmp_path / "onnx", height=32, width=32, batch=2)
    engines = {}
    for name, path in paths.items():
        engines[name] = build_engine(path, tmp_path / f"{name}.plan", fp16=False, tf32=False,
                                     workspace_gb=1)
        with pytest.raises(FileExistsError):
            build_engine(path, tmp_path / f"{name}.plan", fp16=False)
    model = copy.deepcopy(tiny_model).to(trt_env)
    unet = TensorRTModule(engines["unet"])
    x, t, c = _unet_inputs(model, trt_env)
    with torch.no_grad():
        expected = model.unet(x, t, context=c)
    assert _rel(unet(x, t, context=c), expected) < FP32_RTOL
    assert _rel(unet(x, t, c), expected) < FP32_RTOL              # positional, like UNetModel
    # a batch that is a multiple of the engine's is run in chunks
    x4, t4, c4 = (torch.cat([a, a]) for a in (x, t, c))
    assert _rel(unet(x4, t4, context=c4), torch.cat([expected, expected])) < FP32_RTOL
    with pytest.raises(ValueError, match="built for batch 2"):
        unet(x[:1], t[:1], context=c[:1])

    decoder = TensorRTModule(engines["vae_decoder"])
    z = torch.randn(2, 4, 8, 8, device=trt_env)
    with torch.no_grad():
        assert _rel(decoder.decode(z), model.first_stage.decode(z)) < FP32_RTOL

    # refit from a state dict: new weights, same engine
    original = expected
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
        perturbed = model.unet(x, t, context=c)
    assert _rel(perturbed, original) > 10 * FP32_RTOL
    unet.refit(model.unet.state_dict())
    assert _rel(unet(x, t, context=c), perturbed) < FP32_RTOL
    # from the exported graph (TensorRT's ONNX refitter): back to the original weights
    unet.refit(paths["unet"])
    assert _rel(unet(x, t, context=c), original) < FP32_RTOL
    # a LatentDiffusion state dict (keys prefixed "unet.") maps through the manifest too
    unet.refit({f"unet.{k}": v for k, v in model.unet.state_dict().items()})
    assert _rel(unet(x, t, context=c), perturbed) < FP32_RTOL


@pytest.mark.cuda
def test_fp16_strongly_typed_engine(trt_env, tiny_model, tmp_path):
    from ldmfast.export import export_onnx
    from ldmfast.export.tensorrt import TensorRTModule, build_engine

    paths = export_onnx(tiny_model, tmp_path / "onnx16", height=32, width=32, batch=2,
                        dtype="fp16", components=["unet", "vae_decoder"])
    model32 = copy.deepcopy(tiny_model).to(trt_env)
    model16 = copy.deepcopy(tiny_model).to(trt_env, torch.float16)
    x, t, c = _unet_inputs(model32, trt_env)
    unet = TensorRTModule(build_engine(paths["unet"], tmp_path / "unet16.plan"))
    out = unet(x.half(), t, context=c.half())
    with torch.no_grad():
        ref16 = model16.unet(x.half(), t, context=c.half())
        ref32 = model32.unet(x, t, context=c)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert_parity(out, ref16, ref32, torch.float16, "TensorRT fp16 U-Net")


@pytest.mark.cuda
def test_latent_diffusion_samples_with_engine(trt_env, tiny_model, tmp_path):
    from ldmfast.export import export_onnx
    from ldmfast.export.tensorrt import TensorRTModule, build_engine

    paths = export_onnx(tiny_model, tmp_path / "onnx", height=32, width=32, batch=2,
                        components=["unet"])
    model = copy.deepcopy(tiny_model).to(trt_env)
    g = torch.Generator(device=trt_env).manual_seed(0)
    x_T = torch.randn(1, 4, 8, 8, device=trt_env, generator=g)
    cond = ["a red circle"]
    expected = model.sample(cond, steps=4, guidance_scale=3.0, x_T=x_T, progress=False)
    model.unet = TensorRTModule(build_engine(paths["unet"], tmp_path / "unet.plan", fp16=False,
                                             tf32=False))
    got = model.sample(cond, steps=4, guidance_scale=3.0, x_T=x_T, progress=False)
    assert _rel(got, expected) < 1e-2
