"""What the build produced: the compiled core, its CUDA objects when nvcc exists, and no torch linkage."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from emovec import _ext


def nvcc_present() -> bool:
    return shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")


def test_extension_is_built():
    assert _ext.has_cpp_library, f"emovec._C failed to import: {_ext.import_error}"


@pytest.mark.skipif(not nvcc_present() or os.environ.get("EMOVEC_CUDA") == "0", reason="no nvcc, or EMOVEC_CUDA=0")
def test_cuda_objects_compiled_when_nvcc_exists():
    assert _ext.cuda_compiled(), "nvcc is on this machine but emovec._C reports no CUDA kernels"
    assert {"80", "90"} <= set(_ext.cuda_architectures())


def test_extension_does_not_link_torch():
    if not _ext.has_cpp_library or not shutil.which("ldd"):
        pytest.skip("needs the extension and ldd")
    output = subprocess.run(["ldd", _ext._C.__file__], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in output.splitlines() if line.strip()]  # library names, not addresses
    assert names and not any(n.startswith(("libtorch", "libc10")) for n in names), names


def test_no_torch_headers_in_compiled_sources():
    root = os.path.join(os.path.dirname(__file__), "..")
    for folder in ("src", "csrc", "kernels"):
        for name in os.listdir(os.path.join(root, folder)):
            text = open(os.path.join(root, folder, name), encoding="utf-8").read()
            assert "torch/" not in text and "ATen" not in text, f"{folder}/{name} includes torch"
