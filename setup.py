"""Build of emovec._C through CMake (see CMakeLists.txt). Metadata lives in pyproject.toml.

EMOVEC_CUDA: unset = compile CUDA when nvcc is found, 0 = never, 1 = required (error without nvcc).
EMOVEC_NATIVE=0 builds a portable CPU kernel (no -march=native). EMOVEC_CUDA_ARCHITECTURES overrides "80;90".
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def find_nvcc() -> str | None:
    for candidate in (shutil.which("nvcc"), os.environ.get("CUDACXX"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        want_cuda = os.environ.get("EMOVEC_CUDA", "")
        nvcc = find_nvcc()
        if want_cuda == "1" and nvcc is None:
            raise RuntimeError("EMOVEC_CUDA=1 but nvcc was not found: put nvcc on PATH or set CUDACXX")
        use_cuda = nvcc is not None and want_cuda != "0"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DEMOVEC_CUDA={'ON' if use_cuda else 'OFF'}",
            f"-DEMOVEC_NATIVE={'OFF' if os.environ.get('EMOVEC_NATIVE') == '0' else 'ON'}",
        ]
        if use_cuda:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            if os.environ.get("EMOVEC_CUDA_ARCHITECTURES"):
                args.append(f"-DEMOVEC_CUDA_ARCHITECTURES={os.environ['EMOVEC_CUDA_ARCHITECTURES']}")
        if shutil.which("ninja"):
            args.append("-GNinja")
        print(f"emovec: building _C with CUDA {'ON (' + nvcc + ')' if use_cuda else 'OFF'}", flush=True)
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = str(max(1, min(os.cpu_count() or 1, 8)))
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


setup(
    ext_modules=[Extension("emovec._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
