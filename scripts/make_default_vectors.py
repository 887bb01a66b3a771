"""Regenerate the emotion vectors shipped for the default model (SmolLM2-135M-Instruct).

    python scripts/make_default_vectors.py            # about 25 minutes on 2 CPU cores; resumable

Extracts all 171 emotions at every layer from the packaged story grid (denoised with the neutral dialogues), picks
the default layer by held-out accuracy on the packaged held-out stories, and writes
python/emovec/data/vectors/SmolLM2-135M-Instruct.safetensors in float16 (the tensors load as float32).
Progress is checkpointed in emovec's cache folder; rerun the same command after an interruption.
"""

from __future__ import annotations

import sys
import time

import torch

import emovec
from emovec import corpus
from emovec.extraction import extract
from emovec.models import DEFAULT_MODEL, cache_dir


def main() -> int:
    model, tokenizer, name = emovec.load_model()
    if name != DEFAULT_MODEL:
        print(f"expected the default model, got {name}", file=sys.stderr)
        return 1
    target = corpus.data_path("vectors") / f"{name}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = cache_dir() / "vectors" / f"{name}-shipped.partial.safetensors"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    vectors = extract(model, tokenizer, layers="all", checkpoint=checkpoint)
    elapsed = time.perf_counter() - started
    vectors.metadata["extraction_seconds"] = round(elapsed, 1)
    vectors.save(target, dtype=torch.float16)
    checkpoint.unlink(missing_ok=True)
    accuracy = vectors.metadata.get("heldout_accuracy", {})
    print(f"wrote {target}: {len(vectors.names)} vectors x {len(vectors.layers)} layers in {elapsed:.0f} s; "
          f"default layer {vectors.default_layer} (held-out top-1/top-5 {accuracy.get(str(vectors.default_layer))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
