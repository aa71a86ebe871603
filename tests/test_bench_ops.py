"""The kernel benchmark scripts run end to end on small shapes (their figures are not checked:
performance targets live in the benchmarks). bench_ops_cuda.py is what the lent GPU runs
(scripts/gpu_check.sh bench); its --quick mode on the CPU catches a broken script before a
GPU session spends time on it."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cuda_kernel_bench_runs_quick_on_cpu(tmp_path):
    out = tmp_path / "r.csv"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_ops_cuda.py"), "--quick",
                        "--device", "cpu", "--no-compile", "--csv", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(out)))
    benches = {row["bench"] for row in rows}
    assert len(benches) == 4, benches  # gn, attention, ddim, geglu: each appended as it finished
    assert r.stdout.count("results appended to") == 4
    for b in benches:
        provs = {row["provider"] for row in rows if row["bench"] == b}
        assert "ldmfast" in provs and len(provs) >= 2, (b, provs)  # always beside a peer
    assert all(float(row["time_us"]) > 0 for row in rows)
