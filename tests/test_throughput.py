"""benchmarks/throughput.py runs end to end (a short schedule; its figures are not checked here:
performance targets live in the benchmarks, not in unit tests)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILTIN = os.path.join(ROOT, "ldmfast", "weights", "shapes.safetensors")


def run_bench(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"),
                           "--device", "cpu", "--steps", "2", *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=env)


@pytest.mark.skipif(not os.path.exists(BUILTIN), reason="the built-in model is not shipped")
def test_builtin_preset_times_both_sides_on_the_same_weights(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "r.csv"
    r = run_bench("--preset", "shapes", "--providers", "ldmfast,diffusers", "--rounds", "2",
                  "--images", str(tmp_path), "--csv", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    # the parity check ran (and passed) before anything was timed
    assert "ldmfast vs diffusers U-Net relative error" in r.stdout
    assert "judged from the pixels" in r.stdout
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".png")) == \
        ["shapes-diffusers.png", "shapes-ldmfast.png"]
    rows = list(csv.DictReader(open(out)))
    assert {row["provider"] for row in rows} == {"ldmfast", "diffusers", "floor"}
    timed = [row for row in rows if row["op"] != "parity"]
    assert all(row["note"] == ("preset=shapes" if row["provider"] == "floor" else "preset=shapes rounds=2")
               for row in timed)
    assert "medians of 2 rounds" in r.stdout
    # the output parity of the target, from the same noise (float32 here: near exact)
    (par,) = [row for row in rows if row["op"] == "parity"]
    fields = dict(kv.split("=") for kv in par["note"].split())
    assert float(fields["latent_rel_err"]) < 1e-4 and float(fields["psnr_db"]) > 60
    assert "final latents relative error" in r.stdout


def test_unknown_provider_is_a_usage_error(tmp_path):
    r = run_bench("--providers", "ldmfast,tensorflow", "--csv", str(tmp_path / "r.csv"))
    assert r.returncode == 2 and "unknown provider 'tensorflow'" in r.stderr
    assert not (tmp_path / "r.csv").exists()


def test_zero_rounds_is_a_usage_error(tmp_path):
    r = run_bench("--rounds", "0", "--csv", str(tmp_path / "r.csv"))
    assert r.returncode == 2 and "--rounds and --repeats must be >= 1" in r.stderr
    assert not (tmp_path / "r.csv").exists()
