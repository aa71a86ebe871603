"""What both training loops share: the process group, EMA weights, atomic resumable
checkpoints, RNG state, the loss log, mixed precision and gradient checkpointing.

Distributed runs use ``torch.distributed`` DDP when launched by ``torchrun`` (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT in the environment): gloo on CPU, NCCL on CUDA. Every rank draws its
own data (``ShapesBatches.for_step``) and its own noise (a generator seeded with seed + rank);
gradients are averaged by DDP, so the parameters stay identical across ranks.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import types

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .. import fileio

log = logging.getLogger("ldmfast")

__all__ = ["DistInfo", "init_distributed", "EMA", "save_checkpoint", "load_checkpoint",
           "LossLog", "autocast", "enable_gradient_checkpointing", "wrap_ddp", "unwrap",
           "rng_state", "set_rng_state", "seed_step", "StepTimer"]


class DistInfo:
    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None):
        self.rank, self.world = rank, world
        self.device = device or torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device=None) -> DistInfo:
    """Joins the process group that ``torchrun`` describes (no-op for a single process).

    The device defaults to the local rank's GPU when CUDA is available, else the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device is None:
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, device)


def wrap_ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    if not info.distributed or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(module, device_ids=ids)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") and isinstance(
        module, torch.nn.parallel.DistributedDataParallel) else module


def broadcast_float(value: float, info: DistInfo) -> float:
    """Rank 0's value on every rank."""
    if not info.distributed:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.to(info.device)
    dist.broadcast(t, 0)
    return float(t.item())


# ---------------------------------------------------------------------------------------- EMA

class EMA:
    """Exponential moving average of a module's parameters (CompVis ``LitEma``): float32 shadow
    copies, theta_ema <- d theta_ema + (1 - d) theta with d = min(decay, (1 + n) / (10 + n))
    after n updates, so early averages are not dominated by the random initialisation."""

    def __init__(self, module: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()
                       if p.requires_grad}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module):
        d = self.current_decay()
        self.num_updates += 1
        pairs = [(self.shadow[n], p.detach().float()) for n, p in module.named_parameters()
                 if n in self.shadow]
        if pairs:  # multi-tensor kernels, not a lerp per parameter (fp16/bf16 ones cast first)
            shadow, params = zip(*pairs)
            torch._foreach_lerp_(list(shadow), list(params), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, module: nn.Module):
        for n, p in module.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))

    def state_dict(self):
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state):
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for k in self.shadow:
            self.shadow[k].copy_(state["shadow"][k])


# -------------------------------------------------------------------------------- checkpoints

def save_checkpoint(state: dict, path) -> str:
    """Writes ``state`` with ``torch.save`` atomically: a temporary file in the same folder,
    flushed to disk, then ``os.replace``d over ``path``, so an interrupted run never leaves a
    truncated checkpoint behind."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with fileio.atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    return torch.load(path, map_location="cpu", weights_only=False)


def seed_step(generator: torch.Generator, seed: int, step: int, rank: int = 0):
    """Reseeds ``generator`` from (seed, step, rank): each step's noise is a function of where
    it is in the run, so a resumed run (on any number of ranks) draws what the uninterrupted
    one would have, with no generator state to carry between processes."""
    generator.manual_seed(((seed & 0xFFFFF) << 40) | ((rank & 0xFF) << 32) | (step & 0xFFFFFFFF))
    return generator


def rng_state(generator: torch.Generator | None = None) -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # Saved on a machine with more (or fewer) GPUs: the devices both have.
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


# ------------------------------------------------------------------------------------ logging

class LossLog:
    """Appends one JSON object per logged step to ``path`` (JSON lines), on the main rank only."""

    def __init__(self, path, enabled: bool = True):
        self.path = os.fspath(path) if path else None
        self.enabled = enabled and self.path is not None
        if self.enabled:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def write(self, record: dict):
        if not self.enabled:
            return
        clean = {k: (v.item() if torch.is_tensor(v) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")


class StepTimer:
    """Wall and process CPU time per step, excluding the first ``skip`` (warm-up) steps.

    CPU time (all threads of this process) is the number to plan with on a shared machine:
    wall time there depends on everyone else's load."""

    def __init__(self, skip: int = 1):
        self.skip, self.count, self.total, self.cpu_total = skip, 0, 0.0, 0.0
        self._t = self._c = None

    def start(self):
        self._t, self._c = time.perf_counter(), time.process_time()

    def stop(self) -> float:
        dt = time.perf_counter() - self._t
        dc = time.process_time() - self._c
        if self.skip > 0:
            self.skip -= 1
        else:
            self.count += 1
            self.total += dt
            self.cpu_total += dc
        return dt

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    @property
    def cpu_mean(self) -> float | None:
        return self.cpu_total / self.count if self.count else None


# ------------------------------------------------------------------------- precision, memory

_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str = "fp32"):
    """Autocast for "bf16"/"fp16" (weights stay float32); a null context for "fp32"."""
    if precision not in _PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {sorted(_PRECISIONS)}")
    dtype = _PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device; use bf16 on CPU")
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str):
    """A GradScaler for fp16 (whose small gradients underflow without one), else None."""
    if precision == "fp16":
        return torch.amp.GradScaler(device.type)
    return None


def _checkpointed_forward(self, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint
    inner = type(self).forward
    if torch.is_grad_enabled():
        return checkpoint(inner, self, *args, use_reentrant=False, **kwargs)
    return inner(self, *args, **kwargs)


def enable_gradient_checkpointing(blocks) -> int:
    """Recomputes each block's activations in the backward pass instead of storing them
    (Chen et al. 2016): one extra forward per block for the activation memory. Binds a
    checkpointing ``forward`` to each block instance (non-reentrant ``torch.utils.checkpoint``,
    which works with DDP and keyword arguments; a deep copy rebinds to the copy). Returns how
    many blocks were wrapped."""
    n = 0
    for block in blocks:
        if "forward" in vars(block):
            continue
        block.forward = types.MethodType(_checkpointed_forward, block)
        n += 1
    return n



def train_loop(trainer, end: int, desc: str, postfix=lambda rec: {"loss": f"{rec['loss']:.4g}"}):
    """The loop both trainers share: ``trainer.train_step()`` until ``trainer.step == end``,
    a progress bar on the main process, the loss log every ``cfg.log_every`` steps, periodic
    checkpoints and a final one. ``trainer`` has ``step``, ``cfg``, ``info``, ``timer``, ``log``,
    ``train_step`` and ``save``."""
    cfg = trainer.cfg
    bar = tqdm(total=end, initial=trainer.step, desc=desc, dynamic_ncols=True,
               disable=not (cfg.progress and trainer.info.main))
    while trainer.step < end:
        trainer.timer.start()
        logs = trainer.train_step()
        dt = trainer.timer.stop()
        bar.update(1)
        if trainer.step % cfg.log_every == 0 or trainer.step == end:
            rec = {"step": trainer.step, "sec_per_step": round(dt, 4)}
            rec.update({k: float(v) for k, v in logs.items()})
            trainer.log.write(rec)
            bar.set_postfix(**postfix(rec))
        if cfg.out and cfg.ckpt_every and trainer.step % cfg.ckpt_every == 0 and trainer.step < end:
            trainer.save()
    bar.close()
    if cfg.out:
        trainer.save()
    return trainer
