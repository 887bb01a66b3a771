"""Cost of the CPU kernel's index checks (memory safety whatever the slots and segments): the current emovec._C
against a build of an earlier commit without them, interleaved in one run, on the same tensors.

    git worktree add /tmp/oldtree 51ec103 && (cd /tmp/oldtree && EMOVEC_CUDA=0 python setup.py build_ext --inplace)
    python benchmarks/bench_index_check.py --old /tmp/oldtree/python/emovec/_C.cpython-311-x86_64-linux-gnu.so

Both builds get the same raw arguments (the earlier one has no ``errors`` pointer); the new one is timed with and
without an errors flag. Rows: shape, p50 in ms of each, and the ratios new/old.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_op import make_problem  # noqa: E402
from emovec import _ext  # noqa: E402
from harness import measure, print_table, write_csv  # noqa: E402


def load_old(path: str):
    sys.modules.setdefault("emovec_old", types.ModuleType("emovec_old"))
    loader = importlib.machinery.ExtensionFileLoader("emovec_old._C", path)
    spec = importlib.util.spec_from_loader("emovec_old._C", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def raw_args(p: dict, k: int) -> tuple:
    a = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    h = p["h"]
    scores = torch.empty(h.shape[0], k)
    norms = torch.empty(h.shape[0])
    return (a(h), h.shape[0], h.shape[1], h.stride(0), 0, 0, a(p["slots"]), a(p["table"]), p["table"].shape[0],
            a(p["ablate"]), p["ablate"].shape[0] if p["ablate"] is not None else 0, a(p["probes"]), k,
            a(p["center"]), a(scores), a(norms), a(p["segments"]), a(p["sums"]), a(p["counts"]), p["sums"].shape[0]), \
        (scores, norms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="path of an emovec _C built from a commit without index checks")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 16, 256, 4096])
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--k", type=int, default=171)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/index_check_cpu.csv")
    args = parser.parse_args()
    old = load_old(args.old)
    new = _ext._C
    threads = torch.get_num_threads()
    rows = []
    for n in args.n:
        p = make_problem(n, args.d, args.k, torch.float32, torch.device("cpu"), ablate=1, segments=max(1, n // 64))
        p["slots"] = p["slots"].to(torch.int64)
        p["segments"] = p["segments"].to(torch.int64)
        base, keep = raw_args(p, args.k)
        flag = torch.zeros(1, dtype=torch.int32)
        calls = {
            "old": lambda: old.steer_project_cpu(*base, threads),
            # the new core also takes clamp, num_clamp, bounds, relative_bounds, corrections (none here)
            "new": lambda: new.steer_project_cpu(*base, 0, 0, 0, 0, False, 0, threads),
            "new_flag": lambda: new.steer_project_cpu(*base, flag.data_ptr(), 0, 0, 0, False, 0, threads),
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(5):  # interleaved rounds, so drift on a shared machine hits every provider alike
            for name, fn in calls.items():
                times[name].append(measure(fn, torch.device("cpu"), repeats=max(1, args.repeats // 5))["p50_ms"])
        p50 = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
        rows.append({"N": n, "d": args.d, "K": args.k, "old_p50_ms": p50["old"], "new_p50_ms": p50["new"],
                     "new_flag_p50_ms": p50["new_flag"], "new/old": p50["new"] / p50["old"],
                     "new_flag/old": p50["new_flag"] / p50["old"]})
        assert int(flag) == 0
    print_table(rows, list(rows[0]))
    write_csv(args.out, rows)


if __name__ == "__main__":
    main()
