"""The research's experiments on a tiny random Llama with the default model's tokenizer (fast), each checked
against an independent computation (hidden states, scipy, planted Bradley-Terry strengths)."""

from __future__ import annotations

import pytest
import torch

import emovec
from conftest import TINY_NAMES as NAMES
from emovec.science import dose, implied, preferences, validate
from emovec.science.readings import encode, read_messages, spearman, wrap


@pytest.fixture(scope="module")
def tiny(tiny_chat_model):
    return tiny_chat_model


def test_readings_match_hidden_states(tiny):
    model, tokenizer, vectors = tiny
    messages = ["I lost my keys again.", "We won the cup final today and everyone is singing!"]
    got = read_messages(model, tokenizer, vectors, messages, [1, 2], batch_size=2)
    reordered = read_messages(model, tokenizer, vectors, messages, [2, -2], batch_size=1)  # -2 is layer 1
    assert reordered.layers == [1, 2] and torch.allclose(reordered.last, got.last, atol=1e-5)
    for i, message in enumerate(messages):
        text, (start, end) = wrap(tokenizer, message)
        assert text[start:end] == message
        batch, spans = encode(tokenizer, [text], [(start, end)])
        a, b = spans[0]
        assert tokenizer.decode(batch["input_ids"][0, a:b]).strip() == message
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states
        for li, layer in enumerate([1, 2]):
            h = hidden[layer + 1][0]
            cos = torch.nn.functional.normalize(h, dim=-1) @ vectors.unit[layer].T
            torch.testing.assert_close(got.last[i, li], cos[-1], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got.user[i, li], cos[a:b].mean(0), rtol=1e-4, atol=1e-4)


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 5, (20,), generator=g).tolist()  # ties on purpose
    y = torch.randn(20, generator=g).tolist()
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-9)


def test_dose_response_reads_every_value_and_ranks_against_x(tiny):
    model, tokenizer, vectors = tiny
    templates = [{"name": "pills", "template": "I took {X} pills.", "values": [1, 4, 16], "unit": "", "log": True},
                 {"name": "runway", "template": "We have {X} months left.", "values": [12, 6, 3], "unit": "",
                  "log": False, "danger_falls_with_x": True}]
    result = dose.run_dose(model, tokenizer, vectors, templates, [1], emotions=["afraid", "calm"])
    assert [t["messages"] for t in result["templates"]][0] == ["I took 1 pills.", "I took 4 pills.",
                                                                "I took 16 pills."]
    readings = read_messages(model, tokenizer, vectors, result["templates"][1]["messages"], [1])
    entry = result["templates"][1]["layers"]["1"]["last"]
    afraid = readings.at(1)[:, vectors.index("afraid")].tolist()
    assert entry["readings"]["afraid"] == pytest.approx(afraid, abs=1e-4)
    assert entry["spearman_x"]["afraid"] == pytest.approx(spearman([12, 6, 3], afraid), abs=1e-3)
    assert entry["spearman_danger"]["afraid"] == pytest.approx(-entry["spearman_x"]["afraid"])
    rows = dose.summary_rows(result)
    assert {(r["template"], r["layer"]) for r in rows} == {("pills", 1), ("runway", 1)}
    with pytest.raises(KeyError, match="unknown concept 'nope'"):
        dose.run_dose(model, tokenizer, vectors, templates, [1], emotions=["nope"])


def test_packaged_experiment_data_loads():
    templates = dose.load_templates()
    assert len(templates) >= 6 and templates[0]["name"] == "tylenol"
    assert templates[0]["values"][0] == 500 and templates[0]["values"][-1] == 16000
    assert len(implied.load_messages()) >= 30
    activities = preferences.load_activities()
    assert len(activities) >= 40 and len({a["category"] for a in activities}) >= 5


def test_implied_ranks_follow_the_readings(tiny):
    model, tokenizer, vectors = tiny
    rows = [{"text": "My dog died this morning.", "emotion": "sad"}, {"text": "Someone is breaking in!",
                                                                      "emotion": "afraid"},
            {"text": "Not an emotion we know.", "emotion": "bewildered"}]
    result = implied.run_implied(model, tokenizer, vectors, rows, 1, top=3)
    assert [m["emotion"] for m in result["messages"]] == ["sad", "afraid"]  # unknown emotions are left out
    readings = read_messages(model, tokenizer, vectors, [r["text"] for r in rows[:2]], [1]).at(1)
    for i, item in enumerate(result["messages"]):
        own = readings[i, vectors.index(item["emotion"])]
        assert item["rank_last"] == 1 + int((readings[i] > own).sum())
        assert len(item["top_last"]) == 3
    assert result["summary"]["last"]["top10"] == 2  # only 8 vectors here
    centred = readings - readings.mean(0, keepdim=True)
    for i, item in enumerate(result["messages"]):
        own = centred[i, vectors.index(item["emotion"])]
        assert item["rank_centred"] == 1 + int((centred[i] > own).sum())


def test_elo_recovers_planted_strengths():
    strengths = torch.tensor([1.0, 0.0, -0.5, 2.0])
    pairs = [(a, b) for a in range(4) for b in range(4) if a != b]
    p = torch.tensor([float(torch.sigmoid(strengths[a] - strengths[b])) for a, b in pairs])
    elo = preferences.fit_elo(4, pairs, p)
    want = 1500 + preferences.ELO_SCALE * (strengths - strengths.mean())
    torch.testing.assert_close(elo, want, rtol=0, atol=1.0)
    moved = p.clone()  # activity 0 now wins more: refit it alone with the others held
    shifted = preferences.fit_elo(4, pairs, torch.where(torch.tensor([a == 0 for a, _ in pairs]), 0.95, moved),
                                  fixed=elo, free=[0])
    assert shifted[0] > elo[0] + 50 and torch.equal(shifted[1:], elo[1:])
    rows = [i for i, pair in enumerate(pairs) if 0 in pair]
    unsteered = preferences.fit_elo(4, [pairs[i] for i in rows], p[rows], fixed=elo, free=[0])
    assert abs(float(unsteered[0] - elo[0])) < 5  # refitting one activity on its own pairs barely moves it


def test_choices_are_batch_invariant_and_steering_touches_only_the_target(tiny):
    model, tokenizer, vectors = tiny
    texts = ["baking bread", "filing taxes", "walking a dog"]
    pairs = [(0, 1), (1, 0), (2, 1), (0, 2)]
    batched = preferences.choice_probabilities(model, tokenizer, texts, pairs, batch_size=4)
    alone = torch.cat([preferences.choice_probabilities(model, tokenizer, texts, [pair]) for pair in pairs])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    zero = preferences.choice_probabilities(model, tokenizer, texts, pairs, steering=(vectors, {"calm": 0.0}, [1], 2))
    torch.testing.assert_close(zero, batched, rtol=1e-4, atol=1e-5)
    moved = preferences.choice_probabilities(model, tokenizer, texts, pairs, steering=(vectors, {"calm": 2.0}, [1], 2))
    involved = torch.tensor([2 in pair for pair in pairs])
    torch.testing.assert_close(moved[~involved], batched[~involved], rtol=1e-4, atol=1e-5)
    assert (moved[involved] - batched[involved]).abs().min() > 1e-6


def test_preferences_report(tiny):
    model, tokenizer, vectors = tiny
    activities = [{"activity": a, "category": c} for a, c in
                  [("baking bread", "creative"), ("filing taxes", "tedious"), ("walking a dog", "social"),
                   ("insulting a child", "unsafe")]]
    result = preferences.run_preferences(model, tokenizer, vectors, activities, 1, steer_emotions=["calm"],
                                         strength=0.5, targets=[0], randoms=1)
    assert len(result["activities"]) == 4 and set(result["elo_correlation"]) == set(NAMES)
    assert sum(a["elo"] for a in result["activities"]) / 4 == pytest.approx(1500, abs=0.5)
    assert set(result["steering"]["mean_elo_shift"]) == {"calm", "random-0"}


def test_family_tokens_and_validate(tiny):
    model, tokenizer, vectors = tiny
    first = tokenizer.encode(" afraid", add_special_tokens=False)[0]
    assert first in validate.family_tokens(tokenizer, "afraid")
    assert tokenizer.encode(" fear", add_special_tokens=False)[0] in validate.family_tokens(tokenizer, "afraid")
    at = tokenizer.encode(" at", add_special_tokens=False)[0]
    assert at not in validate.family_tokens(tokenizer, "at ease")
    result = validate.run_validate(model, tokenizer, vectors, emotions=["afraid", "calm"], strengths=[0.5],
                                   layers=[[1]], prefixes=["I feel", "She was"], randoms=2)
    run = result["runs"][0]
    assert 0 <= run["share_beating_all_randoms"] <= 1 and set(run["per_emotion"]) == {"afraid", "calm"}
    # independent: steer with afraid alone and compare the family log-prob by hand
    ids = validate.family_tokens(tokenizer, "afraid")
    deltas = []
    for prefix in ["I feel", "She was"]:
        batch = tokenizer(prefix, return_tensors="pt")  # plain text, with the tokenizer's own special tokens
        with torch.no_grad():
            plain = torch.log_softmax(model(**batch).logits[0, -1], -1)
            with emovec.steer(model, vectors, {"afraid": 0.5}, [1]):
                steered = torch.log_softmax(model(**batch).logits[0, -1], -1)
        deltas.append(float(torch.logsumexp(steered[ids], 0) - torch.logsumexp(plain[ids], 0)))
    assert run["per_emotion"]["afraid"]["delta"] == pytest.approx(sum(deltas) / 2, abs=1e-3)
    shown = validate.samples(model, tokenizer, vectors, ["calm"], 0.5, [1], max_new_tokens=3)
    assert [s["steering"] for s in shown] == ["plain", "calm=+0.5"]


# ------------------------------------------------------------------------------------------ the commands


@pytest.fixture
def tiny_cli(tiny, tmp_path, monkeypatch):
    """The tiny model under the name "tiny" in the CLI's model cache, and its vectors in a file."""
    from emovec import cli
    from emovec.models import LoadedModel

    model, tokenizer, vectors = tiny
    monkeypatch.setitem(cli._MODELS, ("tiny", None), LoadedModel(model, tokenizer, "tiny"))
    return vectors.save(tmp_path / "v.safetensors")


def _run(*args):
    from test_cli_runtime import invoke

    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def test_dose_command(tiny_cli, tmp_path):
    import json

    out = tmp_path / "dose"
    result = _run("dose", "--model", "tiny", "--vectors", str(tiny_cli), "--only", "tylenol,fever", "--emotions",
                  "afraid,calm", "--out", str(out), "--quiet")
    data = json.loads((out / "dose.json").read_text())
    assert [t["name"] for t in data["templates"]] == ["tylenol", "fever"] and data["layers"] == [1]
    assert (out / "dose-tylenol.png").exists() and "Spearman" in result.stdout
    from test_cli_runtime import invoke, one_line_error

    assert "unknown template(s) ['nope']" in one_line_error(invoke("dose", "--model", "tiny", "--vectors",
                                                                   str(tiny_cli), "--only", "nope", "--out", str(out)))
    assert "unknown concept 'fear'" in one_line_error(invoke("dose", "--model", "tiny", "--vectors", str(tiny_cli),
                                                             "--emotions", "fear", "--out", str(out), "--quiet"))


def test_implied_preferences_and_validate_commands(tiny_cli, tmp_path):
    import json

    _run("implied", "--model", "tiny", "--vectors", str(tiny_cli), "--out", str(tmp_path / "i"), "--quiet")
    data = json.loads((tmp_path / "i" / "implied.json").read_text())
    assert data["messages"] and all(m["emotion"] in NAMES for m in data["messages"])
    _run("preferences", "--model", "tiny", "--vectors", str(tiny_cli), "--limit", "4", "--steer", "calm",
         "--targets", "1", "--randoms", "1", "--out", str(tmp_path / "p"), "--quiet")
    data = json.loads((tmp_path / "p" / "preferences.json").read_text())
    assert len(data["activities"]) == 4 and set(data["steering"]["mean_elo_shift"]) == {"calm", "random-0"}
    assert (tmp_path / "p" / "preferences-elo.png").exists() and (tmp_path / "p" / "preferences-steering.png").exists()
    _run("validate", "--model", "tiny", "--vectors", str(tiny_cli), "--emotions", "afraid,calm", "--strengths",
         "0.2", "--randoms", "2", "--samples", "calm", "--out", str(tmp_path / "v"), "--quiet")
    data = json.loads((tmp_path / "v" / "validate.json").read_text())
    assert data["runs"][0]["strength"] == 0.2 and [s["steering"] for s in data["samples"]] == ["plain", "calm=+0.2"]
    from test_cli_runtime import invoke, one_line_error

    assert "--strengths must be comma-separated numbers" in one_line_error(invoke(
        "validate", "--model", "tiny", "--vectors", str(tiny_cli), "--strengths", "x", "--out", str(tmp_path / "v")))


def test_regulation_checks(tiny):
    """The regulation experiment on the tiny model: the dose cap flattens the regulated layer's curve down to the cap,
    caps alone never change unsteered logits (they stay within bounds by construction), and the steered + capped run
    reports how much the cap corrected."""
    from emovec.science import regulation

    model, tokenizer, vectors = tiny
    templates = [t for t in dose.load_templates() if t["name"] in ("tylenol", "fever")]
    result = regulation.run_regulation(model, tokenizer, vectors, layer=0, later=2, strength=0.5,
                                       templates=templates, max_new_tokens=4)
    assert result["layer"] == 0 and result["later_layer"] == 2
    for row in result["dose"]:
        capped = row["regulated_layer"]["capped"]
        assert max(capped) <= row["cap"] + 1e-4  # the reading where the reply begins never exceeds the cap
        plain = row["regulated_layer"]["plain"]
        assert all(abs(c - min(p, row["cap"])) < 1e-4 for p, c in zip(plain, capped))
    assert set(result["steer_then_cap"]) == {"desperate", "random-0"}
    for entry in result["steer_then_cap"].values():
        assert entry["cap_alone_max_abs_logit_change"] == 0.0
        assert 0.0 <= entry["share_of_readings_corrected_when_steered"] <= 1.0
        assert len(entry["generations"]["steered_and_capped"]) == len(regulation.GENERATION_PROMPTS)
    assert regulation.summary_lines(result)


def test_regulation_command(tiny_cli, tmp_path):
    import json

    out = tmp_path / "r"
    result = _run("regulation", "--model", "tiny", "--vectors", str(tiny_cli), "--layer", "0", "--later", "1",
                  "--only", "tylenol", "--out", str(out), "--quiet")
    data = json.loads((out / "regulation.json").read_text())
    assert data["layer"] == 0 and [r["template"] for r in data["dose"]] == ["tylenol"]
    assert (out / "regulation-dose.png").exists() and (out / "regulation-steer.png").exists()
    assert "steer +desperate" in result.stdout
    from test_cli_runtime import invoke, one_line_error

    assert "unknown dose template" in one_line_error(invoke("regulation", "--model", "tiny", "--vectors",
                                                            str(tiny_cli), "--only", "nope", "--out", str(out)))
