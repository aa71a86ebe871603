"""Loading and saving LDM weights.

``load_components`` reads CompVis/SD ``.ckpt``/``.safetensors`` checkpoints (also bare
first-stage or U-Net state dicts), diffusers folders and ldmfast's own files into
``Components(unet, first_stage, cond_stage, config)``. ``save`` writes ldmfast safetensors (the
config as JSON in the metadata) or a CompVis-layout ``{"state_dict": ...}`` ``.ckpt``,
atomically. ``from_diffusers`` converts an in-memory diffusers module. Pickles are read with
``torch.load(weights_only=True)``: one that needs code to run is refused, never executed.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import pickle

import torch
from torch import nn

from . import configs, fileio
from .models import Components, build_cond_stage, build_first_stage, build_unet, convert

log = logging.getLogger("ldmfast")

__all__ = ["Components", "load_components", "save", "from_diffusers", "read_state_dict",
           "PREFIXES"]

PREFIXES = {"unet": "model.diffusion_model.", "first_stage": "first_stage_model.",
            "cond_stage": "cond_stage_model."}
_BUILDERS = {"unet": build_unet, "first_stage": build_first_stage, "cond_stage": build_cond_stage}
_META_KEY = "ldmfast_config"


# ------------------------------------------------------------------------------------ reading

def _refuse_pickle(path, err):
    return ValueError(
        f"{path}: refused to load: this pickle needs code execution to unpickle ({err}). "
        "ldmfast reads .ckpt files with torch.load(weights_only=True), which only rebuilds "
        "tensors and plain containers, because unpickling arbitrary objects runs code from the "
        "file. If you trust the file, convert it to .safetensors with a tool you trust.")


def read_state_dict(path) -> tuple[dict, dict | None]:
    """(flat name -> tensor dict, ldmfast config or None) from a .safetensors or pickle file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                             f"{e}") from e
        config = None
        if _META_KEY in meta:
            try:
                config = json.loads(meta[_META_KEY])
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: the ldmfast config in its metadata is not JSON: {e}") from e
        return sd, config
    with open(path, "rb") as f:
        head = f.read(8)
    # torch.save writes a zip (PK..) or, in the legacy format, a pickle of protocol 2 (\x80):
    # anything else (an image, a text file) would be called a pickle needing code execution.
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        kind = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image"}
        what = next((v for k, v in kind.items() if head.startswith(k)), "not a PyTorch file")
        raise ValueError(f"{path}: not a checkpoint ({what}): expected a .ckpt / .pt written by "
                         "torch.save, a .safetensors file or a diffusers folder")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refuse_pickle(path, e) from None
    except (EOFError, RuntimeError, OSError, ValueError, KeyError, IndexError) as e:
        raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupt?): {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    config = obj.get(_META_KEY)
    if isinstance(config, str):
        config = json.loads(config)
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: its 'state_dict' entry is a {type(sd).__name__}, not a dict")
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    if not sd:
        raise ValueError(f"{path}: holds no tensors")
    return sd, config


def _listing(keys, n=12):
    keys = sorted(keys)
    more = f" ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _ema_to_model(sd, unet_keys, path):
    """The U-Net weights from ``model_ema.*``: LitEma stores ``diffusion_model.<name>`` with the
    dots removed (``model_ema.diffusion_modelinput_blocks00weight``)."""
    ema = {k[len("model_ema."):]: v for k, v in sd.items() if k.startswith("model_ema.")}
    if not ema:
        raise ValueError(f"{path}: use_ema=True but the checkpoint has no model_ema.* weights")
    out, missing = {}, []
    for k in unet_keys:
        name = ("diffusion_model." + k).replace(".", "")
        if name in ema:
            out[PREFIXES["unet"] + k] = ema[name]
        else:
            missing.append(k)
    if missing:
        raise ValueError(f"{path}: the EMA weights lack {len(missing)} U-Net parameters: "
                         f"{_listing(missing)}")
    return out


# --------------------------------------------------------------------------- building modules

def _fix_meta_buffers(module):
    """Non-persistent buffers are not in state dicts, so after building on the meta device they
    are recreated here (CLIP's position_ids is the only one among our modules)."""
    for mod in module.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_meta:
                if name != "position_ids":
                    raise RuntimeError(f"cannot materialise the buffer {name!r}")
                mod._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape).contiguous()


def _load_module(part, cfg, sd, where, dtype):
    """Builds ``part`` from ``cfg`` without initialising weights, checks ``sd`` (names and
    shapes, all problems reported at once) and loads it."""
    with torch.device("meta"):
        module = _BUILDERS[part](cfg)
    if module is None:
        return None
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} (expected {tuple(expected[k].shape)}, got {tuple(sd[k].shape)})"
              for k in expected if k in sd and sd[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_listing(shapes, 8)}")
    if problems:
        raise ValueError(f"{where}: {part} ({PREFIXES[part]}*) does not fit its config: "
                         + "; ".join(problems))
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=True)
    _fix_meta_buffers(module)
    module.eval()
    return module


_IGNORED = {"first_stage": ("loss.",), "cond_stage": ("transformer.text_model.embeddings.position_ids",)}


def _split(sd):
    parts = {p: {} for p in PREFIXES}
    for k, v in sd.items():
        for part, prefix in PREFIXES.items():
            if k.startswith(prefix):
                name = k[len(prefix):]
                if not name.startswith(_IGNORED.get(part, ("\0",))):
                    parts[part][name] = v
                break
    return parts


def _bare(sd):
    """Prefixes for state dicts of one module saved alone (the paper's autoencoder files)."""
    if any(k.startswith(p) for k in sd for p in PREFIXES.values()):
        return sd
    if "encoder.conv_in.weight" in sd:
        return {PREFIXES["first_stage"] + k: v for k, v in sd.items()}
    if "input_blocks.0.0.weight" in sd:
        return {PREFIXES["unet"] + k: v for k, v in sd.items()}
    return sd


def _resolve_config(config, where):
    if config is None or isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, (str, os.PathLike)):
        name = os.fspath(config)
        if name.endswith((".yaml", ".yml")):
            return configs.from_ldm_yaml(name)
        return configs.get(name)
    raise ValueError(f"{where}: config must be a dict, a preset name or an LDM YAML path, "
                     f"not {type(config).__name__}")


def _set_tokenizer(cond, tokenizer, where):
    kind = (cond or {}).get("type")
    if kind == "clip" and isinstance(tokenizer, (str, os.PathLike)):
        cond["tokenizer_path"] = os.fspath(tokenizer)
    elif kind == "transformer":
        cond["tokenizer"] = (dict(tokenizer) if isinstance(tokenizer, dict) else
                             {"type": "hf", "path": os.fspath(tokenizer)})
    else:
        raise ValueError(f"{where}: tokenizer= applies to a 'clip' (a folder) or 'transformer' "
                         f"text encoder, not to cond_stage type {kind!r}")


def _assemble(sd, config, where, use_ema, dtype, parameterization=None, tokenizer=None):
    sd = _bare(sd)
    if config is None:
        try:
            config = configs.infer(sd, parameterization)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    elif parameterization is not None and config.get("diffusion"):
        config["diffusion"]["parameterization"] = parameterization
    if tokenizer is not None:
        _set_tokenizer(config.get("cond_stage"), tokenizer, where)
    openclip = "cond_stage_model.model."
    if any(k.startswith(openclip) for k in sd) and (config.get("cond_stage") or {}).get("type") == "clip":
        tower = {k[len(openclip):]: v for k, v in sd.items() if k.startswith(openclip)}
        sd = {k: v for k, v in sd.items() if not k.startswith(openclip)}
        layers = config["cond_stage"]["clip_config"]["num_hidden_layers"]
        try:
            sd.update({PREFIXES["cond_stage"] + k: v
                       for k, v in convert.openclip_to_clip(tower, layers).items()})
        except KeyError as e:
            raise ValueError(f"{where}: OpenCLIP text encoder weights lack {e}") from None
    parts = _split(sd)
    if use_ema:
        if not config.get("unet"):
            raise ValueError(f"{where}: use_ema=True but the config has no U-Net")
        with torch.device("meta"):
            keys = list(build_unet(config["unet"]).state_dict())
        parts["unet"] = {k[len(PREFIXES["unet"]):]: v
                         for k, v in _ema_to_model(sd, keys, where).items()}
    elif any(k.startswith("model_ema.") for k in sd):
        log.info("%s: has EMA weights; loading the non-EMA ones (use_ema=True for EMA)", where)
    modules = {}
    for part in PREFIXES:
        cfg = config.get(part)
        if not cfg or (part == "cond_stage" and cfg.get("type") in (None, "first_stage")):
            if parts[part] and part != "cond_stage":
                raise ValueError(f"{where}: has {part} weights ({PREFIXES[part]}*) but the config "
                                 f"has no {part}")
            modules[part] = None
            continue
        modules[part] = _load_module(part, cfg, parts[part], where, dtype)
    return Components(modules["unet"], modules["first_stage"], modules["cond_stage"], config)


def load_components(path, config=None, use_ema: bool = False, *, parameterization=None,
                    dtype: torch.dtype | None = torch.float32, tokenizer=None) -> Components:
    """Loads U-Net, first stage and conditioning encoder from ``path``.

    path: a CompVis/SD ``.ckpt``/``.safetensors`` (``model.diffusion_model.*``,
    ``first_stage_model.*``, ``cond_stage_model.*``, ``model_ema.*``; also a first stage or
    U-Net saved alone), a diffusers folder, or a file written by ``save``.
    config: None (ldmfast metadata, else inferred from the weights), a dict, a preset name, or
    an original LDM YAML file. use_ema: take the U-Net from ``model_ema.*``.
    parameterization: "eps"/"v"/"x0", overriding the config (SD-2 checkpoints do not say).
    dtype: floating-point weights are cast to it (None keeps the stored dtypes).
    tokenizer: a local tokenizer folder for the text encoder (checkpoints hold no tokenizer:
    CLIP's, or a Hugging Face one such as BERT's for the paper's text encoder), or a tokenizer
    config dict for the transformer encoder ({"type": "word", "vocab": [...]}).
    """
    where = os.fspath(path)
    if parameterization not in (None, "eps", "v", "x0"):
        raise ValueError(f"parameterization must be 'eps', 'v' or 'x0', not {parameterization!r}")
    if os.path.isdir(where):
        if use_ema:
            raise ValueError(f"{where}: a diffusers folder holds one set of weights; use_ema=True "
                             "does not apply")
        sd, found = _read_diffusers(where)
        cfg = _resolve_config(config, where) or found
        return _assemble(sd, cfg, where, False, dtype, parameterization, tokenizer)
    sd, stored = read_state_dict(where)
    cfg = _resolve_config(config, where) if config is not None else stored
    return _assemble(sd, cfg, where, use_ema, dtype, parameterization, tokenizer)


# ---------------------------------------------------------------------------------- diffusers

def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_weights(folder, stems):
    stems = list(stems) + [s + ".fp16" for s in stems]  # the fp16 variant when alone
    names = os.listdir(folder)
    for stem in stems:
        for ext in (".safetensors", ".bin"):
            if stem + ext in names:
                return read_state_dict(os.path.join(folder, stem + ext))[0]
            index = stem + ext + ".index.json"
            if index in names:  # sharded weights
                shards = sorted(set(_read_json(os.path.join(folder, index))["weight_map"].values()))
                sd = {}
                for shard in shards:
                    sd.update(read_state_dict(os.path.join(folder, shard))[0])
                return sd
    raise ValueError(f"{folder}: no weights ({', '.join(s + '.safetensors' for s in stems)} "
                     "or .bin)")


_BETAS = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _read_diffusers(folder):
    """(CompVis-layout state dict, config) from a diffusers pipeline folder."""
    sub = {name: os.path.join(folder, name) for name in ("unet", "vae", "text_encoder",
                                                         "tokenizer", "scheduler")}
    if not os.path.isfile(os.path.join(sub["unet"], "config.json")):
        raise ValueError(f"{folder}: not a diffusers folder (unet/config.json is missing)")
    sd, config = {}, {"unet": None, "first_stage": None, "cond_stage": None}
    ucfg = _read_json(os.path.join(sub["unet"], "config.json"))
    unet_sd, config["unet"] = convert.unet_from_diffusers(
        _read_weights(sub["unet"], ["diffusion_pytorch_model"]), ucfg,
        ucfg.get("_class_name", "UNet2DConditionModel"))
    sd.update({PREFIXES["unet"] + k: v for k, v in unet_sd.items()})
    scale = 1.0
    if not os.path.isdir(sub["vae"]) and os.path.isdir(os.path.join(folder, "vqvae")):
        sub["vae"] = os.path.join(folder, "vqvae")  # diffusers' LDMPipeline names it so
    vcfg_path = os.path.join(sub["vae"], "config.json")
    if os.path.isfile(vcfg_path):
        vcfg = _read_json(vcfg_path)
        vae_sd, config["first_stage"] = convert.first_stage_from_diffusers(
            _read_weights(sub["vae"], ["diffusion_pytorch_model"]), vcfg,
            vcfg.get("_class_name", "AutoencoderKL"))
        sd.update({PREFIXES["first_stage"] + k: v for k, v in vae_sd.items()})
        scale = float(vcfg.get("scaling_factor", 0.18215 if vcfg.get("_class_name", "AutoencoderKL")
                               == "AutoencoderKL" else 1.0))
    tcfg_path = os.path.join(sub["text_encoder"], "config.json")
    if os.path.isfile(tcfg_path):
        te_sd, cond = convert.clip_from_transformers(
            _read_weights(sub["text_encoder"], ["model", "pytorch_model"]), _read_json(tcfg_path))
        if os.path.isdir(sub["tokenizer"]):
            cond["tokenizer_path"] = os.path.abspath(sub["tokenizer"])
            tok_cfg = os.path.join(sub["tokenizer"], "tokenizer_config.json")
            if os.path.isfile(tok_cfg):
                cond["max_length"] = min(int(_read_json(tok_cfg).get("model_max_length", 77)), 77)
        config["cond_stage"] = cond
        sd.update({PREFIXES["cond_stage"] + k: v for k, v in te_sd.items()})
    sc_path = os.path.join(sub["scheduler"], "scheduler_config.json")
    sc = _read_json(sc_path) if os.path.isfile(sc_path) else {}
    beta, prediction = sc.get("beta_schedule", "scaled_linear"), sc.get("prediction_type", "epsilon")
    if beta not in _BETAS or sc.get("trained_betas") is not None:
        raise ValueError(f"{sc_path}: beta_schedule {beta!r} has no LDM equivalent ({', '.join(_BETAS)})")
    if prediction not in _PREDICTION:
        raise ValueError(f"{sc_path}: prediction_type {prediction!r} is not supported")
    config["diffusion"] = {
        "parameterization": _PREDICTION[prediction], "beta_schedule": _BETAS[beta],
        "linear_start": float(sc.get("beta_start", 0.00085)),
        "linear_end": float(sc.get("beta_end", 0.012)),
        "timesteps": int(sc.get("num_train_timesteps", 1000)), "scale_factor": scale,
        "conditioning_key": "crossattn" if config["cond_stage"] else (
            "concat" if config["unet"]["in_channels"] > config["unet"]["out_channels"] else None)}
    return sd, config


def from_diffusers(module: nn.Module) -> nn.Module:
    """The ldmfast module equivalent to a diffusers ``UNet2DConditionModel``, ``UNet2DModel``,
    ``AutoencoderKL`` or ``VQModel`` (or a transformers ``CLIPTextModel``): same outputs, same
    dtype and device, weights copied; the result carries its ``.config``."""
    cls = type(module).__name__
    if cls not in ("UNet2DConditionModel", "UNet2DModel", "AutoencoderKL", "VQModel",
                   "CLIPTextModel", "CLIPTextModelWithProjection"):
        raise ValueError(f"from_diffusers: {cls} is not supported (UNet2DConditionModel, "
                         "UNet2DModel, AutoencoderKL, VQModel, CLIPTextModel)")
    sd = {k: v.detach().clone() for k, v in module.state_dict().items()}
    cfg = dict(module.config) if not hasattr(module.config, "to_dict") else module.config.to_dict()
    if cls in ("UNet2DConditionModel", "UNet2DModel"):
        sd, part_cfg = convert.unet_from_diffusers(sd, cfg, cls)
        part = "unet"
    elif cls in ("AutoencoderKL", "VQModel"):
        sd, part_cfg = convert.first_stage_from_diffusers(sd, cfg, cls)
        part = "first_stage"
    else:
        sd, part_cfg = convert.clip_from_transformers(sd, cfg)
        part = "cond_stage"
    out = _load_module(part, part_cfg, sd, f"from_diffusers({cls})", None)
    return out.train(module.training)


# ------------------------------------------------------------------------------------- saving

def _part_of(module):
    from .models import (AutoencoderKL, ClassEmbedder, CLIPTextEmbedder, IdentityEncoder,
                         SpatialRescaler, TransformerEmbedder, UNetModel, VQModel)
    if isinstance(module, UNetModel):
        return "unet"
    if isinstance(module, (AutoencoderKL, VQModel)):
        return "first_stage"
    if isinstance(module, (ClassEmbedder, CLIPTextEmbedder, IdentityEncoder, SpatialRescaler,
                           TransformerEmbedder)):
        return "cond_stage"
    raise ValueError(f"save: a {type(module).__name__} is not an ldmfast model module")


def _collect(obj):
    """(prefixed state dict, config) of a Components-like object or a single module."""
    if all(hasattr(obj, a) for a in ("unet", "first_stage", "cond_stage")):
        config = copy.deepcopy(getattr(obj, "config", None) or {})
        parts = {"unet": obj.unet, "first_stage": obj.first_stage, "cond_stage": obj.cond_stage}
    elif isinstance(obj, nn.Module):
        if not hasattr(obj, "config"):
            raise ValueError(f"save: the {type(obj).__name__} carries no .config (build it with "
                             "ldmfast.models.build_* or load it with ldmfast.checkpoint)")
        part = _part_of(obj)
        config = {"unet": None, "first_stage": None, "cond_stage": None, "diffusion": None}
        parts = {p: (obj if p == part else None) for p in PREFIXES}
    else:
        raise ValueError(f"save: cannot save a {type(obj).__name__}; give Components (or anything "
                         "with .unet/.first_stage/.cond_stage/.config) or an ldmfast module")
    sd = {}
    for part, module in parts.items():
        if module is None:
            continue
        if getattr(module, "config", None) is not None:
            config[part] = copy.deepcopy(module.config)
        elif not config.get(part):
            raise ValueError(f"save: no config for the {part}")
        for k, v in module.state_dict().items():
            sd[PREFIXES[part] + k] = v
    try:
        text = json.dumps(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save: the config is not JSON-serialisable: {e}") from e
    return sd, text


def _tensors_for_file(sd):
    """Contiguous CPU tensors, each with its own storage (safetensors refuses shared memory)."""
    out, seen = {}, set()
    for k, v in sd.items():
        v = v.detach().to("cpu").contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if ptr in seen:
            v = v.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = v
    return out


def save(obj, path, overwrite: bool = False) -> str:
    """Writes ``obj`` (Components-like, or one ldmfast module carrying ``.config``) to ``path``:
    ``.safetensors`` with the config as JSON in the metadata (``load_components`` restores any
    architecture), or ``.ckpt`` with a CompVis-layout ``{"state_dict": ...}``. The file appears
    atomically (``ldmfast.fileio.atomic_path``); on failure nothing is left. An existing file
    (the checkpoint the model came from, say, with EMA weights this one may lack) is replaced
    only with ``overwrite=True``."""
    path = os.fspath(path)
    if not path.endswith((".safetensors", ".ckpt")):
        raise ValueError(f"save: {path!r} must end in .safetensors or .ckpt")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"save: folder {folder!r} does not exist")
    fileio.check_writable(path, overwrite)
    sd, config_json = _collect(obj)
    tensors = _tensors_for_file(sd)
    with fileio.atomic_path(path, replace=overwrite) as tmp:
        if path.endswith(".safetensors"):
            from safetensors.torch import save_file
            save_file(tensors, tmp, metadata={"format": "pt", _META_KEY: config_json})
        else:
            torch.save({"state_dict": tensors, _META_KEY: config_json}, tmp)
    return path
