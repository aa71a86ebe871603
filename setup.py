"""Builds ldmfast's op libraries by driving CMake (CMakeLists.txt is the build description).

    pip install --no-build-isolation -e .      # with torch already installed

Environment: LDMFAST_CUDA=1 forces the CUDA kernels, LDMFAST_CUDA=0 forces a CPU-only build
(default: CUDA when nvcc is found and torch is a CUDA build); LDMFAST_CUDA_ARCHS="80;90a;90-virtual"
overrides the archs; CUTLASS_DIR points at a directory holding include/cute; MAX_JOBS limits
the parallel compile jobs.
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    import torch

    flag = os.environ.get("LDMFAST_CUDA", "").strip()
    if flag == "0":
        return False, "LDMFAST_CUDA=0"
    if flag == "1":
        return True, "LDMFAST_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if shutil.which("nvcc") is None and not os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        return False, "nvcc was not found"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda} and nvcc found"


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt, then places _C (and _C_cuda) in the package."""

    def run(self):
        cuda, why = _want_cuda()
        build_dir = os.path.join(ROOT, "build", "cuda" if cuda else "cpu")
        os.makedirs(build_dir, exist_ok=True)
        out_dir = os.path.join(build_dir, "lib")
        args = [
            "cmake", "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython3_EXECUTABLE={sys.executable}", "-DLDMFAST_WITH_TORCH=ON",
            f"-DLDMFAST_WITH_CUDA={'ON' if cuda else 'OFF'}", f"-DLDMFAST_OUTPUT_DIR={out_dir}",
        ]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        if os.environ.get("LDMFAST_CUDA_ARCHS"):
            args.append(f"-DLDMFAST_CUDA_ARCHS={os.environ['LDMFAST_CUDA_ARCHS']}")
        if os.environ.get("CUTLASS_DIR"):
            args.append(f"-DCUTLASS_DIR={os.environ['CUTLASS_DIR']}")
        if cuda:
            print(f"ldmfast: building the CPU and CUDA kernels ({why})", flush=True)
        else:
            print(f"ldmfast: building the CPU kernels only ({why})", flush=True)
        # Configured every time (seconds): a changed LDMFAST_CUDA_ARCHS or CUTLASS_DIR reaches the
        # cache, and a configure that failed (it still leaves a cache behind) is tried again.
        subprocess.check_call(args)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call(["cmake", "--build", build_dir, "--parallel", jobs])
        for ext in self.extensions:
            name = ext.name.split(".")[-1]
            built = os.path.join(out_dir, name + ".so")
            if not os.path.exists(built):
                continue  # _C_cuda in a CPU-only build
            dest = self.get_ext_fullpath(ext.name)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            # Replace atomically: a process that has the old library mapped keeps working.
            tmp = dest + ".tmp"
            shutil.copyfile(built, tmp)
            os.replace(tmp, dest)
        if not cuda:
            for stale in (self.get_ext_fullpath("ldmfast._C_cuda"),):
                if os.path.exists(stale):
                    os.remove(stale)

    def get_ext_filename(self, fullname):
        # Plain names (_C.so): these are torch op libraries loaded with torch.ops.load_library,
        # not Python extension modules.
        return os.path.join(*fullname.split(".")) + ".so"


setup(
    name="ldmfast",
    version="0.1.0",
    description="Fast Latent Diffusion Models: fused C++/CUDA kernels under a thin PyTorch model layer",
    packages=find_packages(include=["ldmfast", "ldmfast.*"]),
    package_data={"ldmfast": ["*.so", "weights/*.safetensors"]},
    ext_modules=[Extension("ldmfast._C", sources=[]), Extension("ldmfast._C_cuda", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    # torch is deliberately not listed: pip would resolve it to a CUDA wheel of several GB.
    # Install the torch you want first (2.6 or newer), then this package without build isolation.
    install_requires=["numpy", "safetensors", "tqdm", "pillow", "pyyaml"],
    extras_require={
        "export": ["onnx", "onnxruntime", "onnxscript"],
        "interop": ["diffusers", "transformers"],
        "test": ["pytest", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["ldmfast=ldmfast.cli:main"]},
)
