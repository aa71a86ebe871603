"""The CUDA kernels run on the CPU: csrc/cuda/emu builds them with g++ (one fiber per CUDA
thread, ldmatrix / mma.sync / cp.async / clusters / cooperative grids re-implemented) and checks
every path the host code picks against float64 references. On machines without a GPU this is the only place the
kernels' indexing, tails, layouts and barriers are executed. cp.async copies land at the issuing
thread's wait (a missing wait fails), and the attention kernels run again with copies landing at
issue (EMU_CP_ASYNC=early, the other extreme). A second build with ThreadSanitizer runs a smaller
set and fails when two threads of one CTA (or cluster) access memory with no barrier ordering
them (a missing __syncthreads or __syncwarp); CTAs of different clusters are not compared.
It cannot see timing; compute-sanitizer on the GPU checks the real thing (scripts/gpu_check.sh).

Needs g++ and the CUDA headers (not a GPU or nvcc), and libtsan for the race check; skipped
visibly without them, unless LDMFAST_REQUIRE_NVCC=1 (CI). Takes about 4 minutes on 2 cores.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_SH = os.path.join(ROOT, "csrc", "cuda", "emu", "run.sh")


def _require(missing):
    if missing:
        if os.environ.get("LDMFAST_REQUIRE_NVCC") == "1":
            pytest.fail(f"{' and '.join(missing)} not found, but LDMFAST_REQUIRE_NVCC=1 requires the CUDA checks")
        pytest.skip(f"{' and '.join(missing)} not found")


def _toolchain():
    headers = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include", "cuda_runtime.h")
    _require([w for w, ok in (("g++", shutil.which("g++")), ("the CUDA headers", os.path.exists(headers))) if not ok])


def _check(res, least):
    """The run passed every check, and ran at least `least` of them."""
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, tail
    passed, total = (int(n) for n in res.stdout.strip().splitlines()[-1].split()[0].split("/"))
    assert passed == total and total >= least, tail


def test_cuda_kernels_on_the_cpu_emulator(tmp_path):
    _toolchain()
    env = {**os.environ, "LDMFAST_EMU_DIR": str(tmp_path), "EMU_TSAN": "0"}
    _check(subprocess.run(["bash", RUN_SH, "all"], capture_output=True, text=True, env=env), 611)
    exe = str(tmp_path / "emu_test")
    for which in ("mma", "short"):  # the cp.async kernels, copies landing at issue
        _check(subprocess.run([exe, which], capture_output=True, text=True, env={**env, "EMU_CP_ASYNC": "early"}), 30)
    # The sm_90 group_norm_silu path: one group's statistics gathered across a cluster's CTAs.
    _check(subprocess.run([exe, "gn"], capture_output=True, text=True, env={**env, "EMU_SM90": "1"}), 171)
    # The held GroupNorm kernel at an H100's occupancy (one 512-thread CTA a SM whatever its
    # shared memory): registers, shared-memory slots and streamed items.
    _check(subprocess.run([exe, "held"], capture_output=True, text=True, env={**env, "EMU_REGS_PER_THREAD": "128"}), 9)
    # The proxy check fires: operands staged with no fence.proxy.async before the wgmma reads
    # them abort the run (on the hardware the tensor cores may read stale bytes).
    res = subprocess.run([exe, "wgmma"], capture_output=True, text=True, env={**env, "EMU_WGMMA_MUTATE": "no_proxy_fence"})
    assert res.returncode != 0 and "no fence.proxy.async by that thread" in res.stderr, (res.stdout + res.stderr)[-3000:]


def test_cuda_kernels_have_no_unordered_accesses(tmp_path):
    _toolchain()
    # Built and run: on some Linux kernels (address-space randomisation) GCC's libtsan dies at start-up.
    probe = subprocess.run(["g++", "-fsanitize=thread", "-x", "c++", "-", "-o", str(tmp_path / "probe")],
                           input="int main() { return 0; }\n", capture_output=True, text=True)
    if probe.returncode == 0:
        probe = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True)
    _require([] if probe.returncode == 0 else ["a working ThreadSanitizer (g++ -fsanitize=thread)"])
    env = {**os.environ, "LDMFAST_EMU_DIR": str(tmp_path), "EMU_TSAN": "1"}
    _check(subprocess.run(["bash", RUN_SH, "race"], capture_output=True, text=True, env=env), 26)
    exe = str(tmp_path / "emu_test")
    # Copies landing at issue: a cp.async into a buffer other warps still read is a race too.
    # The sm_90 cluster path synchronises CTAs through cluster.sync.
    for extra in ({"EMU_CP_ASYNC": "early"}, {"EMU_SM90": "1"}):
        _check(subprocess.run([exe, "race"], capture_output=True, text=True,
                              env={**env, "TSAN_OPTIONS": "halt_on_error=1", **extra}), 26)
    # The held GroupNorm kernel's shared-memory slots and streamed items (H100 occupancy).
    _check(subprocess.run([exe, "held"], capture_output=True, text=True,
                          env={**env, "TSAN_OPTIONS": "halt_on_error=1", "EMU_REGS_PER_THREAD": "128"}), 9)
