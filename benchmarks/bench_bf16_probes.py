"""fp32 rows against fp32 or bf16 probes (and bf16 dots: the rows rounded to bf16 too) in the CPU's prepared call (`emovec._C.CpuCall`, what `emovec.monitor` and
the vLLM plugin run per layer): one layer warm, 30 layers' probes in turn (L3), and 30 layers after streaming 64 MB
between calls (what a decode step's weights do to the caches); and the bound of each: one read of the same probe bytes
(`emovec._C.cpu_read_seconds`, warm from L2, and the 30 layers' in turn from L3), with the call's time over it.

    python benchmarks/bench_bf16_probes.py                  # d = 576, K = 171 (the default model), rows 1 and 8

Times are per layer call, medians over repeats; results/bf16_probes_cpu.json with the command that made them.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from emovec import _ext  # noqa: E402
from harness import command_line, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--k", type=int, default=171)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not _ext.has_cpp_library:
        sys.exit("emovec._C is not built")
    g = torch.Generator().manual_seed(0)
    d, k = args.d, args.k
    big = torch.empty(64 * 2**20 // 4)
    rows_out = []
    for n in args.rows:
        h = torch.randn(n, d, generator=g)
        scores, norms = torch.empty(n, k), torch.empty(n)
        variants = [(torch.float32, False), (torch.bfloat16, False)]
        if _ext._C.cpu_bf16_dot():
            variants.append((torch.bfloat16, True))  # emovec.monitor(bf16_dots=True)
        for dtype, dots in variants:
            probes = [torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1).to(dtype)
                      for _ in range(args.layers)]
            calls = [_ext._C.CpuCall(d=d, h_dtype=_ext.DTYPE_CODES[torch.float32], w_dtype=_ext.DTYPE_CODES[dtype],
                                     probes=p.data_ptr(), num_probes=k, center=0, bf16_dots=dots) for p in probes]
            run = (h.data_ptr(), n, d, scores.data_ptr(), norms.data_ptr(), 1, 0, 0)
            result = {"rows": n, "probes": str(dtype).replace("torch.", "") + (" (bf16 dots)" if dots else "")}
            for _ in range(200):
                calls[0].run(*run)
            one = []
            for _ in range(args.repeats * 10):
                t0 = time.perf_counter()
                for _ in range(20):
                    calls[0].run(*run)
                one.append((time.perf_counter() - t0) / 20 * 1e6)
            result["one_layer_warm_us"] = round(statistics.median(one), 3)
            # the bound: reading the same probe bytes once, warm (one layer's, from L2) and in turn (30 layers', L3)
            size = probes[0].numel() * probes[0].element_size()
            read_warm = _ext._C.cpu_read_seconds(probes[0].data_ptr(), size, 2000) * 1e6
            read_turn = statistics.median(
                sum(_ext._C.cpu_read_seconds(p.data_ptr(), size, 1) for p in probes) / len(probes) * 1e6
                for _ in range(args.repeats))
            result["read_probes_warm_us"] = round(read_warm, 3)
            result["one_layer_warm / read"] = round(result["one_layer_warm_us"] / read_warm, 2)
            result["read_probes_in_turn_us"] = round(read_turn, 3)
            for label, cold in (("layers_in_turn_us", False), ("after_64mb_stream_us", True)):
                samples = []
                for _ in range(args.repeats):
                    if cold:
                        big.add_(1.0)
                    t0 = time.perf_counter()
                    for call in calls:
                        call.run(*run)
                    samples.append((time.perf_counter() - t0) / len(calls) * 1e6)
                result[label] = round(statistics.median(samples), 3)
            result["layers_in_turn / read"] = round(result["layers_in_turn_us"] / read_turn, 2)
            rows_out.append(result)
            print(result, flush=True)
    out = {"d": d, "K": k, "layers": args.layers, "threads": 1, "machine": platform.processor() or platform.machine(),
           "bf16_dot": bool(_ext._C.cpu_bf16_dot()), "rows": rows_out, "command": command_line()}
    write_json(args.out or Path(__file__).parent / "results" / "bf16_probes_cpu.json", out)
    return out


if __name__ == "__main__":
    main()
