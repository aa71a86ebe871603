"""Loading and saving: diffusers folders, CompVis .ckpt/.safetensors, ldmfast files, EMA,
refused pickles, bad input with clear errors and nothing written."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

import ldmfast

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from ldmfast import checkpoint, configs  # noqa: E402
from ldmfast.checkpoint import Components, load_components, save  # noqa: E402
from ldmfast.models import build  # noqa: E402
from conftest import write_clip_tokenizer  # noqa: E402

RTOL = 1e-4


def rel_err(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def randomize(module, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()



CLIP_CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, max_position_embeddings=77, pad_token_id=53,
                   bos_token_id=52, eos_token_id=53)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny SD-style diffusers folder with random weights; returns (folder, modules)."""
    root = tmp_path_factory.mktemp("sd_tiny")
    unet = randomize(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=2), seed=1)
    vae = randomize(AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), latent_channels=4,
        norm_num_groups=32, layers_per_block=1, sample_size=16, scaling_factor=0.5), seed=2)
    text = randomize(CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG)), seed=3, std=0.2)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    text.save_pretrained(root / "text_encoder")
    write_clip_tokenizer(str(root / "tokenizer"))
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="v_prediction").save_pretrained(root / "scheduler")
    return root, (unet, vae, text)


def check_outputs(comps, unet, vae, text):
    g = torch.Generator().manual_seed(5)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 32, generator=g)
    img = torch.randn(1, 3, 16, 16, generator=g)
    ids = torch.randint(0, 64, (2, 77), generator=g)
    with torch.no_grad():
        assert rel_err(comps.unet(x, torch.tensor([1, 999]), c),
                       unet(x, torch.tensor([1, 999]), c).sample) < RTOL
        assert rel_err(comps.first_stage.encode(img).mode(), vae.encode(img).latent_dist.mean) < RTOL
        z = torch.randn(1, 4, 8, 8, generator=g)
        assert rel_err(comps.first_stage.decode(z), vae.decode(z).sample) < RTOL
        assert rel_err(comps.cond_stage.encode(ids), text(ids).last_hidden_state) < RTOL


def test_diffusers_folder(sd_folder):
    root, modules = sd_folder
    comps = load_components(root)
    assert isinstance(comps, Components)
    check_outputs(comps, *modules)
    d = comps.config["diffusion"]
    assert d["parameterization"] == "v" and d["beta_schedule"] == "linear"
    assert d["scale_factor"] == 0.5 and d["conditioning_key"] == "crossattn"
    assert comps.cond_stage.encode(["a cat", "dog"]).shape == (2, 77, 32)


def test_safetensors_and_ckpt_roundtrip(sd_folder, tmp_path):
    root, modules = sd_folder
    comps = load_components(root)
    for name in ("model.safetensors", "model.ckpt"):
        path = save(comps, tmp_path / name)
        back = load_components(path)
        assert back.config == json.loads(json.dumps(comps.config))
        check_outputs(back, *modules)
        for part in ("unet", "first_stage", "cond_stage"):
            a, b = getattr(comps, part).state_dict(), getattr(back, part).state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the .ckpt is a CompVis checkpoint: prefixed keys under "state_dict"
    sd = torch.load(tmp_path / "model.ckpt", weights_only=True)["state_dict"]
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.bias",
                "first_stage_model.encoder.mid.attn_1.q.weight", "first_stage_model.quant_conv.weight",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
        assert key in sd
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def compvis_ckpt(comps, path, extra=None):
    """A plain CompVis-style checkpoint (no ldmfast metadata), as LDM/SD training writes."""
    sd = {}
    for part, prefix in checkpoint.PREFIXES.items():
        module = getattr(comps, part)
        if module is not None:
            sd.update({prefix + k: v for k, v in module.state_dict().items()})
    sd.update(extra or {})
    torch.save({"state_dict": sd, "global_step": 1}, path)
    return sd


def test_compvis_checkpoint_with_config_dict(sd_folder, tmp_path):
    root, modules = sd_folder
    comps = load_components(root)
    compvis_ckpt(comps, tmp_path / "plain.ckpt",
                 {"cond_stage_model.transformer.text_model.embeddings.position_ids":
                  torch.arange(77)[None]})  # older checkpoints carry it
    back = load_components(tmp_path / "plain.ckpt", config=comps.config)
    check_outputs(back, *modules)
    cfg = dict(comps.config, cond_stage=dict(comps.config["cond_stage"], tokenizer_path=None))
    with pytest.raises(ValueError, match="no tokenizer"):
        load_components(tmp_path / "plain.ckpt", config=cfg).cond_stage.encode("a cat")
    back = load_components(tmp_path / "plain.ckpt", config=cfg, tokenizer=root / "tokenizer")
    assert back.cond_stage.encode("a cat").shape == (1, 77, 32)
    # the public entry point takes the tokenizer folder the same way
    model = ldmfast.load(tmp_path / "plain.ckpt", config=cfg, tokenizer=root / "tokenizer")
    assert torch.equal(model.encode_text(["a cat"]), back.cond_stage.encode("a cat"))


def test_architecture_inferred_from_weights(tmp_path):
    """A plain checkpoint of the tiny preset: the architecture and the head count (not in the
    weights) come from the matching preset."""
    torch.manual_seed(0)
    comps = build(configs.get("tiny"))
    compvis_ckpt(comps, tmp_path / "tiny.ckpt")
    back = load_components(tmp_path / "tiny.ckpt")
    assert back.config["unet"]["num_heads"] == 2
    assert back.config["cond_stage"]["type"] == "transformer"
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 16, 32)
    with torch.no_grad():
        assert torch.equal(back.unet(x, torch.tensor([3]), c), comps.unet.eval()(x, torch.tensor([3]), c))


def test_ldm_yaml_config(tmp_path):
    cfg = configs.get("tiny")
    cfg["cond_stage"].update(heads=8, dim_head=64)  # what LDM's BERTEmbedder always uses
    comps = build(cfg)
    yaml = pytest.importorskip("yaml")
    doc = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.3,
        "conditioning_key": "crossattn", "parameterization": "eps",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                        "params": cfg["unet"]},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "ddconfig": cfg["first_stage"]["ddconfig"],
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.BERTEmbedder", "params": {
            "n_embed": 32, "n_layer": 2, "vocab_size": cfg["cond_stage"]["vocab_size"],
            "max_seq_len": 16}}}}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(doc))
    compvis_ckpt(comps, tmp_path / "tiny.ckpt")
    back = load_components(tmp_path / "tiny.ckpt", config=str(tmp_path / "tiny.yaml"))
    assert back.config["diffusion"]["scale_factor"] == 0.3
    assert back.config["cond_stage"]["n_layer"] == 2


def test_ema_weights(tmp_path):
    comps = build(configs.get("tiny"))
    ema = {"model_ema." + ("diffusion_model." + k).replace(".", ""): v + 1
           for k, v in comps.unet.state_dict().items()}
    ema["model_ema.decay"], ema["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(7)
    compvis_ckpt(comps, tmp_path / "ema.ckpt", ema)
    assert "model_ema.diffusion_modelinput_blocks00weight" in ema
    plain = load_components(tmp_path / "ema.ckpt")
    averaged = load_components(tmp_path / "ema.ckpt", use_ema=True)
    for k, v in comps.unet.state_dict().items():
        assert torch.equal(plain.unet.state_dict()[k], v)
        assert torch.equal(averaged.unet.state_dict()[k], v + 1)
    compvis_ckpt(comps, tmp_path / "no_ema.ckpt")
    with pytest.raises(ValueError, match="no model_ema"):
        load_components(tmp_path / "no_ema.ckpt", use_ema=True)
    del ema["model_ema.diffusion_modeloutput_blocks00in_layers0weight"]
    compvis_ckpt(comps, tmp_path / "partial_ema.ckpt", ema)
    with pytest.raises(ValueError, match=r"output_blocks\.0\.0\.in_layers\.0\.weight"):
        load_components(tmp_path / "partial_ema.ckpt", use_ema=True)


class _Evil:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil_plain.ckpt", "wb") as f:  # a raw pickle
        pickle.dump({"state_dict": {"x": _Evil(str(marker))}}, f)
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)},
                "callback": _Evil(str(marker))}, tmp_path / "evil_zip.ckpt")  # torch's zip format
    assert not marker.exists()
    for name in ("evil_plain.ckpt", "evil_zip.ckpt"):
        with pytest.raises(ValueError, match="refused.*code execution"):
            load_components(tmp_path / name)
        assert not marker.exists()


def test_single_module_files(tmp_path):
    comps = build(configs.get("tiny"))
    for part in ("unet", "first_stage", "cond_stage"):
        path = save(getattr(comps, part), tmp_path / f"{part}.safetensors")
        back = load_components(path)
        assert type(getattr(back, part)) is type(getattr(comps, part))
        assert [getattr(back, p) is None for p in ("unet", "first_stage", "cond_stage")].count(True) == 2
        a, b = getattr(comps, part).state_dict(), getattr(back, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_bare_first_stage_checkpoint(tmp_path):
    """The paper's autoencoder files: AutoencoderKL state dict without prefix, loss.* included."""
    comps = build(configs.get("tiny"))
    sd = dict(comps.first_stage.state_dict())
    sd["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": sd}, tmp_path / "ae.ckpt")
    back = load_components(tmp_path / "ae.ckpt")
    assert back.unet is None and back.config["first_stage"]["type"] == "kl"
    assert back.config["first_stage"]["ddconfig"]["ch_mult"] == [1, 2, 2]


def test_dtype_kept_or_cast(tmp_path):
    comps = build(configs.get("tiny"))
    comps.unet.half()
    save(comps.unet, tmp_path / "u.safetensors")
    assert next(load_components(tmp_path / "u.safetensors").unet.parameters()).dtype == torch.float32
    kept = load_components(tmp_path / "u.safetensors", dtype=None)
    assert next(kept.unet.parameters()).dtype == torch.float16


# ------------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    return save(build(configs.get("tiny")), path)


def _sd(path):
    from safetensors.torch import load_file
    return load_file(path)


def test_unknown_architecture(tmp_path):
    torch.save({"state_dict": {"some.weight": torch.zeros(2)}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match=r"x\.ckpt.*unknown architecture"):
        load_components(tmp_path / "x.ckpt")


def test_missing_unexpected_and_misshapen_keys(tiny_file, tmp_path):
    cfg = configs.get("tiny")
    sd = _sd(tiny_file)
    del sd["model.diffusion_model.out.2.weight"]
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    sd["first_stage_model.quant_conv.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save({"state_dict": sd}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError) as e:
        load_components(tmp_path / "bad.ckpt", config=cfg)
    msg = str(e.value)
    assert "bad.ckpt" in msg and "missing keys: out.2.weight" in msg
    assert "unexpected keys: extra.weight" in msg
    with pytest.raises(ValueError, match=r"quant_conv\.weight \(expected \(8, 8, 1, 1\), got \(3, 3, 1, 1\)\)"):
        sd = _sd(tiny_file)
        sd["first_stage_model.quant_conv.weight"] = torch.zeros(3, 3, 1, 1)
        torch.save({"state_dict": sd}, tmp_path / "shape.ckpt")
        load_components(tmp_path / "shape.ckpt", config=cfg)


def test_truncated_files(tiny_file, tmp_path):
    data = open(tiny_file, "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors.*truncated or corrupt"):
        load_components(tmp_path / "cut.safetensors")
    save(build(configs.get("tiny")).unet, tmp_path / "u.ckpt")
    data = open(tmp_path / "u.ckpt", "rb").read()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.ckpt.*truncated or corrupt"):
        load_components(tmp_path / "cut.ckpt")
    # not a pickle at all: named as what it is, not as a pickle that needs code execution
    from PIL import Image
    Image.new("RGB", (4, 4)).save(tmp_path / "image.png")
    (tmp_path / "notes.ckpt").write_text("my notes")
    with pytest.raises(ValueError, match=r"image\.png: not a checkpoint \(a PNG image\)"):
        load_components(tmp_path / "image.png")
    with pytest.raises(ValueError, match=r"notes\.ckpt: not a checkpoint \(not a PyTorch file\)"):
        load_components(tmp_path / "notes.ckpt")
    with pytest.raises(ValueError, match="no such file"):
        load_components(tmp_path / "absent.ckpt")
    with pytest.raises(ValueError, match="not a diffusers folder"):
        load_components(tmp_path)


def test_save_failures_write_nothing(tmp_path, monkeypatch):
    comps = build(configs.get("tiny"))
    with pytest.raises(ValueError, match=r"\.safetensors or \.ckpt"):
        save(comps, tmp_path / "model.bin")
    comps.config["diffusion"]["bad"] = object()
    with pytest.raises(ValueError, match="JSON"):
        save(comps, tmp_path / "model.safetensors")
    assert os.listdir(tmp_path) == []
    del comps.config["diffusion"]["bad"]
    target = save(comps, tmp_path / "model.safetensors")
    before = open(target, "rb").read()

    import safetensors.torch

    def failing(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        save(comps, target, overwrite=True)
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temporary file left
    assert open(target, "rb").read() == before  # the old file is untouched
    with pytest.raises(ValueError, match="carries no .config"):
        save(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_sd2_openclip_text_encoder_converts(tmp_path):
    """SD-2 stores OpenCLIP's text tower (cond_stage_model.model.*) and reads its penultimate
    layer through ln_final; it loads as a CLIPTextModel without the last block."""
    cfg = dict(CLIP_CONFIG, num_hidden_layers=3, hidden_act="gelu", hidden_size=64,
               intermediate_size=128, num_attention_heads=1)  # 64-wide heads, as OpenCLIP
    torch.manual_seed(0)
    ref = randomize(CLIPTextModel(CLIPTextConfig(**cfg)), seed=4, std=0.2)
    r = {k: v for k, v in ref.state_dict().items()}
    oc = {"model.token_embedding.weight": r["embeddings.token_embedding.weight"],
          "model.positional_embedding": r["embeddings.position_embedding.weight"],
          "model.ln_final.weight": r["final_layer_norm.weight"],
          "model.ln_final.bias": r["final_layer_norm.bias"],
          "model.text_projection": torch.zeros(64, 64), "model.logit_scale": torch.zeros(())}
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
             "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
    for i in range(3):
        for a, b in names.items():
            for p in ("weight", "bias"):
                oc[f"model.transformer.resblocks.{i}.{a}.{p}"] = r[f"encoder.layers.{i}.{b}.{p}"]
        for p in ("weight", "bias"):
            oc[f"model.transformer.resblocks.{i}.attn.in_proj_{p}"] = torch.cat(
                [r[f"encoder.layers.{i}.self_attn.{x}_proj.{p}"] for x in "qkv"])
    comps = build(configs.get("tiny"))
    compvis_ckpt(Components(comps.unet, comps.first_stage, None, {}), tmp_path / "sd2ish.ckpt",
                 {"cond_stage_model." + k: v for k, v in oc.items()})
    back = load_components(tmp_path / "sd2ish.ckpt")
    assert back.config["cond_stage"]["clip_config"]["num_hidden_layers"] == 2
    ids = torch.randint(0, 64, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.final_layer_norm(ref(ids, output_hidden_states=True).hidden_states[-2])
        assert rel_err(back.cond_stage.encode(ids), want) < RTOL


@pytest.mark.parametrize("name", ["sd1", "sd2", "txt2img-1p4b", "cin256", "celebahq", "bsr-sr",
                                  "inpainting"])
def test_presets_recognised_from_weights(name):
    """Plain checkpoints of each preset's shape (meta tensors: shapes only) infer to the preset,
    including what the weights do not hold (heads, schedule, CLIP activation)."""
    want = configs.get(name)
    with torch.device("meta"):
        comps = build(want)
    sd = {}
    for part, prefix in checkpoint.PREFIXES.items():
        if getattr(comps, part) is not None:
            sd.update({prefix + k: v for k, v in getattr(comps, part).state_dict().items()})
    got = configs.infer(sd)
    defaults = {"num_heads": -1, "num_head_channels": -1, "use_linear_in_transformer": False,
                "context_dim": None}
    for k, v in defaults.items():
        assert got["unet"].get(k, v) == want["unet"].get(k, v), k
    assert got["first_stage"] == want["first_stage"]
    assert got["cond_stage"] == want["cond_stage"]
    assert got["diffusion"] == want["diffusion"]


V1_INFERENCE = """
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
        use_checkpoint: True
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""


def test_sd1_yaml_reads_as_the_preset(tmp_path):
    (tmp_path / "v1-inference.yaml").write_text(V1_INFERENCE)
    got = configs.from_ldm_yaml(str(tmp_path / "v1-inference.yaml"))
    want = configs.get("sd1")
    assert got["diffusion"] == want["diffusion"]
    assert got["cond_stage"] == want["cond_stage"]
    assert {k: v for k, v in got["first_stage"]["ddconfig"].items() if k != "attn_type"} == \
        {k: v for k, v in want["first_stage"]["ddconfig"].items() if k != "attn_type"}
    with torch.device("meta"):
        u = build({"unet": got["unet"]}).unet
    assert sum(p.numel() for p in u.parameters()) == 859_520_964
    with pytest.raises(ValueError, match="not an LDM config"):
        (tmp_path / "bad.yaml").write_text("model: 3\n")
        configs.from_ldm_yaml(str(tmp_path / "bad.yaml"))


def test_unconditional_vq_diffusers_folder(tmp_path):
    """diffusers' LDMPipeline layout (CompVis/ldm-celebahq-256): unet (UNet2DModel) + vqvae."""
    from diffusers import UNet2DModel, VQModel
    unet = randomize(UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32))
    vq = randomize(VQModel(in_channels=3, out_channels=3, block_out_channels=(32, 32),
                           down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=3,
                           num_vq_embeddings=16, layers_per_block=1))
    unet.save_pretrained(tmp_path / "unet")
    vq.save_pretrained(tmp_path / "vqvae")
    DDIMScheduler(beta_schedule="linear", beta_start=0.0015, beta_end=0.0195).save_pretrained(
        tmp_path / "scheduler")
    comps = load_components(tmp_path)
    assert comps.cond_stage is None and comps.config["diffusion"]["conditioning_key"] is None
    assert comps.config["diffusion"]["beta_schedule"] == "sqrt_linear"
    assert comps.config["first_stage"]["type"] == "vq"
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(comps.unet(x, torch.tensor([9])), unet(x, torch.tensor([9])).sample) < RTOL
        assert rel_err(comps.first_stage.decode(x), vq.decode(x).sample) < RTOL
