"""benchmarks/profile_kernels.py (ncu's program on the lent GPU): its cases run on CPU, and its
summary reads ncu's details CSV as ncu writes it to --log-file (messages and program output
interleaved)."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "profile_kernels.py")


def _run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)


def test_cases_run_on_cpu_in_the_order_listed():
    listed = _run("--list", "--quick")
    ran = _run("--device", "cpu", "--quick")
    assert listed.returncode == 0 and ran.returncode == 0, ran.stderr[-3000:]
    assert listed.stdout == ran.stdout and listed.stdout.count("case ") == 4
    assert "attention B1 H2 64x77 d40: ldmfast, sdpa" in ran.stdout
    full = _run("--list")
    assert "case 4: attention B2 H8 4096x4096 d40: ldmfast, sdpa" in full.stdout  # the shapes


def test_bad_cases_are_usage_errors():
    r = _run("--cases", "attn,conv", "--list")
    assert r.returncode == 2 and "--cases: unknown op 'conv'" in r.stderr
    # which kernels --variants adds depends on the GPU: a list without them would misorder ncu's
    r = _run("--cases", "attn", "--variants", "--list")
    assert r.returncode == 2 and "--list does not know which kernels --variants adds" in r.stderr


HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
          '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value",'
          '"Rule Name","Rule Type","Rule Description"\n')


def _row(i, kernel, section, metric, unit, value):
    return (f'"{i}","77","python3","127.0.0.1","{kernel}","1","7","(128, 1, 1)","(352, 1, 1)","0","9.0",'
            f'"{section}","{metric}","{unit}","{value}","","",""\n')


def test_summary_has_one_line_per_kernel(tmp_path):
    attn = ("void ldmfast::cuda::(anonymous namespace)::attention_wgmma_kernel<cutlass::half_t, 48, (int)2>"
            "(ldmfast::AttentionArgs)")
    log = tmp_path / "ncu.csv"
    log.write_text(
        "==PROF== Connected to process 77\ncase 0: attention B2 H8 4096x4096 d40: ldmfast, sdpa\n" + HEADER
        + _row(0, attn, "GPU Speed Of Light Throughput", "Duration", "usecond", "171.20")
        + _row(0, attn, "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "3.10")
        + _row(0, attn, "GPU Speed Of Light Throughput", "Compute (SM) Throughput", "%", "61.5")
        + _row(0, attn, "Occupancy", "Achieved Occupancy", "%", "24.9")
        + _row(0, attn, "Launch Statistics", "Registers Per Thread", "register/thread", "168")
        + _row(1, "void pytorch_flash::flash_fwd_kernel<Flash_fwd_traits>(Flash_fwd_params)",
               "GPU Speed Of Light Throughput", "Duration", "usecond", "198.0")
        + "==PROF== Disconnected from process 77\n")
    r = _run("--summarize", str(log))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["id", "kernel", "grid", "block", "time", "dram%", "sm%", "occ%", "regs", "waves"]
    assert len(lines) == 3
    assert lines[1].split()[:2] == ["0", "ldmfast::cuda::attention_wgmma_kernel<cutlass::half_t,"]
    assert "171.20 usecond" in lines[1] and "61.5" in lines[1] and "168" in lines[1]
    assert "pytorch_flash::flash_fwd_kernel<Flash_fwd_traits>" in lines[2] and "198.0 usecond" in lines[2]


def test_summary_of_a_log_without_details_is_an_error(tmp_path):
    log = tmp_path / "ncu.csv"
    log.write_text("==PROF== Connected to process 77\n==ERROR== something went wrong\n")
    r = _run("--summarize", str(log))
    assert r.returncode != 0 and "no ncu details rows" in r.stderr
    r = _run("--summarize", str(tmp_path / "none.csv"))
    assert r.returncode == 2 and "--summarize: no such file" in r.stderr
