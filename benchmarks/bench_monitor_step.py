"""One decode step of the default model with and without `emovec.monitor` on all layers x K vectors: what monitoring
costs per step inside the forward pass, without generate()'s own per-call work and noise.

    python benchmarks/bench_monitor_step.py                  # batch 1, K = 171, 15 rounds of 10 steps each way
    python benchmarks/bench_monitor_step.py --batch 8

A 16-token prompt fills a KV cache; each step feeds one token and crops the cache back, so every step sees the same
shapes. Rounds alternate a block of plain steps and blocks inside one `emovec.monitor` context each (entered once
per block): fp32 probes, bf16 probes, fp32 probes with a call per layer (as before 2026-11-30) instead of every
layer's projection run together at the last layer, and fp32 probes with the layers run together at each step but no
rows kept across steps (DEFER_WINDOW_ROWS = 0, as before the windows). Reports, for each, the median over rounds of
a block's mean step (rows a monitor still keeps at the block's end are projected then, and counted), and the ratio
to plain; results/monitor_step_<device>_b<B>.json.
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
import emovec.runtime as runtime  # noqa: E402
from emovec.bench.runner import random_vectors  # noqa: E402
from emovec.layers import find_decoder_layers  # noqa: E402
from harness import command_line, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--k", type=int, default=171)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="steps per block")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from transformers import DynamicCache

    model, _tokenizer, name = emovec.load_model(None)
    vectors = random_vectors(model, args.k)
    layers = list(range(len(find_decoder_layers(model).layers)))
    ids = torch.randint(100, 1000, (args.batch, 16), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    token = torch.full((args.batch, 1), 500)
    mask = torch.ones(args.batch, 17, dtype=torch.long)
    monitor = emovec.monitor(model, vectors, layers)
    monitor_bf16 = emovec.monitor(model, vectors, layers, bf16_probes=True)

    def block(context=None) -> list[float]:
        """A block of steps, each timed; a monitor's rows still kept at the end (the runtime keeps the rows of up to
        DEFER_WINDOW_ROWS // batch decode steps and projects them together) are projected then, and that time is
        spread over the block's steps, so the steps' mean is the amortised cost."""
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
            cache.crop(-1)
            times.append(time.perf_counter() - t0)
        if context is not None:
            t0 = time.perf_counter()
            context._flush()
            spread = (time.perf_counter() - t0) / len(times)
            times = [t + spread for t in times]
        return times

    monitor_each = emovec.monitor(model, vectors, layers)

    def layer_by_layer() -> list[float]:  # each layer's projection in its own call, as before 2026-11-30
        kept = runtime.DEFER_MAX_ROWS
        runtime.DEFER_MAX_ROWS = 0
        try:
            with monitor_each:
                return block(monitor_each)
        finally:
            runtime.DEFER_MAX_ROWS = kept

    monitor_step = emovec.monitor(model, vectors, layers)

    def step_by_step() -> list[float]:  # the layers together at each step's last layer, as before 2026-11-30 (3)
        kept = runtime.DEFER_WINDOW_ROWS
        runtime.DEFER_WINDOW_ROWS = 0
        try:
            with monitor_step:
                return block(monitor_step)
        finally:
            runtime.DEFER_WINDOW_ROWS = kept

    plain: list[float] = []
    monitored: list[float] = []
    monitored_bf16: list[float] = []
    monitored_each: list[float] = []
    monitored_step: list[float] = []

    def mean(blocks: list[list[float]]) -> float:  # the median over rounds of each block's mean step
        return statistics.median(statistics.fmean(b) for b in blocks)

    with torch.no_grad():
        block()
        for _ in range(args.rounds):
            plain.append(block())
            with monitor:
                monitored.append(block(monitor))
            with monitor_bf16:
                monitored_bf16.append(block(monitor_bf16))
            monitored_each.append(layer_by_layer())
            monitored_step.append(step_by_step())
    a, b, c = mean(plain), mean(monitored), mean(monitored_bf16)
    e, f = mean(monitored_each), mean(monitored_step)
    print(f"batch {args.batch}: plain {a * 1e3:.2f} ms, monitored ({len(layers)} layers x {args.k}) {b * 1e3:.2f} ms "
          f"per step: x{b / a:.3f}; with bf16 probes {c * 1e3:.2f} ms: x{c / a:.3f}; layer by layer (a call per "
          f"layer) {e * 1e3:.2f} ms: x{e / a:.3f}; step by step (the layers together at each step, no rows kept "
          f"across steps) {f * 1e3:.2f} ms: x{f / a:.3f}")
    result = {"model": name, "batch": args.batch, "K": args.k, "layers": len(layers), "threads": torch.get_num_threads(),
              "plain_ms": round(a * 1e3, 3), "monitored_ms": round(b * 1e3, 3), "ratio": round(b / a, 4),
              "monitored_bf16_probes_ms": round(c * 1e3, 3), "ratio_bf16_probes": round(c / a, 4),
              "monitored_layer_by_layer_ms": round(e * 1e3, 3), "ratio_layer_by_layer": round(e / a, 4),
              "monitored_step_by_step_ms": round(f * 1e3, 3), "ratio_step_by_step": round(f / a, 4),
              "window_rows": runtime.DEFER_WINDOW_ROWS, "statistic": "median over rounds of a block's mean step",
              "steps_each": sum(len(b) for b in plain), "torch": torch.__version__, "command": command_line()}
    write_json(args.out or Path(__file__).parent / "results" / f"monitor_step_cpu_b{args.batch}.json", result)
    return result


if __name__ == "__main__":
    main()
