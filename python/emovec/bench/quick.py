"""A quick, interleaved timing of the fused op against the naive torch sequence (for the demo's table)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from emovec.ops import steer_project
from emovec.reference import naive_sequence


def op_ratios(shapes=((1, 576, 171), (256, 576, 171)), repeats: int = 30, rounds: int = 3) -> list[dict[str, Any]]:
    """For each (N, d, K): median microseconds of the fused op (steer + project + capture) and of the naive
    sequence of torch ops on the same CPU tensors, interleaved in ``rounds``, and their ratio."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for n, d, k in shapes:
        h = torch.randn(n, d, generator=g)
        table = 0.01 * torch.randn(2, d, generator=g)
        slots = (torch.arange(n) % 3) - 1
        probes = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
        segments = torch.arange(n) % 2
        sums, counts = torch.zeros(2, d), torch.zeros(2)
        scores, norms = torch.empty(n, k), torch.empty(n)

        def fused():
            steer_project(h, slots=slots, table=table, probes=probes, segments=segments, sums=sums, counts=counts,
                          scores=scores, norms=norms, validate=False)

        def naive():
            naive_sequence(h, slots, table, None, probes, None, segments, sums, counts)

        times: dict[str, list[float]] = {"fused": [], "naive": []}
        for fn in (fused, naive):
            fn()  # warm up
        for _ in range(rounds):
            for name, fn in (("fused", fused), ("naive", naive)):
                samples = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    fn()
                    samples.append(time.perf_counter() - t0)
                times[name].append(statistics.median(samples))
        fused_us, naive_us = (1e6 * statistics.median(times[x]) for x in ("fused", "naive"))
        rows.append({"N": n, "d": d, "K": k, "fused_us": round(fused_us, 1), "naive_us": round(naive_us, 1),
                     "speedup": round(naive_us / fused_us, 2)})
    return rows
