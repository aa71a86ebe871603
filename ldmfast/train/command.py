"""``python -m ldmfast train``: runs a training recipe (see ``ldmfast.train.recipes``).

    python -m ldmfast train --recipe shapes --out runs/shapes
    torchrun --nproc_per_node 2 -m ldmfast train --recipe shapes --steps 200

A run resumes from the checkpoints in ``--out`` when they are there.
"""
from __future__ import annotations

import json
import logging

log = logging.getLogger("ldmfast")

HELP = "train a recipe (autoencoder, then latent diffusion) on the built-in shapes data"


def add_arguments(p):
    from .recipes import RECIPES
    p.add_argument("--recipe", required=True, choices=sorted(RECIPES),
                   help="shapes (text-to-image) or shapes-sr (4x super-resolution)")
    p.add_argument("--out", default=None, help="run folder for checkpoints, logs and the "
                   "exported model (default runs/<recipe>)")
    p.add_argument("--steps", type=int, default=None, help="LDM training steps (default: the "
                   "recipe's)")
    p.add_argument("--ae-steps", type=int, default=None, help="autoencoder training steps "
                   "(default: the recipe's)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size of both stages (split "
                   "over the processes; default: the recipe's)")
    p.add_argument("--first-stage", default=None, help="a trained autoencoder to use instead "
                   "of training one: autoencoder.pt of another run, or a model file")
    p.add_argument("--lpips", default=None, help="local LPIPS/VGG-16 weights for the "
                   "perceptual loss (off without; nothing is downloaded)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="autocast precision (default fp32; fp16 needs CUDA)")
    p.add_argument("--ops", default="auto", choices=["auto", "fused", "reference"],
                   help="train through the fused ops or their plain-PyTorch references "
                   "(auto: the references on CPU, where their backward is faster)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process "
                   "(default: torch's; 1 is best on a busy machine and with torchrun)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute U-Net activations in the backward pass to save memory")
    p.add_argument("--export", default=None, help="where to write the trained model "
                   "(default <out>/<recipe>.safetensors)")
    p.add_argument("--seed", type=int, default=None, help="seed for weights, data and noise")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args) -> int:
    from . import recipes
    for name in ("steps", "ae_steps", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "ae_steps" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    out = args.out or f"runs/{args.recipe}"
    summary = recipes.run(recipes.get(args.recipe), out, ldm_steps=args.steps,
                          ae_steps=args.ae_steps, first_stage=args.first_stage,
                          lpips=args.lpips, precision=args.precision,
                          grad_checkpoint=args.grad_checkpoint, batch_size=args.batch_size,
                          progress=not args.no_progress, evaluate=not args.no_eval,
                          export=args.export, seed=args.seed, ops=args.ops,
                          threads=args.threads)
    brief = {k: v for k, v in summary.items() if k != "eval"}
    if "eval" in summary:
        brief["eval"] = {k: v for k, v in summary["eval"].items() if k != "samples"}
    log.info("%s", json.dumps(brief, indent=1))
    return 0
