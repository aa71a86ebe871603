"""The issue targets' kernels, once each beside their peer, for Nsight Compute (ncu) on the lent GPU.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... --csv --page details \\
        --log-file ncu.csv python3 benchmarks/profile_kernels.py [--cases gn,attn,ddim,geglu] [--variants]
    python3 benchmarks/profile_kernels.py --summarize ncu.csv     (one line per profiled kernel)
    python3 benchmarks/profile_kernels.py --list                  (the cases, in the order they run)

Every case warms up its calls outside the profiled range, then runs ldmfast's op once and the
peer once between cudaProfilerStart and cudaProfilerStop, so ncu (started with
--profile-from-start off) sees exactly those kernels, in the order --list prints. With --variants
each attention case also runs every kernel LDMFAST_ATTENTION_KERNEL selects. scripts/gpu_check.sh's
profile stage runs it. Timings come from the benchmarks (bench_ops_cuda.py), not from here: ncu
replays each kernel many times to read its counters.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from bench_ops_cuda import ATTN_KERNEL_MAX_D, ATTN_KERNELS, _geglu_eager, _with_env  # noqa: E402

import ldmfast.ops as ops  # noqa: E402
import ldmfast.ref as ref  # noqa: E402

# The shapes the issues set targets on (issue 5: GroupNorm+SiLU, DDIM; issue 6: attention).
GN = [((1, 128, 512, 512), "nchw", False), ((1, 128, 512, 512), "nhwc", False), ((2, 320, 64, 64), "nhwc", True),
      ((2, 1280, 16, 16), "nchw", False)]
ATTN = [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
        (2, 8, 256, 77, 160), (2, 8, 4096, 4096, 64)]
DDIM = [(4, 4, 128, 128)]
GEGLU = [(2 * 4096, 2 * 4 * 320)]
QUICK = {"gn": [((1, 32, 16, 16), "nhwc", True)], "attn": [(1, 2, 64, 77, 40)], "ddim": [(2, 4, 8, 8)],
         "geglu": [(64, 80)]}


def cases(which, device, dtype, quick=False, variants=False):
    """(name, [(provider, fn), ...]) for each case of the ops in `which`, inputs made."""
    pick = (lambda k, full: QUICK[k] if quick else full)
    out = []
    if "gn" in which:
        for shape, layout, with_emb in pick("gn", GN):
            fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
            x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
            c = shape[1]
            w, b = torch.randn(c, device=device, dtype=dtype), torch.randn(c, device=device, dtype=dtype)
            e = torch.randn(shape[0], c, device=device, dtype=dtype) if with_emb else None
            g = 32 if c % 32 == 0 else 8
            out.append((f"gn {'x'.join(map(str, shape))} {layout}{' +emb' if with_emb else ''}", [
                ("ldmfast", lambda x=x, w=w, b=b, e=e, g=g: ops.group_norm_silu(x, w, b, g, 1e-5, True, e)),
                ("eager", lambda x=x, w=w, b=b, e=e, g=g: F.silu(F.group_norm(
                    x if e is None else x + e[:, :, None, None], g, w, b, 1e-5)))]))
    if "attn" in which:
        for (B, H, Lq, Lk, D) in pick("attn", ATTN):
            q = torch.randn(B, Lq, H, D, device=device, dtype=dtype)
            k = torch.randn(B, Lk, H, D, device=device, dtype=dtype)
            v = torch.randn(B, Lk, H, D, device=device, dtype=dtype)
            provs = [("ldmfast", lambda q=q, k=k, v=v: ops.attention(q, k, v))]
            if variants and device.type == "cuda":
                sm90 = torch.cuda.get_device_capability(device) == (9, 0)
                for kern in ATTN_KERNELS:
                    if D <= ATTN_KERNEL_MAX_D.get(kern, D) and (sm90 or not kern.startswith("wgmma")):
                        provs.append(("ldmfast_" + kern, lambda q=q, k=k, v=v, kern=kern: _with_env(
                            "LDMFAST_ATTENTION_KERNEL", kern, ops.attention, q, k, v)))
            provs.append(("sdpa", lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))))
            out.append((f"attention B{B} H{H} {Lq}x{Lk} d{D}", provs))
    if "ddim" in which:
        for shape in pick("ddim", DDIM):
            x, eps, eps_u, noise = (torch.randn(shape, device=device, dtype=dtype) for _ in range(4))
            s = [torch.tensor(v, device=device) for v in (0.5, 0.6, 0.1, 7.5)]
            out.append((f"ddim {'x'.join(map(str, shape))}", [
                ("ldmfast", lambda x=x, eps=eps, eps_u=eps_u, noise=noise, s=s: ops.ddim_step(
                    x, eps, s[0], s[1], s[2], noise, eps_u, s[3])),
                ("eager", lambda x=x, eps=eps, eps_u=eps_u, noise=noise, s=s: ref.ddim_step(
                    x, eps, s[0], s[1], s[2], noise, eps_u, s[3]))]))
    if "geglu" in which:
        for shape in pick("geglu", GEGLU):
            h = torch.randn(shape, device=device, dtype=dtype)
            out.append((f"geglu {'x'.join(map(str, shape))}", [
                ("ldmfast", lambda h=h: ops.geglu(h)), ("eager", lambda h=h: _geglu_eager(h))]))
    return out


def run(which, device, dtype, quick, variants):
    profiler = torch.cuda.profiler if device.type == "cuda" else None
    for i, (name, provs) in enumerate(cases(which, device, dtype, quick, variants)):
        for _, fn in provs:  # warm-up (first-call setup, autotuning) outside the profiled range
            fn(), fn()
        if profiler:
            torch.cuda.synchronize(device)
            profiler.start()
        for _, fn in provs:
            fn()
        if profiler:
            torch.cuda.synchronize(device)
            profiler.stop()
        print(f"case {i}: {name}: {', '.join(p for p, _ in provs)}", flush=True)


# Per kernel: these metrics of ncu's details page (SpeedOfLight, Occupancy, LaunchStats sections).
SUMMARY = [("Duration", "time"), ("DRAM Throughput", "dram%"), ("Compute (SM) Throughput", "sm%"),
           ("Achieved Occupancy", "occ%"), ("Registers Per Thread", "regs"), ("Waves Per SM", "waves")]


def summarize(path):
    """One line per kernel of an ncu `--csv --page details` log (other lines, ncu's ==PROF==
    messages and the program's output, are skipped)."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.startswith('"')]
    rows = list(csv.DictReader(lines))
    need = {"ID", "Kernel Name", "Metric Name", "Metric Value"}
    if not rows or not need <= set(rows[0]):
        sys.exit(f"{path}: no ncu details rows (expected the columns {sorted(need)})")
    kernels = {}
    for r in rows:
        k = kernels.setdefault(r["ID"], {"id": r["ID"], "kernel": _short(r["Kernel Name"]),
                                         "grid": r.get("Grid Size", ""), "block": r.get("Block Size", "")})
        for metric, col in SUMMARY:
            if r["Metric Name"] == metric:
                unit = r.get("Metric Unit", "")
                k[col] = r["Metric Value"] + (f" {unit}" if col == "time" and unit else "")
    C.print_table(list(kernels.values()), ["id", "kernel", "grid", "block"] + [c for _, c in SUMMARY])


def _short(name, width=70):
    """A kernel's demangled name without its return type and parameter list, cut to width."""
    # ldmfast's kernels (and many of torch's) live in an anonymous namespace, whose "(" is no
    # parameter list
    name = name.removeprefix("void ").replace("(anonymous namespace)::", "")
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # the parameter list: the first '(' outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            cut = i
            break
    name = name[:cut]
    return name if len(name) <= width else name[:width - 3] + "..."


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="attn,gn,ddim,geglu", help="comma list from attn, gn, ddim, geglu")
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--variants", action="store_true", help="every attention kernel, not only the default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="one small shape per op (a check of the script)")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument("--summarize", metavar="NCU_CSV", default=None, help="summarize an ncu details CSV and exit")
    args = ap.parse_args(argv)
    if args.summarize is not None:
        if not os.path.isfile(args.summarize):
            ap.error(f"--summarize: no such file {args.summarize!r}")
        return summarize(args.summarize)
    which = args.cases.split(",")
    for w in which:
        if w not in ("attn", "gn", "ddim", "geglu"):
            ap.error(f"--cases: unknown op {w!r} (choose from attn, gn, ddim, geglu)")
    device = torch.device(args.device)
    if device.type == "cuda" and not ops.cuda_available():
        ap.error("--device cuda: ldmfast was built without its CUDA kernels (build with LDMFAST_CUDA=1)")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.list:
        if args.variants:
            ap.error("--list does not know which kernels --variants adds (that depends on the GPU): "
                     "the profiled run prints its cases as it goes")
        for i, (name, provs) in enumerate(cases(which, torch.device("meta"), dtype, args.quick, False)):
            print(f"case {i}: {name}: {', '.join(p for p, _ in provs)}")
        return None
    with torch.no_grad():
        run(which, device, dtype, args.quick, args.variants)
    return None


if __name__ == "__main__":
    main()
