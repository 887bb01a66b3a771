"""The labelled text emovec reads: emotion words, stories, neutral dialogues, and the checks they must pass.

This module has no heavy imports (no torch), so data-writing tools can use it on its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from importlib import resources
from pathlib import Path

# Suffixes stripped to find a word's stem. The stem must keep at least 5 letters, otherwise the whole
# word is the stem (so "content" does not forbid "continue", but "anxious" forbids "anxiously").
_SUFFIXES = ("ened", "ed", "ful", "ous", "ive", "ent", "ant", "ic", "ish", "y", "e")
# Family members that prefix matching cannot see (irregular nouns and verbs of the same root).
_EXTRA_FORMS: dict[str, tuple[str, ...]] = {
    "afraid": ("fear",),
    "angry": ("anger",),
    "proud": ("pride",),
    "patient": ("patience",),
    "impatient": ("impatience",),
    "anxious": ("anxiety", "anxieties"),
    "ashamed": ("shame",),
    "bored": ("boredom", "boring"),
    "sad": ("sadness", "sadden"),
    "mad": ("madness", "madly"),
    "hateful": ("hate", "hatred", "hating"),
    "loving": ("love", "loved", "loves", "lovingly"),
    "grateful": ("gratitude",),
    "jealous": ("jealousy",),
    "envious": ("envy", "envied"),
    "curious": ("curiosity",),
    "guilty": ("guilt",),
    "lonely": ("loneliness",),
    "furious": ("fury",),
    "greedy": ("greed",),
    "hysterical": ("hysteria",),
    "vengeful": ("vengeance", "revenge"),
    "vindictive": ("vindicate",),
    "triumphant": ("triumph",),
    "skeptical": ("skeptic", "sceptic"),
    "suspicious": ("suspicion", "suspect"),
    "sympathetic": ("sympathy", "sympathize", "sympathise"),
    "empathetic": ("empathy", "empathize", "empathise"),
    "compassionate": ("compassion",),
    "contemptuous": ("contempt",),
    "disdainful": ("disdain",),
    "scornful": ("scorn",),
    "spiteful": ("spite",),
    "resentful": ("resent",),
    "regretful": ("regret",),
    "remorseful": ("remorse",),
    "thankful": ("thank",),
    "peaceful": ("peace",),
    "playful": ("play",),
    "joyful": ("joy",),
    "blissful": ("bliss",),
    "hopeful": ("hope",),
    "hope": ("hopeful", "hoping"),
    "euphoric": ("euphoria",),
    "nostalgic": ("nostalgia",),
    "depressed": ("depression", "depressing"),
    "desperate": ("desperation", "despair"),
    "humiliated": ("humiliation", "humiliating"),
    "enthusiastic": ("enthusiasm",),
    "optimistic": ("optimism", "optimist"),
    "paranoid": ("paranoia",),
    "panicked": ("panic",),
    "terrified": ("terror", "terrify", "terrifying"),
    "horrified": ("horror", "horrify", "horrifying", "horrible"),
    "frightened": ("fright", "frighten"),
    "scared": ("scare", "scary"),
    "shocked": ("shock",),
    "surprised": ("surprise",),
    "amazed": ("amaze", "amazing", "amazement"),
    "astonished": ("astonish",),
    "amused": ("amuse", "amusing", "amusement"),
    "disgusted": ("disgust",),
    "embarrassed": ("embarrass",),
    "mortified": ("mortify",),
    "infatuated": ("infatuation",),
    "inspired": ("inspire", "inspiration"),
    "satisfied": ("satisfy", "satisfaction", "satisfying"),
    "fulfilled": ("fulfil", "fulfillment", "fulfilment"),
    "relieved": ("relief", "relieve"),
    "stressed": ("stress",),
    "tired": ("tire", "tiring"),
    "worried": ("worry", "worries", "worrying"),
    "troubled": ("trouble",),
    "tormented": ("torment",),
    "trapped": ("trap",),
    "upset": ("upsetting",),
    "heartbroken": ("heartbreak", "heartbroke", "broken heart"),
    "grief-stricken": ("grief", "grieve", "grieving"),
    "worthless": ("worth",),
    "vulnerable": ("vulnerability",),
    "weary": ("weariness", "wearily"),
    "sleepy": ("sleep",),
    "lazy": ("laziness", "lazily"),
    "calm": ("calmly", "calmness"),
    "serene": ("serenity",),
    "happy": ("happiness", "happily", "unhappy"),
    "unhappy": ("unhappiness",),
    "sorry": ("sorrow",),
    "kind": ("kindness", "kindly"),
    "hurt": ("hurtful",),
    "excited": ("excite", "exciting", "excitement"),
    "exasperated": ("exasperate", "exasperation"),
    "frustrated": ("frustrate", "frustration"),
    "irritated": ("irritate", "irritation", "irritable"),
    "annoyed": ("annoy", "annoyance"),
    "offended": ("offend", "offense", "offence"),
    "insulted": ("insult",),
    "outraged": ("outrage",),
    "enraged": ("rage", "enrage"),
    "irate": ("ire",),
    "indignant": ("indignation",),
    "defiant": ("defiance", "defy"),
    "stubborn": ("stubbornly", "stubbornness"),
    "obstinate": ("obstinacy",),
    "bewildered": ("bewilder",),
    "perplexed": ("perplex",),
    "puzzled": ("puzzle", "puzzling"),
    "mystified": ("mystify", "mystery"),
    "disoriented": ("disorient",),
    "dumbstruck": ("dumbstruck", "struck dumb"),
    "awestruck": ("awe",),
    "elated": ("elation",),
    "ecstatic": ("ecstasy",),
    "exuberant": ("exuberance",),
    "jubilant": ("jubilation",),
    "delighted": ("delight",),
    "pleased": ("please", "pleasure", "pleasant"),
    "cheerful": ("cheer",),
    "energized": ("energy", "energise", "energised", "energetic"),
    "invigorated": ("invigorate", "vigor", "vigour"),
    "rejuvenated": ("rejuvenate",),
    "refreshed": ("refresh",),
    "relaxed": ("relax",),
    "restless": ("restlessly", "restlessness"),
    "stimulated": ("stimulate", "stimulus"),
    "thrilled": ("thrill",),
    "overwhelmed": ("overwhelm",),
    "distressed": ("distress",),
    "disturbed": ("disturb",),
    "unnerved": ("unnerve", "nerve"),
    "unsettled": ("unsettle",),
    "rattled": ("rattle",),
    "shaken": ("shake", "shook", "shaking"),
    "alarmed": ("alarm",),
    "miserable": ("misery",),
    "melancholy": ("melancholic",),
    "dispirited": ("dispiriting",),
    "resigned": ("resign", "resignation"),
    "reflective": ("reflect", "reflection"),
    "sentimental": ("sentiment",),
    "sensitive": ("sensitivity",),
    "self-confident": ("confident", "confidence"),
    "self-conscious": ("self-consciousness",),
    "self-critical": ("self-criticism",),
    "smug": ("smugly", "smugness"),
    "sullen": ("sullenly",),
    "valiant": ("valor", "valour"),
    "vibrant": ("vibrancy",),
    "vigilant": ("vigilance",),
    "dependent": ("depend", "dependence", "dependency"),
    "docile": ("docility",),
    "droopy": ("droop",),
    "listless": ("listlessly",),
    "sluggish": ("sluggishly",),
    "brooding": ("brood",),
    "gloomy": ("gloom",),
    "grumpy": ("grump",),
    "bitter": ("bitterly", "bitterness"),
    "hostile": ("hostility",),
    "indifferent": ("indifference",),
    "aroused": ("arouse", "arousal"),
    "eager": ("eagerly", "eagerness"),
    "nervous": ("nerve", "nerves"),
    "tense": ("tension",),
    "safe": ("safety", "safely"),
    "content": ("contentment", "contented"),
    "at ease": ("ease", "eased", "easing"),
    "on edge": ("edgy",),
    "worn out": ("worn-out",),
}


def _stem(word: str) -> str:
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 5:
            return word[: -len(suffix)]
    return word


@cache
def emotion_word_pattern(emotion: str) -> re.Pattern[str]:
    """A case-insensitive regex matching the emotion word and its word family.

    Single words match every word that starts with their stem ("anxious" -> "anxious", "anxiously");
    multi-word and hyphenated concepts match the phrase with a space or hyphen between its parts;
    irregular family members (``angry`` -> ``anger``) come from a curated table.
    """
    emotion = emotion.strip().lower()
    parts = re.split(r"[\s-]+", emotion)
    inflection = r"(?:s|es|ed|d|ing|ly|ness|er|est)?\b"
    alternatives = []
    if len(parts) > 1:
        alternatives.append(r"[\s-]+".join(re.escape(p) for p in parts) + r"\w*")
    elif len(emotion) <= 4:  # short words ("sad", "mad", "kind"): whole word plus inflections, not a prefix
        alternatives.append(re.escape(emotion) + inflection)
    else:
        alternatives.append(re.escape(_stem(emotion)) + r"\w*")
        if emotion.endswith("y"):  # happy -> happier, happily
            alternatives.append(re.escape(emotion[:-1]) + r"i\w*")
    for form in _EXTRA_FORMS.get(emotion, ()):
        form_parts = re.split(r"[\s-]+", form)
        # forms of 4+ letters match as prefixes (fear -> fearfully); shorter ones (ire, joy) only inflected
        ending = r"\w*" if len(form) >= 4 else inflection
        alternatives.append(r"[\s-]+".join(re.escape(p) for p in form_parts) + ending)
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")", re.IGNORECASE)


def find_emotion_words(text: str, emotion: str) -> list[str]:
    """Every occurrence of the emotion word or its family in ``text`` (empty when the text is clean)."""
    return [m.group(0) for m in emotion_word_pattern(emotion).finditer(text)]


def shingles(text: str, size: int = 5) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z']+", text.lower())
    return {tuple(words[i : i + size]) for i in range(max(0, len(words) - size + 1))}


def near_duplicates(texts: list[str], threshold: float = 0.35, size: int = 5) -> list[tuple[int, int, float]]:
    """Pairs (i, j, jaccard) of texts whose word ``size``-shingle Jaccard similarity exceeds ``threshold``."""
    sets = [shingles(t, size) for t in texts]
    index: dict[tuple[str, ...], list[int]] = {}
    for i, s in enumerate(sets):
        for sh in s:
            index.setdefault(sh, []).append(i)
    overlap: dict[tuple[int, int], int] = {}
    for members in index.values():
        if len(members) > 50:  # a stock phrase shared by many texts says nothing about duplication
            continue
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                key = (members[a], members[b])
                overlap[key] = overlap.get(key, 0) + 1
    pairs = []
    for (i, j), n in overlap.items():
        union = len(sets[i]) + len(sets[j]) - n
        if union and n / union > threshold:
            pairs.append((i, j, n / union))
    return pairs


def data_path(name: str) -> Path:
    return Path(str(resources.files("emovec") / "data" / name)) if __package__ else Path(__file__).parent / "data" / name


def read_jsonl(path: str | Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg}); each line must be one object") from None


class DataError(ValueError):
    """A data file has a line that cannot be used; the message names the file and the 1-based line."""


def read_records(path: str | Path, fields: Sequence[str], on_error: str = "raise") -> tuple[list[dict], int]:
    """The JSON objects of a JSONL file that have string values for ``fields`` (the first of a tuple of
    alternatives that is present), and the number of lines skipped.

    Lines that are not valid UTF-8, not valid JSON, not an object, or lack a field (or hold null or a non-string
    there) raise DataError naming the file and line, or, with ``on_error="skip"``, are skipped and counted.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    rows, skipped = [], 0
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, 1):
            problem, row = _parse_record(raw, fields)
            if problem is None and row is None:
                continue  # blank line
            if problem is not None:
                if on_error == "raise":
                    raise DataError(f"{path}, line {line_number}: {problem} (use --on-error skip to skip such lines)")
                skipped += 1
                continue
            rows.append(row)
    return rows, skipped


def _parse_record(raw: bytes, fields: Sequence[str]) -> tuple[str | None, dict | None]:
    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError as error:
        return f"not valid UTF-8 (byte {error.start})", None
    if not line:
        return None, None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        return f"not valid JSON ({error.msg}); each line must be one JSON object", None
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object with fields {' and '.join(map(repr, fields))}", None
    for field in fields:
        names = field.split("|")
        name = next((n for n in names if n in row), None)
        if name is None:
            return f"no {' or '.join(repr(n) for n in names)} field (keys: {sorted(row)})", None
        if not isinstance(row[name], str) or not row[name].strip():
            return f"field {name!r} must be a non-empty string, got {json.dumps(row[name])[:40]}", None
    return None, row


def load_emotions() -> list[str]:
    """The 171 emotion concepts of the research, in file order."""
    return [w.strip() for w in data_path("emotions.txt").read_text(encoding="utf-8").splitlines() if w.strip()]


def load_heldout() -> list[dict]:
    """The held-out emotion stories (6 per emotion, each about its own situation, none of the grid's topics):
    dicts with id, emotion, topic, text. Extraction uses the grid (:func:`load_grid`); these test how well its
    vectors generalise."""
    rows: list[dict] = []
    for part in sorted(data_path("stories").glob("*.jsonl")):
        rows.extend(read_jsonl(part))
    return rows


def load_neutral() -> list[dict]:
    """The packaged neutral Human/Assistant dialogues."""
    return list(read_jsonl(data_path("neutral_dialogues.jsonl")))


def load_topics() -> list[dict]:
    """The story grid's shared topics: id, title, situation, and the narration (person, gender, age, character)."""
    return json.loads(data_path("grid/topics.json").read_text(encoding="utf-8"))


def load_grid() -> list[dict]:
    """The story grid: one story per emotion and shared topic (fields id, emotion, topic, person, text)."""
    rows: list[dict] = []
    for part in sorted(data_path("grid").glob("*.jsonl")):
        rows.extend(read_jsonl(part))
    return rows


GRID_WORDS = (100, 160)


def check_grid_rows(rows: Iterable[dict]) -> list[str]:
    """Problems with story-grid rows: schema, topic and narration as the grid prescribes, length, emotion words."""
    topics = {t["id"]: t for t in load_topics()}
    emotions = set(load_emotions())
    problems = []
    for row in rows:
        rid = row.get("id", "?")
        missing = {"id", "emotion", "topic", "person", "text"} - set(row)
        if missing:
            problems.append(f"{rid}: missing fields {sorted(missing)}")
            continue
        topic = topics.get(row["topic"])
        if row["emotion"] not in emotions:
            problems.append(f"{rid}: unknown emotion {row['emotion']!r}")
        if topic is None:
            problems.append(f"{rid}: unknown topic {row['topic']!r}")
            continue
        if row["id"] != f"{row['emotion']}/{row['topic']}":
            problems.append(f"{rid}: id must be '{row['emotion']}/{row['topic']}'")
        if row["person"] != topic["person"]:
            problems.append(f"{rid}: topic {row['topic']} is told in the {topic['person']} person, not {row['person']}")
        text = row["text"]
        n_words = len(text.split())
        if not GRID_WORDS[0] <= n_words <= GRID_WORDS[1]:
            problems.append(f"{rid}: {n_words} words, expected {GRID_WORDS[0]}-{GRID_WORDS[1]}")
        if topic["person"] == "first" and not re.search(r"\b(I|my|me)\b", text):
            problems.append(f"{rid}: should be told in the first person (no I/my/me)")
        name = topic["character"].split(",")[0]
        if topic["person"] == "third" and name not in text:
            problems.append(f"{rid}: third-person story should name its character {name}")
        hits = find_emotion_words(text, row["emotion"])
        if hits:
            problems.append(f"{rid}: uses the emotion word family of {row['emotion']!r}: {hits}")
    return problems


def check_story_rows(rows: Iterable[dict]) -> list[str]:
    """Problems with story rows (schema, length, emotion words); empty when all pass."""
    problems = []
    for row in rows:
        missing = {"id", "emotion", "topic", "text"} - set(row)
        if missing:
            problems.append(f"{row.get('id', '?')}: missing fields {sorted(missing)}")
            continue
        n_words = len(row["text"].split())
        if not 80 <= n_words <= 180:
            problems.append(f"{row['id']}: {n_words} words, expected 80-180")
        hits = find_emotion_words(row["text"], row["emotion"])
        if hits:
            problems.append(f"{row['id']}: uses the emotion word family of {row['emotion']!r}: {hits}")
    return problems


if __name__ == "__main__":  # python python/emovec/corpus.py [--grid] FILE.jsonl ... : check story files
    import sys

    grid = sys.argv[1:2] == ["--grid"]
    all_rows = [row for path in sys.argv[1 + grid :] for row in read_jsonl(path)]
    issues = check_grid_rows(all_rows) if grid else check_story_rows(all_rows)
    for i, j, score in near_duplicates([r["text"] for r in all_rows]):
        issues.append(f"near-duplicate: {all_rows[i]['id']} ~ {all_rows[j]['id']} (jaccard {score:.2f})")
    print("\n".join(issues) if issues else f"{len(all_rows)} stories OK")
    sys.exit(1 if issues else 0)
