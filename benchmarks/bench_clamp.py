"""Cost of regulation (clamp directions with per-slot bounds) on top of what monitoring and steering already do in the
fused op: steering table + projection onto K probes, with and without C clamp directions (cosine bounds, the
corrections recorded), interleaved in one run on the same tensors. Rows: shape, p50 of each, ratios to the op
without regulation, and the share of rows the bounds corrected.

    python benchmarks/bench_clamp.py                       # CPU kernel (emovec._C)
    python benchmarks/bench_clamp.py --device cuda         # on a GPU (CUDA kernel for N <= 64, Triton above)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import emovec  # noqa: E402
from bench_op import make_problem  # noqa: E402
from harness import measure, print_table, write_csv  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 16, 256, 4096])
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--k", type=int, default=171)
    parser.add_argument("--c", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--out", default=None, help="CSV (default: benchmarks/results/clamp_<device>.csv)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    rows = []
    for n in args.n:
        p = make_problem(n, args.d, args.k, dtype, device, ablate=0, segments=1)
        scores = torch.empty(n, args.k, device=device)
        norms = torch.empty(n, device=device)
        h0 = p["h"].clone()
        g = torch.Generator().manual_seed(1)
        calls = {}

        def base(h=p["h"]):
            h.copy_(h0)
            emovec.steer_project(h, slots=p["slots"], table=p["table"], probes=p["probes"], scores=scores,
                                 norms=norms, backend=args.backend, validate=False)

        calls["steer+project"] = base
        shares = {}
        for c in args.c:
            clamp = torch.nn.functional.normalize(torch.randn(c, args.d, generator=g), dim=1).to(device)
            # cosine caps at about the median reading: roughly half of the rows get corrected
            bounds = torch.tensor([[-1.0, 0.0]] * c).expand(p["table"].shape[0], c, 2).contiguous().to(device)
            corrections = torch.empty(n, c, device=device)

            def regulated(h=p["h"], clamp=clamp, bounds=bounds, corrections=corrections):
                h.copy_(h0)
                emovec.steer_project(h, slots=p["slots"], table=p["table"], probes=p["probes"], scores=scores,
                                     norms=norms, clamp=clamp, bounds=bounds, relative_bounds=True,
                                     corrections=corrections, backend=args.backend, validate=False)

            calls[f"+clamp{c}"] = regulated
            regulated()
            shares[c] = float((corrections != 0).any(1).float().mean())
        copy = lambda h=p["h"]: h.copy_(h0)  # noqa: E731  the reset every call pays, subtracted below
        calls["copy"] = copy
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(5):  # interleaved rounds: drift on a shared machine hits every variant alike
            for name, fn in calls.items():
                times[name].append(measure(fn, device, repeats=max(1, args.repeats // 5))["p50_ms"])
        p50 = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
        net = {name: max(p50[name] - p50["copy"], 1e-9) for name in calls if name != "copy"}
        row = {"N": n, "d": args.d, "K": args.k, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
               "steer+project_ms": round(net["steer+project"], 5)}
        for c in args.c:
            row[f"clamp{c}_ms"] = round(net[f"+clamp{c}"], 5)
            row[f"clamp{c}/base"] = round(net[f"+clamp{c}"] / net["steer+project"], 3)
            row[f"clamp{c}_rows_corrected"] = round(shares[c], 3)
        rows.append(row)
        print(row, flush=True)
    out = args.out or f"benchmarks/results/clamp_{device.type}.csv"
    write_csv(out, rows)
    print("regulation on top of steering + projection (p50 ms, the reset copy subtracted):")
    print_table(rows, [c for c in rows[0] if c not in ("device", "dtype")])


if __name__ == "__main__":
    main()
