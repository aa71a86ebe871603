"""``python -m ldmfast export {onnx,tensorrt}``: the command-line face of ``ldmfast.export``.

Registered in ``ldmfast.cli.COMMANDS`` as ``"export": "ldmfast.export.command"``. Importing
this module imports neither torch nor TensorRT; ``run`` does.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from . import OPSETS

log = logging.getLogger("ldmfast")

HELP = "export a model to ONNX graphs, or ONNX graphs to TensorRT engines"


def add_arguments(parser):
    sub = parser.add_subparsers(dest="export_format", metavar="format")
    sub.required = True

    p = sub.add_parser("onnx", help="write unet.onnx, vae_decoder.onnx, text_encoder.onnx",
                       description="Exports a checkpoint's U-Net, VAE decoder and text encoder "
                                   "to ONNX (see docs/export.md).")
    p.add_argument("--checkpoint", "-c", required=True,
                   help="model file (.ckpt/.safetensors/.pt) or diffusers folder")
    p.add_argument("--config", default=None, help="config preset name or file, when the "
                   "checkpoint does not carry one")
    p.add_argument("--ema", action="store_true", help="use the EMA weights where present")
    p.add_argument("--out", "-o", required=True, help="output directory (must not exist or be "
                   "empty, unless --overwrite and it holds an earlier export)")
    p.add_argument("--height", type=_at_least(1), default=512, help="image height in pixels (a "
                   "multiple of the first stage's and the U-Net's downsampling, e.g. 64 for SD)")
    p.add_argument("--width", type=_at_least(1), default=512, help="image width in pixels")
    p.add_argument("--batch", type=_at_least(1), default=1,
                   help="batch of every graph (2 = one prompt with classifier-free guidance)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="weights and activations; statistics and softmax stay fp32")
    p.add_argument("--opset", type=int, default=18, choices=OPSETS, metavar="{18..23}",
                   help="ONNX opset (default 18)")
    p.add_argument("--dynamic", action="store_true",
                   help="symbolic batch and latent size instead of fixed shapes")
    p.add_argument("--components", default=None,
                   help="comma-separated subset of unet,vae_decoder,text_encoder")
    p.add_argument("--text-length", type=_at_least(1), default=None,
                   help="token count (default: the text encoder's, 77 for CLIP)")
    p.add_argument("--group-norm", default="auto", choices=["auto", "instance", "group"],
                   help="GroupNorm as InstanceNormalization (any opset) or GroupNormalization "
                        "(opset >= 21)")
    p.add_argument("--attention", default="auto", choices=["auto", "matmul", "onnx"],
                   help="attention as MatMul-Softmax-MatMul or the opset-23 Attention op")
    p.add_argument("--slim", action="store_true", help="also run onnxslim (graphs < 2 GiB)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export (files "
                   "it does not write, such as engines and other components' graphs, are kept)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    t = sub.add_parser("tensorrt", help="build TensorRT engines from exported ONNX graphs",
                       description="Builds one TensorRT 10 engine per graph (needs the "
                                   "`tensorrt` package and an NVIDIA GPU).")
    t.add_argument("--onnx", required=True,
                   help="an export directory (every graph in it) or one .onnx file")
    t.add_argument("--out", "-o", default=None, help="engine directory (default: next to the "
                   "graphs), or the engine file when --onnx is one file")
    t.add_argument("--fp16", action=argparse_bool(), default=True,
                   help="allow fp16 kernels (weakly typed builds; default on)")
    t.add_argument("--bf16", action="store_true", help="allow bf16 kernels (weakly typed)")
    t.add_argument("--strongly-typed", dest="strongly_typed", action=argparse_bool(),
                   default=None, help="take tensor types from the graph (default: yes for fp16/"
                   "bf16 exports)")
    t.add_argument("--workspace-gb", type=float, default=8.0, help="builder workspace limit")
    t.add_argument("--timing-cache", default=None, help="timing cache file (read and updated)")
    t.add_argument("--no-refit", dest="refit", action="store_false",
                   help="build without BuilderFlag.REFIT (no weight swapping)")
    t.add_argument("--overwrite", action="store_true", help="replace existing engine files (never "
                   "the input graphs)")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def argparse_bool():
    return argparse.BooleanOptionalAction


def _at_least(low):
    """An argparse type: an integer >= ``low``, so a bad value is refused at parse time with
    argparse's one-line message naming the option (exit status 2)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _run_onnx(args):
    from ..pipeline import LatentDiffusion
    from .onnx import COMPONENTS, check_options, export_onnx

    if not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist")
    components = args.components.split(",") if args.components else None
    unknown = sorted(set(components or ()) - set(COMPONENTS))
    if unknown:  # before loading what may be gigabytes
        raise ValueError(f"--components: unknown {unknown}; choose from {','.join(COMPONENTS)}")
    model = LatentDiffusion.load(args.checkpoint, config=args.config, use_ema=args.ema)
    check_options(model, args.height, args.width, components, args.text_length, cli=True)
    paths = export_onnx(model, args.out, height=args.height, width=args.width, batch=args.batch,
                        dtype=args.dtype, opset=args.opset, dynamic=args.dynamic,
                        components=components, text_length=args.text_length,
                        group_norm=args.group_norm, attention=args.attention,
                        slim=True if args.slim else False, overwrite=args.overwrite,
                        progress=not args.no_progress)
    for name, path in paths.items():
        log.info("%s: %s", name, path)
    return 0


def _run_tensorrt(args):
    from pathlib import Path

    from tqdm.auto import tqdm

    from .tensorrt import build_engine, check_paths, require_tensorrt

    require_tensorrt()
    src = Path(args.onnx)
    if src.is_dir():
        graphs = sorted(src.glob("*.onnx"))
        if not graphs:
            raise FileNotFoundError(f"no .onnx graphs in {src}")
        out_dir = Path(args.out) if args.out else src
        jobs = [(g, out_dir / (g.stem + ".plan")) for g in graphs]
    elif src.is_file():
        jobs = [(src, Path(args.out) if args.out else src.with_suffix(".plan"))]
    else:
        raise FileNotFoundError(f"{src} does not exist")
    for onnx_path, engine_path in jobs:  # every job, before the first (long) build
        check_paths(onnx_path, engine_path, args.timing_cache, args.overwrite,
                    names=("--onnx", "--out", "--timing-cache"), flag="--overwrite")
    for onnx_path, engine_path in tqdm(jobs, desc="export tensorrt", unit="engine",
                                       disable=args.no_progress):
        build_engine(onnx_path, engine_path, fp16=args.fp16, bf16=args.bf16,
                     workspace_gb=args.workspace_gb, timing_cache=args.timing_cache,
                     strongly_typed=args.strongly_typed, refit=args.refit,
                     overwrite=args.overwrite)
        log.info("%s -> %s", onnx_path, engine_path)
    return 0


def run(args) -> int:
    try:
        if args.export_format == "onnx":
            return _run_onnx(args)
        return _run_tensorrt(args)
    except ImportError as e:  # e.g. TensorRT missing: one line, not a traceback
        if os.environ.get("LDMFAST_DEBUG", "") not in ("", "0"):
            raise
        print(f"ldmfast export {args.export_format}: error: {e}", file=sys.stderr)
        return 1
