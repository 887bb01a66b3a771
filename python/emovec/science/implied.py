"""Implied emotions: short user messages that imply an emotion without naming it; where the reply begins, how
highly does the intended emotion rank among all the vectors?"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from emovec import corpus
from emovec.science.readings import read_messages
from emovec.vectors import VectorSet


def load_messages(path: str | Path | None = None) -> list[dict[str, str]]:
    """Rows with ``text`` and ``emotion``; default: the packaged 36 messages."""
    path = path if path is not None else corpus.data_path("experiments/implied.jsonl")
    rows, _ = corpus.read_records(path, ["text", "emotion"])
    return rows


def run_implied(model, tokenizer, vectors: VectorSet, rows: Sequence[dict], layer: int, *, top: int = 5,
                batch_size: int = 8, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """For each message: the intended emotion's rank (1 = strongest) among all vectors, at the last prompt token
    and over the user's tokens, and the ``top`` strongest emotions there.

    Also ``rank_centred``: the rank at the last prompt token after subtracting each emotion's mean reading over
    all the messages. The last prompt token is the same template token for every message, so a vector that is
    high there whatever the message (on the default model: sullen) tops every raw ranking; centring asks which
    emotion this message raises most relative to the others. (Added after the raw ranking was first seen.)"""
    rows = [r for r in rows if r["emotion"] in vectors.names]
    if not rows:
        raise ValueError("none of the messages names an emotion these vectors have; check the 'emotion' fields")
    readings = read_messages(model, tokenizer, vectors, [r["text"] for r in rows], [layer], batch_size=batch_size,
                             progress=progress)
    names = vectors.names
    last = readings.at(layer, "last")
    centred = last - last.mean(0, keepdim=True)
    items = []
    for i, row in enumerate(rows):
        item = {"text": row["text"], "emotion": row["emotion"]}
        for which, table in (("last", last), ("user", readings.at(layer, "user")), ("centred", centred)):
            values = table[i]
            order = values.argsort(descending=True).tolist()
            item[f"rank_{which}"] = order.index(names.index(row["emotion"])) + 1
            item[f"top_{which}"] = [[names[j], round(float(values[j]), 4)] for j in order[:top]]
        items.append(item)
    summary = {}
    for which in ("last", "user", "centred"):
        ranks = sorted(item[f"rank_{which}"] for item in items)
        summary[which] = {"median_rank": ranks[len(ranks) // 2] if ranks else None,
                          "top1": sum(r == 1 for r in ranks), "top5": sum(r <= 5 for r in ranks),
                          "top10": sum(r <= 10 for r in ranks)}
    return {"layer": layer, "num_vectors": len(names), "chance_median_rank": (len(names) + 1) / 2,
            "messages": items, "summary": summary}
