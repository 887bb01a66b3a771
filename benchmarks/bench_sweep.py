"""emovec sweep against a plain forward pass over the same tokens, on the default model, in one run.

    python benchmarks/bench_sweep.py                 # 256 grid stories, 2 rounds (a few minutes on 2 cores)

Providers, interleaved per round: ``plain`` (the decoder over the same batches, all layers, no LM head),
``sweep-token`` (every layer x all 171 vectors per token, float16), ``sweep-mean`` (the same, pooled per example).
Reports tokens/s, the ratio to plain, peak resident memory of the process, and bytes written per token.
Writes benchmarks/results/sweep_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import emovec  # noqa: E402
from emovec import corpus  # noqa: E402
from emovec.extraction import resolve_vectors  # noqa: E402
from emovec.sweep import run_sweep  # noqa: E402
from emovec.sweep.core import _batches, _Piece  # noqa: E402
from harness import command_line  # noqa: E402


def plain(model, tokenizer, texts, budget: int) -> int:
    pieces = [_Piece(i, tokenizer(t)["input_ids"], [], [], 0) for i, t in enumerate(texts)]
    tokens = 0
    with torch.no_grad():
        for batch in _batches(pieces, budget):
            width = max(len(pieces[i].ids) for i in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(pieces[i].ids)] = torch.tensor(pieces[i].ids)
                mask[row, : len(pieces[i].ids)] = 1
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)
            tokens += int(mask.sum())
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    args = parser.parse_args()
    model, tokenizer, name = emovec.load_model()
    vectors = resolve_vectors(None, model)
    texts = [row["text"] for row in corpus.load_grid()[:: max(1, 4104 // args.examples)][: args.examples]]
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    times: dict[str, list[float]] = {"plain": [], "sweep-token": [], "sweep-mean": []}
    written: dict[str, int] = {}
    tokens = 0
    for r in range(args.rounds):
        t0 = time.perf_counter()
        tokens = plain(model, tokenizer, texts, args.batch_tokens)
        times["plain"].append(time.perf_counter() - t0)
        for pool in ("token", "mean"):
            out = work / f"{pool}-{r}"
            t0 = time.perf_counter()
            run_sweep(model, tokenizer, vectors, data, out, layers="all", pool=pool, batch_tokens=args.batch_tokens,
                      progress=False)
            times[f"sweep-{pool}"].append(time.perf_counter() - t0)
            written[pool] = sum(p.stat().st_size for p in (out / "shards").glob("*.parquet"))
            shutil.rmtree(out)
    median = {k: statistics.median(v) for k, v in times.items()}
    report = {"model": name, "threads": torch.get_num_threads(), "examples": len(texts), "tokens": tokens,
              "layers": len(vectors.layers), "vectors": len(vectors.names), "rounds": args.rounds,
              "tokens_per_s": {k: tokens / v for k, v in median.items()},
              "ratio_to_plain": {k: median["plain"] / v for k, v in median.items()},
              "bytes_per_token": {k: v / tokens for k, v in written.items()},
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "all_times": times,
              "command": command_line()}
    shutil.rmtree(work, ignore_errors=True)
    out = Path("benchmarks/results") / f"sweep_{next(model.parameters()).device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
