"""Time extracting all 171 emotion vectors at every layer of the default model, and report their geometry.

    python benchmarks/bench_extract.py            # writes benchmarks/results/extract_<device>.json

Reports: wall time and tokens/s of the extraction, variance explained by PC1 and PC2 of the vectors at the
default layer, and the nearest neighbours by cosine of afraid, calm, desperate, happy and loving.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import emovec  # noqa: E402
from emovec.extraction import default_vectors_path, extract  # noqa: E402
from harness import command_line  # noqa: E402


def geometry(vectors: emovec.VectorSet, layer: int) -> dict:
    unit = vectors.unit[vectors.slice_of(layer)]
    centered = unit - unit.mean(0)
    singular = torch.linalg.svdvals(centered) ** 2
    explained = (singular / singular.sum()).tolist()
    cos = unit @ unit.T
    neighbours = {}
    for name in ("afraid", "calm", "desperate", "happy", "loving"):
        i = vectors.index(name)
        order = cos[i].argsort(descending=True)[1:6]
        neighbours[name] = [(vectors.names[j], round(float(cos[i, j]), 3)) for j in order]
    return {"pc1_variance": explained[0], "pc2_variance": explained[1], "neighbours": neighbours}


def main() -> None:
    t0 = time.perf_counter()
    model, tokenizer, name = emovec.load_model()
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    vectors = extract(model, tokenizer, progress=True)
    extract_s = time.perf_counter() - t0
    path = default_vectors_path(model)
    if not path.exists():
        vectors.save(path)
    report = {"model": name, "threads": torch.get_num_threads(), "load_s": load_s, "extract_s": extract_s,
              "stories": vectors.metadata["num_stories"], "neutral": vectors.metadata["num_neutral"],
              "layers": len(vectors.layers), "default_layer": vectors.default_layer,
              "neutral_pcs_at_default_layer": vectors.metadata["neutral_pcs_per_layer"][vectors.slice_of(vectors.default_layer)],
              **geometry(vectors, vectors.default_layer), "command": command_line()}
    out = Path("benchmarks/results") / f"extract_{next(model.parameters()).device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
