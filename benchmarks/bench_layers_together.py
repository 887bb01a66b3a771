"""The monitor's CPU calls at a decode step: one prepared call per layer (`emovec._C.CpuCall`, each its own OpenMP
region) against the layers run together at the last one (`emovec._C.CpuLayers`, what `emovec.monitor` and the vLLM
plugin do at up to 24 rows), and the prepared call's fixed cost (time by number of probes).

    python benchmarks/bench_layers_together.py            # d = 576, K = 171, 30 layers, rows 1 and 8, 1 and 2 threads

Thirty layers' probes (12 MB in fp32, 6 MB in bf16) are read in turn, as in a step (from L3 here, from DRAM inside a
forward pass whose weights evict them). Interleaved rounds, the best round of each; results/layers_together_cpu.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import command_line, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--k", type=int, default=171)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "layers_together_cpu.json"))
    args = parser.parse_args(argv)
    from emovec import _ext

    if not _ext.has_cpp_library:
        sys.exit("bench_layers_together.py needs emovec._C (the compiled CPU kernel)")
    C = _ext._C
    d, k, layers = args.d, args.k, args.layers
    g = torch.Generator().manual_seed(0)
    rows_out = []
    for n in (1, 8):
        for probe_dtype in (torch.float32, torch.bfloat16):
            probes = [torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1).to(probe_dtype)
                      for _ in range(layers)]
            calls = [C.CpuCall(d=d, h_dtype=_ext.DTYPE_CODES[torch.float32], w_dtype=_ext.DTYPE_CODES[probe_dtype],
                               probes=p.data_ptr(), num_probes=k, center=0) for p in probes]
            group = C.CpuLayers(calls)
            hs = [torch.randn(n, d, generator=g) for _ in range(layers)]
            scores, norms = torch.empty(layers, n, k), torch.empty(layers, n)

            def each(threads):
                def run():
                    for i in range(layers):
                        calls[i].run(hs[i].data_ptr(), n, d, scores[i].data_ptr(), norms[i].data_ptr(), threads)
                return run

            def together(threads):
                def run():
                    for i in range(layers):
                        group.run(i, hs[i].data_ptr(), n, d, scores[i].data_ptr(), norms[i].data_ptr(), threads)
                return run

            fns = {f"{kind} {t} thread{'s' if t > 1 else ''}": (each if kind == "a call per layer" else together)(t)
                   for kind in ("a call per layer", "together") for t in (1, 2)}
            best = {name: float("inf") for name in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    for _ in range(10):
                        fn()
                    best[name] = min(best[name], (time.perf_counter() - t0) / 10)
            row = {"rows": n, "probes": str(probe_dtype).replace("torch.", ""),
                   **{f"{name} (us per step)": round(v * 1e6, 1) for name, v in best.items()}}
            row["together / a call per layer, 2 threads"] = round(best["together 2 threads"]
                                                                   / best["a call per layer 2 threads"], 3)
            print(row)
            rows_out.append(row)
    by_k = []
    for probe_dtype in (torch.float32, torch.bfloat16):
        for kk in (16, 64, 128, 176, 256):
            p = torch.nn.functional.normalize(torch.randn(kk, d, generator=g), dim=1).to(probe_dtype)
            call = C.CpuCall(d=d, h_dtype=_ext.DTYPE_CODES[torch.float32], w_dtype=_ext.DTYPE_CODES[probe_dtype],
                             probes=p.data_ptr(), num_probes=kk, center=0)
            h, s, nr = torch.randn(1, d, generator=g), torch.empty(1, kk), torch.empty(1)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(5000):
                    call.run(h.data_ptr(), 1, d, s.data_ptr(), nr.data_ptr(), 1)
                best = min(best, (time.perf_counter() - t0) / 5000)
            empty = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(5000):
                    call.run(h.data_ptr(), 0, d, s.data_ptr(), nr.data_ptr(), 1)  # returns before the kernel
                empty = min(empty, (time.perf_counter() - t0) / 5000)
            by_k.append({"probes": str(probe_dtype).replace("torch.", ""), "K": kk, "one row, one thread, warm (us)":
                         round(best * 1e6, 2), "call from Python alone (us)": round(empty * 1e6, 2)})
            print(by_k[-1])
    result = {"d": d, "K": k, "layers": layers, "steps": rows_out, "by_k": by_k, "command": command_line()}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
