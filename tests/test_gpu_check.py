"""scripts/gpu_check.sh is the lent GPU's whole session: a slip in it costs device minutes, so its
control flow is checked here without a GPU (the stages themselves need one)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(cwd, *args, out, **extra):
    # The test's python first on PATH: the script calls python3 (torch for the build stamp).
    env = dict(os.environ, OUT=str(out), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               **extra)
    env.pop("PYTHONPATH", None)
    return subprocess.run(["bash", os.path.join(cwd, "scripts", "gpu_check.sh"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_script_parses():
    r = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_unknown_stage_refused_before_any_work(tmp_path):
    r = _run(ROOT, "build", "tset", out=tmp_path)
    assert r.returncode == 2
    assert "unknown stage 'tset'" in r.stdout
    # Everything printed also lands in console.txt, one of the few files the device tool returns.
    assert "unknown stage 'tset'" in (tmp_path / "console.txt").read_text()
    assert not (tmp_path / "logs.tar.gz").exists()  # refused before the build


@pytest.fixture
def tree(tmp_path):
    """What the build stamp reads (csrc, setup.py, CMakeLists.txt), the script and the package."""
    t = tmp_path / "tree"
    for d in ("csrc", "scripts"):
        shutil.copytree(os.path.join(ROOT, d), t / d)
    shutil.copytree(os.path.join(ROOT, "ldmfast"), t / "ldmfast",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", ".build_stamp"))
    for f in ("setup.py", "CMakeLists.txt"):
        shutil.copy(os.path.join(ROOT, f), t / f)
    return t


def _carry(tree, stamp):
    """A .gpu_build/build.tar.gz as an earlier call's $OUT/build.tar.gz holds it."""
    (tree / ".gpu_build").mkdir(exist_ok=True)
    so = tree / "_C_cuda.fake.so"
    so.write_bytes(b"not a library")
    st = tree / "stamp"
    st.write_text(stamp + "\n")
    with tarfile.open(tree / ".gpu_build" / "build.tar.gz", "w:gz") as tf:
        tf.add(so, "ldmfast/_C_cuda.fake.so")
        tf.add(st, "ldmfast/.build_stamp")


def test_carried_build_used_only_while_its_sources_match(tree, tmp_path):
    r = _run(tree, "stamp", out=tmp_path / "o0")
    stamp = r.stdout.strip().splitlines()[-1]
    assert r.returncode == 0 and len(stamp) == 16, r.stdout + r.stderr
    _carry(tree, stamp)
    # Matching stamp: unpacked instead of built (the fake library then fails the load check).
    r = _run(tree, "build", out=tmp_path / "o1")
    assert f"== build: the carried .gpu_build/build.tar.gz ({stamp})" in r.stdout, r.stdout
    assert (tree / "ldmfast" / "_C_cuda.fake.so").exists()
    assert r.returncode == 1
    with tarfile.open(tmp_path / "o1" / "logs.tar.gz") as tf:
        assert "./build.log" not in tf.getnames()  # no build was started
    # Any source change makes a new stamp, and the carried build is not used.
    (tree / "ldmfast" / "_C_cuda.fake.so").unlink()
    with open(tree / "csrc" / "cuda" / "ddim_step.cu", "a") as f:
        f.write("\n// changed\n")
    r = _run(tree, "stamp", out=tmp_path / "o2")
    assert r.stdout.strip().splitlines()[-1] != stamp
    # (An arch CMake refuses: the build fails at configure on any machine, before pip installs.)
    r = _run(tree, "build", out=tmp_path / "o3", LDMFAST_CUDA_ARCHS="bogus")
    assert "the carried" not in r.stdout and "== build (" in r.stdout
    assert not (tree / "ldmfast" / "_C_cuda.fake.so").exists()
    # The failed build's log came back packed.
    with tarfile.open(tmp_path / "o3" / "logs.tar.gz") as tf:
        assert "./build.log" in tf.getnames()
