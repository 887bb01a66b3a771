"""Compiled generation: `emovec.generate(..., compile=True)` plain vs monitoring all layers x K vectors and steering
one recipe at one layer, on the default model, with the eager runs of both for reference; interleaved rounds.

    python benchmarks/bench_compiled.py                      # batch 1, 32 new tokens, 3 rounds
    python benchmarks/bench_compiled.py --batch 8 --tokens 64 --rounds 5

Compiling happens in the first (untimed) call of each compiled provider: on 2 CPU cores the default model takes
a few minutes per provider. Time / plain is per provider against the compiled plain run (and the eager plain run
for the eager providers). Results go to results/compiled_<device>.json with the command that made them.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import emovec  # noqa: E402
from emovec.bench.runner import random_vectors  # noqa: E402
from emovec.layers import find_decoder_layers  # noqa: E402
from harness import command_line, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens")
    parser.add_argument("--k", type=int, default=171, help="vectors per layer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model, _tokenizer, name = emovec.load_model(None, device=str(device))
    vectors = random_vectors(model, args.k)
    layers = len(find_decoder_layers(model).layers)
    steer_layer = round(2 * (layers - 1) / 3)
    recipe = {vectors.names[0]: 0.05}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 30000, (args.batch, args.prompt), generator=g).to(device)

    def run(compiled: bool, intervene: bool):
        def call():
            kwargs = dict(vectors=vectors, monitor_layers="all", recipe=recipe, steer_layers=[steer_layer]) \
                if intervene else {}
            with torch.no_grad():
                out = emovec.generate(model, ids, max_new_tokens=args.tokens, compile=compiled, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out
        return call

    providers = {"compiled plain": run(True, False), "compiled emovec": run(True, True),
                 "eager plain": run(False, False), "eager emovec": run(False, True)}
    compile_s = {}
    for label, fn in providers.items():  # the first call compiles (untimed), the second checks it was kept
        t0 = time.perf_counter()
        fn()
        compile_s[label] = round(time.perf_counter() - t0, 1)
        print(f"{label}: first call {compile_s[label]} s", flush=True)
    samples: dict[str, list[float]] = {label: [] for label in providers}
    for r in range(args.rounds):
        for label, fn in providers.items():
            t0 = time.perf_counter()
            fn()
            samples[label].append(time.perf_counter() - t0)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in samples.items()), flush=True)
    rows = []
    for label, v in samples.items():
        base = statistics.median(samples[label.split()[0] + " plain"])
        q = statistics.quantiles(v, n=5) if len(v) > 1 else [v[0]] * 4
        rows.append({"provider": label, "p20_s": round(q[0], 3), "p50_s": round(statistics.median(v), 3),
                     "p80_s": round(q[3], 3), "tokens_per_s": round(args.batch * args.tokens / statistics.median(v), 1),
                     "time_vs_plain_same_mode": round(statistics.median(v) / base, 3),
                     "first_call_s": compile_s[label]})
    for row in rows:
        print(f"{row['provider']:16s} {row['p50_s']:8.3f} s  {row['tokens_per_s']:7.1f} tok/s  "
              f"x{row['time_vs_plain_same_mode']:.3f} of plain in the same mode")
    result = {"model": name, "device": str(device), "batch": args.batch, "prompt": args.prompt, "tokens": args.tokens,
              "K": args.k, "layers": layers, "steer_layer": steer_layer, "rounds": args.rounds,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "rows": rows, "command": command_line()}
    write_json(args.out or Path(__file__).parent / "results" / f"compiled_{device.type}_b{args.batch}.json", result)
    return result


if __name__ == "__main__":
    main()
