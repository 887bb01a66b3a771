"""benchmarks/kernel_report.py in CI: every kernel configuration the dispatcher can choose compiles for sm_90 and
sm_80 (no GPU needed) without spilling, and the monitoring projection uses tensor-core instructions and pipelines its
loads through shared memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_no_dispatched_kernel_spills_and_prefill_uses_tensor_cores(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for the GPU target
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_report.py"), "--fail-on-spill", "--out",
                           str(out)], capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["cuda"] + report["triton"]
    assert not [r for r in rows if "error" in r], [r for r in rows if "error" in r]
    assert {r["arch"] for r in report["triton"]} == {"sm_90", "sm_80"} and len(report["cuda"]) == 30
    assert all(r["spill_bytes"] == 0 for r in rows)
    for r in report["triton"]:
        if "monitor prefill" in r["config"]:
            assert r["tensor_cores"] == ("wgmma" if r["arch"] == "sm_90" else "mma.sync"), r
            # compiled as the device's JIT would (aligned pointers, strides of 16): loads pipelined (cp.async)
            assert r["async_copies"] > 0, r
        if r["blocks"].startswith("broadcast-sum"):  # exact fp32 sums: no product Triton would run in TF32
            assert r["dot_ops"] == 0, r
    assert any(r["config"].startswith("steer + ablate") for r in report["triton"])
    assert report["roofline"] and all(r["H200 bound_us"] > 0 for r in report["roofline"])
    assert [r["blocks"] for r in report["decode"] if r["N"] == 1] == [171, 171]  # every SM busy at N = 1


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_every_cuda_kernel_instantiation_compiles_without_spills(tmp_path):
    """The CUDA half of the report alone (nvcc only, ~20 s): the edit kernel and the projection kernel with one and
    four probes per block, for every <h, weights> dtype pair the launcher dispatches, on sm_90 and sm_80."""
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_report.py"), "--only", "cuda",
                           "--fail-on-spill", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["cuda"]
    assert not [r for r in rows if "error" in r], rows
    pairs = {"fp32/fp32", "fp16/fp16", "fp16/fp32", "bf16/bf16", "bf16/fp32"}
    kernels = {"cuda edit", "cuda project KT=1", "cuda project KT=4"}
    for arch in ("sm_90", "sm_80"):
        found = {(r["kernel"], r["config"]) for r in rows if r["arch"] == arch}
        assert found == {(k, p) for k in kernels for p in pairs}, (arch, found)
    assert all(r["spill_bytes"] == 0 and 0 < r["registers"] <= 255 for r in rows), rows
