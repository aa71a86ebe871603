"""The torch-free CMake build: every CPU kernel with g++, every .cu with nvcc, no torch at all.

This is how CI compile-checks the CUDA code on a machine without a GPU (one arch, to keep the
run short). Skipped, visibly, when nvcc is absent, unless LDMFAST_REQUIRE_NVCC=1 (CI sets it).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    cand = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    return cand if os.path.exists(cand) else None


def _cutlass_dir():
    import cutlass_library

    return os.path.join(os.path.dirname(cutlass_library.__file__), "source")


def _cmake(tmp_path, *extra):
    """Configures and builds; returns the build dir and the build's output, each compiler
    command's output in one piece: Ninja prints it so, other generators get one job."""
    build = tmp_path / "build"
    cfg = ["cmake", "-S", ROOT, "-B", str(build), "-DLDMFAST_WITH_TORCH=OFF", *extra]
    ninja = shutil.which("ninja") is not None
    if ninja:
        cfg += ["-G", "Ninja"]
    subprocess.run(cfg, check=True, capture_output=True, text=True)
    jobs = (os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)) if ninja else "1"
    res = subprocess.run(["cmake", "--build", str(build), "--parallel", jobs, "--verbose"],
                         capture_output=True, text=True)
    assert res.returncode == 0, f"build failed:\n{res.stdout[-8000:]}\n{res.stderr[-8000:]}"
    return build, res.stdout + res.stderr


def test_cpu_kernels_build_without_torch(tmp_path):
    build, log = _cmake(tmp_path, "-DLDMFAST_WITH_CUDA=OFF")
    assert glob.glob(str(build / "libldmfast_cpu_kernels.a"))
    for src in glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")):
        assert os.path.basename(src) in log, f"{src} was not compiled"
    assert "site-packages/torch" not in log


def test_kernels_and_contracts_include_no_torch():
    """STYLE.md section 1: torch headers appear only in csrc/torch/."""
    for sub in ("include", "cpu", "cuda"):
        for path in glob.glob(os.path.join(ROOT, "csrc", sub, "**", "*.*"), recursive=True):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.lstrip().startswith("#include"):
                        assert not any(t in line for t in ("torch/", "c10/", "ATen/")), f"{path}: {line.strip()}"


def test_cuda_kernels_compile_without_torch(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        if os.environ.get("LDMFAST_REQUIRE_NVCC") == "1":
            pytest.fail("nvcc not found, but LDMFAST_REQUIRE_NVCC=1 requires the CUDA compile check")
        pytest.skip("nvcc not found: the CUDA compile check needs the CUDA toolkit")
    sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    assert sources, "no CUDA sources found in csrc/cuda"
    arch = os.environ.get("LDMFAST_CUDA_ARCHS", "90a")
    build, log = _cmake(tmp_path, "-DLDMFAST_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}",
                        f"-DCUTLASS_DIR={_cutlass_dir()}", f"-DLDMFAST_CUDA_ARCHS={arch}",
                        "-DCMAKE_CUDA_FLAGS=-Xptxas=-v")
    assert glob.glob(str(build / "libldmfast_cuda_kernels.a"))
    for src in sources:
        assert os.path.basename(src) in log, f"{src} was not compiled"
    _check_ptxas_report(log)
    _check_error_reporting(build, arch)


def _check_ptxas_report(log):
    """What ptxas -v said of the build: no "Potential Performance Loss" advisory (C7513: wgmma
    serialised, given when ordinary code writes a wgmma's registers inside its asynchronous
    window, e.g. at a branch's join; C7508: setmaxnreg dropped) and no sm_90a wgmma attention
    kernel that spills. None of them fails a compile, and none shows without a GPU any other way."""
    assert "Function properties for" in log, "no ptxas -v report in the build log"
    lost = [line for line in log.splitlines() if "Potential Performance Loss" in line]
    assert not lost, "\n".join(lost)[:4000]
    arch, archs, func, wgmma = None, set(), None, 0
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '\w+' for '(\w+)'", line)
        if m:
            arch = m.group(1)  # ptxas reports each function's properties right after this line
            archs.add(arch)
            continue
        m = re.search(r"Function properties for (\w+)", line)
        if m:
            func = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and func is not None and "attention_wgmma_kernel" in func and arch == "sm_90a":
            wgmma += 1
            assert m.group(1) == "0", f"{func}: {line.strip()}"
    assert wgmma > 0 or "sm_90a" not in archs, "no sm_90a wgmma kernel in the ptxas report"


def _check_error_reporting(build, arch):
    """A host program linked against the kernel library alone: the strings a failed launch is
    explained with (no GPU needed to name an error)."""
    src = build / "errors_main.cpp"
    src.write_text(
        '#include <cstdio>\n#include "ldmfast/common.h"\n'
        "int main() {\n"
        '  std::printf("%s\\n%s\\n%d\\n", ldmfast::cuda::error_string(209), ldmfast::cuda::built_archs(),\n'
        "              ldmfast::cuda::device_compute_capability());\n}\n")
    # The static cudart CMake found for the kernels: no runtime library path needed to run it.
    cache = (build / "CMakeCache.txt").read_text()
    cudart = next(line.split("=", 1)[1] for line in cache.splitlines()
                  if line.startswith("CUDA_cudart_static_LIBRARY:"))
    exe = build / "errors_main"
    res = subprocess.run([shutil.which("g++") or "g++", "-std=c++17", f"-I{os.path.join(ROOT, 'csrc', 'include')}",
                          str(src), str(build / "libldmfast_cuda_kernels.a"), cudart, "-ldl", "-lpthread", "-lrt",
                          "-o", str(exe)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    name, archs, cc = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    assert name.startswith("cudaErrorNoKernelImageForDevice: "), name
    assert archs == arch.replace(";", ",")
    import torch

    # No device (CPU torch, or no GPU): the capability reads as 0, and the query's error is cleared.
    want = 0
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        want = 10 * major + minor
    assert int(cc) == want


def test_cuda_binding_parses_with_cpu_torch():
    """csrc/torch/cuda_ops.cpp is built only where CUDA is; here its C++ is at least checked
    (g++ -fsyntax-only -DUSE_CUDA against the CPU torch's headers), so a binding error does not
    wait for a GPU session to show."""
    from torch.utils import cpp_extension
    import sysconfig

    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    # C++17 as CMakeLists.txt builds it (torch 2.11 on the GPU machine is C++17); torch's own
    # headers as system headers (2.13's use C++20 extensions), so only our code must be C++17.
    cmd = [gxx, "-std=c++17", "-pedantic-errors", "-fsyntax-only", "-DUSE_CUDA",
           *(f"-isystem{p}" for p in cpp_extension.include_paths()), f"-I{sysconfig.get_paths()['include']}",
           f"-I{os.path.join(ROOT, 'csrc', 'include')}", f"-I{os.path.join(ROOT, 'csrc', 'torch')}",
           os.path.join(ROOT, "csrc", "torch", "cuda_ops.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-8000:]


def test_cuda_archs_are_checked_at_configure(tmp_path):
    """An arch that is neither SASS ("90a") nor PTX ("90-virtual") stops the configure step with
    a message naming LDMFAST_CUDA_ARCHS, instead of an nvcc error deep in the build."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: configuring the CUDA build needs the CUDA toolkit")
    res = subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path / "build"), "-DLDMFAST_WITH_TORCH=OFF",
                          "-DLDMFAST_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}",
                          f"-DCUTLASS_DIR={_cutlass_dir()}", "-DLDMFAST_CUDA_ARCHS=90a;sm_100"],
                         capture_output=True, text=True)
    assert res.returncode != 0
    assert "LDMFAST_CUDA_ARCHS: 'sm_100'" in res.stderr


def test_a_cuda_library_that_does_not_load_leaves_the_cpu_ops(monkeypatch, caplog):
    """_C_cuda built against another torch fails to load (undefined symbols): a warning naming
    it and how to rebuild, and `import ldmfast` keeps working on the CPU."""
    import torch

    from ldmfast.ops import _library

    assert _library._state["cpu"] is not None  # the CPU library is loaded (import of ldmfast.ops)
    loaded = []

    def load_library(path):
        if "_C_cuda" in path:
            raise OSError(f"{path}: undefined symbol: _ZN3c104cuda9SetDeviceEa")
        loaded.append(path)
    monkeypatch.setattr(_library, "_state", {"cpu": None, "cuda": None})
    monkeypatch.setattr(_library, "_find", lambda stem: f"/x/{stem}.so")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.ops, "load_library", load_library)
    with caplog.at_level("WARNING", logger="ldmfast"):
        _library.load()
    assert loaded == ["/x/_C.so"] and not _library.cuda_loaded()
    assert "could not load its CUDA kernels /x/_C_cuda.so" in caplog.text and "undefined symbol" in caplog.text


def _needed(lib):
    out = subprocess.run(["readelf", "-d", str(lib)], check=True, capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


@pytest.mark.skipif(shutil.which("readelf") is None or shutil.which("cmake") is None,
                    reason="needs readelf and cmake")
def test_torch_library_shares_libstdcxx_under_a_static_toolchain(tmp_path):
    # torch catches what the op libraries throw (every TORCH_CHECK); a libstdc++ linked in
    # statically has an exception runtime of its own: on the GPU machine the first error raised
    # from _C_cuda crashed the process.
    import sys

    build = tmp_path / "build"
    # Both ways a toolchain links it statically: the flag, and (the GPU machine's case) a -L dir,
    # there from the CUDA host compiler, that holds libstdc++.a and no libstdc++.so.
    static = tmp_path / "static"
    static.mkdir()
    archive = subprocess.run(["c++", "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    flags = "-static-libstdc++"
    if os.path.isabs(archive) and os.path.exists(archive):
        os.symlink(archive, static / "libstdc++.a")
        flags += f" -L{static}"
    env = dict(os.environ, LDFLAGS=flags)
    cfg = ["cmake", "-S", ROOT, "-B", str(build), "-DLDMFAST_WITH_TORCH=ON", "-DLDMFAST_WITH_CUDA=OFF",
           f"-DPython3_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"]
    if shutil.which("ninja"):
        cfg += ["-G", "Ninja"]
    subprocess.run(cfg, check=True, capture_output=True, text=True, env=env)
    jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
    res = subprocess.run(["cmake", "--build", str(build), "--target", "_C", "--parallel", jobs],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    needed = _needed(build / "_C.so")
    assert any(n.startswith("libstdc++.so") for n in needed), needed


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf")
def test_installed_op_libraries_share_libstdcxx():
    libs = [p for p in (os.path.join(ROOT, "ldmfast", n) for n in ("_C.so", "_C_cuda.so")) if os.path.exists(p)]
    if not libs:
        pytest.skip("the op libraries are not built in this tree")
    for lib in libs:
        assert any(n.startswith("libstdc++.so") for n in _needed(lib)), (lib, _needed(lib))
