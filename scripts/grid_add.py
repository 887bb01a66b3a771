"""Add one emotion's row of the story grid from a plain-text draft (authoring tool for the packaged corpus).

Draft format: one block per topic, each starting with a line ``## <topic-id>`` followed by the story text.
Usage: python scripts/grid_add.py EMOTION DRAFT.txt
Writes python/emovec/data/grid/<emotion-slug>.jsonl (atomically) when every story passes the grid checks,
otherwise prints the problems and writes nothing.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python" / "emovec"))
import corpus  # noqa: E402  (torch-free, importable by path)


def parse(draft: str) -> dict[str, str]:
    blocks = re.split(r"^##\s*(\S+)\s*$", draft, flags=re.M)
    return {blocks[i].strip(): " ".join(blocks[i + 1].split()) for i in range(1, len(blocks) - 1, 2)}


def main(emotion: str, draft_path: str) -> int:
    if emotion not in corpus.load_emotions():
        print(f"unknown emotion {emotion!r}")
        return 1
    topics = corpus.load_topics()
    stories = parse(Path(draft_path).read_text(encoding="utf-8"))
    problems = [f"missing topic {t['id']}" for t in topics if t["id"] not in stories]
    problems += [f"unknown topic {k}" for k in stories if k not in {t["id"] for t in topics}]
    rows = [{"id": f"{emotion}/{t['id']}", "emotion": emotion, "topic": t["id"], "person": t["person"],
             "text": stories[t["id"]]} for t in topics if t["id"] in stories]
    problems += corpus.check_grid_rows(rows)
    out = corpus.data_path("grid") / (emotion.replace(" ", "-") + ".jsonl")
    others = [r for p in sorted(out.parent.glob("*.jsonl")) if p != out for r in corpus.read_jsonl(p)]
    texts = [r["text"] for r in rows] + [r["text"] for r in others]
    ids = [r["id"] for r in rows] + [r["id"] for r in others]
    for i, j, score in corpus.near_duplicates(texts):
        if i < len(rows) or j < len(rows):
            problems.append(f"near-duplicate: {ids[i]} ~ {ids[j]} (jaccard {score:.2f}): rewrite one of them")
    if problems:
        print("\n".join(problems))
        print(f"NOT written: {len(problems)} problem(s)")
        return 1
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out)
    print(f"OK: wrote {len(rows)} stories to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
