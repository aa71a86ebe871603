"""TensorRT 10 engines from ldmfast's ONNX graphs, and a torch-facing runner for them.

    from ldmfast.export.tensorrt import build_engine, TensorRTModule
    build_engine("out/sd15/unet.onnx", "out/sd15/unet.plan", fp16=True)
    model.unet = TensorRTModule("out/sd15/unet.plan")        # same call as the PyTorch U-Net
    images = model.txt2img("a red circle", steps=30)

TensorRT is imported only inside these functions, so ``ldmfast`` and the ONNX exporter work
without it; using them without it raises an ImportError that names the package. Written
against the documented TensorRT 10 Python API (``Builder``, ``OnnxParser``, ``BuilderFlag``,
``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, ``Refitter``/``OnnxParserRefitter``,
``set_tensor_address`` + ``execute_async_v3``).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .. import fileio
from . import _files

log = logging.getLogger("ldmfast")

__all__ = ["build_engine", "check_paths", "TensorRTModule", "require_tensorrt"]

# Names a caller may use for an engine input, in the PyTorch modules' own vocabulary.
_ALIASES = {"x": "sample", "timesteps": "timestep", "t": "timestep", "z": "latent",
            "tokens": "input_ids"}


def require_tensorrt():
    """The ``tensorrt`` module, or an ImportError that says what to install."""
    try:
        import tensorrt
    except ImportError as e:
        raise ImportError(
            "this needs NVIDIA TensorRT 10 (the Python package `tensorrt`, e.g. "
            "`pip install tensorrt`, with a CUDA GPU and a CUDA build of torch); it is not "
            f"installed here ({e})") from e
    major = int(str(getattr(tensorrt, "__version__", "10")).split(".")[0])
    if major < 10:
        raise ImportError(f"TensorRT {tensorrt.__version__} is too old: ldmfast needs TensorRT "
                          ">= 10 (execute_async_v3, strongly typed networks)")
    return tensorrt


class _Logger:
    """One TensorRT logger per process, forwarding to the ``ldmfast`` logger."""

    instance = None

    @classmethod
    def get(cls, trt):
        if cls.instance is None:
            class Forward(trt.ILogger):
                def __init__(self):
                    trt.ILogger.__init__(self)

                def log(self, severity, msg):
                    level = {trt.ILogger.INTERNAL_ERROR: logging.ERROR,
                             trt.ILogger.ERROR: logging.ERROR,
                             trt.ILogger.WARNING: logging.WARNING,
                             trt.ILogger.INFO: logging.DEBUG}.get(severity, logging.DEBUG)
                    log.log(level, "TensorRT: %s", msg)
            cls.instance = Forward()
        return cls.instance


def _parser_errors(parser) -> str:
    return "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))


def _load_graph(onnx_path: Path, arg: str = "onnx_path"):
    """The graph without its weights (external data stays on disk)."""
    import onnx

    if not onnx_path.is_file():
        raise FileNotFoundError(f"{arg}: {onnx_path} does not exist or is not a file")
    try:
        return onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
        raise ValueError(f"{arg}: {onnx_path} is not an ONNX graph ({e})") from None


def _onnx_input_shapes(graph):
    """{input name: shape} of the graph (dims as ints, or None where symbolic)."""
    shapes = {}
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def _graph_is_low_precision(graph) -> bool:
    import onnx

    low = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    return any(v.type.tensor_type.elem_type in low for v in graph.input)


def _profile_shapes(onnx_path, graph, shapes):
    """(min, opt, max) per input: the export's own static shapes, or ``shapes`` where given
    (required for symbolic dims, e.g. ``{"sample": [(1,4,64,64), (2,4,64,64), (4,4,96,96)]}``)."""
    out = {}
    for name, dims in _onnx_input_shapes(graph).items():
        if shapes and name in shapes:
            spec = shapes[name]
            out[name] = tuple(tuple(s) for s in spec) if isinstance(spec[0], (list, tuple)) \
                else (tuple(spec),) * 3
        elif any(d is None for d in dims):
            raise ValueError(f"input {name!r} of {onnx_path} has symbolic dims {dims}: give "
                             "its (min, opt, max) shapes in `shapes`")
        else:
            out[name] = (tuple(dims),) * 3
    return out


def _same_file(a: Path, b: Path) -> bool:
    """The same file by path (symbolic links resolved) or, both existing, by inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _sidecar(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def check_paths(onnx_path, engine_path, timing_cache=None, overwrite: bool = False,
                names=("onnx_path", "engine_path", "timing_cache"),
                flag: str = "overwrite=True"):
    """Refuses, before any work, a build that would lose a file: the engine, its ``.json``
    sidecar or the timing cache written onto a file the build reads (the graph, its external
    data, the export's manifest beside it) or onto each other, whatever ``overwrite`` says;
    an existing engine without ``overwrite``; a folder given for a file. ``names`` are the
    arguments the messages name (the command line passes its options). Returns the graph
    (its weights left on disk)."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    graph = _load_graph(onnx_path, names[0])
    reads = [(onnx_path, "the ONNX graph being built"),
             (onnx_path.parent / _files.MANIFEST, "the export's manifest")]
    reads += [(onnx_path.parent / e.value, "the graph's external data")
              for t in graph.initializer for e in t.external_data if e.key == "location"]
    sidecar = _sidecar(engine_path)
    checks = [(names[1], engine_path, reads), (f"{names[1]} (its .json sidecar)", sidecar, reads)]
    if timing_cache is not None:
        checks.append((names[2], Path(timing_cache),
                       reads + [(engine_path, "the engine"), (sidecar, "the engine's sidecar")]))
    for arg, out, avoid in checks:
        for src, what in avoid:
            if _same_file(out, src):
                raise ValueError(f"{arg}: {out} is {what}; refusing to write over it (even with "
                                 "overwrite): choose another file")
    fileio.check_writable(engine_path, overwrite, names[1], flag)
    if timing_cache is not None and Path(timing_cache).is_dir():
        raise IsADirectoryError(f"{names[2]}: {timing_cache!r} is a folder; give a file name")
    return graph


def _load_timing_cache(config, blob: bytes):
    """A timing cache made from ``blob`` and set on ``config``; None when TensorRT cannot use
    it (not a timing cache, or one from another GPU or TensorRT version)."""
    try:
        cache = config.create_timing_cache(blob)
        ok = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
        return cache if ok else None
    except Exception:  # TensorRT raises on some malformed blobs, returns None on others
        return None


def build_engine(onnx_path, engine_path, fp16: bool = True, bf16: bool = False,
                 workspace_gb: float = 8.0, timing_cache=None, strongly_typed: bool | None = None,
                 refit: bool = True, shapes=None, overwrite: bool = False,
                 tf32: bool = True, builder_optimization_level: int | None = None) -> Path:
    """Builds a TensorRT engine from an exported ONNX graph and writes it atomically.

    fp16 / bf16: allow those precisions (weakly typed networks only; TensorRT then picks per
    layer). strongly_typed: take every tensor's type from the graph instead, so the fp32
    islands the exporter put around GroupNorm statistics and softmax are kept exactly; None
    means "yes when the graph's inputs are fp16/bf16" (an fp16 export), which is the
    recommended route. With strongly typed networks the fp16/bf16 flags are not used.
    One optimisation profile is made, fixed at the export's shapes unless ``shapes`` gives
    (min, opt, max) per input. refit: build with BuilderFlag.REFIT so ``TensorRTModule.refit``
    can swap weights (LoRA) without a rebuild. timing_cache: a file read if present and
    written back after the build (speeds up rebuilds of the same graph on the same GPU); an
    existing file TensorRT cannot load as a timing cache (or one for another GPU) is replaced
    only with ``overwrite``. overwrite: replace an existing engine file; otherwise an existing
    one is refused. No output is ever written over an input (see ``check_paths``).
    tf32: TensorRT may run fp32 layers in TF32 (its default); False keeps full fp32 matmuls.
    """
    trt = require_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    graph = check_paths(onnx_path, engine_path, timing_cache, overwrite)
    if strongly_typed is None:
        strongly_typed = _graph_is_low_precision(graph)
    logger = _Logger.get(trt)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external data (unet.onnx.data) relative to the graph file.
    if not parser.parse_from_file(str(onnx_path)):
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{_parser_errors(parser)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if not strongly_typed:
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if bf16:
            config.set_flag(trt.BuilderFlag.BF16)
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    if builder_optimization_level is not None:
        config.builder_optimization_level = int(builder_optimization_level)

    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in _profile_shapes(onnx_path, graph, shapes).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    del graph  # the builder holds its own copy of the network
    cache_path = None if timing_cache is None else Path(timing_cache)
    if cache_path is not None:
        existed = cache_path.exists()
        blob = cache_path.read_bytes() if existed else b""
        # A cache TensorRT loads is there to be updated; any other existing file is not ours.
        if _load_timing_cache(config, blob) is None:
            if blob and not overwrite:
                raise FileExistsError(
                    f"timing_cache: {cache_path} exists and TensorRT cannot load it as a timing "
                    "cache (another file, or a cache from another GPU or TensorRT version); pass "
                    "overwrite=True (--overwrite) to replace it, or choose another file")
            log.warning("%s is not a timing cache TensorRT can use; starting a new one",
                        cache_path)
            if _load_timing_cache(config, b"") is None:
                raise RuntimeError("TensorRT could not create an empty timing cache")

    log.info("building TensorRT engine from %s (strongly typed: %s, fp16: %s, bf16: %s)",
             onnx_path, strongly_typed, fp16, bf16)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}; run with "
                           "logging at DEBUG for the builder's messages")
    _files.write_file_atomic(engine_path, plan, overwrite=overwrite, arg="engine_path")
    sidecar = {"onnx": str(onnx_path.resolve()), "strongly_typed": bool(strongly_typed),
               "fp16": bool(fp16), "bf16": bool(bf16), "refit": bool(refit)}
    # the sidecar belongs to the engine: it is replaced with it
    _files.write_file_atomic(_sidecar(engine_path), json.dumps(sidecar, indent=1).encode(),
                             overwrite=True, arg="engine_path")
    if cache_path is not None:
        try:
            _files.write_file_atomic(cache_path, config.get_timing_cache().serialize(),
                                     overwrite=existed, arg="timing_cache")
        except FileExistsError:
            if existed:
                raise
            # Absent when the build began, there now (a build beside this one wrote it): the
            # newcomer is not ours to replace, and the engine is built, so only say so.
            log.warning("timing_cache: %s appeared during the build (another build?); left as it "
                        "is, this build's timing cache not saved", cache_path)
    return engine_path


def _torch_dtype(trt, dtype):
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.INT32: torch.int32, trt.DataType.INT8: torch.int8,
             trt.DataType.BOOL: torch.bool}
    for name, tdt in (("BF16", torch.bfloat16), ("INT64", torch.int64), ("UINT8", torch.uint8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = tdt
    if dtype not in table:
        raise TypeError(f"TensorRT tensor type {dtype} has no torch equivalent here")
    return table[dtype]


class TensorRTModule(nn.Module):
    """Runs a TensorRT engine on torch CUDA tensors, on the current CUDA stream.

    Called like the module it was exported from: ``unet(x, timesteps, context=None, y=None)``
    for a U-Net engine, ``decode(z)`` (or ``forward``) for a decoder, ``forward(input_ids)`` for
    a text encoder. Inputs are cast to the engine's dtypes and made contiguous; a scalar
    timestep is broadcast over the batch; a batch that is a multiple of a fixed-batch engine's
    batch is run in chunks. Outputs are new torch tensors (one tensor, or a tuple).

    A zero-size, frozen parameter of the engine's dtype is registered so code that asks a
    module for ``next(module.parameters()).dtype / .device`` (LatentDiffusion does) still works.
    """

    def __init__(self, engine, device=None, manifest=None):
        super().__init__()
        trt = require_tensorrt()
        if not torch.cuda.is_available():
            raise RuntimeError("TensorRTModule needs a CUDA GPU and a CUDA build of torch")
        self.device = torch.device(device) if device is not None else \
            torch.device("cuda", torch.cuda.current_device())
        self._trt = trt
        self._logger = _Logger.get(trt)
        self.engine_path = None
        if isinstance(engine, (str, Path)):
            self.engine_path = Path(engine)
            blob = self.engine_path.read_bytes()
        else:
            blob = engine
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(blob)
            if self.engine is None:
                raise RuntimeError("TensorRT could not deserialize the engine (built with another "
                                   "TensorRT version or for another GPU?)")
            self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = [], []
        self._dtypes = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            self._dtypes[name] = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs.append(name)
            else:
                self.outputs.append(name)
        first = self._dtypes[self.inputs[0]]
        anchor = first if first.is_floating_point else torch.float32
        self._anchor = nn.Parameter(torch.empty(0, dtype=anchor, device=self.device),
                                    requires_grad=False)
        shape = list(self.engine.get_tensor_shape(self.inputs[0]))
        self.batch = shape[0] if shape and shape[0] > 0 else None
        if "sample" in self.inputs:  # the U-Net attributes LatentDiffusion reads
            self.in_channels = int(shape[1])
            self.out_channels = int(list(self.engine.get_tensor_shape(self.outputs[0]))[1])
        self.manifest = manifest

    # --- calling -------------------------------------------------------------------------------
    def _bind(self, args, kwargs):
        if len(args) > len(self.inputs):
            raise TypeError(f"engine takes {len(self.inputs)} inputs {self.inputs}, got "
                            f"{len(args)} positional arguments")
        values = dict(zip(self.inputs, args))
        for key, value in kwargs.items():
            name = _ALIASES.get(key, key)
            if value is None:
                continue
            if name not in self.inputs:
                raise TypeError(f"engine has no input {key!r} (inputs: {self.inputs})")
            values[name] = value
        missing = [n for n in self.inputs if values.get(n) is None]
        if missing:
            raise TypeError(f"engine inputs {missing} were not given")
        batch = None
        for name in self.inputs:
            v = values[name]
            if not torch.is_tensor(v):
                v = torch.tensor(v)
            if name == "timestep" and v.dim() == 0:
                ref = values[self.inputs[0]]
                v = v.expand(ref.shape[0])
            values[name] = v.to(device=self.device, dtype=self._dtypes[name]).contiguous()
            batch = values[name].shape[0] if batch is None else batch
        return values, batch

    def _run(self, values):
        ctx = self.context
        for name in self.inputs:
            t = values[name]
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
            ctx.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the ldmfast log)")
        return outs

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        values, batch = self._bind(args, kwargs)
        if self.batch is not None and batch != self.batch:
            if batch % self.batch:
                raise ValueError(f"this engine was built for batch {self.batch}; got batch "
                                 f"{batch}, which is not a multiple of it (re-export with "
                                 "--batch or --dynamic)")
            chunks = [self._run({n: v[i:i + self.batch] for n, v in values.items()})
                      for i in range(0, batch, self.batch)]
            outs = [torch.cat(parts) for parts in zip(*chunks)]
        else:
            outs = self._run(values)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def decode(self, z, *unused, **unused_kw):
        """The first stage's call: image = decoder(post_quant_conv(z))."""
        return self(z)

    decode_latent = decode

    # --- refit ---------------------------------------------------------------------------------
    def refit(self, weights, manifest=None, component: str | None = None) -> list[str]:
        """Swaps the engine's weights in place (it must have been built with refit=True).

        weights: an ONNX file (the same graph re-exported with new weights, e.g. after merging
        a LoRA; TensorRT's ONNX refitter matches initializers by name), or a state dict. A
        state dict is mapped to the graph's initializers through the export manifest (its
        ``weights`` table records which parameter, transposed how, each initializer holds):
        keys may be the module's own (``input_blocks.0.0.weight``) or a LatentDiffusion's
        (``unet.input_blocks.0.0.weight``). Returns the refitted weight names.
        """
        trt = self._trt
        refitter = trt.Refitter(self.engine, self._logger)
        if isinstance(weights, (str, Path)):
            parser_refitter = trt.OnnxParserRefitter(refitter, self._logger)
            if not parser_refitter.refit_from_file(str(weights)):
                errors = "\n".join(str(parser_refitter.get_error(i))
                                   for i in range(getattr(parser_refitter, "num_errors", 0)))
                raise RuntimeError(f"TensorRT could not parse {weights} for refit:\n{errors}")
            if not refitter.refit_cuda_engine():
                raise RuntimeError(f"TensorRT refit from {weights} failed (engine built without "
                                   "refit=True, or a graph with other weights?)")
            return list(refitter.get_all_weights())
        table, component = self._weights_table(manifest, component)
        prefix = {"unet": "unet.", "vae_decoder": "first_stage.",
                  "text_encoder": "cond_stage."}.get(component, "")
        state = {(k[len(prefix):] if prefix and k.startswith(prefix) else k): v
                 for k, v in weights.items()}
        refittable = set(refitter.get_all_weights())
        keep_alive, done = [], []
        for onnx_name, entry in table.items():
            if onnx_name not in refittable or entry["source"] not in state:
                continue
            proto = refitter.get_weights_prototype(onnx_name)
            t = state[entry["source"]].detach()
            if entry.get("perm") is not None:
                t = t.permute(*entry["perm"])
            dtype = _torch_dtype(trt, proto.dtype)
            t = t.to(device=self.device, dtype=dtype).contiguous()
            if t.numel() != proto.size:
                raise ValueError(f"{entry['source']}: {t.numel()} values for {onnx_name}, the "
                                 f"engine holds {proto.size}")
            keep_alive.append(t)
            w = trt.Weights(proto.dtype, t.data_ptr(), t.numel())
            if not refitter.set_named_weights(onnx_name, w, trt.TensorLocation.DEVICE):
                raise RuntimeError(f"TensorRT rejected new weights for {onnx_name}")
            done.append(onnx_name)
        missing = list(refitter.get_missing_weights())
        if missing:
            raise RuntimeError(f"refit incomplete: TensorRT still needs {missing[:8]} "
                               f"({len(missing)} in all) that the state dict does not provide")
        stream = torch.cuda.current_stream(self.device)
        if not refitter.refit_cuda_engine_async(stream.cuda_stream):
            raise RuntimeError("TensorRT refit failed (engine built without refit=True?)")
        stream.synchronize()  # the weight tensors above must live until the copy is done
        return done

    def _weights_table(self, manifest, component):
        if manifest is None:
            manifest = self.manifest
        if manifest is None and self.engine_path is not None:
            side = self.engine_path.with_name(self.engine_path.name + ".json")
            if side.is_file():
                onnx_path = Path(json.loads(side.read_text())["onnx"])
                manifest = onnx_path.parent / _files.MANIFEST
                component = component or onnx_path.stem
        if manifest is None:
            raise ValueError("refit from a state dict needs the export's manifest.json "
                             "(pass manifest=... or keep the engine's .json sidecar)")
        if isinstance(manifest, (str, Path)):
            manifest = json.loads(Path(manifest).read_text())
        comps = manifest["components"]
        if component is None:
            component = next((c for c in comps if comps[c]["inputs"][0]["name"] == self.inputs[0]),
                             None)
        if component not in comps:
            raise ValueError(f"component {component!r} is not in the manifest ({list(comps)})")
        return comps[component]["weights"], component
