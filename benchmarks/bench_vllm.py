"""vLLM plain vs vLLM with emovec's plugin, in one engine and one run (rounds interleaved).

Scenarios, each 8 concurrent requests of ``--tokens`` greedy tokens (ignore_eos) from short prompts:
  vllm       plain vLLM: a second engine in the same process, started with the plugin off (EMOVEC_VLLM=0);
  plain      no emovec settings (the plugin is loaded and idle);
  steer      one recipe per request, 4 different recipes among the 8, at layers 10-20;
  steer+mon  the same, and every request monitors all 171 emotions at every layer (per generated token).
Output tokens/s per round, the median and p20/p80 over rounds, time per token relative to plain vLLM (per round,
then the median); the readings' fetch time
separately. Run it in vLLM's environment (scripts/setup_vllm.sh). Never asserts anything.

    python benchmarks/bench_vllm.py [--rounds 3] [--tokens 64] [--eager] [--dtype float32] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RECIPES = ["calm=0.05", "desperate=0.05", "happy=0.05,afraid=-0.03", "loving=0.05"]
PROMPTS = ["I just lost my job and", "Tell me about your weekend.", "The storm was getting closer, so",
           "Write a short note to a friend who", "My favourite food is", "The meeting ran late because",
           "Here is a recipe for soup:", "When the train stopped suddenly,"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's compiled mode)")
    parser.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/vllm_<device>.json)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # spawned workers read EMOVEC_VLLM afresh (forked ones, vLLM's default on a GPU, would inherit the loaded plugin)
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

    import torch
    from vllm import LLM, SamplingParams

    from emovec.integrations import vllm as ev

    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = LLM(ev.model_path(), dtype=args.dtype, max_model_len=512, max_num_seqs=8, enforce_eager=args.eager, seed=0)
    os.environ["EMOVEC_VLLM"] = "0"  # read by the plugin in the processes the second engine starts
    off = LLM(ev.model_path(), dtype=args.dtype, max_model_len=512, max_num_seqs=8, enforce_eager=args.eager, seed=0)
    del os.environ["EMOVEC_VLLM"]

    def params(kind: str, i: int) -> SamplingParams:
        extra = None
        if kind != "plain":
            extra = ev.extra_args(steer=RECIPES[i % 4], layers="10-20",
                                  monitor="all" if kind == "steer+mon" else None,
                                  monitor_layers="all" if kind == "steer+mon" else None)
        return SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True, extra_args=extra)

    kinds = ["vllm", "plain", "steer", "steer+mon"]
    engines = {"vllm": off, "plain": llm, "steer": llm, "steer+mon": llm}
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    fetch_s: list[float] = []
    for k in kinds:  # warm-up: compile shapes, allocate buffers
        engines[k].generate(PROMPTS, [params("plain" if k == "vllm" else k, i) for i in range(8)], use_tqdm=False)
    ev.fetch(llm)
    for r in range(args.rounds):
        for k in kinds:
            t0 = time.perf_counter()
            outs = engines[k].generate(PROMPTS, [params("plain" if k == "vllm" else k, i) for i in range(8)],
                                       use_tqdm=False)
            dt = time.perf_counter() - t0
            rates[k].append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
            if k == "steer+mon":
                t0 = time.perf_counter()
                got = ev.readings(llm, outs)
                fetch_s.append(time.perf_counter() - t0)
                assert len(got) == 8
        print(f"round {r + 1}: " + ", ".join(f"{k} {rates[k][-1]:.1f} tok/s" for k in kinds), flush=True)

    def summary(values: list[float]) -> dict[str, float]:
        q = statistics.quantiles(values, n=10) if len(values) > 1 else [values[0]] * 9
        return {"p20": q[1], "p50": statistics.median(values), "p80": q[7]}

    rows = {k: {"tok_s": summary(v), "rounds": v} for k, v in rates.items()}
    for k in kinds:
        # per round, time relative to the plain run of the same round, then the median
        rows[k]["time_vs_vllm"] = statistics.median(p / x for p, x in zip(rates["vllm"], rates[k]))
    result = {"command": " ".join(["python", *sys.argv]), "device": device, "machine": platform.processor() or
              platform.machine(), "threads": torch.get_num_threads(), "dtype": args.dtype, "eager": args.eager,
              "tokens": args.tokens, "requests": 8, "recipes": RECIPES, "scenarios": rows,
              "readings_fetch_s": summary(fetch_s) if fetch_s else None}
    out = Path(args.out or Path(__file__).parent / "results" / f"vllm_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(f"{'scenario':<10} {'tok/s p50':>10} {'p20':>8} {'p80':>8} {'time/vllm':>10}")
    for k in kinds:
        s = rows[k]["tok_s"]
        print(f"{k:<10} {s['p50']:>10.1f} {s['p20']:>8.1f} {s['p80']:>8.1f} {rows[k]['time_vs_vllm']:>10.3f}")
    if fetch_s:
        print(f"readings fetch (8 requests x {args.tokens} tokens x 30 layers x 171): "
              f"{statistics.median(fetch_s):.2f} s")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
