"""Regenerate an emotion-story corpus with any local chat model, enforcing the no-emotion-word rule by filtering."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from emovec.corpus import find_emotion_words, near_duplicates, read_jsonl

TOPICS = [
    "a night shift at a hospital", "a family dinner", "a job interview", "a long train journey", "a small farm in winter",
    "a school exam", "a first day in a new city", "a football match", "a kitchen before a big event",
    "a letter from an old friend", "a lost pet", "a mountain hike", "a court hearing", "a wedding rehearsal",
    "a broken-down car", "a science lab late at night", "a market stall", "a hospital waiting room",
    "a moving day", "a phone call from abroad", "a fishing boat", "a piano recital", "an online game",
    "a garden in spring", "a retirement party", "a power cut", "a bakery at dawn", "a border crossing",
]
NARRATORS = [
    "a child of nine", "a teenager", "a nurse in her forties", "a retired teacher", "a farmer",
    "a software developer", "a chef", "a soldier on leave", "a grandmother", "a young father", "a student",
    "a bus driver", "an immigrant shopkeeper", "an athlete", "a scientist", "a musician",
]
PROMPT = (
    "Write one short story of about 120 words about {narrator} and {topic}. The main character feels {emotion}. "
    "Show the feeling only through actions, body sensations, dialogue and thoughts. Never write the word "
    "'{emotion}' or any word from its family. Write in the {person} person. Reply with the story only."
)


def story_prompt(emotion: str, rng: random.Random) -> tuple[str, str]:
    topic = rng.choice(TOPICS)
    prompt = PROMPT.format(narrator=rng.choice(NARRATORS), topic=topic, emotion=emotion,
                           person=rng.choice(["first", "third"]))
    return prompt, topic


def accept(text: str, emotion: str, min_words: int = 60, max_words: int = 220) -> str | None:
    """The cleaned story, or None when it breaks a rule (length, the emotion word or its family)."""
    text = text.strip().strip('"').strip()
    end = max(text.rfind(mark) for mark in ".!?")
    if end > 0:  # a draft cut off by max_new_tokens ends at its last full sentence
        text = text[: end + 1]
    words = len(text.split())
    if not min_words <= words <= max_words or find_emotion_words(text, emotion):
        return None
    return text


def generate_stories(generate: Callable[[str], str], emotions: Sequence[str], per_emotion: int, out: str | Path,
                     *, attempts: int = 4, seed: int = 0, progress: Callable[[int], None] | None = None) -> dict:
    """Write ``per_emotion`` accepted stories per emotion to ``out`` (JSONL), resuming a partial file.

    ``generate(prompt) -> text`` is any text generator. Rejected drafts (emotion word used, wrong length,
    near-duplicate) are retried up to ``attempts`` times per story. The file is rewritten atomically after
    each emotion, so an interrupted run loses at most one emotion's work.
    """
    out = Path(out)
    rows = list(read_jsonl(out)) if out.exists() else []
    rng = random.Random(seed)
    stats = {"accepted": 0, "rejected": 0, "resumed": len(rows)}
    for emotion in emotions:
        have = [r for r in rows if r["emotion"] == emotion]
        for n in range(len(have), per_emotion):
            for _ in range(attempts):
                prompt, topic = story_prompt(emotion, rng)
                text = accept(generate(prompt), emotion)
                if text is not None and not near_duplicates([r["text"] for r in rows] + [text], threshold=0.5):
                    slug = emotion.replace(" ", "_").replace("-", "_")
                    rows.append({"id": f"{slug}-{n + 1}", "emotion": emotion, "topic": topic, "text": text})
                    stats["accepted"] += 1
                    break
                stats["rejected"] += 1
        _write_jsonl(rows, out)
        if progress:
            progress(1)
    return stats


def _write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def chat_generator(model, tokenizer, max_new_tokens: int = 260, temperature: float = 0.8, seed: int = 0):
    """A ``generate(prompt) -> text`` function over a local chat model (sampling, chat template)."""
    import torch

    torch.manual_seed(seed)
    device = next(model.parameters()).device

    def generate(prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = {k: v.to(device) for k, v in ids.items()}
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                 top_p=0.95, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    return generate
