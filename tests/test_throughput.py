"""benchmarks/throughput.py runs end to end (a short schedule; its figures are not checked here:
performance targets live in the benchmarks, not in unit tests)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

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


# ---- argument checks, in process: the model builders are stubbed, so a run that passes the checks
# stops where the model would be built (nothing is timed) ----------------------------------------

class _Built(Exception):
    pass


def run_main(monkeypatch, capsys, *args):
    """(exit code, or "built" when the checks passed; stdout; stderr) of throughput.main."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import throughput

    def stop(*a, **k):
        raise _Built
    for name in ("build", "load_builtin", "build_ldmfast_only"):
        monkeypatch.setattr(throughput, name, stop)
    try:
        throughput.main(["--device", "cpu", *args])
        code = 0
    except _Built:
        code = "built"
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_zero_sizes_and_steps_are_usage_errors(monkeypatch, capsys):
    # 0 used to be replaced by the preset's value (64x64, 50 steps) instead of being refused
    code, _, err = run_main(monkeypatch, capsys, "--height", "0", "--width", "0")
    assert code == 2 and "--height/--width must be positive multiples of" in err and "got 0x0" in err
    code, _, err = run_main(monkeypatch, capsys, "--steps", "0")
    assert code == 2 and "--steps must be >= 1, got 0" in err
    code, _, err = run_main(monkeypatch, capsys, "--batch", "0")
    assert code == 2 and "--batch must be >= 1, got 0" in err
    # the cpu preset's VAE (f = 8) and U-Net (3 halvings) need multiples of 64: 32x40 used to
    # pass here and fail deep in the U-Net
    code, _, err = run_main(monkeypatch, capsys, "--preset", "cpu", "--height", "32", "--width", "40")
    assert code == 2 and "multiples of 64 for preset cpu, got 32x40" in err
    code, out, _ = run_main(monkeypatch, capsys, "--preset", "cpu", "--height", "64", "--width", "128", "--steps", "1")
    assert code == "built" and "64x128" in out and "1 DDIM steps" in out


@pytest.mark.parametrize("device", ["foo", "meta", "cuda:99"])
def test_bad_device_is_a_usage_error(monkeypatch, capsys, device):
    # --device foo was a raw torch traceback
    code, _, err = run_main(monkeypatch, capsys, "--device", device)
    assert code == 2 and "--device" in err and device in err and "Traceback" not in err


def test_providers_that_cannot_run_here(monkeypatch, capsys):
    # On CPU, --providers ldmfast-eager measured nothing, exited 0 and appended only the floor.
    code, out, err = run_main(monkeypatch, capsys, "--providers", "ldmfast-eager")
    assert code == 2
    assert "none of ldmfast-eager can run here (ldmfast-eager needs a CUDA device" in err
    assert "these can: ldmfast, ldmfast-ref" in err
    # some can: the others are skipped, each with a line that says why
    code, out, _ = run_main(monkeypatch, capsys, "--providers", "ldmfast,diffusers-graph,ldmfast-eager")
    assert code == "built"
    assert "skipping provider diffusers-graph: needs a CUDA device" in out
    assert "skipping provider ldmfast-eager: needs a CUDA device" in out
    assert "skipping provider ldmfast:" not in out


def test_csv_with_another_header_is_refused(monkeypatch, capsys, tmp_path):
    # Rows were appended under a foreign header, misaligned, without a word.
    other = tmp_path / "mydata.csv"
    other.write_text("name,score\nalice,10\n")
    code, _, err = run_main(monkeypatch, capsys, "--csv", str(other))
    assert code == 2 and "--csv" in err and "name,score" in err
    assert other.read_text() == "name,score\nalice,10\n"
    # a results file of these benchmarks, or a new file, is fine
    import _common
    ours = tmp_path / "ours.csv"
    _common.append_results([{"bench": "b", "provider": "p"}], torch.device("cpu"), str(ours))
    assert run_main(monkeypatch, capsys, "--csv", str(ours))[0] == "built"
    assert run_main(monkeypatch, capsys, "--csv", str(tmp_path / "new.csv"))[0] == "built"
    assert not (tmp_path / "new.csv").exists()
    # the default file (benchmarks/results/<device>.csv) is checked up front too
    default = tmp_path / "default.csv"
    default.write_text("name,score\n")
    monkeypatch.setattr(_common, "results_path", lambda device, path=None: path or str(default))
    code, _, err = run_main(monkeypatch, capsys)
    assert code == 2 and "default.csv" in err and default.read_text() == "name,score\n"


def test_append_results_refuses_another_header(monkeypatch, tmp_path):
    # The shared appender itself (bench_ops_cuda.py uses it too) checks the header.
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import _common
    path = tmp_path / "r.csv"
    _common.append_results([{"bench": "b", "provider": "p"}], torch.device("cpu"), str(path))
    _common.append_results([{"bench": "b", "provider": "q"}], torch.device("cpu"), str(path))
    assert [r["provider"] for r in csv.DictReader(open(path))] == ["p", "q"]
    path.write_text("date,provider\n")
    with pytest.raises(ValueError, match="its header is 'date,provider'.*--csv"):
        _common.append_results([{"bench": "b", "provider": "p"}], torch.device("cpu"), str(path))
    assert path.read_text() == "date,provider\n"



def test_flop_count_includes_the_fused_attention(monkeypatch):
    """The floor's FLOPs: torch has no formula for ldmfast's attention op, so throughput.py
    gives one (4 B H Lq Lk D); without it every attention layer of the U-Net was left out."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import throughput
    from ldmfast import ops

    q, k, v = torch.randn(2, 64, 3, 40), torch.randn(2, 77, 3, 40), torch.randn(2, 77, 3, 40)
    w = torch.randn(40, 40)
    flops = throughput.count_flops(lambda: ops.attention(q @ w, k, v))
    assert flops == 4 * 2 * 3 * 64 * 77 * 40 + 2 * (2 * 64 * 3) * 40 * 40


def test_use_device_gives_set_device_an_index(monkeypatch):
    """The benchmarks' default --device is "cuda": torch.cuda.set_device refuses a device with
    no index, so it is made the current one's first (the bench and throughput stages died there)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import _common as C
    from torch.cuda._utils import _get_device_index

    seen = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.append(_get_device_index(d)))
    assert C.use_device(torch.device("cuda")) == torch.device("cuda", 0) and seen == [0]
    assert C.use_device(torch.device("cuda", 1)) == torch.device("cuda", 1) and seen == [0, 1]
    assert C.use_device(torch.device("cpu")) == torch.device("cpu") and seen == [0, 1]


# ---- a provider that fails costs only its own figures ----------------------------------------

def _run_real(monkeypatch, capsys, *args):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    import throughput
    try:
        throughput.main(["--device", "cpu", "--steps", "2", "--rounds", "1", *args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _failing_accelerate(monkeypatch, message):
    """accelerate(pipe) raises `message` (restoring still works): the diffusers+ldmfast provider fails."""
    pytest.importorskip("diffusers")
    import ldmfast.dropin

    def boom(*a, **k):
        if not k.get("restore"):
            raise RuntimeError(message)
    monkeypatch.setattr(ldmfast.dropin, "accelerate", boom)


@pytest.mark.skipif(not os.path.exists(BUILTIN), reason="the built-in model is not shipped")
def test_a_failing_provider_is_reported_and_the_others_kept(monkeypatch, capsys, tmp_path):
    _failing_accelerate(monkeypatch, "boom in accelerate")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after --cudnn-benchmark
    out = tmp_path / "r.csv"
    code, stdout, stderr = _run_real(monkeypatch, capsys, "--preset", "shapes", "--providers",
                                     "ldmfast,diffusers+ldmfast,diffusers", "--csv", str(out), "--cudnn-benchmark")
    assert code != 0 and "diffusers+ldmfast: RuntimeError: boom in accelerate" in str(code)
    assert "provider diffusers+ldmfast FAILED" in stdout and "Traceback" in stderr
    assert "ldmfast (round 1/1): step" in stdout and "diffusers (round 1/1): step" in stdout
    rows = list(csv.DictReader(open(out)))
    assert {row["provider"] for row in rows} == {"ldmfast", "diffusers", "floor"}
    assert all(row["layout"] == "NCHW" for row in rows if row["provider"] != "floor")
    # --cudnn-benchmark: set for the whole run, and said in every provider's rows
    assert torch.backends.cudnn.benchmark
    assert all("cudnn_benchmark=1" in row["note"] for row in rows if row["provider"] in ("ldmfast", "diffusers"))
    # the parity line still ran, between the providers that did
    assert [row["provider"] for row in rows if row["op"] == "parity"] == ["ldmfast"]


@pytest.mark.skipif(not os.path.exists(BUILTIN), reason="the built-in model is not shipped")
def test_a_run_in_which_every_provider_fails_appends_nothing(monkeypatch, capsys, tmp_path):
    _failing_accelerate(monkeypatch, "no accelerating today")
    out = tmp_path / "r.csv"
    code, stdout, _ = _run_real(monkeypatch, capsys, "--preset", "shapes", "--providers", "diffusers+ldmfast",
                                "--csv", str(out))
    assert code != 0 and "diffusers+ldmfast: RuntimeError: no accelerating today" in str(code)
    assert not out.exists() and "results appended" not in stdout
