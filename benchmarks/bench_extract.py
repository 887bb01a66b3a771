"""Extraction throughput against a plain forward pass over the same tokens, in one run, on the default model.

    python benchmarks/bench_extract.py                  # a tenth of the story grid, 2 rounds each
    python benchmarks/bench_extract.py --fraction 1     # the whole grid (about 20 minutes a round on 2 cores)

Both providers see the same stories in the same batches (longest first, batch 8): ``plain`` runs the decoder
(no LM head) over every layer; ``extract`` runs emovec's story pass (segment capture at all 30 layers through the
fused op, the forward stopped after the deepest layer). Rounds are interleaved; medians are reported with the
ratio. The full extraction's wall time is recorded in the shipped vectors' metadata (extraction_seconds) by
``scripts/make_default_vectors.py``. Writes benchmarks/results/extract_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import emovec  # noqa: E402
from emovec import corpus  # noqa: E402
from emovec.extraction import _normalise_rows, extract  # noqa: E402
from harness import command_line  # noqa: E402


def plain_forward(model, tokenizer, rows, batch_size: int) -> int:
    lengths = [len(r["text"]) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (-lengths[i], rows[i]["id"]))
    tokens = 0
    with torch.no_grad():
        for i in range(0, len(order), batch_size):
            batch = tokenizer([rows[j]["text"] for j in order[i : i + batch_size]], return_tensors="pt",
                              padding=True, truncation=True, max_length=512)
            model.model(**batch)
            tokens += int(batch["attention_mask"].sum())
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the grid's stories (every n-th)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    model, tokenizer, name = emovec.load_model()
    grid = corpus.load_grid()
    step = max(1, round(1 / args.fraction))
    stories = grid[::step]
    rows = _normalise_rows(stories)
    times: dict[str, list[float]] = {"plain": [], "extract": []}
    tokens = 0
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        tokens = plain_forward(model, tokenizer, rows, args.batch_size)
        times["plain"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        extract(model, tokenizer, stories=stories, neutral=[], denoise_variance=0, heldout=[],
                batch_size=args.batch_size, progress=False)
        times["extract"].append(time.perf_counter() - t0)
    median = {k: statistics.median(v) for k, v in times.items()}
    report = {"model": name, "threads": torch.get_num_threads(), "stories": len(stories), "tokens": tokens,
              "rounds": args.rounds, "plain_s": median["plain"], "extract_s": median["extract"],
              "plain_tokens_per_s": tokens / median["plain"], "extract_tokens_per_s": tokens / median["extract"],
              "extract_over_plain_time": median["extract"] / median["plain"], "all_times": times,
              "command": command_line()}
    shipped = corpus.data_path("vectors") / f"{name}.safetensors"
    if shipped.exists():
        report["shipped_extraction_seconds"] = emovec.VectorSet.load(shipped).metadata.get("extraction_seconds")
    out = Path("benchmarks/results") / f"extract_{next(model.parameters()).device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
