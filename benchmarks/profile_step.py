"""Where the time of one U-Net step and one VAE decode goes, kernel by kernel.

    python benchmarks/profile_step.py [--preset sd15] [--dtype fp16] [--what unet,decode]

ldmfast's model of a throughput.py preset (random weights, channels_last on a GPU), run eagerly
under torch.profiler after warm-up. Prints, per step: the time of each kind of work (GroupNorm,
attention, convolution, GEMM, elementwise, copies, other) and the kernels that take the most.
On a GPU the times are the kernels' own (device time, launch gaps excluded: the step's wall time
with a CUDA graph is throughput.py's figure); on CPU they are the ops' own CPU time.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput as T  # noqa: E402

# First match wins; matched against the lower-cased kernel (or op) name.
KINDS = [
    ("groupnorm", r"group_norm|groupnorm|rows_stats|rows_apply"),
    ("attention", r"attention|flash|fmha|softmax|sdpa"),
    ("copy", r"copy|memcpy|memset|nchwtonhwc|nhwctonchw|transpose|permute|concat|\bcat\b|contiguous"),
    ("conv", r"conv|fprop|dgrad|implicit|winograd|cudnn"),
    ("gemm", r"gemm|matmul|addmm|\bmm\b|cublas|cutlass|xmma|sm90_|linear"),
    ("geglu/gelu", r"geglu|gelu"),
    ("elementwise", r"elementwise|vectorized|add|mul|silu|unrolled|reduce"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def profile(fn, device, repeats):
    """{name: (self time in us per call of fn, count per call)} of fn's kernels (GPU) or ops (CPU)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    out = {}
    for e in prof.key_averages():
        if device.type == "cuda":
            # Kernels only: device time lands on the kernel events, which have no CPU time.
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = e.self_cuda_time_total
            if t <= 0 or e.self_cpu_time_total > 0:
                continue
        else:
            t = e.self_cpu_time_total
            if t <= 0 or e.key.startswith("ProfilerStep"):
                continue
        out[e.key] = (t / repeats, e.count / repeats)
    return out


def report(title, times, top):
    total = sum(t for t, _ in times.values())
    kinds = {}
    for name, (t, n) in times.items():
        k = kinds.setdefault(kind_of(name), [0.0, 0.0])
        k[0] += t
        k[1] += n
    print(f"\n{title}: {total / 1e3:.3f} ms of {'kernel' if 'kernel' in title else 'op'} time per call")
    rows = [{"kind": k, "ms": f"{t / 1e3:.3f}", "share": f"{t / total:.1%}", "calls": f"{n:.0f}"}
            for k, (t, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0])]
    T.C.print_table(rows, ["kind", "ms", "share", "calls"])
    print(f"the {top} largest:")
    rows = [{"us": f"{t:.1f}", "calls": f"{n:.0f}", "us_per_call": f"{t / n:.2f}" if n else "",
             "kind": kind_of(name), "name": name[:110]}
            for name, (t, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]]
    T.C.print_table(rows, ["us", "calls", "us_per_call", "kind", "name"])
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(T.PRESETS), default=None,
                    help="model preset (default: sd15 on a GPU, cpu otherwise)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--dtype", choices=sorted(T.DTYPES), default=None)
    ap.add_argument("--batch", type=int, default=2, help="U-Net batch (2 = one image with guidance)")
    ap.add_argument("--what", default="unet,decode", help="comma list from unet, decode")
    ap.add_argument("--repeats", type=int, default=None, help="profiled calls (default 5 on a GPU, 2 on CPU)")
    ap.add_argument("--top", type=int, default=25, help="kernels listed (default 25)")
    args = ap.parse_args(argv)
    what = [w for w in args.what.split(",") if w]
    if not what or any(w not in ("unet", "decode") for w in what):
        ap.error(f"--what must list unet and/or decode, got {args.what!r}")
    if args.batch < 1:
        ap.error(f"--batch must be >= 1, got {args.batch}")
    if args.repeats is not None and args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.top < 1:
        ap.error(f"--top must be >= 1, got {args.top}")
    device = T.C.device_arg(ap, args.device)
    preset_name = args.preset or ("sd15" if device.type == "cuda" else "cpu")
    if preset_name == "shapes":
        ap.error("--preset shapes: use cpu or sd15 (random weights of the preset's architecture)")
    preset = T.PRESETS[preset_name]
    dtype = T.DTYPES[args.dtype or (preset["dtype"] if device.type == "cuda" else "fp32")]
    repeats = args.repeats or (5 if device.type == "cuda" else 2)

    import ldmfast.models.ops as model_ops

    model = T.build_ldmfast_only(preset, dtype, device)
    if model_ops.using_reference_ops():
        print("note: ldmfast's compiled ops did not load; this profiles the reference ops")
    f = 2 ** (len(preset["vae"]["block_out_channels"]) - 1)
    h, w = preset["height"] // f, preset["width"] // f
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    g = torch.Generator(device="cpu").manual_seed(0)
    lat = torch.randn(args.batch, 4, h, w, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    ctx = torch.randn(args.batch, *preset["context"], generator=g).to(device, dtype)
    t = torch.full((args.batch,), 500, device=device, dtype=torch.long)
    z1 = torch.randn(1, 4, h, w, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    work = {"unet": (f"U-Net step, batch {args.batch}, {h}x{w} latent", lambda: model.unet(lat, t, context=ctx)),
            "decode": (f"VAE decode, batch 1, {preset['height']}x{preset['width']}", lambda: model.first_stage.decode(z1))}
    print(f"device: {T.C.device_name(device)}  torch {torch.__version__}  commit {T.C.git_sha()}  "
          f"preset {preset_name}  dtype {str(dtype).split('.')[-1]}  {repeats} profiled calls each")
    unit = "kernel" if device.type == "cuda" else "op (CPU)"
    with torch.no_grad():
        for name in what:
            title, fn = work[name]
            for _ in range(3):  # warm-up: cuDNN's algorithm search, first-call allocations
                fn()
            report(f"{title}, {unit}", profile(fn, device, repeats), args.top)


if __name__ == "__main__":
    main()
