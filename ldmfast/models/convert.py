"""The one converter from diffusers' layout to the CompVis layout.

Works on plain state dicts and diffusers config dicts (no diffusers import), so the same code
serves in-memory diffusers modules (``ldmfast.checkpoint.from_diffusers``) and diffusers folders
on disk. Each function returns (CompVis-named state dict without prefix, ldmfast config) and
refuses, naming the setting, any diffusers configuration the CompVis architecture cannot express.
"""
from __future__ import annotations

import re

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}


def _expect(cfg, what, **wanted):
    for key, ok in wanted.items():
        value = cfg.get(key, ok[0] if isinstance(ok, tuple) else ok)
        allowed = ok if isinstance(ok, tuple) else (ok,)
        if value not in allowed:
            raise ValueError(f"{what}: {key}={value!r} has no CompVis equivalent "
                             f"(supported: {', '.join(map(repr, allowed))})")


def _per_level(value, what, name):
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{what}: per-level {name} {list(value)} is not supported")
        return value[0]
    return value if value is not None else None


_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _modern_names(sd):
    """diffusers' pre-0.14 attention names (query/key/value/proj_attn) -> the current ones."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if len(parts) > 2 and parts[-2] in _OLD_ATTENTION and ".attentions." in k:
            k = ".".join(parts[:-2] + [_OLD_ATTENTION[parts[-2]], parts[-1]])
        out[k] = v
    return out


# -------------------------------------------------------------------------------------- U-Net

def _unet_config(cfg, cls):
    what = f"diffusers {cls}"
    common = dict(act_fn="silu", norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
                  time_embedding_type="positional", center_input_sample=False,
                  class_embed_type=None, downsample_padding=1, time_embedding_dim=None)
    _expect(cfg, what, **common)
    if abs(cfg.get("norm_eps", 1e-5) - 1e-5) > 1e-12:
        raise ValueError(f"{what}: norm_eps={cfg['norm_eps']} (CompVis uses 1e-5)")
    boc = list(cfg["block_out_channels"])
    mc = boc[0]
    if any(c % mc for c in boc):
        raise ValueError(f"{what}: block_out_channels {boc} are not multiples of the first")
    nrb = cfg.get("layers_per_block", 2)
    if isinstance(nrb, (list, tuple)):
        nrb = _per_level(nrb, what, "layers_per_block")
    out = dict(in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
               model_channels=mc, channel_mult=[c // mc for c in boc], num_res_blocks=nrb,
               dropout=float(cfg.get("dropout", 0.0)),
               use_scale_shift_norm=cfg.get("resnet_time_scale_shift", "default") == "scale_shift",
               num_classes=cfg.get("num_class_embeds"), legacy=False)
    _expect(cfg, what, resnet_time_scale_shift=("default", "scale_shift"))
    return out, boc, nrb


def unet_config_from_diffusers(cfg: dict, cls: str) -> dict:
    """ldmfast U-Net kwargs for a diffusers UNet2DConditionModel / UNet2DModel config."""
    what = f"diffusers {cls}"
    out, boc, nrb = _unet_config(cfg, cls)
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    n = len(boc)
    if cls == "UNet2DConditionModel":
        _expect(cfg, what, conv_in_kernel=3, conv_out_kernel=3, dual_cross_attention=False,
                addition_embed_type=None, encoder_hid_dim=None, time_cond_proj_dim=None,
                time_embedding_dim=None, timestep_post_act=None, class_embeddings_concat=False,
                mid_block_type="UNetMidBlock2DCrossAttn", attention_type="default",
                resnet_skip_time_act=False, resnet_out_scale_factor=1.0,
                cross_attention_norm=None, time_embedding_act_fn=None, mid_block_scale_factor=1,
                projection_class_embeddings_input_dim=None,
                reverse_transformer_layers_per_block=None)
        only_cross = cfg.get("only_cross_attention", False)
        if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
            raise ValueError(f"{what}: only_cross_attention has no CompVis equivalent")
        attn_down, plain_down = "CrossAttnDownBlock2D", "DownBlock2D"
        attn_up, plain_up = "CrossAttnUpBlock2D", "UpBlock2D"
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim") or 8
        heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * n
        context_dim = cfg.get("cross_attention_dim")
        if isinstance(context_dim, (list, tuple)):
            context_dim = _per_level(context_dim, what, "cross_attention_dim")
        depth = _per_level(cfg.get("transformer_layers_per_block", 1), what,
                           "transformer_layers_per_block")
        out.update(use_spatial_transformer=True, context_dim=context_dim, transformer_depth=depth,
                   use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)))
        levels = [i for i, t in enumerate(down) if t == attn_down] + [n - 1]  # the middle too
    else:
        if (cfg.get("resnet_time_scale_shift") == "scale_shift"
                and cfg.get("attn_norm_num_groups") is None):
            raise ValueError(f"{what}: with resnet_time_scale_shift='scale_shift' diffusers drops "
                             "the middle attention's GroupNorm unless attn_norm_num_groups=32; "
                             "CompVis always has it")
        _expect(cfg, what, add_attention=True, attn_norm_num_groups=(None, 32),
                downsample_type=("conv", "resnet"), upsample_type=("conv", "resnet"),
                mid_block_type=("UNetMidBlock2D",))
        if cfg.get("downsample_type", "conv") != cfg.get("upsample_type", "conv"):
            raise ValueError(f"{what}: downsample_type and upsample_type must agree")
        attn_down, plain_down = "AttnDownBlock2D", "DownBlock2D"
        attn_up, plain_up = "AttnUpBlock2D", "UpBlock2D"
        hd = cfg.get("attention_head_dim", 8)
        heads = [c // hd if hd else 1 for c in boc]
        out.update(resblock_updown=cfg.get("downsample_type", "conv") == "resnet")
        levels = [i for i, t in enumerate(down) if t == attn_down] + [n - 1]
    for i, t in enumerate(down):
        if t not in (attn_down, plain_down):
            raise ValueError(f"{what}: down block {t!r} is not supported ({attn_down}, {plain_down})")
        mirrored = up[n - 1 - i]
        if mirrored != (attn_up if t == attn_down else plain_up):
            raise ValueError(f"{what}: up block {mirrored!r} does not mirror down block {t!r}")
    out["attention_resolutions"] = [2 ** i for i, t in enumerate(down) if t == attn_down]
    level_heads = {heads[i] for i in levels}
    head_dims = {boc[i] // heads[i] for i in levels}
    if len(level_heads) == 1:
        out.update(num_heads=level_heads.pop(), num_head_channels=-1)
    elif len(head_dims) == 1:
        out.update(num_heads=-1, num_head_channels=head_dims.pop())
    else:
        raise ValueError(f"{what}: attention heads {heads} are neither one count nor one width")
    return out


def _unet_attention_2d(sd, prefix, heads):
    """diffusers ``Attention`` (group_norm, to_q/k/v, to_out.0) -> ADM AttentionBlock with one
    qkv conv in the legacy (heads, 3, d) channel order."""
    c = sd[prefix + "to_q.weight"].shape[0]
    d = c // heads
    out = {"norm.weight": sd[prefix + "group_norm.weight"], "norm.bias": sd[prefix + "group_norm.bias"],
           "proj_out.weight": sd[prefix + "to_out.0.weight"][..., None],
           "proj_out.bias": sd[prefix + "to_out.0.bias"]}
    w = torch.stack([sd[prefix + f"to_{p}.weight"].reshape(heads, d, c) for p in "qkv"], dim=1)
    b = torch.stack([sd[prefix + f"to_{p}.bias"].reshape(heads, d) for p in "qkv"], dim=1)
    out["qkv.weight"] = w.reshape(3 * c, c, 1)
    out["qkv.bias"] = b.reshape(3 * c)
    return out


class _KeyMover:
    """Moves keys of a diffusers state dict under CompVis names (``out``), remembering which
    source keys were taken (``done``) so the leftovers can be reported."""

    def __init__(self, sd: dict):
        self.sd, self.out, self.done = sd, {}, set()

    def put(self, src_prefix: str, dst_prefix: str, table=None):
        """Every key under src_prefix to dst_prefix; ``table`` renames the first component."""
        for k in [k for k in self.sd if k.startswith(src_prefix)]:
            rest = k[len(src_prefix):]
            if table is not None:
                head, _, tail = rest.partition(".")
                rest = table[head] + "." + tail
            self.out[dst_prefix + rest] = self.sd[k]
            self.done.add(k)


def unet_from_diffusers(sd: dict, cfg: dict, cls: str = "UNet2DConditionModel"):
    """(CompVis U-Net state dict, ldmfast U-Net config) from a diffusers U-Net."""
    ucfg = unet_config_from_diffusers(cfg, cls)
    sd = _modern_names(sd)
    # diffusers applies downsample_type/upsample_type to its attention blocks only, so whether a
    # resampler is a ResBlock is read from the weights; CompVis needs one kind throughout
    samplers = {m.group(0) for m in (re.match(r"(down|up)_blocks\.\d+\.(down|up)samplers\.0\.", k)
                                      for k in sd) if m}
    kinds = {"resnet" if p + "conv1.weight" in sd else "conv" for p in samplers}
    if len(kinds) > 1:
        raise ValueError(f"diffusers {cls}: mixes conv and ResBlock resamplers (downsample_type/"
                         "upsample_type apply to attention blocks only); CompVis uses one kind")
    if cls == "UNet2DModel":
        ucfg["resblock_updown"] = kinds == {"resnet"}
    nrb, n = ucfg["num_res_blocks"], len(ucfg["channel_mult"])
    attn_levels = {i for i in range(n) if 2 ** i in ucfg["attention_resolutions"]}
    mc = ucfg["model_channels"]
    hd = cfg.get("attention_head_dim", 8)

    def heads_at(level):
        return (mc * ucfg["channel_mult"][level]) // hd if hd else 1

    mover = _KeyMover(sd)
    out, done, put = mover.out, mover.done, mover.put

    def put_attn(src, dst, level):
        if cls == "UNet2DConditionModel":
            put(src, dst)
        else:
            keys = [k for k in sd if k.startswith(src)]
            if keys:
                out.update({dst + k: v for k, v in _unet_attention_2d(sd, src, heads_at(level)).items()})
                done.update(keys)

    put("time_embedding.linear_1.", "time_embed.0.")
    put("time_embedding.linear_2.", "time_embed.2.")
    put("class_embedding.", "label_emb.")
    put("conv_in.", "input_blocks.0.0.")
    put("conv_norm_out.", "out.0.")
    put("conv_out.", "out.2.")
    for i in range(n):
        for j in range(nrb):
            idx = 1 + i * (nrb + 1) + j
            put(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0.", _RESNET)
            put_attn(f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{idx}.1.", i)
        if i != n - 1:
            idx = (i + 1) * (nrb + 1)
            if ucfg.get("resblock_updown"):
                put(f"down_blocks.{i}.downsamplers.0.", f"input_blocks.{idx}.0.", _RESNET)
            else:
                put(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{idx}.0.op.")
    put("mid_block.resnets.0.", "middle_block.0.", _RESNET)
    put_attn("mid_block.attentions.0.", "middle_block.1.", n - 1)
    put("mid_block.resnets.1.", "middle_block.2.", _RESNET)
    for i in range(n):
        level = n - 1 - i
        for j in range(nrb + 1):
            idx = i * (nrb + 1) + j
            put(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{idx}.0.", _RESNET)
            put_attn(f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{idx}.1.", level)
        if level != 0:
            idx = i * (nrb + 1) + nrb
            slot = 2 if level in attn_levels else 1
            if ucfg.get("resblock_updown"):
                put(f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{idx}.{slot}.", _RESNET)
            else:
                put(f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{idx}.{slot}.conv.")
    left = sorted(set(sd) - done)
    if left:
        raise ValueError(f"diffusers {cls}: unexpected keys with no CompVis name: "
                         f"{', '.join(left[:10])}{' ...' if len(left) > 10 else ''}")
    return out, ucfg


# ----------------------------------------------------------------------------- autoencoders

def first_stage_config_from_diffusers(cfg: dict, cls: str) -> dict:
    what = f"diffusers {cls}"
    _expect(cfg, what, act_fn="silu", norm_num_groups=32, use_quant_conv=True,
            use_post_quant_conv=True, norm_type=("group",), lookup_from_codebook=False)
    for t in cfg.get("down_block_types", ["DownEncoderBlock2D"]):
        if t != "DownEncoderBlock2D":
            raise ValueError(f"{what}: down block {t!r} is not supported (DownEncoderBlock2D)")
    for t in cfg.get("up_block_types", ["UpDecoderBlock2D"]):
        if t != "UpDecoderBlock2D":
            raise ValueError(f"{what}: up block {t!r} is not supported (UpDecoderBlock2D)")
    boc = list(cfg["block_out_channels"])
    ch = boc[0]
    if any(c % ch for c in boc):
        raise ValueError(f"{what}: block_out_channels {boc} are not multiples of the first")
    z = cfg.get("latent_channels", 4)
    dd = dict(double_z=cls == "AutoencoderKL", z_channels=z, resolution=cfg.get("sample_size", 256),
              in_channels=cfg.get("in_channels", 3), out_ch=cfg.get("out_channels", 3), ch=ch,
              ch_mult=[c // ch for c in boc], num_res_blocks=cfg.get("layers_per_block", 1),
              attn_resolutions=[], dropout=0.0,
              attn_type="vanilla" if cfg.get("mid_block_add_attention", True) else "none")
    if isinstance(dd["resolution"], (list, tuple)):
        dd["resolution"] = dd["resolution"][0]
    if cls == "AutoencoderKL":
        return {"type": "kl", "embed_dim": z, "ddconfig": dd}
    if cls == "VQModel":
        return {"type": "vq", "embed_dim": cfg.get("vq_embed_dim") or z,
                "n_embed": cfg.get("num_vq_embeddings", 256), "ddconfig": dd}
    raise ValueError(f"{what}: not an autoencoder diffusers converts (AutoencoderKL, VQModel)")


def _vae_attention(sd, src):
    def conv(w):
        return w.reshape(w.shape[0], w.shape[1], 1, 1) if w.dim() == 2 else w
    out = {"norm.weight": sd[src + "group_norm.weight"], "norm.bias": sd[src + "group_norm.bias"]}
    for a, b in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        out[f"{b}.weight"] = conv(sd[f"{src}{a}.weight"])
        out[f"{b}.bias"] = sd[f"{src}{a}.bias"]
    return out


def first_stage_from_diffusers(sd: dict, cfg: dict, cls: str = "AutoencoderKL"):
    """(CompVis first-stage state dict, ldmfast first-stage config) from a diffusers VAE."""
    fcfg = first_stage_config_from_diffusers(cfg, cls)
    sd = _modern_names(sd)
    n = len(fcfg["ddconfig"]["ch_mult"])
    mover = _KeyMover(sd)
    out, done, put = mover.out, mover.done, mover.put

    def put_attn(src, dst):
        keys = [k for k in sd if k.startswith(src)]
        if keys:
            out.update({dst + k: v for k, v in _vae_attention(sd, src).items()})
            done.update(keys)

    for part in ("encoder", "decoder"):
        put(f"{part}.conv_in.", f"{part}.conv_in.")
        put(f"{part}.conv_out.", f"{part}.conv_out.")
        put(f"{part}.conv_norm_out.", f"{part}.norm_out.")
        put(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET)
        put(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET)
        put_attn(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.")
    for i in range(n):
        put(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
        put(f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.")
        put(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.")
        put(f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n - 1 - i}.upsample.conv.")
    mover.out = out = {re.sub(r"\.block\.(\d+)\.conv_shortcut\.", r".block.\1.nin_shortcut.", k): v
                             for k, v in out.items()}
    for name in ("quant_conv.", "post_quant_conv.", "quantize."):
        put(name, name)
    left = sorted(set(sd) - done)
    if left:
        raise ValueError(f"diffusers {cls}: unexpected keys with no CompVis name: "
                         f"{', '.join(left[:10])}{' ...' if len(left) > 10 else ''}")
    return out, fcfg


# ----------------------------------------------------------------------------- text encoder

def clip_from_transformers(sd: dict, cfg: dict):
    """(CompVis ``cond_stage_model`` state dict, cond_stage config) from a transformers
    CLIPTextModel; ``position_ids`` buffers are dropped (not persistent in current versions)."""
    arch = cfg.get("architectures") or ["CLIPTextModel"]
    if cfg.get("model_type", "clip_text_model") != "clip_text_model" or not any(
            a.startswith("CLIPTextModel") for a in arch):
        raise ValueError(f"text encoder {arch} / {cfg.get('model_type')!r} is not a CLIP text "
                         "model; only CLIPTextModel converts to cond_stage type 'clip'")
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
            "projection_dim", "pad_token_id", "bos_token_id", "eos_token_id")
    clip_config = {k: cfg[k] for k in keep if k in cfg}
    # transformers 5 writes embeddings.* / encoder.*; older files text_model.*
    out = {"transformer.text_model." + (k[len("text_model."):] if k.startswith("text_model.") else k): v
           for k, v in sd.items() if not k.endswith("position_ids")
           and not k.startswith("text_projection")}
    return out, {"type": "clip", "clip_config": clip_config, "tokenizer_path": None,
                 "max_length": 77, "layer": "last"}


def openclip_to_clip(sd: dict, num_layers: int) -> dict:
    """SD-2's OpenCLIP text tower (``cond_stage_model.model.*`` without the prefix) as
    ``CLIPTextModel`` weights (``transformer.text_model.*``) keeping the first ``num_layers``
    residual blocks: SD-2 reads the penultimate layer through ``ln_final``, which a 23-layer
    CLIPTextModel's last hidden state reproduces (as diffusers' SD-2 text encoder)."""
    t = "transformer.text_model."
    out = {t + "embeddings.token_embedding.weight": sd["token_embedding.weight"],
           t + "embeddings.position_embedding.weight": sd["positional_embedding"],
           t + "final_layer_norm.weight": sd["ln_final.weight"],
           t + "final_layer_norm.bias": sd["ln_final.bias"]}
    blocks = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    if num_layers > blocks:
        raise ValueError(f"OpenCLIP text encoder has {blocks} blocks, the config wants {num_layers}")
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
             "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
    for i in range(num_layers):
        src, dst = f"transformer.resblocks.{i}.", f"{t}encoder.layers.{i}."
        for a, b in names.items():
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
        for p in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.in_proj_{p}"].chunk(3, dim=0)
            out.update({f"{dst}self_attn.q_proj.{p}": q, f"{dst}self_attn.k_proj.{p}": k,
                        f"{dst}self_attn.v_proj.{p}": v})
    return out
