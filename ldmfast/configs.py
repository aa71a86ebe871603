"""Model presets as plain config dicts, LDM YAML configs, and configs inferred from weights.

A config is ``{"unet": {...}, "first_stage": {...}, "cond_stage": {...} or None,
"diffusion": {...}}``: ``unet`` holds CompVis ``UNetModel`` arguments; ``first_stage`` a
``type`` ("kl" | "vq") with ``embed_dim``, ``n_embed`` (vq) and the CompVis ``ddconfig``;
``cond_stage`` a ``type`` ("clip" | "transformer" | "class" | "rescaler" | "identity" |
"first_stage" | None) with the encoder's arguments; ``diffusion`` the training schedule
(``parameterization``, ``beta_schedule``, ``linear_start``, ``linear_end``, ``timesteps``) and
``scale_factor`` and ``conditioning_key``. ``build(config)`` makes the modules.
"""
from __future__ import annotations

import copy
import logging
import os
import re

log = logging.getLogger("ldmfast")

__all__ = ["get", "names", "build", "first_stage", "from_ldm_yaml", "infer"]


def _dd(ch_mult, z, attn=(), ch=128, num_res_blocks=2, resolution=256, attn_type="vanilla",
        double_z=True):
    return {"double_z": double_z, "z_channels": z, "resolution": resolution, "in_channels": 3,
            "out_ch": 3, "ch": ch, "ch_mult": list(ch_mult), "num_res_blocks": num_res_blocks,
            "attn_resolutions": list(attn), "dropout": 0.0, "attn_type": attn_type}


# The paper's first stages (latent-diffusion models/first_stage_models/*/config.yaml).
_FIRST_STAGES = {
    "kl-f4": {"type": "kl", "embed_dim": 3, "ddconfig": _dd([1, 2, 4], 3)},
    "kl-f8": {"type": "kl", "embed_dim": 4, "ddconfig": _dd([1, 2, 4, 4], 4)},
    "kl-f16": {"type": "kl", "embed_dim": 16, "ddconfig": _dd([1, 1, 2, 2, 4], 16, [16])},
    "kl-f32": {"type": "kl", "embed_dim": 64, "ddconfig": _dd([1, 1, 2, 2, 4, 4], 64, [16, 8])},
    "vq-f4": {"type": "vq", "embed_dim": 3, "n_embed": 8192,
              "ddconfig": _dd([1, 2, 4], 3, double_z=False)},
    "vq-f4-noattn": {"type": "vq", "embed_dim": 3, "n_embed": 8192,
                     "ddconfig": _dd([1, 2, 4], 3, attn_type="none", double_z=False)},
    "vq-f8": {"type": "vq", "embed_dim": 4, "n_embed": 16384,
              "ddconfig": _dd([1, 2, 2, 4], 4, [32], double_z=False)},
    "vq-f16": {"type": "vq", "embed_dim": 8, "n_embed": 16384,
               "ddconfig": _dd([1, 1, 2, 2, 4], 8, [16], double_z=False)},
}

# OpenAI CLIP ViT-L/14's text tower (SD-1) and OpenCLIP ViT-H/14's without its last layer
# (SD-2 uses the penultimate layer; diffusers stores it with 23 layers).
_CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
           "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
           "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
           "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}
_OPENCLIP_H = {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096,
               "num_hidden_layers": 23, "num_attention_heads": 16, "max_position_embeddings": 77,
               "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 1024,
               "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}

_TINY_WORDS = ("a an the of in on with and photo painting drawing picture red green blue yellow "
               "black white orange purple pink brown gray big small tiny large circle square "
               "triangle star cat dog bird fish tree house car flower sun moon mountain river "
               "sky sea night day").split()


def _diffusion(parameterization="eps", start=0.00085, end=0.012, scale=0.18215, key="crossattn",
               schedule="linear"):
    return {"parameterization": parameterization, "beta_schedule": schedule,
            "linear_start": start, "linear_end": end, "timesteps": 1000, "scale_factor": scale,
            "conditioning_key": key}


def _sd_unet(context_dim, **kw):
    u = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
         "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
         "num_heads": 8, "use_spatial_transformer": True, "transformer_depth": 1,
         "context_dim": context_dim, "legacy": False}
    u.update(kw)
    return u


_PRESETS = {
    # Stable Diffusion 1.x (configs/stable-diffusion/v1-inference.yaml)
    "sd1": {"unet": _sd_unet(768), "first_stage": _FIRST_STAGES["kl-f8"],
            "cond_stage": {"type": "clip", "clip_config": _CLIP_L, "tokenizer_path": None,
                           "max_length": 77, "layer": "last"},
            "diffusion": _diffusion()},
    # Stable Diffusion 2.x 768-v (v2-inference-v.yaml); "sd2-base" is the 512 eps model
    "sd2": {"unet": _sd_unet(1024, num_heads=-1, num_head_channels=64,
                             use_linear_in_transformer=True, image_size=96),
            "first_stage": _FIRST_STAGES["kl-f8"],
            "cond_stage": {"type": "clip", "clip_config": _OPENCLIP_H, "tokenizer_path": None,
                           "max_length": 77, "layer": "last"},
            "diffusion": _diffusion("v")},
    # the paper's LDM-KL-8 text-to-image model (txt2img-1p4B-eval.yaml)
    "txt2img-1p4b": {"unet": _sd_unet(1280), "first_stage": _FIRST_STAGES["kl-f8"],
                     "cond_stage": {"type": "transformer", "n_embed": 1280, "n_layer": 32,
                                    "vocab_size": 30522, "max_seq_len": 77, "tokenizer": None},
                     "diffusion": _diffusion()},
    # class-conditional ImageNet, LDM-VQ-4 (cin256-v2.yaml)
    "cin256": {"unet": {"image_size": 64, "in_channels": 3, "out_channels": 3,
                        "model_channels": 192, "attention_resolutions": [8, 4, 2],
                        "num_res_blocks": 2, "channel_mult": [1, 2, 3, 5], "num_heads": 1,
                        "use_spatial_transformer": True, "transformer_depth": 1,
                        "context_dim": 512},
               "first_stage": _FIRST_STAGES["vq-f4"],
               "cond_stage": {"type": "class", "embed_dim": 512, "n_classes": 1001,
                              "key": "class_label"},
               "diffusion": _diffusion(start=0.0015, end=0.0195, scale=1.0)},
    # unconditional CelebA-HQ, LDM-VQ-4 (models/ldm/celeba256/config.yaml)
    "celebahq": {"unet": {"image_size": 64, "in_channels": 3, "out_channels": 3,
                          "model_channels": 224, "attention_resolutions": [8, 4, 2],
                          "num_res_blocks": 2, "channel_mult": [1, 2, 3, 4],
                          "num_head_channels": 32},
                 "first_stage": _FIRST_STAGES["vq-f4"], "cond_stage": None,
                 "diffusion": _diffusion(start=0.0015, end=0.0195, scale=1.0, key=None)},
    # 4x super-resolution: the low-resolution image concatenated (models/ldm/bsr_sr)
    "bsr-sr": {"unet": {"image_size": 64, "in_channels": 6, "out_channels": 3,
                        "model_channels": 160, "attention_resolutions": [16, 8],
                        "num_res_blocks": 2, "channel_mult": [1, 2, 2, 4],
                        "num_head_channels": 32},
               "first_stage": _FIRST_STAGES["vq-f4"], "cond_stage": {"type": "identity"},
               "diffusion": _diffusion(start=0.0015, end=0.0155, scale=1.0, key="concat")},
    # inpainting: masked-image latent (3) and mask (1) concatenated (models/ldm/inpainting_big)
    "inpainting": {"unet": {"image_size": 64, "in_channels": 7, "out_channels": 3,
                            "model_channels": 256, "attention_resolutions": [8, 4, 2],
                            "num_res_blocks": 2, "channel_mult": [1, 2, 3, 4], "num_heads": 8,
                            "resblock_updown": True},
                   "first_stage": _FIRST_STAGES["vq-f4-noattn"],
                   "cond_stage": {"type": "first_stage"},
                   "diffusion": _diffusion(start=0.0015, end=0.0205, scale=1.0, key="concat")},
    # a text-conditioned model small enough for tests and CPU demos
    "tiny": {"unet": {"image_size": 16, "in_channels": 4, "out_channels": 4,
                      "model_channels": 32, "attention_resolutions": [2], "num_res_blocks": 1,
                      "channel_mult": [1, 2], "num_heads": 2, "use_spatial_transformer": True,
                      "transformer_depth": 1, "context_dim": 32, "legacy": False},
             "first_stage": {"type": "kl", "embed_dim": 4,
                             "ddconfig": _dd([1, 2, 2], 4, ch=32, num_res_blocks=1,
                                             resolution=64)},
             "cond_stage": {"type": "transformer", "n_embed": 32, "n_layer": 2,
                            "vocab_size": len(_TINY_WORDS) + 4, "max_seq_len": 16, "heads": 2,
                            "dim_head": 16,
                            "tokenizer": {"type": "word", "vocab": list(_TINY_WORDS),
                                          "max_length": 16}},
             "diffusion": _diffusion(scale=1.0)},
}
_PRESETS["sd2-base"] = copy.deepcopy(_PRESETS["sd2"])
_PRESETS["sd2-base"]["unet"]["image_size"] = 64
_PRESETS["sd2-base"]["diffusion"]["parameterization"] = "eps"
for _name, _fs in _FIRST_STAGES.items():  # first stages alone (their standalone checkpoints)
    _PRESETS[_name] = {"unet": None, "first_stage": _fs, "cond_stage": None, "diffusion": None}

_ALIASES = {"sd-1": "sd1", "sd1.5": "sd1", "sd-1.5": "sd1", "sd15": "sd1", "sd-2": "sd2",
            "sd2-v": "sd2", "sd21": "sd2", "txt2img": "txt2img-1p4b", "ldm-kl-8": "txt2img-1p4b",
            "cin": "cin256", "celeba": "celebahq", "sr": "bsr-sr", "bsr_sr": "bsr-sr"}


def names() -> list[str]:
    """The preset names ``get`` accepts (aliases aside)."""
    return sorted(_PRESETS)


def get(name: str) -> dict:
    """A deep copy of a preset config."""
    key = _ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if key not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(names())}")
    return copy.deepcopy(_PRESETS[key])


def first_stage(name: str) -> dict:
    """The first-stage config of one of the paper's autoencoders (kl-f4 ... vq-f16)."""
    if name not in _FIRST_STAGES:
        raise ValueError(f"unknown first stage {name!r}; known: {', '.join(_FIRST_STAGES)}")
    return copy.deepcopy(_FIRST_STAGES[name])


def build(config):
    """Modules with random weights for a config dict or preset name -> ``Components``."""
    from .models import build as _build
    return _build(get(config) if isinstance(config, str) else config)


# ----------------------------------------------------------------------------- LDM YAML files

_COND_TARGETS = {
    "ClassEmbedder": "class", "BERTEmbedder": "transformer", "TransformerEmbedder": "transformer",
    "SpatialRescaler": "rescaler", "FrozenCLIPEmbedder": "clip", "Identity": "identity",
    "FrozenOpenCLIPEmbedder": "openclip",
}


def from_ldm_yaml(path) -> dict:
    """A config from an original LDM/SD YAML file (``model.params.unet_config`` etc.)."""
    import yaml
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        p = doc["model"]["params"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not an LDM config (needs model.params): {e}") from e
    if "unet_config" not in p:
        raise ValueError(f"{path}: model.params.unet_config is missing")
    unet = dict(p["unet_config"].get("params", {}))
    fs = p.get("first_stage_config")
    first = None
    if fs:
        target, fp = fs.get("target", ""), dict(fs.get("params", {}))
        kind = "vq" if "VQ" in target.rsplit(".", 1)[-1] else "kl"
        first = {"type": kind, "embed_dim": fp["embed_dim"], "ddconfig": dict(fp["ddconfig"])}
        if kind == "vq":
            first["n_embed"] = fp["n_embed"]
    cs = p.get("cond_stage_config")
    cond, key = None, p.get("conditioning_key")
    if cs == "__is_first_stage__":
        cond = {"type": "first_stage"}
    elif cs and cs != "__is_unconditional__":
        cls = cs.get("target", "").rsplit(".", 1)[-1]
        if cls not in _COND_TARGETS:
            raise ValueError(f"{path}: cond_stage target {cs.get('target')!r} is not supported "
                             f"({', '.join(_COND_TARGETS)})")
        cp = {k: v for k, v in (cs.get("params") or {}).items() if k not in ("device", "freeze")}
        cond = {"type": _COND_TARGETS[cls]}
        if cls == "FrozenCLIPEmbedder":
            if cp.get("layer", "last") != "last":
                raise ValueError(f"{path}: FrozenCLIPEmbedder layer {cp['layer']!r} is not "
                                 "supported (only 'last')")
            cond.update(clip_config=dict(_CLIP_L), tokenizer_path=None,
                        max_length=cp.get("max_length", 77), layer="last")
        elif cls == "FrozenOpenCLIPEmbedder":
            cond = {"type": "clip", "clip_config": dict(_OPENCLIP_H), "tokenizer_path": None,
                    "max_length": 77, "layer": "last"}
            if cp.get("layer", "last") == "last":
                cond["clip_config"]["num_hidden_layers"] = 24
        elif cls in ("BERTEmbedder", "TransformerEmbedder"):
            cond.update(n_embed=cp["n_embed"], n_layer=cp["n_layer"],
                        vocab_size=cp.get("vocab_size", 30522),
                        max_seq_len=cp.get("max_seq_len", 77), tokenizer=None)
        else:
            cond.update(cp)
    if key is None:  # LatentDiffusion's defaults: concat_mode=True unless a key is given
        key = "concat" if p.get("concat_mode", True) else "crossattn"
    if cs in (None, "__is_unconditional__"):
        key = None
    diffusion = {"parameterization": p.get("parameterization", "eps"),
                 "beta_schedule": p.get("beta_schedule", "linear"),
                 "linear_start": p.get("linear_start", 1e-4),
                 "linear_end": p.get("linear_end", 2e-2), "timesteps": p.get("timesteps", 1000),
                 "scale_factor": p.get("scale_factor", 1.0), "conditioning_key": key}
    return {"unet": unet, "first_stage": first, "cond_stage": cond, "diffusion": diffusion}


# ------------------------------------------------------------------ configs inferred from weights

def _sub(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def infer_unet(sd: dict) -> dict:
    """U-Net arguments read off a CompVis U-Net state dict (no prefix). The attention head
    count is not in the weights: it comes from a matching preset, else a guess (logged)."""
    if "input_blocks.0.0.weight" not in sd or "out.2.weight" not in sd:
        raise ValueError("not a CompVis U-Net: input_blocks.0.0.weight / out.2.weight missing")
    mc, cin = sd["input_blocks.0.0.weight"].shape[:2]
    n_out = 1 + max(int(m.group(1)) for m in map(re.compile(r"output_blocks\.(\d+)\.").match, sd) if m)
    # The first output block holding an upsampler (a conv, or a ResBlock after slot 0) ends the
    # lowest level; a parameter-free resampler shows as an input block with no weights.
    up = [i for i in range(n_out) if any(
        re.match(rf"output_blocks\.{i}\.[1-9]\.(conv\.weight|in_layers\.0\.weight)", k) for k in sd)]
    gaps = [i for i in range(n_out) if not any(k.startswith(f"input_blocks.{i}.") for k in sd)]
    nrb = up[0] if up else (gaps[0] - 1 if gaps else n_out - 1)
    levels = n_out // (nrb + 1)
    mult, attn = [], []
    for lv in range(levels):
        b = 1 + lv * (nrb + 1)
        mult.append(sd[f"input_blocks.{b}.0.out_layers.3.weight"].shape[0] // mc)
        if any(k.startswith(f"input_blocks.{b}.1.") for k in sd):
            attn.append(2 ** lv)
    spatial = any(".transformer_blocks." in k for k in sd)
    out = {"in_channels": int(cin), "out_channels": int(sd["out.2.weight"].shape[0]),
           "model_channels": int(mc), "num_res_blocks": nrb, "channel_mult": mult,
           "attention_resolutions": attn,
           "use_scale_shift_norm": sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]
           == 2 * mult[0] * mc,
           "resblock_updown": levels > 1 and f"input_blocks.{nrb + 1}.0.in_layers.0.weight" in sd,
           "conv_resample": levels == 1 or f"input_blocks.{nrb + 1}.0.op.weight" in sd
           or f"input_blocks.{nrb + 1}.0.in_layers.0.weight" in sd}
    if "label_emb.weight" in sd:
        out["num_classes"] = int(sd["label_emb.weight"].shape[0])
    if spatial:
        k2 = next(k for k in sd if k.endswith("attn2.to_k.weight"))
        depth = 1 + max(int(m.group(1)) for m in
                        map(re.compile(r"middle_block\.1\.transformer_blocks\.(\d+)\.").match, sd) if m)
        out.update(use_spatial_transformer=True, context_dim=int(sd[k2].shape[1]),
                   transformer_depth=depth,
                   use_linear_in_transformer=sd["middle_block.1.proj_in.weight"].dim() == 2)
    return out


_HEAD_KEYS = ("num_heads", "num_head_channels", "num_heads_upsample", "legacy", "image_size")


def _same(a, b):
    def norm(k, v, cfg):
        if k == "attention_resolutions":  # only the downsampling factors that occur count
            return sorted(r for r in v if r < 2 ** len(cfg["channel_mult"]))
        return list(v) if isinstance(v, (list, tuple)) else v
    keys = set(a) | set(b)
    defaults = {"use_scale_shift_norm": False, "resblock_updown": False, "conv_resample": True,
                "use_spatial_transformer": False, "use_linear_in_transformer": False,
                "num_classes": None, "transformer_depth": 1, "context_dim": None}
    return all(norm(k, a.get(k, defaults.get(k)), a) == norm(k, b.get(k, defaults.get(k)), b)
               for k in keys if k not in _HEAD_KEYS + ("dropout",))


def infer_first_stage(sd: dict) -> dict:
    """First-stage config read off a CompVis autoencoder state dict (no prefix); attention
    resolutions assume 256-pixel training images, as all of the paper's autoencoders."""
    if "encoder.conv_in.weight" not in sd:
        raise ValueError("not a CompVis autoencoder: encoder.conv_in.weight missing")
    ch, cin = sd["encoder.conv_in.weight"].shape[:2]
    levels = 1 + max(int(m.group(1)) for m in map(re.compile(r"encoder\.down\.(\d+)\.").match, sd) if m)
    nrb = 1 + max(int(m.group(1)) for m in map(re.compile(r"encoder\.down\.0\.block\.(\d+)\.").match, sd) if m)
    mult = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)]
    attn = [256 // 2 ** i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in sd]
    z, embed = sd["post_quant_conv.weight"].shape[:2]
    vq = "quantize.embedding.weight" in sd
    dd = _dd(mult, int(z), attn, ch=int(ch), num_res_blocks=nrb, double_z=not vq,
             attn_type="vanilla" if "encoder.mid.attn_1.q.weight" in sd else "none")
    dd.update(in_channels=int(cin), out_ch=int(sd["decoder.conv_out.weight"].shape[0]))
    out = {"type": "vq" if vq else "kl", "embed_dim": int(embed), "ddconfig": dd}
    if vq:
        out["n_embed"] = int(sd["quantize.embedding.weight"].shape[0])
    return out


def infer_cond_stage(sd: dict) -> dict | None:
    """Conditioning-encoder config read off a CompVis ``cond_stage_model`` state dict."""
    if not sd:
        return None
    if "embedding.weight" in sd:
        n, d = sd["embedding.weight"].shape
        return {"type": "class", "embed_dim": int(d), "n_classes": int(n), "key": "class_label"}
    if "transformer.text_model.embeddings.token_embedding.weight" in sd:
        t = "transformer.text_model."
        vocab, hidden = sd[t + "embeddings.token_embedding.weight"].shape
        layers = 1 + max(int(m.group(1)) for m in
                         map(re.compile(r"transformer\.text_model\.encoder\.layers\.(\d+)\.").match, sd) if m)
        clip = dict(_CLIP_L if hidden == 768 else _OPENCLIP_H)
        clip.update(vocab_size=int(vocab), hidden_size=int(hidden), num_hidden_layers=layers,
                    intermediate_size=int(sd[t + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
                    num_attention_heads=int(hidden) // 64,
                    max_position_embeddings=int(sd[t + "embeddings.position_embedding.weight"].shape[0]))
        return {"type": "clip", "clip_config": clip, "tokenizer_path": None, "max_length": 77,
                "layer": "last"}
    if "transformer.token_emb.weight" in sd:
        vocab, dim = sd["transformer.token_emb.weight"].shape
        n_layer = (1 + max(int(m.group(1)) for m in map(
            re.compile(r"transformer\.attn_layers\.layers\.(\d+)\.").match, sd) if m)) // 2
        inner = int(sd["transformer.attn_layers.layers.0.1.to_q.weight"].shape[0])
        heads = 8 if inner % 8 == 0 else 1  # x-transformers' default; not in the weights
        return {"type": "transformer", "n_embed": int(dim), "n_layer": n_layer,
                "vocab_size": int(vocab),
                "max_seq_len": int(sd["transformer.pos_emb.emb.weight"].shape[0]),
                "heads": heads, "dim_head": inner // heads, "tokenizer": None}
    if "channel_mapper.weight" in sd:
        o, i = sd["channel_mapper.weight"].shape[:2]
        return {"type": "rescaler", "in_channels": int(i), "out_channels": int(o),
                "bias": "channel_mapper.bias" in sd}
    if "model.token_embedding.weight" in sd:  # SD-2's OpenCLIP, read at its penultimate layer
        vocab, hidden = sd["model.token_embedding.weight"].shape
        blocks = 1 + max(int(m.group(1)) for m in map(
            re.compile(r"model\.transformer\.resblocks\.(\d+)\.").match, sd) if m)
        clip = dict(_OPENCLIP_H, vocab_size=int(vocab), hidden_size=int(hidden),
                    num_hidden_layers=blocks - 1, num_attention_heads=int(hidden) // 64,
                    intermediate_size=int(sd["model.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                    max_position_embeddings=int(sd["model.positional_embedding"].shape[0]))
        return {"type": "clip", "clip_config": clip, "tokenizer_path": None, "max_length": 77,
                "layer": "last"}
    raise ValueError("cond_stage_model weights of an unknown encoder (keys such as "
                     f"{', '.join(sorted(sd)[:5])})")


_COND_SHAPE_KEYS = {"transformer": ("n_embed", "n_layer", "vocab_size", "max_seq_len"),
                    "class": ("embed_dim", "n_classes"),
                    "rescaler": ("in_channels", "out_channels", "bias")}
_CLIP_SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "max_position_embeddings")


def _cond_fits(inferred, preset):
    """Whether a preset's cond_stage has the inferred encoder's shapes."""
    if not inferred or not preset or inferred["type"] != preset["type"]:
        return False
    if inferred["type"] == "clip":
        return all(inferred["clip_config"].get(k) == preset["clip_config"].get(k)
                   for k in _CLIP_SHAPE_KEYS)
    if inferred["type"] == "transformer" and (inferred["heads"] * inferred["dim_head"]
                                              != preset.get("heads", 8) * preset.get("dim_head", 64)):
        return False
    return all(inferred.get(k) == preset.get(k) for k in _COND_SHAPE_KEYS.get(inferred["type"], ()))


def infer(sd: dict, parameterization: str | None = None) -> dict:
    """A config for a CompVis-layout state dict (with ``model.diffusion_model.`` etc. prefixes):
    the architecture read off the weights, completed from the matching preset where one matches
    (head counts, schedule, scale factor), else with logged guesses."""
    unet_sd = _sub(sd, "model.diffusion_model.")
    fs_sd = _sub(sd, "first_stage_model.")
    cs_sd = {k: v for k, v in _sub(sd, "cond_stage_model.").items()}
    if not unet_sd and not fs_sd:
        raise ValueError("unknown architecture: no model.diffusion_model.* or first_stage_model.* "
                         "weights")
    config = {"unet": None, "first_stage": None, "cond_stage": None, "diffusion": None}
    if fs_sd:
        config["first_stage"] = infer_first_stage(fs_sd)
    config["cond_stage"] = infer_cond_stage(cs_sd)
    if not unet_sd:
        return config
    unet = infer_unet(unet_sd)
    match = next((n for n in ("sd1", "sd2", "txt2img-1p4b", "cin256", "celebahq", "bsr-sr",
                              "inpainting", "tiny") if _same(unet, _PRESETS[n]["unet"])), None)
    if match:
        preset = get(match)
        if match == "sd2" and parameterization is None:
            log.warning("an SD-2.x U-Net does not record its parameterization; assuming v "
                        "(768-v models) -- pass parameterization='eps' for the 512 base models")
        for k in _HEAD_KEYS:
            if k in preset["unet"]:
                unet[k] = preset["unet"][k]
        config["diffusion"] = preset["diffusion"]
        if config["cond_stage"] is None and preset["cond_stage"] and \
                preset["cond_stage"]["type"] in ("identity", "first_stage"):
            config["cond_stage"] = preset["cond_stage"]
        elif _cond_fits(config["cond_stage"], preset["cond_stage"]):
            config["cond_stage"] = preset["cond_stage"]  # with what the weights cannot say
        log.info("checkpoint matches the %r preset", match)
    else:
        if unet.get("use_linear_in_transformer"):
            unet.update(num_head_channels=64, num_heads=-1)
        elif unet.get("use_spatial_transformer"):
            unet.update(num_heads=8)
        else:
            unet.update(num_head_channels=32, num_heads=-1)
        unet["legacy"] = False
        key = ("crossattn" if unet.get("use_spatial_transformer") else
               "concat" if unet["in_channels"] > unet["out_channels"] else None)
        fs = config["first_stage"]
        config["diffusion"] = _diffusion(
            scale=0.18215 if fs and fs["type"] == "kl" and fs["embed_dim"] == 4 else 1.0, key=key)
        log.warning("checkpoint matches no preset: attention heads (%s) and the diffusion "
                    "schedule are guesses; pass a config for exact settings",
                    {k: unet[k] for k in ("num_heads", "num_head_channels") if k in unet})
    if parameterization is not None:
        config["diffusion"]["parameterization"] = parameterization
    config["unet"] = unet
    return config
