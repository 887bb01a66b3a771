"""Every autotuning candidate of the Triton projection kernel (monitoring prefill) timed on a GPU, against torch's
own ``h @ probes.T`` + ``h.norm(dim=1)`` and the copy bandwidth: which tile the autotuner should pick, and how far from
the memory bound each one is.

    python benchmarks/bench_triton_candidates.py                       # N = 4096, 32768; d = 4096; K = 171; bf16, fp32
    python benchmarks/bench_triton_candidates.py --n 32768 --dtype bfloat16

Per row: the candidate (BLOCK_N, BLOCK_K, BLOCK_D, warps, stages), median ms (triton.testing.do_bench), the bytes the
op must move (h once, the probes once, the scores and norms) over that time, and the share of the measured copy
bandwidth; the fastest candidate is marked, and checked against float64 (a wrong tile would show here first). Needs a
CUDA device: the candidates differ only in how they use one, so the interpreter cannot rank them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import copy_bandwidth_gbs, print_table, write_csv  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--d", type=int, nargs="+", default=[4096])
    parser.add_argument("--k", type=int, default=171)
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=sorted(DTYPES))
    parser.add_argument("--out", default="benchmarks/results/triton_candidates_cuda.csv")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_triton_candidates.py needs a CUDA device (the candidates are ranked by how they run on one)")
    import triton.testing

    from emovec.triton.steer_project import plan_projection, project_triton, projection_configs

    device = torch.device("cuda")
    copy_gbs = copy_bandwidth_gbs(device)
    rows = []
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        for d in args.d:
            for n in args.n:
                g = torch.Generator().manual_seed(n + d)
                h = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
                probes = torch.nn.functional.normalize(torch.randn(args.k, d, generator=g), dim=1)
                probes = probes.to(device=device, dtype=dtype)
                scores = torch.empty(n, args.k, device=device)
                norms = torch.empty(n, device=device)
                moved = h.numel() * h.element_size() + probes.numel() * probes.element_size() + (scores.numel()
                                                                                                + norms.numel()) * 4
                want = h.double() @ probes.double().T
                shape = {"n": n, "d": d, "k": args.k, "dtype": dtype_name}
                torch_ms = triton.testing.do_bench(
                    lambda: ((h @ probes.T).float(), h.float().norm(dim=1)), return_mode="median")
                rows.append({**shape, "candidate": "torch h @ probes.T + norm", "ms": round(torch_ms, 4),
                             "GB/s": round(moved / torch_ms / 1e6, 1),
                             "of copy": round(moved / torch_ms / 1e6 / copy_gbs, 3), "fastest": "", "max_rel_error": ""})
                timed = []
                for config in projection_configs(n, d, args.k, dtype):
                    describe = plan_projection(n, d, args.k, dtype, config)["describe"]
                    try:
                        ms = triton.testing.do_bench(
                            lambda config=config: project_triton(h, probes, None, scores, norms, config),
                            return_mode="median")
                    except Exception as error:  # report, do not stop the table
                        rows.append({**shape, "candidate": describe, "ms": "", "GB/s": "", "of copy": "",
                                     "fastest": f"{type(error).__name__}", "max_rel_error": ""})
                        continue
                    project_triton(h, probes, None, scores, norms, config)
                    error = ((scores.double() - want).abs().max() / want.abs().max()).item()
                    row = {**shape, "candidate": describe, "ms": round(ms, 4), "GB/s": round(moved / ms / 1e6, 1),
                           "of copy": round(moved / ms / 1e6 / copy_gbs, 3), "fastest": "",
                           "max_rel_error": f"{error:.2e}"}
                    rows.append(row)
                    timed.append((ms, row))
                if timed:
                    min(timed, key=lambda item: item[0])[1]["fastest"] = "<- fastest"
                print_table([r for r in rows if r["n"] == n and r["d"] == d and r["dtype"] == dtype_name],
                            list(rows[-1]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_csv(args.out, rows)
    print(f"\ncopy bandwidth {copy_gbs:.0f} GB/s; wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
