"""The packaged corpus obeys its rules, and story regeneration filters drafts by them."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from emovec import corpus
from emovec.stories import accept, generate_stories

EMOTIONS = corpus.load_emotions()
STORIES = corpus.load_heldout()


def test_emotion_list_matches_the_research():
    assert len(EMOTIONS) == 171 and len(set(EMOTIONS)) == 171
    assert {"afraid", "calm", "desperate", "loving", "at ease", "grief-stricken"} <= set(EMOTIONS)


def test_every_emotion_has_at_least_six_stories_with_all_fields():
    counts = Counter(row["emotion"] for row in STORIES)
    assert set(counts) == set(EMOTIONS)
    assert min(counts.values()) >= 6 and len(STORIES) >= 1026
    assert len({row["id"] for row in STORIES}) == len(STORIES)
    for row in STORIES:
        assert set(row) >= {"id", "emotion", "topic", "text"} and row["topic"].strip()


def test_stories_have_the_right_length_and_never_name_their_emotion():
    assert corpus.check_story_rows(STORIES) == []


def test_no_near_duplicate_stories():
    assert corpus.near_duplicates([row["text"] for row in STORIES]) == []


def test_stories_vary_in_topic_and_narration():
    for emotion in EMOTIONS:
        rows = [r for r in STORIES if r["emotion"] == emotion]
        assert len({r["topic"] for r in rows}) == len(rows), emotion
    first_person = sum(bool(re.search(r"\b(I|my|me)\b", r["text"])) for r in STORIES)
    assert 0.2 < first_person / len(STORIES) < 0.8


@pytest.mark.parametrize(
    "emotion, text, hits",
    [
        ("happy", "She smiled happily; happiness filled her, happier than ever.", ["happily", "happiness", "happier"]),
        ("afraid", "He felt fear, was afraid, and fearfully hid.", ["fear", "afraid", "fearfully"]),
        ("angry", "Anger rose as he angrily slammed the door.", ["Anger", "angrily"]),
        ("at ease", "She was at ease, and her shoulders eased.", ["at ease", "eased"]),
        ("grief-stricken", "The grief-stricken man; his grief; grief stricken.", ["grief-stricken", "grief", "grief stricken"]),
        ("mad", "He made a saddle and madly ran; madness.", ["madly", "madness"]),
        ("sad", "Saddle up, she saddened; sadly.", ["saddened", "sadly"]),
        ("worn out", "She was worn-out and worn out.", ["worn-out", "worn out"]),
        ("content", "He continued to read the contents; contentment.", ["contents", "contentment"]),
    ],
)
def test_word_family_detection(emotion, text, hits):
    assert corpus.find_emotion_words(text, emotion) == hits


def test_neutral_dialogues_are_plain_and_well_formed():
    rows = corpus.load_neutral()
    assert len(rows) >= 200 and len({r["id"] for r in rows}) == len(rows)
    banned = re.compile(r"\b(thanks?|thank you|please|great|glad|sorry|happy to help|love|hope|excited|worried)\b", re.I)
    for row in rows:
        assert row["emotion"] == "neutral" and row["topic"]
        turns = [t for t in row["text"].split("\n\n") if t.strip()]
        assert 2 <= len(turns) <= 6 and len(turns) % 2 == 0, row["id"]
        for i, turn in enumerate(turns):
            assert turn.startswith("Human:" if i % 2 == 0 else "Assistant:"), row["id"]
        assert "!" not in row["text"] and not banned.search(row["text"]), row["id"]


def test_generate_stories_filters_drafts_and_resumes(tmp_path):
    clean = "She counted the coins twice, hands steady, breathing slow, watching the sea roll in. " * 8
    drafts = iter([
        "Too short.",
        "He was calm and calmly sat. " * 15,  # uses the emotion word: rejected
        clean,
        clean,  # a duplicate of an accepted story: rejected
        clean.replace("coins", "stones").replace("sea", "rain").replace("hands", "feet").replace("twice", "again")
        + " The kettle whistled; the dog slept; the clock ticked; the bread rose. " * 3,
    ])
    out = tmp_path / "stories.jsonl"
    stats = generate_stories(lambda prompt: next(drafts), ["calm"], 1, out, attempts=3)
    assert stats == {"accepted": 1, "rejected": 2, "resumed": 0}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["emotion"] == "calm" and accept(rows[0]["text"], "calm")
    stats = generate_stories(lambda prompt: next(drafts), ["calm"], 2, out, attempts=3)
    assert stats["resumed"] == 1 and stats["accepted"] == 1
    assert len(out.read_text().splitlines()) == 2


def test_accept_trims_a_draft_cut_off_mid_sentence():
    body = "She set the cup down and watched the rain slide along the glass. " * 8
    assert accept(body + "Then she", "calm") == body.strip()
    assert accept(body + "She felt calm.", "calm") is None


# ------------------------------------------------------------------------------------------ the story grid

GRID = corpus.load_grid()
TOPICS = corpus.load_topics()


def test_grid_has_one_story_per_emotion_and_topic():
    assert len(TOPICS) >= 24 and len({t["id"] for t in TOPICS}) == len(TOPICS)
    cells = Counter((row["emotion"], row["topic"]) for row in GRID)
    assert set(cells) == {(e, t["id"]) for e in EMOTIONS for t in TOPICS}
    assert max(cells.values()) == 1 and len(GRID) == len(EMOTIONS) * len(TOPICS) >= 4104
    assert len({row["id"] for row in GRID}) == len(GRID)


def test_grid_stories_pass_the_checks_and_never_name_their_emotion():
    assert corpus.check_grid_rows(GRID) == []
    assert all(100 <= len(row["text"].split()) <= 160 for row in GRID)


def test_no_near_duplicates_in_the_grid():
    assert corpus.near_duplicates([row["text"] for row in GRID]) == []


def test_narration_is_balanced_the_same_way_for_every_emotion():
    """Person, gender and age come from the topic, so they are identical across emotions and balanced within each."""
    by_topic = {t["id"]: t for t in TOPICS}
    for emotion in EMOTIONS:
        rows = [r for r in GRID if r["emotion"] == emotion]
        for feature in ("person", "gender"):
            counts = Counter(by_topic[r["topic"]][feature] for r in rows)
            assert len(set(counts.values())) == 1, (emotion, feature, counts)  # half first / half third person, ...
        ages = Counter(by_topic[r["topic"]]["age"] for r in rows)
        assert len(set(ages.values())) == 1, (emotion, ages)


def test_heldout_stories_are_about_other_situations():
    grid_titles = {t["title"].lower() for t in TOPICS}
    assert not grid_titles & {row["topic"].lower() for row in STORIES}
    assert not {row["text"] for row in STORIES} & {row["text"] for row in GRID}
