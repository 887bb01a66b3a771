"""Kernel report without a GPU: compile every kernel configuration the dispatcher can choose for sm_90 and sm_80 and
print registers, spills, shared memory and the tensor-core instructions used, plus a roofline model per benchmark
shape (the bytes and FLOPs the op must do, and the time they bound on an H100 / H200) and, for decode, the CUDA
kernels' grid and bound (launches + probes read once).

    python benchmarks/kernel_report.py                    # everything (nvcc + Triton's compiler; a few minutes)
    python benchmarks/kernel_report.py --only cuda        # or --only triton, --only roofline, --only decode
    python benchmarks/kernel_report.py --fail-on-spill    # exit 1 when a dispatched configuration spills

CUDA: ``nvcc -Xptxas -v`` on src/cuda_launch.cu (every instantiation of the two kernels: the edit kernel per <h, weight>
dtype pair, the projection kernel per pair and probe tile KT = 1 / 4). Triton: the kernel compiled
with ``triton.compile`` for a CUDA target (no device needed), its PTX assembled again with Triton's bundled ``ptxas
-v`` for the register and spill counts, and searched for ``wgmma`` / ``mma.sync``. The Triton configurations are the
launcher's own choices (``emovec.triton.steer_project.plan``) for the runtime's real arguments; for the
projection-only kernel (monitoring prefill), which is autotuned on a GPU, every candidate it can pick
(``projection_configs``), each compiled with a center and norms (the most registers). Writes
``benchmarks/results/kernel_report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Assumed device figures (datasheets, dense): memory bandwidth and peak throughput.
DEVICES = {
    "H100 SXM": {"bandwidth_tbs": 3.35, "bf16_tflops": 989.0, "fp32_tflops": 67.0, "sms": 132},
    "H200": {"bandwidth_tbs": 4.8, "bf16_tflops": 989.0, "fp32_tflops": 67.0, "sms": 132},
}
LAUNCH_US = 3.0  # an empty kernel launch, as measured on such machines (order of magnitude)
L2_TBS = 5.5  # L2 read bandwidth of an H100 / H200 die (microbenchmarks report ~5.5-7 TB/s): an assumption
# the CUDA projection kernel's tiling (kernels/steer_project.cuh: kRows; src/cuda_launch.cu: kWideTile)
CUDA_ROWS_PER_BLOCK = 8
CUDA_WIDE_TILE = 4

# ----------------------------------------------------------------------------------------------------------- CUDA

_CUDA_TYPES = (("13__nv_bfloat16", "bf16"), ("6__half", "fp16"), ("f", "fp32"))
_CUDA_ROLES = {
    "edit_rows_kernel": "steer / ablate / clamp rows, one block per row at decode (2nd launch only when editing)",
    "project_rows_kernel": "scores + norms + capture, (probe tile x 8-row group) grid",
}


def _kernel_config(mangled: str) -> tuple[str, str]:
    """(kernel, '<h>/<weights>') of a mangled edit_rows_kernel / project_rows_kernel name, e.g. ('project KT=4',
    'bf16/fp32')."""
    m = re.search(r"(edit_rows_kernel|project_rows_kernel)I(.*)EEvN", mangled)
    if m is None:
        return mangled, ""
    kernel, rest = m.groups()
    types, tile = [], None
    while rest:
        for token, name in _CUDA_TYPES:
            if rest.startswith(token):
                types.append(name)
                rest = rest[len(token):]
                break
        else:
            sub = re.match(r"S\d*_", rest)  # a repeated type: the weights in h's dtype
            literal = re.match(r"Li(\d+)E", rest)
            if sub:
                types.append(types[0])
                rest = rest[sub.end():]
            elif literal:
                tile = int(literal.group(1))
                rest = rest[literal.end():]
            else:
                return mangled, ""
    label = "edit" if kernel == "edit_rows_kernel" else f"project KT={tile}"
    return label, "/".join(types)


def cuda_report(arch: str) -> list[dict]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return [{"arch": arch, "kernel": "cuda", "error": "nvcc not found"}]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-std=c++17", f"-arch={arch}", "-O3", "--use_fast_math", "-Xptxas", "-v", "-c",
               str(ROOT / "src" / "cuda_launch.cu"), "-o", str(Path(tmp) / "k.o")]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return [{"arch": arch, "kernel": "cuda", "error": done.stderr.strip()[-500:]}]
    rows, current = [], None
    for line in done.stderr.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            kernel, dtypes = _kernel_config(m.group(1))
            current = {"arch": arch, "kernel": f"cuda {kernel}", "config": dtypes, "dispatched": True}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            m2 = re.search(r"(\d+) bytes smem", line)
            current["static_smem"] = int(m2.group(1)) if m2 else 0
    for row in rows:
        row["dynamic_smem"] = "rows x d x 4 B (d = 4096: 16 KB)" if row["kernel"] == "cuda edit" else 0
        row["tensor_cores"] = "none (CUDA-core fp32 dots)"
    return rows


# --------------------------------------------------------------------------------------------------------- Triton

def triton_configs() -> list[dict]:
    """The launcher's choices for the runtime's real arguments (see emovec.triton.steer_project)."""
    base = dict(n=32768, d=4096)
    return [
        {"name": "monitor prefill bf16 h, fp32 probes", "h": "bf16", "w": "fp32", "k": 171, "scores": True, **base},
        {"name": "monitor prefill bf16 h, bf16 probes", "h": "bf16", "w": "bf16", "k": 171, "scores": True, **base},
        {"name": "monitor prefill fp16 h, fp32 probes", "h": "fp16", "w": "fp32", "k": 171, "scores": True, **base},
        {"name": "monitor prefill fp32", "h": "fp32", "w": "fp32", "k": 171, "scores": True, **base},
        {"name": "steer prefill bf16 (table, no probes)", "h": "bf16", "w": "bf16", "k": 0, "table": True, **base},
        {"name": "extraction capture bf16 (segments)", "h": "bf16", "w": "bf16", "k": 0, "capture": True, **base},
        {"name": "regulate prefill bf16 (1 clamp)", "h": "bf16", "w": "fp32", "k": 0, "clamp": 1, **base},
        {"name": "steer + ablate 3 + regulate 2, fp32", "h": "fp32", "w": "fp32", "k": 0, "table": True, "ablate": 3,
         "clamp": 2, **base},
        {"name": "monitor decode bf16 N=8 (no CUDA ext)", "h": "bf16", "w": "fp32", "k": 171, "scores": True,
         "n": 8, "d": 4096},
    ]


def _jit_attrs(signature: dict, values: dict) -> dict:
    """The specialization Triton's JIT gives a launch on a device, for ``triton.compile``: every pointer 16-byte
    aligned (torch's allocations are) and every integer argument whose value (``values``) is a multiple of 16 marked
    so. Without it, 16-bit loads cannot be proven 4-byte aligned, are not vectorised, and are never pipelined through
    shared memory (cp.async): a kernel compiled without a device would look unpipelined when it is not."""
    names = list(signature)
    attrs = {}
    for name, kind in signature.items():
        if kind.startswith("*") or (kind in ("i32", "i64") and values.get(name, 1) % 16 == 0):
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    return attrs


def _triton_compile(config: dict, arch: int) -> list:
    """(compiled kernel, launch plan) for each configuration the launcher can pick for ``config``'s call: one, or
    every autotuning candidate of the projection-only kernel."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from emovec.triton import steer_project as sp

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    h_dtype, w_dtype = dt[config["h"]], dt[config["w"]]
    n, d, k = config["n"], config["d"], config["k"]
    c = config.get("clamp", 0)
    tname = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    projection_only = (config.get("scores") and k > 0 and not config.get("table") and not config.get("capture")
                       and c == 0 and n > sp.SMALL_N)
    if projection_only:  # what the launcher dispatches for monitoring: the lean GEMM-tile kernel, autotuned
        compiled = []
        for candidate in sp.projection_configs(n, d, k, h_dtype):
            plan = sp.plan_projection(n, d, k, h_dtype, candidate)
            probe_type = tname[h_dtype] if not plan["flags"]["DOT_FP32"] else tname[w_dtype]
            signature = {"h_ptr": f"*{tname[h_dtype]}", "h_row_stride": "i64", "probes_ptr": f"*{probe_type}",
                         "center_ptr": f"*{tname[w_dtype]}", "center_dots_ptr": "*fp32", "scores_ptr": "*fp32",
                         "norms_ptr": "*fp32", "N": "i32", "D": "i32", "K": "i32"}
            flags = dict(plan["flags"], HAS_CENTER=True, HAS_NORMS=True)
            for key in flags:
                signature[key] = "constexpr"
            attrs = _jit_attrs(signature, {"h_row_stride": d, "N": n, "D": d, "K": k})
            kernel = triton.compile(ASTSource(fn=sp._project_kernel, signature=signature, constexprs=flags, attrs=attrs),
                                    target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": plan["num_warps"], "num_stages": plan["num_stages"]})
            compiled.append((kernel, plan))
        return compiled
    a = config.get("ablate", 0)
    plan = sp.plan(n, d, k, a, c, h_dtype, scores=config.get("scores", False), norms=config.get("scores", False),
                   capture=config.get("capture", False), edits=config.get("table", False) or a > 0 or c > 0)
    hp, wp = f"*{tname[h_dtype]}", f"*{tname[w_dtype]}"
    signature = {
        "h_ptr": hp, "h_row_stride": "i64", "slots_ptr": "*i64", "table_ptr": wp, "ablate_ptr": wp, "probes_ptr": wp,
        "center_ptr": wp, "scores_ptr": "*fp32", "norms_ptr": "*fp32", "segments_ptr": "*i64", "sums_ptr": "*fp32",
        "counts_ptr": "*fp32", "errors_ptr": "*i32", "clamp_ptr": wp, "gram_ptr": "*fp32", "bounds_ptr": "*fp32",
        "corrections_ptr": "*fp32", "N": "i32", "D": "i32", "K": "i32", "A": "i32", "R": "i32", "S": "i32", "C": "i32",
    }
    flags = dict(plan["flags"])
    flags.update(HAS_SLOTS=config.get("table", False) or c > 0, HAS_TABLE=config.get("table", False),
                 HAS_ABLATE=a > 0, HAS_CENTER=False, HAS_ERRORS=True, HAS_CLAMP=c > 0, RELATIVE_BOUNDS=c > 0,
                 HAS_CORRECTIONS=c > 0, HAS_SCORES=plan["scores"], HAS_NORMS=plan["norms"],
                 HAS_CAPTURE=config.get("capture", False))
    for key in flags:
        signature[key] = "constexpr"
    attrs = _jit_attrs(signature, {"h_row_stride": d, "N": n, "D": d, "K": k, "A": a, "R": 4 if config.get("table")
                                   else 0, "S": 0, "C": c})
    source = ASTSource(fn=sp._steer_project_kernel, signature=signature, constexprs=flags, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": plan.get("num_warps", 4), "num_stages": plan.get("num_stages", 3)})
    return [(kernel, plan)]


def _resources(kernel, arch: int) -> dict:
    """Registers, local memory (spills) and the ptxas verdict of the cubin Triton built, read with cuobjdump; when
    the cubin is missing, the PTX is assembled again with the newest ptxas at hand."""
    import triton.backends.nvidia as nv

    bundled = Path(nv.__file__).parent / "bin"
    out: dict = {}
    cubin = kernel.asm.get("cubin")
    if cubin:
        cuobjdump = shutil.which("cuobjdump") or str(bundled / "cuobjdump")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "k.cubin"
            path.write_bytes(cubin)
            done = subprocess.run([cuobjdump, "-res-usage", str(path)], capture_output=True, text=True)
        m = re.search(r"REG:(\d+) STACK:(\d+)", done.stdout)
        if m:
            out["registers"] = int(m.group(1))
            out["spill_bytes"] = int(m.group(2))  # the stack frame: spills (Triton kernels keep no local arrays)
            return out
        out["error"] = (done.stderr or done.stdout).strip()[-300:]
    for ptxas in (shutil.which("ptxas"), str(bundled / "ptxas-blackwell"), str(bundled / "ptxas")):
        if not ptxas:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "k.ptx"
            path.write_text(kernel.asm["ptx"])
            done = subprocess.run([ptxas, f"-arch=sm_{arch}{'a' if arch == 90 else ''}", "-v", str(path), "-o",
                                   str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
        if done.returncode == 0:
            m = re.search(r"Used (\d+) registers", done.stderr)
            s = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
            return {"registers": int(m.group(1)) if m else None,
                    "spill_bytes": int(s.group(1)) + int(s.group(2)) if s else None}
        out["error"] = done.stderr.strip()[-300:]
    return out


def triton_report(arch: int) -> list[dict]:
    rows = []
    for config in triton_configs():
        call = {"arch": f"sm_{arch}", "kernel": "triton", "config": config["name"], "dispatched": True}
        try:
            compiled = _triton_compile(config, arch)
        except Exception as error:  # report, do not stop the table
            rows.append({**call, "error": f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"})
            continue
        for kernel, plan in compiled:
            ptx = kernel.asm["ptx"]
            row = {**call, **_resources(kernel, arch), "shared_bytes": int(getattr(kernel.metadata, "shared", 0)),
                   "blocks": plan["describe"]}
            kinds = []
            if "wgmma" in ptx:
                kinds.append("wgmma")
            if re.search(r"\bmma\.sync", ptx):
                kinds.append("mma.sync")
            row["tensor_cores"] = ", ".join(kinds) or "none"
            # matrix products in the kernel's IR: the broadcast-sum kernel must have none (Triton rewrites a sum over
            # the middle axis of a broadcast product into a TF32 tt.dot, ~1e-3 relative error on fp32 rows)
            row["dot_ops"] = len(re.findall(r"\btt\.dot\b", kernel.asm["ttir"]))
            # loads pipelined through shared memory (cp.async on sm_80 / sm_90, or TMA), as the device would run them
            row["async_copies"] = ptx.count("cp.async.cg") + ptx.count("cp.async.ca") + ptx.count("cp.async.bulk")
            rows.append(row)
            print(f"  {row['arch']} {config['name']} {row['blocks']}: regs {row.get('registers')}, spills "
                  f"{row.get('spill_bytes')}, smem {row['shared_bytes']}, {row['tensor_cores']}, "
                  f"{row['async_copies']} async copies", file=sys.stderr, flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------- roofline

def roofline() -> list[dict]:
    """Bytes and FLOPs of the monitoring op (projection onto K probes + norms) per benchmark shape, and the bound."""
    rows = []
    for n, d, k, phase in ((1, 4096, 171, "decode"), (16, 4096, 171, "decode"), (32768, 4096, 171, "prefill"),
                           (1, 576, 171, "decode"), (4096, 576, 171, "prefill")):
        for probe_bytes in (4, 2):
            h_bytes = n * d * 2  # bf16 rows read once
            moved = h_bytes + k * d * probe_bytes + n * (k + 1) * 4  # + probes once + scores and norms written
            flops = 2 * n * d * k + 2 * n * d
            row = {"N": n, "d": d, "K": k, "phase": phase, "probes": "fp32" if probe_bytes == 4 else "bf16",
                   "MB_moved": round(moved / 1e6, 3), "MFLOP": round(flops / 1e6, 2)}
            for name, dev in DEVICES.items():
                memory_us = moved / (dev["bandwidth_tbs"] * 1e12) * 1e6
                compute_us = flops / (dev["bf16_tflops"] * 1e12) * 1e6
                bound = max(memory_us, compute_us)
                row[f"{name} bound_us"] = round(bound + (LAUNCH_US if phase == "decode" else 0.0), 2)
            rows.append(row)
    return rows


def decode_roofline() -> list[dict]:
    """The CUDA kernels at decode (N <= 64, d = 4096, K = 171, bf16 h): the projection grid the launcher picks, the
    bytes from DRAM (h once, the probes once per call, scores and norms) and from L2 (each probe tile re-reads its row
    group's rows; each row group re-reads the probes), and the bound: launches x 3 us + the larger of DRAM bytes /
    bandwidth and L2 bytes / L2_TBS (monitoring: 1 launch; steering as well: 2, and h written back)."""
    rows = []
    d, k = 4096, 171
    for n in (1, 2, 4, 8, 16, 64):
        for probe_bytes in (2, 4):
            groups = -(-n // CUDA_ROWS_PER_BLOCK)
            sms = DEVICES["H200"]["sms"]
            tile = CUDA_WIDE_TILE if 2 * groups * -(-k // CUDA_WIDE_TILE) >= sms else 1  # src/cuda_launch.cu's rule
            k_tiles = -(-k // tile)
            h_bytes = n * d * 2
            dram = h_bytes + k * d * probe_bytes + n * (k + 1) * 4
            l2 = k_tiles * h_bytes + groups * k * d * probe_bytes
            row = {"N": n, "probes": "bf16" if probe_bytes == 2 else "fp32", "KT": tile, "blocks": groups * k_tiles,
                   "DRAM_MB": round(dram / 1e6, 3), "L2_MB": round(l2 / 1e6, 2)}
            for name, dev in DEVICES.items():
                memory_us = max(dram / (dev["bandwidth_tbs"] * 1e12), l2 / (L2_TBS * 1e12)) * 1e6
                row[f"{name} monitor_us"] = round(LAUNCH_US + memory_us, 2)
                row[f"{name} steer+monitor_us"] = round(2 * LAUNCH_US + memory_us + h_bytes / (dev["bandwidth_tbs"]
                                                                                             * 1e12) * 1e6, 2)
            rows.append(row)
    return rows


def _print(rows: list[dict], title: str) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(c for r in rows for c in r))
    print(f"\n{title}")
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["cuda", "triton", "roofline", "decode"], default=None)
    parser.add_argument("--fail-on-spill", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernel_report.json"))
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    report: dict = {"assumed_devices": DEVICES, "launch_us": LAUNCH_US, "l2_tbs": L2_TBS}
    if args.only in (None, "cuda"):
        report["cuda"] = cuda_report("sm_90") + cuda_report("sm_80")
        _print(report["cuda"], "CUDA kernel (nvcc -Xptxas -v)")
    if args.only in (None, "triton"):
        report["triton"] = triton_report(90) + triton_report(80)
        _print(report["triton"], "Triton kernel (triton.compile for the target, ptxas -v)")
    if args.only in (None, "roofline"):
        report["roofline"] = roofline()
        _print(report["roofline"], f"Roofline of the monitoring op (bf16 h; launch {LAUNCH_US} us added at decode)")
    if args.only in (None, "decode"):
        report["decode"] = decode_roofline()
        _print(report["decode"], f"CUDA kernels at decode, d = 4096, K = 171, bf16 h ({LAUNCH_US} us per launch)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    spills = [r for r in report.get("cuda", []) + report.get("triton", [])
              if r.get("dispatched") and (r.get("spill_bytes") or 0) > 0]
    if spills:
        print(f"{len(spills)} dispatched configuration(s) spill: " + "; ".join(f"{r['arch']} {r['config']}"
                                                                             for r in spills))
    return 1 if (args.fail_on_spill and spills) else 0


if __name__ == "__main__":
    sys.exit(main())
