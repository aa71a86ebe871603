"""ldmfast's headline benchmark: the whole model, side by side with diffusers, in one run.

    python benchmarks/throughput.py [--preset sd15|cpu|shapes] [--height H --width W] [--batch 2]
                                    [--dtype fp16|bf16|fp32] [--steps 50] [--providers ...]
                                    [--compile] [--rounds N] [--repeats N] [--csv PATH]
                                    [--cudnn-benchmark]

With no arguments it runs on whatever device is present: on a GPU the SD-1.5 architecture at
512x512 in fp16 with random weights, on CPU the built-in model (ldmfast's trained shapes model,
64x64, caption "a green triangle"; without it, a small SD-shaped random-weight preset, `cpu`).
Both sides use the same weights: random ones built in diffusers and converted with
`ldmfast.from_diffusers`, or the built-in ones converted with diffusers' own CompVis converters
(and the two U-Nets checked to agree before anything is timed). With the built-in model each
provider's end-to-end image is judged from its pixels (colour and shape) and, with --images,
saved. Printed per provider: U-Net steps per second at the given batch (2 =
classifier-free guidance), VAE decode time at batch 1, and the end-to-end latency of one DDIM image
with guidance plus decode; the ratios to diffusers eager; and the floor, the model's FLOPs over
the matmul throughput measured in the same run. On CPU every provider is measured in each of 3
rounds (--rounds) and the figures are medians over rounds, so that a machine whose speed drifts
during the run (a shared CPU) does not favour whichever provider ran at its fast moments.

Providers: ldmfast (fused kernels; on GPU the U-Net step and the decode replayed from CUDA graphs,
and the end-to-end image from `sample(cuda_graph=True)`, the whole denoising loop as one graph,
plus `decode(cuda_graph=True)`), ldmfast-eager (no graphs, GPU only: on CPU it is ldmfast),
ldmfast-ref (the model layer on the plain-PyTorch reference ops), diffusers (eager),
diffusers+ldmfast (the same diffusers pipeline after `ldmfast.accelerate(pipe)`: ldmfast's U-Net
and decoder over diffusers' own weight tensors, restored afterwards), diffusers+ldmfast-graph (the
same with `accelerate(pipe, cuda_graph=True)`: its U-Net calls and decodes replayed from CUDA
graphs, GPU only), diffusers-graph (U-Net step replayed from a CUDA graph, GPU only; it has no
decode or end-to-end figure) and diffusers-compile (torch.compile of the U-Net and decoder; opt-in
with --compile, slow to build). Without diffusers installed the ldmfast providers run on an
ldmfast model built from the same architecture, and the diffusers ones are skipped. On a GPU
ldmfast's own model runs channels_last, the diffusers pipelines (accelerated too) NCHW.

Each provider's figures are printed as they are measured and its rows appended to the results
after its last round, so a run stopped by a time limit keeps what it finished. A provider that
fails is reported with its traceback and left out; the others go on, and the run exits non-zero.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from ldmfast.graphs import cuda_capture  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ALL_PROVIDERS = ["ldmfast", "ldmfast-eager", "ldmfast-ref", "diffusers", "diffusers+ldmfast",
                 "diffusers+ldmfast-graph", "diffusers-graph", "diffusers-compile"]
DIFFUSERS_PROVIDERS = ("diffusers", "diffusers+ldmfast", "diffusers+ldmfast-graph", "diffusers-graph",
                       "diffusers-compile")
CUDA_ONLY_PROVIDERS = ("ldmfast-eager", "diffusers+ldmfast-graph", "diffusers-graph")

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
# An SD-shaped model a 2-core CPU runs through every provider in about a minute.
CPU_UNET = dict(SD15_UNET, sample_size=16, layers_per_block=1, block_out_channels=(32, 64, 128, 128),
                cross_attention_dim=64, attention_head_dim=4)
CPU_VAE = dict(SD_VAE, sample_size=128, layers_per_block=1, block_out_channels=(32, 32, 64, 64))
# The built-in model (ldmfast/weights/shapes.safetensors) as diffusers configures it; its trained
# weights go to both sides (diffusers through its own CompVis converters).
SHAPES_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128,
                   attention_head_dim=(1, 2))
SHAPES_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=0, sample_size=64,
                  block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3)
PRESETS = {
    "sd15": dict(unet=SD15_UNET, vae=SD_VAE, height=512, width=512, dtype="fp16", steps=50, context=(77, 768)),
    "cpu": dict(unet=CPU_UNET, vae=CPU_VAE, height=128, width=128, dtype="fp32", steps=50, context=(77, 64)),
    "shapes": dict(unet=SHAPES_UNET, vae=SHAPES_VAE, height=64, width=64, dtype="fp32", steps=50, context=(12, 128),
                   builtin="shapes", prompt="a green triangle"),
}


def default_preset(device):
    """sd15 on a GPU; on CPU the built-in model when this install carries it, else cpu."""
    if device.type == "cuda":
        return "sd15"
    import ldmfast
    try:
        ldmfast.builtin_path("shapes")
        return "shapes"
    except FileNotFoundError as e:
        print(f"{e}\nusing the random-weight cpu preset instead")
        return "cpu"


def build_ldmfast_only(preset, dtype, device):
    """Without diffusers: the ldmfast model of the same architecture (the preset's diffusers
    configs go through ldmfast's converter, which needs no diffusers), random weights."""
    from ldmfast.models import build_first_stage, build_unet, convert
    from ldmfast.pipeline import LatentDiffusion

    torch.manual_seed(0)
    ucfg = convert.unet_config_from_diffusers(dict(preset["unet"]), "UNet2DConditionModel")
    fcfg = convert.first_stage_config_from_diffusers(dict(preset["vae"]), "AutoencoderKL")
    config = {"unet": ucfg, "first_stage": fcfg, "cond_stage": None,
              "diffusion": {"parameterization": "eps", "beta_schedule": "linear", "linear_start": 0.00085,
                            "linear_end": 0.012, "timesteps": 1000, "conditioning_key": "crossattn",
                            "scale_factor": preset["vae"]["scaling_factor"]}}
    model = LatentDiffusion(build_unet(ucfg), build_first_stage(fcfg), None, config)
    model = model.to(device=device, dtype=dtype)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def load_builtin(preset, dtype, device):
    """The built-in ldmfast model, after checking that the preset's diffusers configs describe it."""
    import ldmfast
    from ldmfast.models import convert

    model = ldmfast.load(ldmfast.builtin_path(preset["builtin"]))
    want = {"unet": convert.unet_config_from_diffusers(dict(preset["unet"]), "UNet2DConditionModel"),
            "first_stage": convert.first_stage_config_from_diffusers(dict(preset["vae"]), "AutoencoderKL")}
    for part, cfg in want.items():
        have = model.config[part]
        flat = dict(cfg, **cfg.get("ddconfig", {}))
        flat_have = dict(have, **have.get("ddconfig", {}))
        wrong = {k: (v, flat_have.get(k)) for k, v in flat.items()
                 if k != "ddconfig" and flat_have.get(k, v) != v}
        if wrong:
            sys.exit(f"the shapes preset does not describe the built-in {part}: (preset, model) {wrong}")
    return model.to(device=device, dtype=dtype)


def build(preset, dtype, device):
    """A diffusers pipeline and the ldmfast model of the same weights: random weights converted
    to ldmfast, or the built-in model's weights converted to diffusers."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    import ldmfast

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**preset["unet"])
    vae = AutoencoderKL(**preset["vae"])
    # CompVis' "linear" schedule is diffusers' "scaled_linear"
    sched_kwargs = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    if preset.get("builtin"):
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

        from ldmfast.pipeline import diffusers_scheduler_kwargs

        model = load_builtin(preset, torch.float32, torch.device("cpu"))
        sched_kwargs = diffusers_scheduler_kwargs(model.config)
        sd = {"model.diffusion_model." + k: v for k, v in model.unet.state_dict().items()}
        unet.load_state_dict(convert_ldm_unet_checkpoint(sd, dict(unet.config)), strict=True)
        sd = {"first_stage_model." + k: v for k, v in model.first_stage.state_dict().items()}
        vae.register_to_config(scaling_factor=float(model.scale_factor))
        vae.load_state_dict(convert_ldm_vae_checkpoint(sd, dict(vae.config)), strict=True)
    sched = DDIMScheduler(**sched_kwargs, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if preset.get("builtin"):
        model = model.to(device=device, dtype=dtype)
    else:
        model = ldmfast.from_diffusers(pipe).to(device=device, dtype=dtype)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return pipe, model


def graphed(fn, *args):
    """fn(*args) captured once in a CUDA graph (warmed up first on the capture stream, as
    ldmfast's own graphs are); the returned callable replays it."""
    replay, _ = cuda_capture(lambda: fn(*args), {}, None, warmup=3)
    return lambda *_: replay()


def matmul_throughput(device, dtype):
    """FLOP/s of a large square matmul in dtype, measured now (the floor's denominator)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = C.time_fn(lambda i: a @ b, device, inner=10 if device.type == "cuda" else 2, repeats=5)
    return 2 * n ** 3 / t


def _attention_flops(q, k, v, scale=None, *, out_shape=None):
    """ldmfast's attention op (shapes (B, L, H, D)): Q K^T and P V, 2 FLOP per multiply-add."""
    b, lq, h, d = q
    return 4 * b * h * lq * k[1] * d


def count_flops(fn):
    """FLOPs of fn as torch counts them, ldmfast's fused attention included (torch knows no
    formula for a custom op: the floor would leave out every attention layer)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    if hasattr(torch.ops, "ldmfast") and hasattr(torch.ops.ldmfast, "attention"):
        mapping[torch.ops.ldmfast.attention] = _attention_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        fn()
    return fc.get_total_flops()


def parity(model, pipe, cond, uncond, x_T, steps, guidance, height, width, graphs):
    """ldmfast's sampler and decoder (from CUDA graphs if graphs) against the diffusers pipeline
    from the same x_T: relative error of the final latents, PSNR of the decoded images."""
    z = model.sample(cond=cond, uncond=uncond, steps=steps, guidance_scale=guidance, x_T=x_T,
                     progress=False, cuda_graph=graphs)
    img = model.decode(z, cuda_graph=graphs).float().clamp(-1, 1)
    z_ref = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=x_T, num_inference_steps=steps,
                 guidance_scale=guidance, height=height, width=width, output_type="latent").images
    img_ref = pipe.vae.decode(z_ref / pipe.vae.config.scaling_factor, return_dict=False)[0].float().clamp(-1, 1)
    err = ((z.float() - z_ref.float()).norm() / z_ref.float().norm()).item()
    mse = ((img - img_ref) / 2).pow(2).mean().item()  # images in [-1, 1]: PSNR over a range of 1
    psnr = float("inf") if mse == 0 else -10 * math.log10(mse)
    return err, psnr


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="model preset (default: sd15 on a GPU, cpu otherwise)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--batch", type=int, default=2, help="U-Net batch (2 = one image with guidance)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps of the end-to-end image")
    ap.add_argument("--providers", default=None, help=f"comma list from {', '.join(ALL_PROVIDERS)}")
    ap.add_argument("--compile", action="store_true", help="add diffusers-compile (takes minutes)")
    ap.add_argument("--repeats", type=int, default=None, help="end-to-end repeats per round (median)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds over all providers, figures are medians over rounds (default 3 on CPU, 1 on GPU)")
    ap.add_argument("--images", default=None, help="folder for each provider's end-to-end image (built-in model; "
                    "<preset>-<provider>.png, renewed on each run)")
    ap.add_argument("--csv", default=None, help="results file (default benchmarks/results/<device>.csv)")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="let cuDNN time its convolution algorithms (torch.backends.cudnn.benchmark) for "
                         "every provider alike; noted in the rows")
    args = ap.parse_args(argv)

    device = C.device_arg(ap, args.device)
    preset_name = args.preset or default_preset(device)
    preset = dict(PRESETS[preset_name])
    dtype = DTYPES[args.dtype or (preset["dtype"] if device.type == "cuda" else "fp32")]
    # `is None`, not `or`: an explicit 0 must reach the checks below, not become the preset's value
    height = preset["height"] if args.height is None else args.height
    width = preset["width"] if args.width is None else args.width
    steps = preset["steps"] if args.steps is None else args.steps
    # The VAE halves the image once per block after the first, the U-Net the latent likewise:
    # sides must survive every halving (LatentDiffusion.size_multiple; 64 for SD).
    f = 2 ** (len(preset["vae"]["block_out_channels"]) - 1)
    multiple = f * 2 ** (len(preset["unet"]["block_out_channels"]) - 1)
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        ap.error(f"--height/--width must be positive multiples of {multiple} for preset "
                 f"{preset_name}, got {height}x{width}")
    if args.batch < 1:
        ap.error(f"--batch must be >= 1, got {args.batch}")
    if steps < 1:
        ap.error(f"--steps must be >= 1, got {steps}")
    if (args.rounds is not None and args.rounds < 1) or (args.repeats is not None and args.repeats < 1):
        ap.error("--rounds and --repeats must be >= 1")
    providers = args.providers.split(",") if args.providers is not None else \
        [p for p in ALL_PROVIDERS if p != "diffusers-compile"]
    if args.compile and "diffusers-compile" not in providers:
        providers.append("diffusers-compile")
    providers = list(dict.fromkeys(providers))  # each once: a repeat would append its rows twice
    for p in providers:
        if p not in ALL_PROVIDERS:
            ap.error(f"--providers: unknown provider {p!r} (choose from {', '.join(ALL_PROVIDERS)})")
    try:
        import diffusers  # noqa: F401
        have_diffusers = True
    except ImportError:
        have_diffusers = False

    def why_not(p):
        """Why provider p cannot run here, or None."""
        if device.type != "cuda" and p in CUDA_ONLY_PROVIDERS:
            return "needs a CUDA device" + (" (on CPU it is ldmfast)" if p == "ldmfast-eager" else "")
        if not have_diffusers and p in DIFFUSERS_PROVIDERS:
            return "needs diffusers (pip install diffusers)"
        return None

    # Refused before anything is built: a run that measures nothing must not exit 0 with only
    # the floor appended to the results.
    if all(why_not(p) for p in providers):
        ap.error(f"--providers: none of {', '.join(providers)} can run here ("
                 + "; ".join(f"{p} {why_not(p)}" for p in providers)
                 + f"); on this machine these can: {', '.join(p for p in ALL_PROVIDERS if not why_not(p))}")
    for p in providers:
        if why_not(p):
            print(f"skipping provider {p}: {why_not(p)}")
    providers = [p for p in providers if not why_not(p)]
    if not have_diffusers:
        print("diffusers is not installed: the ldmfast providers run on an ldmfast model of the same "
              "architecture (pip install diffusers for the peers and the ratios)")
    if os.path.isfile(C.results_path(device, args.csv)):
        try:  # appends no rows: only checks the existing file's header, before minutes of timing
            C.append_results([], device, args.csv)
        except ValueError as e:
            ap.error(f"--csv: {e}")

    from tqdm import tqdm

    # Process-wide, set before anything is built or captured: every provider runs under it.
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    bench_note = " cudnn_benchmark=1" if args.cudnn_benchmark else ""

    import ldmfast.dropin
    import ldmfast.models.ops as model_ops

    print(f"device: {C.device_name(device)}  torch {torch.__version__}  commit {C.git_sha()}  "
          f"dtype {str(dtype).split('.')[-1]}  {height}x{width}  U-Net batch {args.batch}  {steps} DDIM steps")
    if have_diffusers:
        pipe, model = build(preset, dtype, device)
    elif preset.get("builtin"):
        pipe, model = None, load_builtin(preset, dtype, device)
    else:
        pipe, model = None, build_ldmfast_only(preset, dtype, device)
    if model_ops.using_reference_ops():
        sys.exit("ldmfast's compiled ops did not load, so no ldmfast figure would be real: build them first")
    h, w = height // f, width // f
    T, D = preset["context"]
    g = torch.Generator(device="cpu").manual_seed(0)
    lat = torch.randn(args.batch, 4, h, w, generator=g).to(device, dtype)
    ctx = torch.randn(args.batch, T, D, generator=g).to(device, dtype)
    tsteps = torch.full((args.batch,), 500, device=device, dtype=torch.long)
    z1 = torch.randn(1, 4, h, w, generator=g).to(device, dtype)
    x_T = torch.randn(1, 4, h, w, generator=g).to(device, dtype)
    cond, uncond = ctx[:1], torch.zeros_like(ctx[:1])
    guidance = 7.5
    if preset.get("builtin"):
        # the trained model: a real caption, its empty one, and the guidance it was evaluated at
        with torch.no_grad():
            cond, uncond = model.encode_text([preset["prompt"]]), model.encode_text([""])
        guidance = model.guidance_scale
        if have_diffusers:
            with torch.no_grad():
                ours = model.unet(lat, tsteps, context=ctx).float()
                theirs = pipe.unet(lat, tsteps, encoder_hidden_states=ctx, return_dict=False)[0].float()
            err = ((ours - theirs).norm() / theirs.norm()).item()
            print(f"built-in model: ldmfast vs diffusers U-Net relative error {err:.2e}")
            if err > (1e-3 if dtype == torch.float32 else 3e-2):
                sys.exit("ldmfast and diffusers do not compute the same U-Net: no ratio would be fair")
    # The diffusers providers are timed on what their pipeline passes: NCHW latents (their
    # weights are NCHW) and a 0-d timestep (so torch.compile's U-Net is the one the pipeline
    # runs, not a second compile for other input shapes).
    lat_d, z1_d, t_d = lat, z1, tsteps[0]
    if device.type == "cuda":
        lat, z1 = lat.contiguous(memory_format=torch.channels_last), z1.contiguous(memory_format=torch.channels_last)

    peak = matmul_throughput(device, dtype)
    with torch.no_grad():
        step_flops = count_flops(lambda: model.unet(lat, tsteps, context=ctx))
        dec_flops = count_flops(lambda: model.first_stage.decode(z1))
    floor = {"step": step_flops / peak, "decode": dec_flops / peak}
    floor["e2e"] = steps * step_flops * (2 / args.batch) / peak + floor["decode"]
    print(f"floor: U-Net step {step_flops / 1e12:.3f} TFLOP, decode {dec_flops / 1e12:.3f} TFLOP, "
          f"matmul {peak / 1e9:.0f} GFLOP/s measured")

    e2e_repeats = args.repeats or (3 if device.type == "cuda" else 1)
    inner_step = 10 if device.type == "cuda" else 2
    rounds = args.rounds or (3 if device.type == "cpu" else 1)
    images = {}

    def measure(prov, want_image):
        """One round of prov: its figures (seconds) and, if asked, its end-to-end image."""
        ref_ops = model_ops.use_reference_ops(prov == "ldmfast-ref")
        accelerated = False
        orig = None  # diffusers-compile: the pipeline's own U-Net while the compiled one is in
        image = None
        try:
            with torch.no_grad():
                if prov.startswith("ldmfast"):
                    graphs = prov == "ldmfast" and device.type == "cuda"
                    step = lambda *_: model.unet(lat, tsteps, context=ctx)  # noqa: E731
                    # z1 * scale_factor: decode() divides by it, so the decoder sees z1 as the peers do
                    z1_scaled = z1 * model.scale_factor
                    # the decode figure is the decoder alone; the fp16 guard's check (one host sync)
                    # is in the end-to-end figure, as users get it
                    decode = lambda *_: model.decode(z1_scaled, cuda_graph=graphs, fp16_guard=False)  # noqa: E731

                    def e2e(*_):
                        z = model.sample(cond=cond, uncond=uncond, steps=steps, guidance_scale=guidance,
                                         x_T=x_T, progress=False, cuda_graph=graphs)
                        return model.decode(z, cuda_graph=graphs)
                    if graphs:
                        step = graphed(step)
                else:
                    if prov.startswith("diffusers+ldmfast"):
                        ldmfast.dropin.accelerate(pipe, cuda_graph=prov.endswith("-graph"))
                        accelerated = True
                    unet, vae = pipe.unet, pipe.vae
                    if prov == "diffusers-compile":
                        unet, vae_decode = torch.compile(pipe.unet), torch.compile(pipe.vae.decode)
                    else:
                        vae_decode = vae.decode
                    step = lambda *_: unet(lat_d, t_d, encoder_hidden_states=ctx, return_dict=False)  # noqa: E731
                    decode = lambda *_: vae_decode(z1_d, return_dict=False)  # noqa: E731

                    def e2e(*_):
                        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=x_T,
                                    num_inference_steps=steps, guidance_scale=guidance, height=height,
                                    width=width, output_type="pt").images
                    if prov == "diffusers-graph":
                        step = graphed(step)
                    if prov == "diffusers-compile":
                        orig = pipe.unet
                        pipe.unet = unet
                        pipe.vae.decode = vae_decode  # the pipeline's decode: the compiled one too
                r = {"step": C.time_fn(step, device, inner=inner_step, repeats=7 if device.type == "cuda" else 3)}
                # diffusers-graph graphs the U-Net step only: its decode and image would be
                # diffusers eager's again, under a name that says graph
                if prov != "diffusers-graph":
                    r["decode"] = C.time_fn(decode, device, inner=3 if device.type == "cuda" else 1,
                                            repeats=5 if device.type == "cuda" else 3)
                    r["e2e"] = C.time_fn(e2e, device, inner=1, repeats=e2e_repeats, warmup=1)
                if want_image and "e2e" in r:
                    image = e2e().float().cpu().clamp(-1 if prov.startswith("ldmfast") else 0, 1)
                    if not prov.startswith("ldmfast"):
                        image = image * 2 - 1  # diffusers' "pt" images are in [0, 1]
            return r, image
        finally:
            ref_ops.__exit__()
            if orig is not None:  # also when the compile failed: later providers get the originals
                pipe.unet = orig
                pipe.vae.__dict__.pop("decode", None)  # the class's method again
            if accelerated:
                ldmfast.dropin.accelerate(pipe, restore=True)

    def layout(prov):
        # ldmfast's own model runs channels_last on a GPU; the diffusers pipelines (accelerated or
        # not) run on diffusers' NCHW weights and latents, as their users call them
        return "channels_last" if device.type == "cuda" and prov.startswith("ldmfast") else "NCHW"

    dt = str(dtype).split(".")[-1]
    shape = f"{height}x{width}_b{args.batch}"
    ops = {"step": "unet_step", "decode": "vae_decode_b1", "e2e": f"ddim{steps}_cfg_decode"}

    def rows_of(p, r, note):
        return [{"bench": "throughput", "op": ops[m], "shape": shape, "dtype": dt,
                 "layout": layout(p) if p != "floor" else "", "provider": p, "time_us": t * 1e6,
                 "steps_per_s": 1 / t if m == "step" else "", "note": note} for m, t in r.items()]

    # The floor's rows go out with the first provider's: a run in which every provider fails
    # appends nothing.
    pending = rows_of("floor", floor, f"preset={preset_name}")
    written = []

    def write(new_rows):
        nonlocal pending
        written.append(C.append_results(pending + new_rows, device, args.csv))
        pending = []

    # Every provider once per round, rounds one after another: a machine whose speed drifts
    # (a shared CPU, clocks) then slows all providers alike, and the medians over rounds are
    # compared; the spread of the step figure over rounds is printed beside it. Each provider's
    # figures are printed as they are measured and its rows appended after its last round, so a
    # run cut short (a time limit) keeps what it measured; a provider that fails is reported with
    # its traceback and left out of later rounds, and the others go on.
    samples = {p: {} for p in providers}
    failed = {}
    with tqdm(total=rounds * len(providers), desc="providers x rounds", disable=not sys.stderr.isatty()) as bar:
        for rnd in range(rounds):
            for prov in providers:
                bar.update()
                if prov in failed:
                    continue
                try:
                    r, image = measure(prov, want_image=rnd == 0 and bool(preset.get("builtin")))
                except Exception as e:  # noqa: BLE001 - reported, and the run exits non-zero
                    traceback.print_exc()
                    failed[prov] = C.first_line(e)
                    tqdm.write(f"provider {prov} FAILED, left out: {failed[prov]}")
                    samples.pop(prov)
                    images.pop(prov, None)  # left out: its image too
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # a sticky error shows here, not in the next provider
                        torch.cuda.empty_cache()
                    continue
                for metric, t in r.items():
                    samples[prov].setdefault(metric, []).append(t)
                if image is not None:
                    images[prov] = image
                tqdm.write(f"{prov} (round {rnd + 1}/{rounds}): " + "  ".join(
                    f"{m} {t * 1e3:.4g} ms" for m, t in r.items()))
                sys.stdout.flush()
                if rnd == rounds - 1:
                    write(rows_of(prov, {m: statistics.median(v) for m, v in samples[prov].items()},
                                  f"preset={preset_name} rounds={rounds}{bench_note}"))
    results = {p: {m: statistics.median(v) for m, v in s.items()} for p, s in samples.items()}
    spread = {p: (min(s["step"]), max(s["step"])) for p, s in samples.items()}

    # Parity of the first ldmfast provider that ran, configured as it was timed, against
    # diffusers eager. The issue's target (1e-2) is fp16's; bf16 keeps 3 fewer mantissa bits.
    par = next((p for p in ("ldmfast", "ldmfast-eager", "ldmfast-ref") if p in results), None)
    if have_diffusers and par and "diffusers" in results:
        target = 8e-2 if dtype == torch.bfloat16 else 1e-2
        try:
            with torch.no_grad(), model_ops.use_reference_ops(par == "ldmfast-ref"):
                err, psnr = parity(model, pipe, cond, uncond, x_T, steps, guidance, height, width,
                                   graphs=par == "ldmfast" and device.type == "cuda")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            failed["parity"] = C.first_line(e)
        else:
            print(f"\nparity, {par} (as timed) vs diffusers eager from the same noise: final latents relative "
                  f"error {err:.2e} (target < {target:g} in {dt}), decoded images {psnr:.1f} dB PSNR (target > 35)")
            write([{"bench": "throughput", "op": "parity", "shape": f"{height}x{width}", "dtype": dt,
                    "layout": layout(par), "provider": par,
                    "note": f"latent_rel_err={err:.3e} psnr_db={psnr:.2f} steps={steps} preset={preset_name}{bench_note}"}])
    base = results.get("diffusers")

    def ratio(p, m):
        r = results[p]
        return base[m] / r[m] if base and m in base and m in r else ""

    print()
    if rounds > 1:
        print(f"medians of {rounds} rounds; step_range_ms: the U-Net step's lowest and highest round")
    print("layout: ldmfast's own model " + ("channels_last" if device.type == "cuda" else "NCHW")
          + ", the diffusers pipelines NCHW (accelerated ones too)"
          + ("; diffusers-graph graphs the U-Net step only" if "diffusers-graph" in results else ""))
    C.print_table(
        [{"provider": p, "unet_steps_per_s": 1 / r["step"], "step_ms": r["step"] * 1e3,
          "step_range_ms": f"{spread[p][0] * 1e3:.3g}-{spread[p][1] * 1e3:.3g}",
          "decode_ms": r["decode"] * 1e3 if "decode" in r else "", "e2e_s": r.get("e2e", ""),
          "x_step_vs_diffusers": ratio(p, "step"), "x_e2e_vs_diffusers": ratio(p, "e2e")}
         for p, r in results.items()]
        + [{"provider": "floor", "unet_steps_per_s": 1 / floor["step"], "step_ms": floor["step"] * 1e3,
            "decode_ms": floor["decode"] * 1e3, "e2e_s": floor["e2e"]}],
        ["provider", "unet_steps_per_s", "step_ms", "step_range_ms", "decode_ms", "e2e_s", "x_step_vs_diffusers",
         "x_e2e_vs_diffusers"])
    if images:
        from ldmfast.data import shapes
        from ldmfast.images import save_png, to_pil
        print(f"\n{preset['prompt']!r}, judged from the pixels of each provider's end-to-end image:")
        for p, img in images.items():
            colour, form = shapes.judge(img[0])
            saved = ""
            if args.images:
                # this script's own outputs, named per preset and provider: each run renews them
                saved = "  " + save_png(to_pil(img)[0], os.path.join(args.images, f"{preset_name}-{p}.png"),
                                        overwrite=True)
            print(f"  {p:<18} {colour} {form}{saved}")
    if written:
        print(f"\nresults appended to {written[-1]}")
    if failed:
        sys.exit("failed, so left out of the table and the results: "
                 + "; ".join(f"{p}: {why}" for p, why in failed.items()))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # what was measured so far is already in the results file
        sys.exit("interrupted")
