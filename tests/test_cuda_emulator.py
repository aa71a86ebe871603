"""The CUDA kernels run on the CPU: csrc/cuda/emu builds them with g++ (one thread per CUDA
thread, ldmatrix / mma.sync / cp.async / clusters re-implemented) and checks every path the host
code picks against float64 references. On machines without a GPU this is the only place the
kernels' indexing, tails and layouts are executed. cp.async copies land at the issuing thread's
wait (a missing wait fails), and the attention kernels run again with copies landing at issue
(EMU_CP_ASYNC=early, the other extreme). It cannot see timing or a missing barrier;
compute-sanitizer on the GPU does (scripts/gpu_check.sh).

Needs g++ and the CUDA headers (not a GPU or nvcc); skipped visibly without them, unless
LDMFAST_REQUIRE_NVCC=1 (CI). Takes about 3 minutes on 2 cores.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cuda_kernels_on_the_cpu_emulator(tmp_path):
    headers = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include", "cuda_runtime.h")
    missing = [w for w, ok in (("g++", shutil.which("g++")), ("the CUDA headers", os.path.exists(headers))) if not ok]
    if missing:
        if os.environ.get("LDMFAST_REQUIRE_NVCC") == "1":
            pytest.fail(f"{' and '.join(missing)} not found, but LDMFAST_REQUIRE_NVCC=1 requires the CUDA checks")
        pytest.skip(f"{' and '.join(missing)} not found")
    env = {**os.environ, "LDMFAST_EMU_DIR": str(tmp_path)}
    res = subprocess.run(["bash", os.path.join(ROOT, "csrc", "cuda", "emu", "run.sh"), "all"],
                         capture_output=True, text=True, env=env)
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, tail
    last = res.stdout.strip().splitlines()[-1]
    passed, total = (int(n) for n in last.split()[0].split("/"))
    assert passed == total and total >= 250, tail
    for which in ("mma", "short"):  # the cp.async kernels, copies landing at issue
        res = subprocess.run([str(tmp_path / "emu_test"), which], capture_output=True, text=True,
                             env={**env, "EMU_CP_ASYNC": "early"})
        tail = (res.stdout + res.stderr)[-6000:]
        assert res.returncode == 0, tail
        passed, total = (int(n) for n in res.stdout.strip().splitlines()[-1].split()[0].split("/"))
        assert passed == total and total >= 30, tail
