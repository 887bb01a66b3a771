"""Decode on a GPU: the fused op at N = 1..16 rows, d = 4096, K = 171, bf16 h, against the floor no kernel can beat,
an empty kernel launch plus reading the probes once from memory.

    python benchmarks/bench_decode.py                        # CUDA backend (emovec._C built with nvcc)
    python benchmarks/bench_decode.py --backend triton --n 1 16

Every timing is per call, from a CUDA graph of ``--calls`` calls replayed (Python and the launch queue are out, as in
a model's decode step under CUDA graphs). Rows: monitoring (scores + norms), steering + monitoring, and the floor
(an empty launch, timed the same way, + probe bytes / the measured copy bandwidth). The roofline model of the same
shapes is benchmarks/kernel_report.py --only decode.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import emovec  # noqa: E402
from emovec.ops import steer_project_trusted  # noqa: E402
from harness import copy_bandwidth_gbs, measure, print_table, write_csv  # noqa: E402

PROBE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def per_call_us(fn, calls: int, repeats: int) -> float:
    """Median time of one call of ``fn``, from a CUDA graph of ``calls`` calls (captured after a warm-up)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return measure(graph.replay, torch.device("cuda"), repeats=repeats)["p50_ms"] * 1e3 / calls


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--k", type=int, default=171)
    parser.add_argument("--probes", choices=PROBE_DTYPES, nargs="+", default=["bfloat16", "float32"],
                        help="probe (and center) dtype; h is bf16")
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--calls", type=int, default=50, help="calls per CUDA graph")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/decode_cuda.csv")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (this benchmark times CUDA graphs)")
    device = torch.device("cuda")
    copy_gbs = copy_bandwidth_gbs(device)
    one = torch.zeros(1, device=device)
    empty_us = per_call_us(lambda: one.add_(1), args.calls, args.repeats)
    g = torch.Generator().manual_seed(0)
    rows = []
    for probe_name in args.probes:
        wdtype = PROBE_DTYPES[probe_name]
        probes = torch.nn.functional.normalize(torch.randn(args.k, args.d, generator=g), dim=1).to(device, wdtype)
        center = (0.1 * torch.randn(args.d, generator=g)).to(device, wdtype)
        table = (0.01 * torch.randn(4, args.d, generator=g)).to(device, wdtype)
        probe_read_us = args.k * args.d * probes.element_size() / (copy_gbs * 1e9 / 2) * 1e6  # read half of a copy
        for n in args.n:
            h = torch.randn(n, args.d, generator=g).to(device, torch.bfloat16)
            slots = (torch.arange(n) % 4).to(device)
            scores = torch.empty(n, args.k, device=device)
            norms = torch.empty(n, device=device)

            def monitor():
                steer_project_trusted(h, probes=probes, center=center, scores=scores, norms=norms,
                                      backend=args.backend)

            def steer_monitor():
                steer_project_trusted(h, slots=slots, table=table, probes=probes, center=center, scores=scores,
                                      norms=norms, backend=args.backend)

            emovec.steer_project(h.clone(), probes=probes, center=center, backend=args.backend)  # checks the backend
            monitor_us = per_call_us(monitor, args.calls, args.repeats)
            steer_us = per_call_us(steer_monitor, args.calls, args.repeats)
            floor_us = empty_us + probe_read_us
            row = {"backend": args.backend, "N": n, "d": args.d, "K": args.k, "probes": probe_name,
                   "monitor_us": monitor_us, "steer_monitor_us": steer_us, "empty_launch_us": empty_us,
                   "probe_read_us": probe_read_us, "floor_us": floor_us, "monitor_over_floor": monitor_us / floor_us}
            rows.append(row)
            print_table([row], list(row))
    write_csv(args.out, rows)
    print(f"\nwrote {args.out}")
    print_table(rows, ["N", "probes", "monitor_us", "steer_monitor_us", "empty_launch_us", "probe_read_us",
                       "monitor_over_floor"])
    return rows


if __name__ == "__main__":
    main()
