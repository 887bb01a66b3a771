"""``emovec bench`` on a tiny model (fast): every scenario and provider is timed, ratios come from the same run, and
the naive provider does the same work as emovec (same scores and steering effect)."""

from __future__ import annotations

import json

import pytest
import torch

import emovec
from emovec.bench.runner import NaiveHooks, interleaved, random_vectors


@pytest.fixture
def tiny_cli(tiny_chat_model, monkeypatch):
    from emovec import cli
    from emovec.models import LoadedModel

    model, tokenizer, _ = tiny_chat_model
    monkeypatch.setitem(cli._MODELS, ("tiny", None), LoadedModel(model, tokenizer, "tiny"))
    return model, tokenizer


def test_naive_hooks_do_the_same_work_as_emovec(tiny_cli):
    """The baseline is fair: its steering changes the logits exactly as emovec.steer does, and its recorded scores
    equal the monitor's."""
    model, _ = tiny_cli
    vectors = random_vectors(model, 5)
    unit = [vectors.unit[i] for i in range(len(vectors.layers))]
    vector = 0.05 * vectors.unit[1, 0]
    ids = torch.randint(100, 1000, (2, 7))
    with torch.no_grad():
        with NaiveHooks(model, unit, 1, vector) as naive:
            naive_logits = model(input_ids=ids).logits
        with emovec.steer(model, vectors, {"v0": 0.05}, [1]), emovec.monitor(model, vectors, "all") as mon:
            fused_logits = model(input_ids=ids).logits
    torch.testing.assert_close(naive_logits, fused_logits, rtol=1e-5, atol=1e-5)
    scores = mon.result().scores  # (B, T, L, K)
    for layer, (s, n) in enumerate(naive.records):
        torch.testing.assert_close(s, scores[:, :, layer], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(n, mon.result().norms[:, :, layer], rtol=1e-4, atol=1e-4)


def test_nnsight_does_the_same_work_as_emovec(tiny_cli):
    """When nnsight is installed, its provider steers and records as emovec does: the same greedy tokens, and its
    scores at every step and layer equal the monitor's."""
    pytest.importorskip("nnsight")
    from emovec.bench.runner import NnsightRun

    model, tokenizer = tiny_cli
    vectors = random_vectors(model, 5)
    unit = [vectors.unit[i] for i in range(len(vectors.layers))]
    vector = 0.5 * vectors.unit[1, 0]
    ids = torch.randint(100, 1000, (1, 7))
    run = NnsightRun(model, tokenizer, unit, 1, vector)
    tokens, records = run.generate(ids, 4, do_sample=False, pad_token_id=0)
    with torch.no_grad(), emovec.steer(model, vectors, {"v0": 0.5}, [1], relative=False), \
            emovec.monitor(model, vectors, "all") as mon:
        want = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert tokens.tolist() == want.tolist()
    scores = mon.result().scores[0]  # (T, L, K): the prompt's 7 positions, then one per decode step
    layers = len(unit)
    assert len(records) == 4 * layers
    for step in range(4):
        positions = slice(0, 7) if step == 0 else slice(6 + step, 7 + step)
        for layer in range(layers):
            s, _ = records[step * layers + layer]
            torch.testing.assert_close(s[0], scores[positions, layer], rtol=1e-4, atol=1e-4)


def test_interleaved_times_every_provider_each_round():
    calls = []
    result = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, torch.device("cpu"),
                         rounds=3, repeats=2, warmup=1)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert result["a"]["n"] == 3 and result["a"]["p20"] <= result["a"]["p50"] <= result["a"]["p80"]


def test_bench_command_quick(tiny_cli, tmp_path):
    from test_cli_runtime import invoke

    out = tmp_path / "b"
    result = invoke("bench", "--model", "tiny", "--quick", "--k", "8", "--out", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads((out / "bench.json").read_text())
    scenarios = {r["scenario"] for r in data["rows"]}
    assert {"generate b1", "generate b8", "prefill"} <= scenarios
    assert any(s.startswith("step b1") for s in scenarios) and any(s.startswith("op N=1 ") for s in scenarios)
    for row in data["rows"]:
        assert row["p50_ms"] > 0 and row["p20_ms"] <= row["p50_ms"] <= row["p80_ms"]
        if row["provider"] == row["baseline"]:
            assert row["time_vs_baseline"] == 1.0
    providers = {r["provider"] for r in data["rows"] if r["scenario"] == "prefill"}
    assert {"plain", "naive", "emovec-torch"} <= providers
    import importlib.util

    assert ("nnsight" in providers) == (importlib.util.find_spec("nnsight") is not None)
    capped = {r["provider"] for r in data["rows"] if r["scenario"] == "generate b1"}
    assert any(p.endswith("+cap") for p in capped)  # regulation's cost on top of monitoring + steering
    assert data["machine"]["cpu"] and data["command"].startswith("emovec bench")
    assert (out / "bench.png").exists() and (out / "bench.csv").read_text().count("\n") == len(data["rows"]) + 1
    assert any("nnsight" in note for note in data["notes"])
    assert "generate b8" in result.stdout
    from test_cli_runtime import one_line_error

    assert "unknown backend" in one_line_error(invoke("bench", "--model", "tiny", "--backend", "gpu", "--out",
                                                      str(out)))
