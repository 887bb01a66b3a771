"""Fused steer/project/capture op vs the naive torch sequence (gather-add, ablation, matmul, norm, index_add).

    python benchmarks/bench_op.py                      # CPU, the issue's grid (large shapes take a while)
    python benchmarks/bench_op.py --n 1 16 256 --d 576  # a subset
    python benchmarks/bench_op.py --device cuda --dtype bfloat16

Each row: the shape, both providers' p20/p50/p80 in ms, the speed-up (naive p50 / fused p50), and on a GPU the
achieved GB/s of the fused op against the measured copy bandwidth. Results go to benchmarks/results/*.csv.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import emovec  # noqa: E402
from emovec.reference import naive_sequence  # noqa: E402
from harness import copy_bandwidth_gbs, measure, print_table, write_csv  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_problem(n: int, d: int, k: int, dtype: torch.dtype, device: torch.device, ablate: int, segments: int):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(n, d, generator=g).to(dtype).to(device)
    table = (0.01 * torch.randn(4, d, generator=g)).to(dtype).to(device)
    slots = (torch.arange(n) % 5 - 1).clamp(max=3).to(device)  # 1 row in 5 untouched
    q, _ = torch.linalg.qr(torch.randn(d, max(ablate, 1), generator=g))
    directions = q.T[:ablate].contiguous().to(dtype).to(device) if ablate else None
    probes = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1).to(dtype).to(device)
    center = (0.1 * torch.randn(d, generator=g)).to(dtype).to(device)
    seg = (torch.arange(n) * segments // max(n, 1)).to(device)
    sums = torch.zeros(segments, d, device=device)
    counts = torch.zeros(segments, device=device)
    return dict(h=h, slots=slots, table=table, ablate=directions, probes=probes, center=center,
                segments=seg, sums=sums, counts=counts)


def bytes_moved(n: int, d: int, k: int, dtype: torch.dtype, steered_fraction: float = 0.8) -> int:
    """Bytes the op must move: read h, write the steered rows, read probes once, write scores and norms."""
    size = torch.finfo(dtype).bits // 8
    return int(n * d * size * (1 + steered_fraction) + k * d * size + n * (k + 1) * 4)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 16, 256, 4096, 32768])
    parser.add_argument("--d", type=int, nargs="+", default=[576, 4096])
    parser.add_argument("--k", type=int, nargs="+", default=[16, 171])
    parser.add_argument("--ablate", type=int, default=1, help="ablation directions (0 = none)")
    parser.add_argument("--segments", type=int, default=8, help="capture segments (0 = no capture)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="fused backend (default: by device)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-elements", type=float, default=2**27, help="skip shapes with more N*d elements")
    parser.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/op_<device>.csv)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    copy_gbs = copy_bandwidth_gbs(device) if device.type == "cuda" else None
    rows = []
    for d in args.d:
        for n in args.n:
            if n * d > args.max_elements:
                print(f"skip N={n} d={d}: over --max-elements", file=sys.stderr)
                continue
            for k in args.k:
                p = make_problem(n, d, k, dtype, device, args.ablate, args.segments)
                capture = dict(segments=p["segments"], sums=p["sums"], counts=p["counts"]) if args.segments else {}
                scores = torch.empty(n, k, device=device)
                norms = torch.empty(n, device=device)

                def fused():
                    emovec.steer_project(p["h"], slots=p["slots"], table=p["table"], ablate=p["ablate"],
                                         probes=p["probes"], center=p["center"], scores=scores, norms=norms,
                                         backend=args.backend, validate=False, **capture)

                def naive():
                    naive_sequence(p["h"], p["slots"], p["table"], p["ablate"], p["probes"], p["center"],
                                   p["segments"] if args.segments else None, p["sums"], p["counts"])

                t_fused = measure(fused, device, repeats=args.repeats)
                t_naive = measure(naive, device, repeats=args.repeats)
                row = {"device": device.type, "dtype": str(dtype).replace("torch.", ""), "N": n, "d": d, "K": k,
                       "A": args.ablate, "naive_p50_ms": t_naive["p50_ms"], "naive_p20_ms": t_naive["p20_ms"],
                       "naive_p80_ms": t_naive["p80_ms"], "fused_p50_ms": t_fused["p50_ms"],
                       "fused_p20_ms": t_fused["p20_ms"], "fused_p80_ms": t_fused["p80_ms"],
                       "speedup": t_naive["p50_ms"] / t_fused["p50_ms"]}
                if copy_gbs:
                    gbs = bytes_moved(n, d, k, dtype) / (t_fused["p50_ms"] * 1e-3) / 1e9
                    row.update(fused_GBs=gbs, copy_GBs=copy_gbs, fraction_of_copy=gbs / copy_gbs)
                rows.append(row)
                print_table([row], list(row))
    out = args.out or f"benchmarks/results/op_{device.type}.csv"
    write_csv(out, rows)
    print(f"\nwrote {out}")
    columns = ["N", "d", "K", "naive_p50_ms", "fused_p50_ms", "speedup"] + (["fraction_of_copy"] if copy_gbs else [])
    print_table(rows, columns)
    return rows


if __name__ == "__main__":
    main()
