"""benchmarks/profile_step.py (the lent GPU's breakdown of a U-Net step and a decode): it runs on
CPU on the small preset, and every kind of work it names adds up to its total."""
from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "profile_step.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
try:
    import profile_step as P
finally:
    sys.path.pop(0)


def _run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)


def test_decode_breakdown_on_cpu_adds_up():
    r = _run("--device", "cpu", "--what", "decode", "--repeats", "1", "--top", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"VAE decode, batch 1, 128x128, op \(CPU\): ([0-9.]+) ms", r.stdout)
    assert m, r.stdout
    table = r.stdout[m.end():r.stdout.index("the 3 largest")]
    kinds = re.findall(r"^(\S+)\s+([0-9.]+)\s+([0-9.]+)%", table, flags=re.M)
    assert {"conv", "groupnorm"} <= {k for k, _, _ in kinds}  # the decoder's convs and ldmfast's GN
    assert abs(sum(float(ms) for _, ms, _ in kinds) - float(m.group(1))) < 0.01 * float(m.group(1)) + 0.01
    assert len(re.findall(r"^\d", r.stdout[r.stdout.index("the 3 largest"):], flags=re.M)) == 3


def test_kernel_names_sorted_into_kinds():
    assert P.kind_of("void ldmfast::cuda::detail::(anonymous namespace)::rows_apply_kernel<__half>") == "groupnorm"
    assert P.kind_of("attention_wgmma_kernel<80, true>") == "attention"
    assert P.kind_of("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc") == "conv"
    assert P.kind_of("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64") == "gemm"
    assert P.kind_of("void cudnn::ops::nchwToNhwcKernel<__half>") == "copy"
    assert P.kind_of("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<c10::Half>>") == "elementwise"
    assert P.kind_of("aten::native_layer_norm") == "other"


def test_bad_arguments_are_usage_errors():
    r = _run("--what", "unet,encode")
    assert r.returncode == 2 and "--what must list unet and/or decode" in r.stderr
    r = _run("--repeats", "0")
    assert r.returncode == 2 and "--repeats must be >= 1" in r.stderr
