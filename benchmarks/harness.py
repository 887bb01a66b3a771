"""Shared benchmark harness: timing with warm-up, p20/p50/p80, CSV rows that carry the command that made them.

On CUDA it times with events after a synchronize; on the CPU with perf_counter. Never asserts anything.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv])


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeats: int = 20,
            min_seconds: float = 0.0) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times, then time ``repeats`` calls (more if ``min_seconds`` is not reached).

    Returns milliseconds: p20, p50 (median), p80, and the number of samples.
    """
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start_all = time.perf_counter()
    cuda = device.type == "cuda"
    while len(samples) < repeats or (time.perf_counter() - start_all) < min_seconds:
        if cuda:
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= 10 * repeats:
            break
    q = statistics.quantiles(samples, n=10) if len(samples) > 1 else [samples[0]] * 9
    return {"p20_ms": q[1], "p50_ms": statistics.median(samples), "p80_ms": q[7], "samples": len(samples)}


def copy_bandwidth_gbs(device: torch.device, megabytes: int = 512) -> float:
    """Measured device copy bandwidth (read + write bytes per second), the roofline for a memory-bound op."""
    n = megabytes * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, warmup=3, repeats=20)
    return 2 * src.numel() * 4 / (t["p50_ms"] * 1e-3) / 1e9


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """Write rows atomically (temp file + rename), every row tagged with the command that produced it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*fields, "command"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "command": command_line()})
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, result: dict, *, quiet: bool = False) -> Path:
    """Write a result (which carries its "command") atomically as indented JSON, and say where."""
    from emovec.fileio import atomic_write_text

    path = atomic_write_text(path, json.dumps(result, indent=1))
    if not quiet:
        print(f"wrote {path}")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
