"""The share of the default model's forward passes that emovec's own work takes, monitoring all layers x K vectors and
steering one concept at one layer, timed inside the same forward passes: the noise of a shared machine, which swamps
a comparison of whole runs with and without monitoring here (benchmarks/README.md), does not enter the share.

    python benchmarks/bench_monitor_share.py             # prefill 4 x 256 tokens; decode steps at batch 1 and 8

Timed with perf_counter, per forward pass: every call of the wrapper emovec installs on a layer less the layer's own
forward inside it (so the monitoring, the steering, the layers run together at the last one, and the wrapper's own
bookkeeping; the steered layer's call alone is reported too), and the model's pre-hook (each forward's set-up);
after each block, `result()` (the record read back into a MonitorResult), spread over the block's forward passes. The forward passes with the contexts and plain ones
alternate in blocks. What the share misses: the model's weights evicted from the caches by the probes (a decode
step's weights stream from DRAM anyway: bench_monitor_step.py times whole steps, with the noise).
results/monitor_share_cpu.json.
"""

from __future__ import annotations

import argparse
import contextlib
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


class Meter:
    """Time spent in emovec's layer wrappers (less the layers' own forward) and its pre-hook, while installed."""

    def __init__(self) -> None:
        self.spent = 0.0
        self.steering = 0.0  # of which Steer.apply (the steered layer's call)

    @contextlib.contextmanager
    def installed(self):
        slot_call, pre_hook = runtime._LayerSlot.__call__, runtime._LayerRuntime._pre_hook
        steer_apply = runtime.Steer.apply
        meter = self

        def timed_steer(context, *args):
            t0 = time.perf_counter()
            try:
                return steer_apply(context, *args)
            finally:
                meter.steering += time.perf_counter() - t0

        def timed_slot(slot, *args, **kwargs):
            t0 = time.perf_counter()
            inner, inside = slot.inner, [0.0]

            def timed_inner(*a, **k):
                s = time.perf_counter()
                try:
                    return inner(*a, **k)
                finally:
                    inside[0] += time.perf_counter() - s

            slot.inner = timed_inner
            try:
                return slot_call(slot, *args, **kwargs)
            finally:
                slot.inner = inner
                meter.spent += time.perf_counter() - t0 - inside[0]

        def timed_pre_hook(context, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return pre_hook(context, *args, **kwargs)
            finally:
                meter.spent += time.perf_counter() - t0

        runtime._LayerSlot.__call__, runtime._LayerRuntime._pre_hook = timed_slot, timed_pre_hook
        runtime.Steer.apply = timed_steer
        try:
            yield self
        finally:
            runtime._LayerSlot.__call__, runtime._LayerRuntime._pre_hook = slot_call, pre_hook
            runtime.Steer.apply = steer_apply


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=171)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="decode batch sizes")
    parser.add_argument("--prefill", type=int, nargs=2, default=[4, 256], metavar=("BATCH", "TOKENS"))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per block")
    parser.add_argument("--bf16-probes", action="store_true", help="monitor with bf16 probes (the CPU opt-in)")
    parser.add_argument("--bf16-dots", action="store_true",
                        help="monitor with bf16 dots (the rows rounded to bf16 too; implies --bf16-probes)")
    parser.add_argument("--window-rows", type=int, default=None,
                        help="rows per layer the monitor keeps across decode steps (emovec.runtime.DEFER_WINDOW_ROWS; "
                             "0: project at every step)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from transformers import DynamicCache

    if args.window_rows is not None:
        runtime.DEFER_WINDOW_ROWS = args.window_rows
    model, _tokenizer, name = emovec.load_model(None)
    vectors = random_vectors(model, args.k)
    num_layers = len(find_decoder_layers(model).layers)
    layers = list(range(num_layers))
    steer_layer = round(2 * (num_layers - 1) / 3)
    recipe = {vectors.names[0]: 0.05}
    g = torch.Generator().manual_seed(0)
    meter = Meter()
    rows = []

    def measure(label: str, forward, per_block: int, tokens: int) -> None:
        plain: list[float] = []
        within: list[float] = []
        spent: list[float] = []
        steering: list[float] = []
        reading: list[float] = []
        with torch.no_grad():
            forward()  # warm-up, plain and with the contexts
            for rnd in range(args.rounds + 1):
                t0 = time.perf_counter()
                for _ in range(per_block):
                    forward()
                plain_block = (time.perf_counter() - t0) / per_block
                monitor = emovec.monitor(model, vectors, layers, bf16_probes=args.bf16_probes, bf16_dots=args.bf16_dots)
                with meter.installed(), emovec.steer(model, vectors, recipe, [steer_layer]), monitor:
                    meter.spent = meter.steering = 0.0
                    t0 = time.perf_counter()
                    for _ in range(per_block):
                        forward()
                    within_block = (time.perf_counter() - t0) / per_block
                    spent_block = meter.spent / per_block
                    steering_block = meter.steering / per_block
                t0 = time.perf_counter()
                monitor.result()
                read = (time.perf_counter() - t0) / per_block
                if rnd > 0:  # the first round warms the contexts' prepared calls
                    plain.append(plain_block)
                    within.append(within_block)
                    spent.append(spent_block)
                    steering.append(steering_block)
                    reading.append(read)
        p, w = statistics.median(plain), statistics.median(within)
        s, r = statistics.median(spent), statistics.median(reading)
        row = {"scenario": label, "tokens_per_forward": tokens, "plain_ms": round(p * 1e3, 3),
               "with_contexts_ms": round(w * 1e3, 3), "emovec_in_forward_ms": round(s * 1e3, 4),
               "result_per_forward_ms": round(r * 1e3, 4), "emovec_share_of_plain": round((s + r) / p, 4),
               "of_which_steering_ms": round(statistics.median(steering) * 1e3, 4),
               "whole_ratio": round(w / p, 4),
               "whole_ratio_spread": [round(min(within) / max(plain), 4), round(max(within) / min(plain), 4)],
               "rounds": args.rounds, "forwards_per_round": per_block}
        print(f"{label}: plain {p * 1e3:.2f} ms per forward; emovec's own work {s * 1e3:.3f} ms inside it + "
              f"{r * 1e3:.3f} ms reading the record = {100 * (s + r) / p:.2f}% of plain; whole forward with the "
              f"contexts x{w / p:.3f} (rounds' extremes x{row['whole_ratio_spread'][0]:.3f}.."
              f"x{row['whole_ratio_spread'][1]:.3f})", flush=True)
        rows.append(row)

    batch, tokens = args.prefill
    ids = torch.randint(100, 30000, (batch, tokens), generator=g)
    measure(f"prefill {batch} x {tokens}", lambda: model(input_ids=ids, use_cache=False), 2, batch * tokens)
    for batch in args.batches:
        prompt = torch.randint(100, 30000, (batch, 16), generator=g)
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=prompt, past_key_values=cache, use_cache=True)
        token = torch.full((batch, 1), 500)
        mask = torch.ones(batch, 17, dtype=torch.long)

        def step(token=token, mask=mask, cache=cache):  # one decode step; the cache is cropped back after it
            model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
            cache.crop(-1)

        measure(f"decode step b{batch}", step, args.steps, batch)
    result = {"model": name, "K": args.k, "layers": num_layers, "steer_layer": steer_layer, "recipe": recipe,
              "bf16_probes": args.bf16_probes or args.bf16_dots, "bf16_dots": args.bf16_dots, "window_rows": runtime.DEFER_WINDOW_ROWS, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "rows": rows, "command": command_line()}
    suffix = "_bf16_dots" if args.bf16_dots else "_bf16_probes" if args.bf16_probes else ""
    write_json(args.out or Path(__file__).parent / "results" / f"monitor_share_cpu{suffix}.json", result)
    return result


if __name__ == "__main__":
    main()
