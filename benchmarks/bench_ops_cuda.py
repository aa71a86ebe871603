"""Kernel benchmarks for the lent GPU (issues 5 and 6), side by side with the peers in one run.

    python benchmarks/bench_ops_cuda.py [--ops gn,attn,ddim,geglu,upsample,attn_cross] [--dtypes fp16,bf16] [--no-compile]
                                        [--csv PATH] [--quick] [--device cuda|cpu]
    python benchmarks/bench_ops_cuda.py --judge PATH   (the issue targets on a results file's rows)

group_norm_silu: ldmfast vs F.silu(F.group_norm()) eager vs torch.compile of the reference, every
SD-1.x U-Net (batch 2) and VAE (batch 1) shape, NCHW and channels_last; time, GB/s (bytes read +
written once), fraction of the copy bandwidth measured in the same run, ratio to each peer; for
channels_last also ldmfast_groups, ldmfast_rows and ldmfast_held (LDMFAST_GN_KERNEL=groups: the
cluster-per-group kernel; rows: the coalesced pixel-row kernels; held: x read once into the
registers and shared memory of one cooperative grid, the rest streamed through L2, only where it
runs), the kernels the default picks among.
attention: ldmfast (its default kernel and, for fp16/bf16, each kernel LDMFAST_ATTENTION_KERNEL
selects; for Lk <= 80 also the short-context kernel at 2 and 8 CTAs per SM, ldmfast_fast_c2/_c8,
and for head dims up to 80 with 32 query rows a warp, ldmfast_fast_rows32) vs SDPA (torch's
default choice and each available backend) on SD-1.x and SD-2 self/cross shapes; time, TFLOP/s
(4 B H Lq Lk D), ratio. On CUDA every provider is timed by replaying a CUDA graph of 20 calls
(no Python overhead in the figures). ddim_step with guidance and noise vs the
eager reference and its torch.compile. geglu (the FeedForward gate, (B*L, 2*4C) -> (B*L, 4C)) vs
a * F.gelu(b) eager and its torch.compile; GB/s and fraction of copy bandwidth. The torch.compile
peers are timed in a second pass after every other row (compiling each shape takes minutes in all),
with the ratio to ldmfast's first-pass time in their note. upsample (the model layer's
conv3x3(nearest 2x upsample(x)), every upsampling conv of the SD-1.x U-Net and VAE decoder, both
layouts): ldmfast (LDMFAST_UPSAMPLE_CONV's auto choice), ldmfast_subpixel and ldmfast_transposed
(each rewrite forced) vs plain (F.interpolate then the conv: cuDNN's); TFLOP/s of the plain
conv's work, so a rewrite's figure is the rate it stands in for. On CPU (--device cpu --quick) it
checks itself on small shapes.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import ldmfast.models.ops as model_ops  # noqa: E402
import ldmfast.ops as ops  # noqa: E402
import ldmfast.ref as ref  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# (N, C, H, W) of every GroupNorm in the SD-1.x U-Net at a 64x64 latent with CFG batch 2 ...
UNET_GN = [(2, c, r, r) for c, r in [(320, 64), (640, 64), (960, 64), (320, 32), (640, 32), (960, 32),
                                      (1280, 32), (1920, 32), (640, 16), (1280, 16), (1920, 16),
                                      (2560, 16), (1280, 8), (2560, 8)]]
# ... and in the VAE decoder at 512x512 (eps 1e-6), batch 1.
VAE_GN = [(1, c, r, r) for c, r in [(512, 64), (512, 128), (512, 256), (256, 256), (256, 512), (128, 512)]]
# (B, H, Lq, Lk, D): SD-1.x (8 heads; head dims 40/80/160) and SD-2 (head dim 64), 64/32/16/8 latents.
ATTN = ([(2, 8, L, L, 320 * m // 8) for L, m in [(4096, 1), (1024, 2), (256, 4), (64, 4)]]
        + [(2, 8, L, 77, 320 * m // 8) for L, m in [(4096, 1), (1024, 2), (256, 4), (64, 4)]]
        + [(2, h, L, L, 64) for L, h in [(4096, 5), (1024, 10), (256, 20), (64, 20)]]
        + [(2, h, L, 77, 64) for L, h in [(4096, 5), (1024, 10), (256, 20), (64, 20)]]
        + [(2, 8, 4096, 4096, 64)])
DDIM = [(2, 4, 64, 64), (4, 4, 128, 128), (8, 4, 128, 128), (16, 4, 128, 128)]
# (tokens, 2n) of the SD-1.x FeedForward gates with CFG batch 2: n = 4C for C = 320/640/1280 at
# the 64/32/16/8 latent levels.
GEGLU = [(2 * L, 2 * 4 * c) for L, c in [(4096, 320), (1024, 640), (256, 1280), (64, 1280)]]
# (N, C, H) of the upsampling 3x3 convs (C -> C, input H x H): the U-Net's 8->16, 16->32 and
# 32->64 latents at batch 2, the VAE decoder's 64->128, 128->256 and 256->512 at batch 1.
UPSAMPLE = [(2, 1280, 8), (2, 1280, 16), (2, 640, 32), (1, 512, 64), (1, 512, 128), (1, 256, 256)]
QUICK = {"upsample": [(1, 16, 8)], "gn": [(2, 32, 16, 16), (1, 16, 32, 32)], "attn": [(1, 2, 64, 64, 40), (1, 2, 64, 77, 64)],
         "ddim": [(2, 4, 16, 16)], "geglu": [(64, 2 * 40), (33, 2 * 37)]}


def _compiled(fn, enabled):
    if not enabled:
        return None
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    # Static shapes: one specialised kernel per shape, as a user compiling for one resolution
    # gets (by default the second shape would switch it to slower dynamic-shape kernels).
    return torch.compile(fn, dynamic=False)


# The issues' targets on the lent H100 (issue 5: group_norm_silu, ddim_step; issue 6: attention),
# judged on the rows of one run (or, --judge, of one commit in a results file). Attention: the
# best ldmfast kernel (the one to make the default) against torch's SDPA choice ("sdpa") or
# cuDNN's backend, or a time; the rest: the default kernel.
ATTN_TARGETS = {
    "B2_H8_4096x77_d40": ("time_us", 12.0), "B2_H8_1024x77_d80": ("sdpa", 2.0),
    "B2_H8_256x77_d160": ("sdpa", 2.0), "B2_H8_4096x4096_d40": ("sdpa", 1.15),
    "B2_H8_1024x1024_d80": ("sdpa", 1.0), "B2_H8_4096x4096_d64": ("sdpa_cudnn", 0.9),
}
GN_BIG_BYTES = 32 << 20  # input tensors this large: at least 80% of the copy bandwidth
GN_UNET_US = 8.0  # the U-Net shapes (batch 2): at most this many microseconds
DDIM_MIN_NUMEL = 4 * 4 * 128 * 128  # from this size on: at least 70% of the copy bandwidth
EAGER_NOTE = "timed_eagerly_not_capturable"  # a row's note when its provider could not be graphed


def target_checks(rows) -> list[dict]:
    """One line per targeted (shape, dtype, layout) of `rows` (as _rows makes them, or read back
    from the CSV): the figure, the target, and whether this run met it."""
    out = []
    groups = {}
    for r in rows:
        groups.setdefault((r["bench"], r["op"], r["shape"], r["dtype"], r["layout"]), {})[r["provider"]] = r
    for (bench, op, shape, dtype, layout), provs in groups.items():
        line = {"op": op, "shape": shape, "dtype": dtype, "layout": layout}
        ours = provs.get("ldmfast")
        if bench == "attention" and shape in ATTN_TARGETS:
            kind, want = ATTN_TARGETS[shape]
            name, best = min(((p, float(r["time_us"])) for p, r in provs.items() if p.startswith("ldmfast")),
                             key=lambda x: x[1], default=("", ""))
            line.update(provider=name, time_us=best)
            if not name:  # every ldmfast kernel failed on this shape
                line.update(figure="no ldmfast row", target=f"{kind} {want:g}", met=None)
            elif kind == "time_us":
                line.update(figure=f"{best:.3g} us", target=f"<= {want:g} us", met=best <= want)
            elif kind in provs:
                ratio = float(provs[kind]["time_us"]) / best
                # a peer timed eagerly (not capturable) carries launch overhead: no fair ratio
                fair = not any(EAGER_NOTE in (provs[p].get("note") or "") for p in (kind, name))
                line.update(figure=f"x{ratio:.2f} vs {kind}" + ("" if fair else " (eager timing)"),
                            target=f">= x{want:g}", met=ratio >= want if fair else None)
            else:
                line.update(figure=f"no {kind} row", target=f">= x{want:g} vs {kind}", met=None)
        elif bench in ("group_norm_silu", "ddim_step") and ours is not None:
            dims = [int(v) for v in shape.split("x")]  # N x C x H x W
            numel, t, frac = math.prod(dims), float(ours["time_us"]), float(ours["frac_copy"])
            line.update(provider="ldmfast", time_us=t)
            if bench == "ddim_step" and numel >= DDIM_MIN_NUMEL:
                line.update(figure=f"{frac:.0%} of copy", target=">= 70%", met=frac >= 0.7)
            elif bench == "group_norm_silu" and numel * torch.finfo(DTYPES[dtype]).bits // 8 >= GN_BIG_BYTES:
                line.update(figure=f"{frac:.0%} of copy", target=">= 80%", met=frac >= 0.8)
            elif bench == "group_norm_silu" and dims[0] == 2:
                line.update(figure=f"{t:.3g} us", target=f"<= {GN_UNET_US:g} us", met=t <= GN_UNET_US)
            else:
                continue
        else:
            continue
        line["met"] = {True: "yes", False: "NO", None: "?"}[line["met"]]
        out.append(line)
    return out


def rows_to_judge(path) -> list[dict]:
    """The rows of a results CSV that target_checks judges: those of its last row's commit and
    device, the newest of each (shape, dtype, layout, provider), so runs split over several calls
    (or cut by a time limit) of one commit are judged together."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    sha, device = rows[-1]["git_sha"], rows[-1]["device"]
    newest = {}
    for r in rows:
        if r["git_sha"] == sha and r["device"] == device:
            newest[(r["bench"], r["op"], r["shape"], r["dtype"], r["layout"], r["provider"])] = r
    return list(newest.values())


def best_attention_kernels(rows) -> list[dict]:
    """Per attention shape and dtype: the fastest and second-fastest ldmfast kernel, the default
    kernel's time, and the fastest SDPA backend: what choosing the default per shape
    (csrc/cuda/attention.cu) is decided on."""
    groups = {}
    for r in rows:
        if r["bench"] == "attention":
            groups.setdefault((r["shape"], r["dtype"]), {})[r["provider"]] = float(r["time_us"])
    out = []
    for (shape, dtype), t in groups.items():
        ours = sorted((v, p) for p, v in t.items() if p.startswith("ldmfast"))
        peers = sorted((v, p) for p, v in t.items() if p.startswith("sdpa"))
        if not ours:
            continue
        line = {"shape": shape, "dtype": dtype, "best": ours[0][1], "best_us": ours[0][0],
                "default_us": t.get("ldmfast", "")}
        if len(ours) > 1:
            line.update(second=ours[1][1], x_best_vs_second=ours[1][0] / ours[0][0])
        if peers:
            line.update(sdpa_best=peers[0][1], x_best_vs_sdpa=peers[0][0] / ours[0][0])
        out.append(line)
    return out


def print_target_checks(rows, device: str) -> None:
    best = best_attention_kernels(rows)
    if best:
        print(f"fastest ldmfast attention kernel per shape ({device}):")
        C.print_table(best, ["shape", "dtype", "best", "best_us", "second", "x_best_vs_second", "default_us",
                             "sdpa_best", "x_best_vs_sdpa"])
    checks = target_checks(rows)
    if checks:
        print(f"issue targets (meant for the lent H100; these rows: {device}): "
              f"{sum(c['met'] == 'yes' for c in checks)} of {len(checks)} met")
        C.print_table(checks, ["op", "shape", "dtype", "layout", "provider", "time_us", "figure", "target", "met"])


FAILED = []  # "provider at what: error" of this run: reported at the end, and the run exits 1


def _time_all(provs, dev, what, k=1):
    """{provider: (seconds, graphed)} for each provider that ran (graphed: timed from CUDA graph
    replays as asked, always true on CPU). One that raises is reported and left out, and the
    others go on; a sticky CUDA error (an illegal address: every later call would fail too)
    ends the run."""
    times = {}
    for p, f in provs.items():
        try:
            t, graphed = C.time_fn_graphed(f, dev, k, graph=True)
            times[p] = (t, graphed or dev.type != "cuda")
        except Exception as e:  # noqa: BLE001 - reported below, and the run exits non-zero
            if dev.type == "cuda":
                try:
                    torch.cuda.synchronize(dev)
                except RuntimeError:
                    raise e from None
            why = C.first_line(e, 200)
            print(f"  {p} at {what} failed, left out: {why}", file=sys.stderr, flush=True)
            FAILED.append(f"{p} at {what}: {why}")
    return times


# The benches with a torch.compile peer. Compiling builds kernels for every shape (minutes over the
# GroupNorm shapes on the GPU machine), so those peers are timed in a second pass after every
# other row: a run cut by its time limit then loses compile rows only.
COMPILED = ("gn", "ddim", "geglu")


def _this_pass(provs, args):
    """The providers this pass times: all of them, or in the compile pass the compile peer only."""
    return {"compile": provs["compile"]} if args.compile_only else provs


def _ratio_to_first_pass(rows, earlier):
    """Compile-pass rows, with the ldmfast time of the first pass as a ratio in their note."""
    ours = {(r["bench"], r["op"], r["shape"], r["dtype"], r["layout"]): r["time_us"]
            for r in earlier if r["provider"] == "ldmfast"}
    for r in rows:
        t = ours.get((r["bench"], r["op"], r["shape"], r["dtype"], r["layout"]))
        if t:
            r["note"] = " ".join(filter(None, [f"ldmfast_x{r['time_us'] / t:.2f}_vs_this", r.get("note")]))
    return rows


def _rows(times, base, nbytes=None, bw=None, flops=None):
    """One result row per provider; the ldmfast row notes its speed ratio to each peer, and a
    row timed eagerly (the provider could not be captured in a CUDA graph) says so."""
    graphed = {p: g for p, (t, g) in times.items()}
    times = {p: t for p, (t, g) in times.items()}
    out = []
    for p, t in times.items():
        r = {**base, "provider": p, "time_us": t * 1e6}
        if nbytes:
            r.update(gbps=nbytes / t / 1e9, frac_copy=nbytes / t / bw)
        if flops:
            r["tflops"] = flops / t / 1e12
        note = [f"x{times[q] / t:.2f}_vs_{q}" + ("" if graphed[q] else "(eager)")
                for q in times if not q.startswith("ldmfast")] if p.startswith("ldmfast") else []
        if not graphed[p]:
            note.append(EAGER_NOTE)
        r["note"] = " ".join(note)
        out.append(r)
    return out


# Each bench_* yields the result rows of one shape at a time (main appends them as they come).
def bench_gn(args, dev, bw):
    shapes = QUICK["gn"] if args.quick else UNET_GN + VAE_GN
    eager = lambda x, w, b, e, eps: F.silu(F.group_norm(x if e is None else x + e[:, :, None, None], 32 if x.shape[1] % 32 == 0 else 8, w, b, eps))  # noqa: E731
    comp = _compiled(lambda x, w, b, e, eps: ref.group_norm_silu(x, w, b, 32 if x.shape[1] % 32 == 0 else 8, eps, True, e), args.compile)
    for shape in shapes:
        N, Cc = shape[:2]
        G = 32 if Cc % 32 == 0 else 8
        eps = 1e-6 if shape in VAE_GN else 1e-5
        for dname in args.dtypes:
            dt = DTYPES[dname]
            for layout in ("nchw", "nhwc"):
                for with_emb in ([False, True] if shape in UNET_GN else [False]):
                    nbytes = 2 * torch.Size(shape).numel() * torch.finfo(dt).bits // 8
                    k = C.copies_for(nbytes, dev)
                    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
                    xs = [torch.randn(shape, device=dev, dtype=dt).contiguous(memory_format=fmt) for _ in range(k)]
                    w = torch.randn(Cc, device=dev, dtype=dt)
                    b = torch.randn(Cc, device=dev, dtype=dt)
                    e = torch.randn(N, Cc, device=dev, dtype=dt) if with_emb else None
                    provs = {"ldmfast": lambda i: ops.group_norm_silu(xs[i], w, b, G, eps, True, e),
                             "eager": lambda i: eager(xs[i], w, b, e, eps)}
                    if layout == "nhwc":
                        # Each kernel for large groups beside the default's pick of them
                        # (group_norm_silu.cu's choice is made on these rows); held only where
                        # it holds x.
                        for kern in ("groups", "rows", "held"):
                            f = lambda i, kern=kern: _with_env(  # noqa: E731
                                "LDMFAST_GN_KERNEL", kern, ops.group_norm_silu, xs[i], w, b, G, eps, True, e)
                            if kern != "held" or _runs(f):
                                provs["ldmfast_" + kern] = f
                    if comp is not None:
                        provs["compile"] = lambda i: comp(xs[i], w, b, e, eps)
                    times = _time_all(_this_pass(provs, args), dev, f"gn {shape} {dname} {layout}{' +emb' if with_emb else ''}", k)
                    yield _rows(times, {"bench": "group_norm_silu", "op": "gn_silu" + ("+emb" if with_emb else ""),
                                          "shape": "x".join(map(str, shape)), "dtype": dname,
                                          "layout": layout}, nbytes, bw)


def _sdpa_backends():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {}
    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "math": "MATH"}
    return {k: (sdpa_kernel, getattr(SDPBackend, v)) for k, v in names.items() if hasattr(SDPBackend, v)}


ATTN_KERNELS = ("mma", "mma_sync", "mma_wide", "fast", "wgmma", "wgmma_overlap", "wgmma_pingpong", "wgmma_pingpong_overlap",
                "wgmma_pingpong3", "wgmma_pingpong3_overlap")
# The largest head dim each kernel takes as itself; past it the kernel without the suffix runs.
ATTN_KERNEL_MAX_D = {"mma_wide": 80, "wgmma_overlap": 80, "wgmma_pingpong_overlap": 80, "wgmma_pingpong3": 96,
                     "wgmma_pingpong3_overlap": 64}


def _with_env(name, value, fn, *args):
    """fn(*args) with the environment variable `name` set to `value` (None: unset), for the
    kernel choices the ops read at every call (and a CUDA graph captures)."""
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        return fn(*args)
    finally:
        os.environ.pop(name, None)


def _runs(f):
    """Whether f(0) runs, False where the kernel it forces refuses the shape ("operation not
    supported": the held GroupNorm kernel on x larger than its resident CTAs hold)."""
    try:
        f(0)
    except RuntimeError as e:
        if "operation not supported" not in str(e):
            raise
        return False
    return True


def _attention_with(kernel, q, k, v):
    """ops.attention with LDMFAST_ATTENTION_KERNEL set to `kernel` (None: the default)."""
    return _with_env("LDMFAST_ATTENTION_KERNEL", kernel, ops.attention, q, k, v)


def bench_attn(args, dev, bw, cross_only=False):
    shapes = QUICK["attn"] if args.quick else ATTN
    if cross_only:  # --ops attn_cross: the short-context shapes only (Lk = 77; 1 in --quick)
        shapes = [s for s in shapes if s[2] != s[3]]
    backends = _sdpa_backends() if dev.type == "cuda" else {}
    for (B, H, Lq, Lk, D) in shapes:
        for dname in args.dtypes:
            dt = DTYPES[dname]
            # (B, L, H, D) as the projections produce; SDPA gets the transposed views (B, H, L, D).
            q = torch.randn(B, Lq, H, D, device=dev, dtype=dt)
            k = torch.randn(B, Lk, H, D, device=dev, dtype=dt)
            v = torch.randn(B, Lk, H, D, device=dev, dtype=dt)
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            provs = {"ldmfast": lambda i: _attention_with(None, q, k, v)}
            if dev.type == "cuda" and dt != torch.float32:
                # The kernels LDMFAST_ATTENTION_KERNEL can pick, side by side with the default.
                for kern in ATTN_KERNELS:
                    if D > ATTN_KERNEL_MAX_D.get(kern, D):
                        continue  # it runs the kernel without the suffix there: a row would be mislabelled
                    if kern.startswith("wgmma") and torch.cuda.get_device_capability(dev) != (9, 0):
                        continue  # likewise off sm_90 (on sm_90 the build must hold 90a, as gpu_check.sh's does)
                    provs["ldmfast_" + kern] = lambda i, kern=kern: _attention_with(kern, q, k, v)
                if Lk <= 80:
                    # The short-context kernel (what `fast` runs here) at other grid depths than
                    # its default 4 CTAs per SM: more warps in flight against fewer K/V reloads.
                    for c in ("2", "8"):
                        provs["ldmfast_fast_c" + c] = lambda i, c=c: _with_env(
                            "LDMFAST_ATTENTION_SHORT_CTAS_PER_SM", c, _attention_with, "fast", q, k, v)
                    if D <= 80:  # and with two tiles of 16 query rows a warp
                        provs["ldmfast_fast_rows32"] = lambda i: _with_env(
                            "LDMFAST_ATTENTION_SHORT_ROWS", "32", _attention_with, "fast", q, k, v)
            provs["sdpa"] = lambda i: F.scaled_dot_product_attention(qt, kt, vt)
            for name, (ctx, be) in backends.items():
                if name == "math" and Lq * Lk > 1 << 24:
                    continue

                def run(i, ctx=ctx, be=be):
                    with ctx(be):
                        return F.scaled_dot_product_attention(qt, kt, vt)
                try:
                    run(0)
                except RuntimeError:
                    continue  # this backend does not take this shape/dtype
                provs["sdpa_" + name] = run
            times = _time_all(provs, dev, f"attention B{B} H{H} {Lq}x{Lk} d{D} {dname}")
            flops = 4 * B * H * Lq * Lk * D
            yield _rows(times, {"bench": "attention", "op": "self" if Lq == Lk else "cross",
                                  "shape": f"B{B}_H{H}_{Lq}x{Lk}_d{D}", "dtype": dname,
                                  "layout": "blhd"}, flops=flops)


def bench_ddim(args, dev, bw):
    shapes = QUICK["ddim"] if args.quick else DDIM
    comp = _compiled(ref.ddim_step, args.compile)
    for shape in shapes:
        for dname in args.dtypes:
            dt = DTYPES[dname]
            n = torch.Size(shape).numel()
            nbytes = 6 * n * torch.finfo(dt).bits // 8  # read x, eps, eps_uncond, noise; write 2
            k = C.copies_for(nbytes, dev)
            sets = [[torch.randn(shape, device=dev, dtype=dt) for _ in range(4)] for _ in range(k)]
            a_t = torch.tensor(0.5, device=dev)
            a_prev = torch.tensor(0.6, device=dev)
            sig = torch.tensor(0.1, device=dev)
            g = torch.tensor(7.5, device=dev)
            provs = {"ldmfast": lambda i: ops.ddim_step(sets[i][0], sets[i][1], a_t, a_prev, sig, sets[i][3], sets[i][2], g),
                     "eager": lambda i: ref.ddim_step(sets[i][0], sets[i][1], a_t, a_prev, sig, sets[i][3], sets[i][2], g)}
            if comp is not None:
                provs["compile"] = lambda i: comp(sets[i][0], sets[i][1], a_t, a_prev, sig, sets[i][3], sets[i][2], g)
            times = _time_all(_this_pass(provs, args), dev, f"ddim {shape} {dname}", k)
            yield _rows(times, {"bench": "ddim_step", "op": "ddim+cfg+noise",
                                  "shape": "x".join(map(str, shape)), "dtype": dname,
                                  "layout": "nchw"}, nbytes, bw)


def _geglu_eager(h):
    a, gate = h.chunk(2, dim=-1)
    return a * F.gelu(gate)


def bench_geglu(args, dev, bw):
    shapes = QUICK["geglu"] if args.quick else GEGLU
    comp = _compiled(_geglu_eager, args.compile)
    for shape in shapes:
        for dname in args.dtypes:
            dt = DTYPES[dname]
            n = torch.Size(shape).numel()
            nbytes = (n + n // 2) * torch.finfo(dt).bits // 8  # read h (2n per row), write n
            k = C.copies_for(nbytes, dev)
            hs = [torch.randn(shape, device=dev, dtype=dt) for _ in range(k)]
            provs = {"ldmfast": lambda i: ops.geglu(hs[i]), "eager": lambda i: _geglu_eager(hs[i])}
            if comp is not None:
                provs["compile"] = lambda i: comp(hs[i])
            times = _time_all(_this_pass(provs, args), dev, f"geglu {shape} {dname}", k)
            yield _rows(times, {"bench": "geglu", "op": "geglu", "shape": "x".join(map(str, shape)),
                                  "dtype": dname, "layout": "rows"}, nbytes, bw)


def bench_upsample(args, dev, bw):
    shapes = QUICK["upsample"] if args.quick else UPSAMPLE
    for (N, Cc, S) in shapes:
        for dname in args.dtypes:
            dt = DTYPES[dname]
            for layout in ("nchw", "nhwc"):
                fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
                nbytes = 5 * N * Cc * S * S * torch.finfo(dt).bits // 8  # read x, write y (4x)
                k = C.copies_for(nbytes, dev)
                xs = [torch.randn(N, Cc, S, S, device=dev, dtype=dt).contiguous(memory_format=fmt)
                      for _ in range(k)]
                conv = torch.nn.Conv2d(Cc, Cc, 3, 1, 1).to(dev, dt).to(memory_format=fmt).requires_grad_(False)
                provs = {"ldmfast": lambda i: _with_env("LDMFAST_UPSAMPLE_CONV", None, model_ops.upsample_conv, xs[i], conv)}
                for m in ("subpixel", "transposed"):
                    provs["ldmfast_" + m] = lambda i, m=m: _with_env(
                        "LDMFAST_UPSAMPLE_CONV", m, model_ops.upsample_conv, xs[i], conv)
                provs["plain"] = lambda i: conv(F.interpolate(xs[i], scale_factor=2, mode="nearest"))
                times = _time_all(provs, dev, f"upsample {(N, Cc, S)} {dname} {layout}", k)
                flops = 2 * N * 4 * S * S * Cc * Cc * 9
                yield _rows(times, {"bench": "upsample_conv", "op": "up2x+conv3x3",
                                    "shape": f"{N}x{Cc}x{S}x{S}", "dtype": dname, "layout": layout},
                            flops=flops)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default="attn,gn,ddim,geglu,upsample")  # attention first: the most wanted rows
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile peers")
    ap.add_argument("--quick", action="store_true", help="a few small shapes (a check of the script itself)")
    ap.add_argument("--csv", default=None, help="results file (default benchmarks/results/<device>.csv)")
    ap.add_argument("--judge", metavar="CSV", default=None,
                    help="only judge the issue targets on a results file's newest rows of its last commit, and exit")
    args = ap.parse_args(argv)
    if args.judge is not None:
        if not os.path.isfile(args.judge):
            ap.error(f"--judge: no such file {args.judge!r}")
        rows = rows_to_judge(args.judge)
        if not rows:
            ap.error(f"--judge: {args.judge!r} holds no result rows")
        print_target_checks(rows, rows[0]["device"])
        return
    args.dtypes = args.dtypes.split(",")
    for d in args.dtypes:
        if d not in DTYPES:
            ap.error(f"--dtypes: unknown dtype {d!r} (choose from {', '.join(DTYPES)})")
    dev = torch.device(args.device)
    if dev.type == "cuda" and torch.cuda.is_available():
        dev = C.use_device(dev)
    if dev.type == "cuda" and not ops.cuda_available():
        ap.error("--device cuda: ldmfast was built without its CUDA kernels (build with LDMFAST_CUDA=1)")
    if dev.type == "cpu" and not args.quick:
        print("note: the full shape list is meant for the GPU; on CPU use --quick (or benchmarks/bench_ops_cpu.py)")
    bw = C.copy_bandwidth(dev)
    print(f"device: {C.device_name(dev)}  torch {torch.__version__}  commit {C.git_sha()}  "
          f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    benches = {"gn": bench_gn, "attn": bench_attn, "ddim": bench_ddim, "geglu": bench_geglu,
               "upsample": bench_upsample,
               "attn_cross": lambda a, d, b: bench_attn(a, d, b, cross_only=True)}
    names = args.ops.split(",")
    for name in names:
        if name not in benches:
            ap.error(f"--ops: unknown op {name!r} (choose from {', '.join(benches)})")
    everything = []
    passes = [(names, argparse.Namespace(**{**vars(args), "compile": False, "compile_only": False}))]
    if args.compile:
        passes.append(([n for n in names if n in COMPILED],
                       argparse.Namespace(**{**vars(args), "compile": True, "compile_only": True})))
    for pass_names, pass_args in passes:
        if pass_args.compile_only and pass_names:
            print("torch.compile peers (a pass of their own: compiling takes minutes; the ratio to "
                  "ldmfast's first-pass time is in each row's note)\n")
        for name in pass_names:
            part = []
            for rows in benches[name](pass_args, dev, bw):
                if pass_args.compile_only:
                    rows = _ratio_to_first_pass(rows, everything)
                # Shape by shape: a run stopped by a time limit keeps what it measured.
                path = C.append_results(rows, dev, args.csv)
                part += rows
            C.print_table(part, ["op", "shape", "dtype", "layout", "provider", "time_us", "gbps", "tflops", "frac_copy",
                                 "note"])
            if part:
                print(f"results appended to {path}\n")
            everything += part
    print_target_checks(everything, C.device_name(dev))
    if FAILED:
        sys.exit(f"{len(FAILED)} provider runs failed and are not in the results:\n  " + "\n  ".join(FAILED))


if __name__ == "__main__":
    main()
