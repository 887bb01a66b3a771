"""Projection only (what monitoring does) on the CPU: the fused op against the best plain torch sequence for the same
work, ``torch.mm(h, probes.T)`` plus ``torch.linalg.vector_norm(h, dim=1)`` into preallocated outputs.

    python benchmarks/bench_projection.py                       # d = 576, K = 171, fp32, 1 and 2 threads
    python benchmarks/bench_projection.py --n 1 8 256 --threads 1 --dtype bfloat16

Per shape and thread count, three providers timed in interleaved rounds (each round calls each provider `--repeats`
times in turn and keeps the median): `kernel` (the compiled kernel through ``emovec.ops._run_compiled``, what the
runtime's trusted path reaches), `trusted` (``emovec.ops.steer_project_trusted``, the runtime's call with its Python
overhead) and `torch`. The ratio is trusted p50 / torch p50. Results go to results/projection_cpu.csv.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import emovec  # noqa: E402
from emovec.ops import _run_compiled, steer_project_trusted  # noqa: E402
from harness import print_table, write_csv  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _median_us(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(samples)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 4, 8, 16, 24, 32, 64, 128, 256, 1024])
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--k", type=int, default=171)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="h and probes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50, help="calls per provider per round")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "projection_cpu.csv"))
    args = parser.parse_args(argv)
    if not emovec.has_cpp_library:
        sys.exit("emovec._C is not built: pip install -e . first")
    dtype = DTYPES[args.dtype]
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for n in args.n:
            g = torch.Generator().manual_seed(n)
            h = torch.randn(n, args.d, generator=g).to(dtype)
            probes = torch.nn.functional.normalize(torch.randn(args.k, args.d, generator=g), dim=1).to(dtype)
            scores, norms = torch.empty(n, args.k), torch.empty(n)
            torch_scores = torch.empty(n, args.k, dtype=dtype)
            torch_norms = torch.empty(n, dtype=dtype)

            def kernel():
                _run_compiled(h, None, None, None, probes, None, scores, norms, None, None, None, None, None, None,
                              False, None, on_gpu=False)

            def trusted():
                steer_project_trusted(h, probes=probes, scores=scores, norms=norms)

            def plain():
                torch.mm(h, probes.T, out=torch_scores)
                torch.linalg.vector_norm(h, dim=1, out=torch_norms)

            fns = {"kernel": kernel, "trusted": trusted, "torch": plain}
            for fn in fns.values():
                for _ in range(10):
                    fn()
            samples: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    samples[name].append(_median_us(fn, args.repeats))
            p50 = {name: statistics.median(v) for name, v in samples.items()}
            rows.append({"threads": threads, "n": n, "d": args.d, "k": args.k, "dtype": args.dtype,
                         "kernel_us": round(p50["kernel"], 2), "trusted_us": round(p50["trusted"], 2),
                         "torch_us": round(p50["torch"], 2), "trusted_vs_torch": round(p50["trusted"] / p50["torch"], 3),
                         "kernel_vs_torch": round(p50["kernel"] / p50["torch"], 3)})
            print(f"threads {threads} N {n}: kernel {p50['kernel']:.1f} us, trusted {p50['trusted']:.1f} us, "
                  f"torch {p50['torch']:.1f} us", flush=True)
    print_table(rows, ["threads", "n", "kernel_us", "trusted_us", "torch_us", "trusted_vs_torch"])
    print(f"wrote {write_csv(args.out, rows)}")
    return rows


if __name__ == "__main__":
    main()
