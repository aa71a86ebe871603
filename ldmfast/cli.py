"""The ``python -m ldmfast`` command line.

Each subcommand is a module (or any object) with ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``, registered by dotted path in ``COMMANDS`` and imported only when it
runs, so ``--help`` stays fast and one command's heavy imports never slow another.

Errors a user can fix (a missing file, a bad option value, an input the model cannot take)
are reported as one line on stderr with exit status 2; other I/O errors as one line with status
1. ``LDMFAST_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

log = logging.getLogger("ldmfast")

# name -> "module" or "module:attribute"; later commands (export, bench, train) register here.
COMMANDS = {
    "generate": "ldmfast.cli:Generate",
    "export": "ldmfast.export.command",
    "train": "ldmfast.train.command",
}


class UsageError(Exception):
    """A problem with the command line or its inputs: one line, exit status 2."""


def _resolve(target: str):
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _device(name):
    import torch
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r} is not a device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for but this machine has no CUDA GPU")
    return dev


def _dtype(name, device):
    import torch
    if name in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, _DTYPES[name])


def load_model(args):
    """The model named by ``--checkpoint`` (and ``--config``/``--ema``) on ``--device`` in
    ``--dtype``; shared by the commands that sample."""
    path = args.checkpoint
    if path is None:
        from . import builtin_path
        try:
            path = builtin_path("shapes")
        except FileNotFoundError as e:
            raise UsageError(f"no --checkpoint given and {e}") from None
    elif not os.path.exists(path):
        raise UsageError(f"checkpoint {path!r} does not exist")
    from .pipeline import LatentDiffusion
    device = _device(args.device)
    model = LatentDiffusion.load(path, config=getattr(args, "config", None),
                                 use_ema=getattr(args, "ema", False))
    return model.to(device=device, dtype=_dtype(args.dtype, device))


def add_model_arguments(p):
    p.add_argument("--checkpoint", "-c", default=None,
                   help="model file (.ckpt/.safetensors/.pt) or diffusers folder (default: the "
                   "built-in model trained on ldmfast's shapes data)")
    p.add_argument("--config", default=None,
                   help="config preset name or file, when the checkpoint does not carry one")
    p.add_argument("--ema", action="store_true", help="use the EMA weights where present")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda "
                   "when available)")
    p.add_argument("--dtype", default="auto", choices=["auto"] + sorted(_DTYPES),
                   help="compute dtype (default: float16 on CUDA, float32 on CPU)")


class Generate:
    """``generate``: text to image."""

    HELP = "generate images from a text prompt"

    @staticmethod
    def add_arguments(p):
        p.add_argument("prompt", help="the text prompt")
        add_model_arguments(p)
        p.add_argument("--negative", default="", help="negative prompt (the unconditional "
                       "branch of classifier-free guidance)")
        p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
        p.add_argument("--guidance", type=float, default=None,
                       help="classifier-free guidance scale (default: the one the model's config "
                       "recommends, else 7.5; 1 disables it)")
        p.add_argument("--sampler", default="ddim", help="ddim, ddpm or dpmpp_2m (default ddim)")
        p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
        p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
        p.add_argument("--height", type=int, default=None, help="image height in pixels")
        p.add_argument("--width", type=int, default=None, help="image width in pixels")
        p.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
        p.add_argument("--out", "-o", default="out.png",
                       help="output PNG (a batch also writes <out>-<i>.png; default out.png)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace existing output PNGs (other files are never replaced)")
        p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        p.add_argument("--cuda-graph", action="store_true",
                       help="run the denoising loop and the decode as CUDA graphs (GPU; ddim or "
                       "dpmpp_2m with eta 0; no progress bar)")

    @staticmethod
    def run(args) -> int:
        from .diffusion.samplers import get_sampler
        if args.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {args.steps}")
        if args.batch < 1:
            raise UsageError(f"--batch must be at least 1, got {args.batch}")
        try:
            get_sampler(args.sampler)
        except ValueError as e:
            raise UsageError(str(e)) from None
        from . import images as im
        im.check_outputs(args.out, args.batch, args.overwrite, arg="--out", flag="--overwrite")
        if args.cuda_graph:  # before loading what may be gigabytes
            import torch

            from .pipeline import check_graphable_loop
            if not torch.cuda.is_available() or not args.device.startswith(("auto", "cuda")):
                raise UsageError("--cuda-graph needs a CUDA GPU (--device cuda or auto); "
                                 + ("torch sees none here" if not torch.cuda.is_available()
                                    else f"--device is {args.device}"))
            try:
                check_graphable_loop(args.sampler, args.eta)
            except ValueError as e:
                raise UsageError(f"--cuda-graph: {e}") from None
        model = load_model(args)
        if model.cond_stage is None or not hasattr(model.cond_stage, "tokenize"):
            raise UsageError(f"checkpoint {args.checkpoint!r} is not a text-to-image model")
        guidance = model.guidance_scale if args.guidance is None else args.guidance
        seed = args.seed
        if seed is None:
            import torch
            seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
            log.info("seed %d", seed)
        images = model.txt2img(args.prompt, negative_prompt=args.negative, steps=args.steps,
                               guidance_scale=guidance, seed=seed, height=args.height,
                               width=args.width, batch=args.batch, sampler=args.sampler,
                               eta=args.eta, progress=not args.no_progress,
                               cuda_graph=args.cuda_graph)
        for path in im.save_images(images, args.out, overwrite=args.overwrite):
            log.info("wrote %s", path)
        return 0


def build_parser(commands=None):
    commands = COMMANDS if commands is None else commands
    parser = argparse.ArgumentParser(
        prog="python -m ldmfast",
        description="ldmfast: latent diffusion models with fused kernels.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    for name, target in commands.items():
        cmd = _resolve(target) if isinstance(target, str) else target
        p = sub.add_parser(name, help=getattr(cmd, "HELP", None),
                           description=getattr(cmd, "HELP", None))
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd, _name=name)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    debug = os.environ.get("LDMFAST_DEBUG", "") not in ("", "0")
    try:
        return int(args._command.run(args) or 0)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, IsADirectoryError) as e:
        # bad options or inputs (a missing file, a size the model cannot take, an output that
        # would replace a file, ...)
        if debug:
            raise
        sys.stderr.write(f"ldmfast {args._name}: error: {e}\n")
        return 2
    except OSError as e:
        if debug:
            raise
        sys.stderr.write(f"ldmfast {args._name}: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"ldmfast {args._name}: interrupted\n")
        return 130
