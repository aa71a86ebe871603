"""Timing and result-recording helpers shared by the benchmarks.

GPU timings use CUDA events around a loop of calls, median over repeats after warm-up, with the
inputs rotated through enough copies to exceed the L2 cache (the GPU.md method). CPU timings use
perf_counter the same way. Results are appended to benchmarks/results/<device>.csv with the device
name, torch version, git sha and date, so every figure can be traced to where it came from.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import re
import statistics
import subprocess
import time

import torch

from ldmfast.graphs import capturing

HERE = os.path.dirname(os.path.abspath(__file__))
L2_FLUSH_BYTES = 256 << 20  # several times the 50 MB L2 of an H100


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU {line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"CPU x{os.cpu_count()}"


def git_sha() -> str:
    """The commit measured: LDMFAST_GIT_SHA when set (the lent GPU's copy of the tree carries the
    .git of the session's start, so git there names the wrong commit), else git's HEAD, "-dirty"
    with uncommitted changes."""
    given = os.environ.get("LDMFAST_GIT_SHA", "").strip()
    if given:
        if not re.fullmatch(r"[0-9a-f]{7,40}", given):
            raise ValueError(f"LDMFAST_GIT_SHA must be a commit hash (7 to 40 hex digits), got {given!r}")
        return given[:12]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=HERE, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_arg(ap, value) -> torch.device:
    """--device's value (default: cuda when present, else cpu) as a usable device, made current;
    anything else is a usage error through the ArgumentParser `ap`."""
    try:
        device = torch.device(value or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        ap.error(f"--device must be cpu, cuda or cuda:N, got {value!r}")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        ap.error(f"--device {value}: no such CUDA device is available")
    return use_device(device)


def use_device(device: torch.device) -> torch.device:
    """Makes a CUDA `device` current (events, streams and graphs use the current device) and
    returns it with its index ("cuda" is the current one: set_device refuses a device without
    an index)."""
    if device.type != "cuda":
        return device
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    return device


def copies_for(nbytes: int, device: torch.device) -> int:
    """How many input copies to rotate through so one sweep exceeds the L2 cache."""
    if device.type != "cuda" or nbytes <= 0:
        return 1
    return max(1, min(64, -(-L2_FLUSH_BYTES // nbytes)))


def first_line(e: BaseException, width: int = 300) -> str:
    """An exception as one short line (type and the first line of its message), for reports."""
    return (f"{type(e).__name__}: {e}".strip().splitlines() or [type(e).__name__])[0][:width]


def time_fn(fn, device: torch.device, n_inputs: int = 1, inner: int = 20, repeats: int = 15,
            warmup: int = 3, graph: bool = False) -> float:
    """Median seconds per call of fn(i), i cycling over n_inputs prepared input sets.

    On CUDA, ``graph=True`` captures the calls in one CUDA graph and times its replays: the
    GPU's time without Python and dispatcher overhead, which would otherwise dominate kernels
    of a few microseconds. The graph holds at least `inner` calls and every input set (a
    replay of fewer sets than the rotation asks for would find them in the L2 cache). A
    function that cannot be captured is timed eagerly instead (time_fn_graphed says which).
    """
    return time_fn_graphed(fn, device, n_inputs, inner, repeats, warmup, graph)[0]


def time_fn_graphed(fn, device: torch.device, n_inputs: int = 1, inner: int = 20, repeats: int = 15,
                    warmup: int = 3, graph: bool = False) -> tuple[float, bool]:
    """time_fn's figure and whether it came from graph replays (False: timed eagerly, with the
    launch overhead in it, because fn was not asked to be or could not be captured)."""
    if device.type == "cuda" and graph:
        t = _time_graph(fn, device, n_inputs, inner, repeats, warmup)
        if t is not None:
            return t, True
    for i in range(warmup):
        fn(i % n_inputs)
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for r in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(inner):
                fn((r * inner + i) % n_inputs)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / inner)
    else:
        for r in range(repeats):
            t0 = time.perf_counter()
            for i in range(inner):
                fn((r * inner + i) % n_inputs)
            samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples), False


def _time_graph(fn, device, n_inputs, inner, repeats, warmup):
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for i in range(warmup):
            fn(i % n_inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    calls = n_inputs * -(-inner // n_inputs)  # whole sweeps of the input sets, >= inner
    g = torch.cuda.CUDAGraph()
    try:
        with capturing(g, side):  # restores the stream and the allocator if the capture fails
            for i in range(calls):
                fn(i % n_inputs)
    except RuntimeError:
        torch.cuda.synchronize(device)
        return None
    g.replay()
    torch.cuda.synchronize(device)
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / calls)
    del g
    return statistics.median(samples)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth in bytes/s, counting read + write (the roofline used)."""
    if device.type != "cuda":
        nbytes = 1 << 28
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda i: dst.copy_(src), device, inner=5 if device.type == "cuda" else 2, repeats=9)
    return 2 * src.numel() * src.element_size() / t


# One column set for every benchmark, so a results file never mixes headers.
COLUMNS = ["date", "git_sha", "device", "torch", "bench", "op", "shape", "dtype", "layout",
           "provider", "time_us", "gbps", "tflops", "frac_copy", "steps_per_s", "note"]


def results_path(device: torch.device, path: str | None = None) -> str:
    """`path`, or benchmarks/results/<device>.csv."""
    if path is None:
        safe = re.sub(r"[^A-Za-z0-9]+", "_", device_name(device)).strip("_")
        path = os.path.join(HERE, "results", f"{safe}.csv")
    return path


def append_results(rows: list[dict], device: torch.device, path: str | None = None) -> str:
    """Appends rows to benchmarks/results/<device>.csv (or `path`); returns the path."""
    name = device_name(device)
    path = results_path(device, path)
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "git_sha": git_sha(), "device": name, "torch": torch.__version__}
    for r in rows:
        unknown = set(r) - set(COLUMNS)
        assert not unknown, f"unknown result columns {unknown}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:  # rows under another header would be misaligned silently
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:
            raise ValueError(f"{path} is not a results file of these benchmarks: its header is "
                             f"{','.join(header)!r}, expected {','.join(COLUMNS)!r}; give another --csv path")
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**meta, **{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()}})
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
