"""ONNX export of a LatentDiffusion's networks (see docs/export.md for the graph contracts).

Route: ``torch.onnx.export(dynamo=True)`` with ``custom_translation_table`` mapping every
``torch.ops.ldmfast.*`` node to the standard-op functions of ``translations.py``; the graph has
no custom domain (checked). The exporter's own optimiser is replaced by a shorter pass list
(inline, constant folding, dead-code removal, CSE): the same node count on these graphs, at
a small fraction of the rewriter's time, and weight names kept traceable for TensorRT refit.
"""
from __future__ import annotations

import copy
import json
import logging
import operator
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from . import OPSETS, _files
from .translations import resolve_forms, translation_table

log = logging.getLogger("ldmfast")

__all__ = ["export_onnx", "check_options", "COMPONENTS", "DTYPES", "OPSETS"]

COMPONENTS = ("unet", "vae_decoder", "text_encoder")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# protobuf caps a serialised message at 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2 ** 31 - 2 ** 26
_MAX_DYNAMIC_BATCH = 1024  # the symbolic batch's upper bound in the traced graph
_WEIGHT_OPS = ("Transpose", "Reshape", "Unsqueeze", "Squeeze", "Cast")


# --- the graphs' wrappers: fixed input names and order ------------------------------------------

class _UNet(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, context=None, y=None):
        return self.unet(sample, timestep, context=context, y=y)


class _Decoder(nn.Module):
    def __init__(self, first_stage):
        super().__init__()
        self.first_stage = first_stage

    def forward(self, latent):
        return self.first_stage.decode(latent)


class _TextEncoder(nn.Module):
    def __init__(self, cond_stage):
        super().__init__()
        self.cond_stage = cond_stage

    def forward(self, input_ids):
        return self.cond_stage(input_ids)


# --- what a model contains -----------------------------------------------------------------------

def _is_unet(m):
    return hasattr(m, "input_blocks") and hasattr(m, "out_channels")


def _is_first_stage(m):
    return hasattr(m, "decode") and hasattr(m, "post_quant_conv")


def _is_text_encoder(m):
    return hasattr(m, "tokenize") and callable(getattr(m, "forward", None))


def _parts(model):
    """{component name: module} for a LatentDiffusion or one of its networks."""
    if hasattr(model, "unet") and hasattr(model, "first_stage"):
        parts = {"unet": model.unet}
        if model.first_stage is not None:
            parts["vae_decoder"] = model.first_stage
        if model.cond_stage is not None and _is_text_encoder(model.cond_stage):
            parts["text_encoder"] = model.cond_stage
        elif model.cond_stage is not None:
            log.info("cond stage %s is not a text encoder; it is not exported",
                     type(model.cond_stage).__name__)
        return parts
    if _is_unet(model):
        return {"unet": model}
    if _is_first_stage(model):
        return {"vae_decoder": model}
    if _is_text_encoder(model):
        return {"text_encoder": model}
    raise TypeError(f"cannot export a {type(model).__name__}: expected a LatentDiffusion, a "
                    "UNetModel, an autoencoder (decode + post_quant_conv) or a text encoder")


def _text_length(model, cond_stage, text_length):
    if text_length is not None:
        return int(text_length)
    for m in (cond_stage, model):
        for attr in ("max_length", "max_seq_len"):
            if m is not None and getattr(m, attr, None):
                return int(getattr(m, attr))
    return 77


def _downsampling(model, factor):
    if factor is not None:
        return int(factor)
    if hasattr(model, "downsampling_factor"):
        return int(model.downsampling_factor)
    if _is_first_stage(model):
        # the decoder upsamples once per level but the last (num_resolutions = len(ch_mult))
        levels = getattr(getattr(model, "decoder", None), "num_resolutions", None)
        if levels:
            return 2 ** (int(levels) - 1)
    return 8


def _select(model, components):
    parts = _parts(model)
    if components is not None:
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; choose from {COMPONENTS}")
        parts = {k: v for k, v in parts.items() if k in components}
    if not parts:
        raise ValueError("nothing to export")
    return parts


def _name(arg, cli):
    return "--" + arg.replace("_", "-") if cli else arg


def _check_int(arg, value, low, high=None, cli=False):
    try:  # operator.index: Python and NumPy integers, not floats (bools are refused below)
        v = operator.index(value)
        ok = not isinstance(value, bool) and v >= low and (high is None or v <= high)
    except TypeError:
        ok = False
    if not ok:
        bound = f">= {low}" if high is None else f"from {low} to {high}"
        raise ValueError(f"{_name(arg, cli)} must be an integer {bound}, got {value!r}")


def check_options(model, height, width, components=None, text_length=None,
                  downsampling_factor=None, cli=False) -> int:
    """Refuses, before any export work, sizes the graphs cannot have: height and width must be
    positive multiples of the first stage's downsampling factor f, times 2^levels of the U-Net
    when it is exported (its skip connections need every halving to come back to the same
    size); ``text_length`` must fit the text encoder's positions. Errors name the argument
    (``--height`` with ``cli``). Returns f."""
    parts = _select(model, components)
    for arg, value in (("height", height), ("width", width)):
        _check_int(arg, value, 1, cli=cli)
    for arg, value in (("text_length", text_length), ("downsampling_factor", downsampling_factor)):
        if value is not None:
            _check_int(arg, value, 1, cli=cli)
    f = _downsampling(model, downsampling_factor)
    need, why = f, f"the first stage's downsampling factor {f}"
    if "unet" in parts:
        from ..models.unet import count_downsamplings
        need = f * 2 ** count_downsamplings(parts["unet"])
        why += f" times the U-Net's {need // f}"
    for arg, value in (("height", height), ("width", width)):
        if value % need:
            raise ValueError(f"{_name(arg, cli)} must be a multiple of {need} ({why}), got "
                             f"{value}")
    enc = parts.get("text_encoder")
    limit = next((int(getattr(enc, a)) for a in ("max_seq_len", "max_length")
                  if getattr(enc, a, None)), None)
    if text_length is not None and limit is not None and text_length > limit:
        raise ValueError(f"{_name('text_length', cli)} {text_length} exceeds the text encoder's "
                         f"{limit} positions")
    return f


def _unet_spec(unet, batch, h, w, dtype, text_len):
    cfg = getattr(unet, "config", {}) or {}
    context_dim = cfg.get("context_dim", getattr(unet, "context_dim", None))
    if isinstance(context_dim, (list, tuple)):
        context_dim = list(context_dim)[0]
    has_y = getattr(unet, "num_classes", None) is not None
    args = [torch.zeros(batch, unet.in_channels, h, w, dtype=dtype),
            torch.full((batch,), 500.0, dtype=torch.float32)]
    names = ["sample", "timestep"]
    if context_dim:
        args.append(torch.zeros(batch, text_len, int(context_dim), dtype=dtype))
        names.append("context")
    if has_y:
        if not context_dim:
            args.append(None)  # keeps y in its keyword's place; None inputs are not graph inputs
        args.append(torch.zeros(batch, dtype=torch.int64))
        names.append("y")
    return _UNet(unet), tuple(args), names, ["eps"]


def _decoder_spec(first_stage, batch, h, w, dtype):
    channels = first_stage.post_quant_conv.in_channels
    args = (torch.zeros(batch, channels, h, w, dtype=dtype),)
    return _Decoder(first_stage), args, ["latent"], ["image"]


def _text_spec(cond_stage, batch, text_len):
    args = (torch.zeros(batch, text_len, dtype=torch.int64),)
    return _TextEncoder(cond_stage), args, ["input_ids"], ["context"]


def _dynamic_shapes(names, args, spatial):
    batch = torch.export.Dim("batch", min=1, max=_MAX_DYNAMIC_BATCH)
    shapes, names = [], iter(names)
    for a in args:
        if a is None:
            shapes.append(None)
            continue
        name = next(names)
        dims = {0: batch}
        if spatial and name in ("sample", "latent"):
            dims.update({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO})
        shapes.append(dims)
    return tuple(shapes)


# --- cleaning ------------------------------------------------------------------------------------

def _name_weight_values(model):
    """Gives the outputs of layout ops applied to a weight (Linear's transpose, GroupNorm's
    reshape, casts) the weight's name plus the op, so the folded initializer stays traceable
    to its PyTorch parameter; returns {folded name: (source name, transpose perm or None)}."""
    derived = {}
    for node in list(model.graph):
        if node.op_type not in _WEIGHT_OPS or not node.inputs or node.inputs[0] is None:
            continue
        src = node.inputs[0]
        source, perm = (src.name, None)
        if src.name in derived:
            source, perm = derived[src.name]
        elif not src.is_initializer():
            continue
        if node.op_type == "Transpose":
            p = list(node.attributes["perm"].as_ints()) if "perm" in node.attributes else None
            if perm is not None and p is not None:
                p = [perm[i] for i in p]
            perm = p if p is not None else list(reversed(range(len(src.shape or ()))))
        out = node.outputs[0]
        name = f"{src.name}.{node.op_type.lower()}"
        n = 1
        while name in derived:  # the same weight through the same op twice: keep names unique
            n += 1
            name = f"{src.name}.{node.op_type.lower()}{n}"
        out.name = name
        derived[name] = (source, perm)
    return derived


def _clean(model):
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import _constant_folding

    common.InlinePass()(model)
    derived = _name_weight_values(model)
    ir.passes.Sequential(
        _constant_folding.FoldConstantsPass(shape_inference=True, input_size_limit=1 << 14,
                                            output_size_limit=1 << 31,
                                            should_fold=lambda node: None),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedOpsetsPass(),
    )(model)
    return derived


def _weights_map(model, derived, prefix, state_keys):
    """{onnx initializer: {"source": state-dict key, "perm": perm|None}} for refit by name."""
    out = {}
    for name in model.graph.initializers:
        source, perm = derived.get(name, (name, None))
        if source in state_keys:
            key = source[len(prefix):] if source.startswith(prefix) else source
            out[name] = {"source": key, "perm": perm}
    return out


def _io(values):
    return [{"name": v.name, "dtype": v.dtype.name.lower() if v.dtype is not None else None,
             "shape": [d if isinstance(d, int) else str(d) for d in (v.shape or ())]}
            for v in values]


def _save(model, path, use_external):
    import onnx
    import onnx_ir as ir

    if use_external:
        ir.save(model, path, external_data=path.name + ".data")
    else:
        ir.save(model, path)
    # The path-based versions read only the graph file, so they work past protobuf's 2 GiB.
    onnx.shape_inference.infer_shapes_path(str(path), str(path))
    onnx.checker.check_model(str(path), full_check=True)


def _slim(path):
    import onnx
    import onnxslim

    slimmed = onnxslim.slim(onnx.load(str(path)))
    onnx.save(slimmed, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def _export_part(name, wrapper, args, input_names, output_names, dest, *, opset, table,
                 dynamic, external_data, slim, metadata):
    prefix = next(iter(wrapper._modules)) + "."
    state_keys = set(wrapper.state_dict().keys())
    dyn = _dynamic_shapes(input_names, args, spatial=name != "text_encoder") if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter warns about torchvision ops, etc.
        program = torch.onnx.export(
            wrapper, args, dynamo=True, opset_version=opset, custom_translation_table=table,
            input_names=input_names, output_names=output_names, dynamic_shapes=dyn,
            optimize=False, verbose=False)
    model = program.model
    derived = _clean(model)
    foreign = sorted({n.domain for n in model.graph if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise RuntimeError(f"{name}: the exported graph still has custom-domain ops {foreign}; "
                           "a torch.ops.ldmfast op is missing from the translation table")
    for key, value in metadata.items():
        model.metadata_props[key] = str(value)
    model.metadata_props["ldmfast.component"] = name
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None)
    use_external = size >= EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)
    path = dest / f"{name}.onnx"
    info = {"file": path.name, "external_data": (path.name + ".data") if use_external else None,
            "weights_bytes": int(size), "inputs": _io(model.graph.inputs),
            "outputs": _io(model.graph.outputs),
            "weights": _weights_map(model, derived, prefix, state_keys)}
    _save(model, path, use_external)
    del model, program
    do_slim = (not use_external) if slim is None else bool(slim)
    if do_slim and use_external:
        raise ValueError("slim=True needs a graph under 2 GiB (onnxslim works in memory)")
    if do_slim:
        _slim(path)
        info["slimmed"] = True
    return info


def _kept_components(out_dir, overwrite, manifest, exported):
    """The earlier export's components that this one keeps (those it does not export again),
    as {name: manifest entry}. They share the manifest's settings, so an export with other
    settings (size, dtype, opset, ...) is refused rather than left describing them wrongly."""
    if not overwrite or not (out_dir / _files.MANIFEST).is_file():
        return {}
    try:
        old = load_manifest(out_dir)
        kept = {name: info for name, info in old["components"].items()
                if name not in exported and (out_dir / info["file"]).is_file()}
    except (ValueError, KeyError, TypeError) as e:
        raise FileExistsError(f"{out_dir / _files.MANIFEST} cannot be read ({e}); refusing to "
                              "replace that export") from None
    diff = [f"{k} {old.get(k)!r} (now {v!r})" for k, v in manifest.items()
            if k != "components" and old.get(k) != v]
    if kept and diff:
        raise FileExistsError(
            f"{out_dir} holds {sorted(kept)} exported with other settings: {', '.join(diff)}; "
            f"export them again too (components={sorted(set(kept) | set(exported))}) or choose "
            "another directory")
    return kept


@torch.no_grad()
def export_onnx(model, out_dir, height: int = 512, width: int = 512, batch: int = 1,
                dtype="fp32", opset: int = 18, dynamic: bool = False, *, components=None,
                text_length: int | None = None, downsampling_factor: int | None = None,
                group_norm: str = "auto", attention: str = "auto", slim: bool | None = False,
                external_data: bool | None = None, overwrite: bool = False,
                progress: bool = True) -> dict:
    """Exports ``model`` (a LatentDiffusion, or a bare U-Net / autoencoder / text encoder) to
    ``out_dir``: ``unet.onnx``, ``vae_decoder.onnx``, ``text_encoder.onnx`` (those it has)
    and ``manifest.json``. Returns {component name: Path of its .onnx} for the graphs written.

    height, width: image size in pixels; latents are (height/f, width/f), f the first stage's
    downsampling factor (``downsampling_factor`` overrides it, e.g. for a bare U-Net; default
    8). Both must be multiples of f times the U-Net's own downsampling (see ``check_options``).
    batch: the batch of every graph (2 for classifier-free guidance in one U-Net call).
    dtype: "fp32", "fp16" or "bf16" weights and activations; statistics stay float32.
    opset: 18 to 23. dynamic: batch (and latent height/width) become symbolic.
    components: a subset of ("unet", "vae_decoder", "text_encoder").
    group_norm / attention: the ONNX forms of the fused ops (see ``translations.py``).
    slim: run onnxslim after cleaning (None: only for graphs without external data).
    external_data: None = only when weights exceed 2 GiB (the protobuf limit).
    progress: a progress bar over the graphs.

    overwrite: replace an earlier export in ``out_dir`` (a folder with our manifest; any other
    non-empty folder is refused). Only what this export writes is replaced: the graphs of the
    exported components and the manifest. Everything else in the folder is kept: engines built
    from the graphs, the user's own files, and the graphs of components not exported this time,
    whose manifest entries are carried into the new manifest (so they must have been exported
    with the same settings; otherwise the export is refused before any work). Either way the
    files are written to a temporary sibling directory that replaces ``out_dir`` in one step
    only when every graph has passed ``onnx.checker``.
    """
    torch_dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if torch_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    _check_int("opset", opset, OPSETS[0], OPSETS[-1])
    _check_int("batch", batch, 1, _MAX_DYNAMIC_BATCH if dynamic else None)
    if torch_dtype == torch.bfloat16 and opset < 22:
        raise ValueError("dtype bf16 needs opset >= 22: Conv and most other ops accept "
                         f"bfloat16 only from opset 22 (opset {opset} was requested)")
    gn_form, attn_form = resolve_forms(opset, group_norm, attention)
    f = check_options(model, height, width, components, text_length, downsampling_factor)
    # NumPy integers pass the checks; the manifest (JSON) needs Python ints
    height, width, batch, opset = (operator.index(v) for v in (height, width, batch, opset))
    if text_length is not None:
        text_length = operator.index(text_length)
    parts = _select(model, components)
    h, w = height // f, width // f
    text_len = _text_length(model, getattr(model, "cond_stage", None) or parts.get("text_encoder"),
                            text_length)
    out_dir = Path(out_dir)
    _files.check_destination(out_dir, overwrite)

    table = translation_table(opset, gn_form, attn_form)
    dtype_name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[torch_dtype]
    metadata = {"ldmfast.dtype": dtype_name, "ldmfast.height": height, "ldmfast.width": width,
                "ldmfast.batch": batch, "ldmfast.downsampling_factor": f,
                "ldmfast.scale_factor": getattr(model, "scale_factor", ""),
                "ldmfast.parameterization": getattr(model, "parameterization", "")}
    manifest = {"format": "ldmfast-onnx-export/1", "opset": opset, "dtype": dtype_name,
                "height": height, "width": width, "batch": batch, "latent": [h, w],
                "downsampling_factor": f, "dynamic": bool(dynamic), "group_norm": gn_form,
                "attention": attn_form, "scale_factor": getattr(model, "scale_factor", None),
                "parameterization": getattr(model, "parameterization", None),
                "components": {}}
    kept = _kept_components(out_dir, overwrite, manifest, parts)
    # torch.export specialises a dimension whose example size is 1, so a dynamic export
    # traces with batch 2 (the graph accepts any batch either way).
    trace_batch = max(batch, 2) if dynamic else batch
    from tqdm.auto import tqdm
    tmp = _files.staging_dir(out_dir)
    try:
        for name, module in tqdm(parts.items(), desc="export onnx", unit="graph",
                                 disable=not progress):
            # Exports never change the caller's module: dtype casts happen on a copy.
            part = module if torch_dtype == torch.float32 else copy.deepcopy(module).to(torch_dtype)
            was_training = part.training
            part.eval()
            try:
                if name == "unet":
                    spec = _unet_spec(part, trace_batch, h, w, torch_dtype, text_len)
                elif name == "vae_decoder":
                    spec = _decoder_spec(part, trace_batch, h, w, torch_dtype)
                else:
                    spec = _text_spec(part, trace_batch, text_len)
                log.info("exporting %s (%s, opset %d)", name, dtype_name, opset)
                manifest["components"][name] = _export_part(
                    name, *spec, tmp, opset=opset, table=table, dynamic=dynamic,
                    external_data=external_data, slim=slim, metadata=metadata)
            finally:
                part.train(was_training)
            del part
        written = {name: out_dir / info["file"] for name, info in manifest["components"].items()}
        manifest["components"].update(kept)
        with open(tmp / _files.MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The names this export owns in out_dir: an earlier export's files under them are replaced
    # (a .data file the new graph no longer has included); the rest of out_dir is carried over.
    owned = {n for name in parts for n in (f"{name}.onnx", f"{name}.onnx.data")}
    _files.commit_dir(tmp, out_dir, overwrite, owned)
    return written


def load_manifest(out_dir) -> dict:
    """The ``manifest.json`` of an export directory."""
    with open(Path(out_dir) / _files.MANIFEST) as fh:
        return json.load(fh)
