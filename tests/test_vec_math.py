"""Accuracy of the CPU kernels' exp functions (csrc/cpu/vec_math.h) against double-precision libm.

tests/cpp/vec_math_check.cpp evaluates them in vectorised loops over dense grids, compiled with
the kernels' flags; the bounds are the header's claims.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    exe = tmp_path_factory.mktemp("vec_math") / "check"
    subprocess.run([gxx, "-std=c++17", "-O3", "-march=native", "-fno-math-errno", "-fopenmp",
                    f"-I{os.path.join(ROOT, 'csrc', 'cpu')}", f"-I{os.path.join(ROOT, 'csrc', 'include')}",
                    os.path.join(ROOT, "tests", "cpp", "vec_math_check.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {line.split()[0]: line.split()[1:] for line in out.splitlines()}


@pytest.mark.parametrize("name,bound", [
    ("exp2_approx", 1.0),        # "within about 1 ulp"
    ("exp_approx", 1.0),
    ("exp2_nonpositive", 2.5),   # the softmax's exp2: "about 2 ulp" on [-126, 0]
    ("exp2_nonpositive_unit", 2.5),
])
def test_max_ulp_error(results, name, bound):
    assert float(results[name][0]) <= bound, f"{name}: {results[name][0]} ulp"


def test_special_values(results):
    # exp2_nonpositive: 2^0 = 1 exactly, -inf -> 0, NaN -> NaN, below 2^-127 -> 0;
    # exp2_approx: -inf -> 0, inf -> inf, NaN -> NaN
    assert results["special"] == ["1"] * 5
