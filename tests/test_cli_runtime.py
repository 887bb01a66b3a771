"""The runtime commands of the CLI: ``emovec monitor``, ``emovec steer`` and ``emovec chat`` (and emovec.render).

The tests marked slow run the default model (SmolLM2-135M-Instruct). The CLI keeps loaded models in a module-level
cache, so the model is loaded once for this whole file (by the ``loaded`` fixture) and every command reuses it.
They use a vector file of random directions made here (``--vectors``), never the default emotion vectors.
The fast tests check the renderers on a hand-made MonitorResult and the parsing of steering terms.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import emovec
from conftest import CLI_NAMES as NAMES
from emovec import cli, render
from emovec.models import INSTALL_HINT, ModelLoadError, default_gguf_path
from emovec.runtime import MonitorResult
from emovec.vectors import VectorSet

TEXT = "I feel calm and happy today, thank you."
ENV = {"COLUMNS": "200"}  # a fixed console width, whatever the terminal running the tests


def _has_default_model() -> bool:
    try:
        default_gguf_path()
    except ModelLoadError:
        return False
    return True


def slow(test):
    """Marks a test that runs the default model: slow (still run in CI), skipped when the model is not installed."""
    test = pytest.mark.skipif(not _has_default_model(), reason=f"default model missing: {INSTALL_HINT}")(test)
    return pytest.mark.slow(test)


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(cli.main, list(args), input=input, env=ENV)


def one_line_error(result) -> str:
    """The error a failed command printed; asserts it is one line and no traceback."""
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


# ================================================================================================ fast tests


def _result(tokens: list[str]) -> MonitorResult:
    torch.manual_seed(1)
    T, L, K = len(tokens), 2, len(NAMES)
    scores = torch.randn(1, T, L, K)
    norms = torch.full((1, T, L), 4.0)
    return MonitorResult(NAMES, [3, 7], scores, norms, torch.ones(1, T, dtype=torch.bool),
                         torch.arange(T)[None], torch.arange(T)[None], [tokens])


def test_parse_recipe():
    assert cli._parse_recipe(["calm=0.05", "afraid=-0.02"]) == {"calm": 0.05, "afraid": -0.02}
    assert cli._parse_recipe(["calm=0.05,sad=1e-2", " happy = 2 "]) == {"calm": 0.05, "sad": 0.01, "happy": 2.0}
    assert cli._parse_recipe([]) == {}
    for bad, words in [("calm", "NAME=STRENGTH"), ("=0.5", "NAME=STRENGTH"), ("calm=", "NAME=STRENGTH"),
                       ("calm=abc", "number"), ("calm=nan", "finite"), ("calm=1,calm=2", "twice")]:
        with pytest.raises(cli.UserError, match=words):
            cli._parse_recipe([bad])


def test_bad_add_syntax_is_one_clear_line():
    line = one_line_error(invoke("steer", "--add", "calm", "hello"))
    assert "bad steering term 'calm'" in line and "NAME=STRENGTH" in line
    line = one_line_error(invoke("steer", "--add", "calm=strong", "hello"))
    assert "'strong'" in line and "number" in line
    assert "--add" in one_line_error(invoke("steer", "hello"))


def test_render_table_and_json():
    from rich.console import Console

    tokens = ["Hello", " wor", "ld", "\n", "<b>"]
    res = _result(tokens)
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(render.monitor_table(res, top=2, emotion="sad"))
    text = console.export_text()
    for token in ["Hello", "wor", "ld", "↵", "<b>"]:
        assert token in text
    assert re.search(r"pos ┃ token\s*┃ layer ┃ #1\s*┃ #2\s*┃\s*sad", text)
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if re.match(r"\s*2 │", line))
    for line, layer in zip(lines[at:at + 2], [3, 7], strict=True):  # one row per layer, the token on the first
        assert re.match(rf"\s*(2 │ ld|  │)\s*│\s*{layer} │", line)
        first, second = (re.escape(f"{name} {value:+.3f}") for name, value in res.top(0, layer=layer, k=2)[2])
        sad = float(render.layer_cosine(res, layer)[2, NAMES.index("sad")])
        assert re.search(rf"│ {first}\s*│ {second}\s*│\s*{re.escape(f'{sad:+.3f}')}$", line.rstrip())
    tops = res.top(0, layer=7, k=2)
    data = render.monitor_json(res, top=2, model="m")
    assert data["model"] == "m" and data["layers"] == [3, 7] and len(data["tokens"]) == 5
    assert [name for name, _ in data["tokens"][2]["top"]["7"]] == [name for name, _ in tops[2]]
    json.dumps(data)


def test_render_html_is_self_contained_and_escaped():
    tokens = ["Hi", " <script>alert(1)</script>", " & ", "\n", "end"]
    res = _result(tokens)
    page = render.monitor_html(res, emotion="afraid", special=[True, False, False, False, False], subtitle="x")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count('class="tok') == len(tokens) and 'class="tok special"' in page
    assert "http://" not in page and "https://" not in page and "<link" not in page and " src=" not in page
    data = re.search(r'<script type="application/json" id="emovec-data">(.*?)</script>', page, re.S).group(1)
    parsed = json.loads(data)
    assert parsed["tokens"] == tokens and parsed["names"] == NAMES and len(parsed["values"]) == 2
    top = res.top(0, layer=3, k=5)[0]
    first_title = re.search(r'title="([^"]*)"', page).group(1)
    assert first_title.split("\n") == [f"{n} {v:+.3f}" for n, v in top]
    assert '<option value="1" selected>afraid</option>' in page
    # default emotion: the highest mean cosine over the non-special tokens
    default = render.monitor_html(res, special=[True, False, False, False, False])
    want = NAMES[int(render.layer_cosine(res, 3)[1:].mean(0).argmax())]
    assert f'selected>{want}</option>' in default


def test_mean_emotions_and_write_atomic(tmp_path: Path):
    res = _result(["a", "b", "c"])
    pairs = render.mean_emotions(res, start=1, k=3)
    want = res.cosine[0, 1:].mean(dim=(0, 1))
    assert [n for n, _ in pairs] == [NAMES[i] for i in want.topk(3).indices.tolist()]
    assert render.mean_emotions(res, start=3) == []
    target = tmp_path / "page.html"
    cli._write_atomic(target, "one")
    cli._write_atomic(target, "two")
    assert target.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["page.html"]
    with pytest.raises(cli.UserError, match="does not exist"):
        cli._write_atomic(tmp_path / "missing" / "x.html", "x")


# ================================================================================================ slow tests


def _tokens(loaded, text: str) -> list[str]:
    tokenizer = loaded.tokenizer
    return [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.tokenize(text)]


def _rows(output: str) -> dict[int, str]:
    """Table rows of `emovec monitor` by position."""
    rows = {}
    for line in output.splitlines():
        match = re.match(r"\s*(\d+) │(.*)", line)
        if match:
            rows[int(match.group(1))] = match.group(2)
    return rows


@slow
def test_monitor_prints_every_token_and_the_names(loaded, vector_file):
    result = invoke("monitor", "--vectors", str(vector_file), "--top", str(len(NAMES)), TEXT)
    assert result.exit_code == 0, result.output
    assert len(cli._MODELS) == 1  # the fixture's model was reused
    rows = _rows(result.stdout)
    tokens = _tokens(loaded, TEXT)
    assert len(rows) == len(tokens)
    for position, token in enumerate(tokens):
        assert token.strip() in rows[position]
    for name in NAMES:
        assert name in result.stdout
    assert f"{len(tokens)} tokens" in result.stdout and "layer 19" in result.stdout
    from_stdin = invoke("monitor", "--vectors", str(vector_file), "--top", str(len(NAMES)), "-", input=TEXT)
    assert from_stdin.exit_code == 0 and _rows(from_stdin.stdout) == rows


@slow
def test_monitor_agrees_with_emovec_monitor(loaded, vector_file, tmp_path):
    out = tmp_path / "top.json"
    result = invoke("monitor", "--vectors", str(vector_file), "--json", str(out), TEXT)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    # independently: emovec.monitor on the same text, at the vectors' default layer (19 of 30)
    vectors = VectorSet.load(vector_file)
    encoded = loaded.tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad(), emovec.monitor(loaded.model, vectors, layers=[19], tokenizer=loaded.tokenizer) as mon:
        loaded.model(**encoded)
    want = mon.result().top(0, layer=19, k=3)
    assert data["layers"] == [19] and len(data["tokens"]) == len(want) == encoded["input_ids"].shape[1]
    for row, expected in zip(data["tokens"], want, strict=True):
        assert [name for name, _ in row["top"]["19"]] == [name for name, _ in expected]
        assert [value for _, value in row["top"]["19"]] == pytest.approx([v for _, v in expected], abs=1e-5)
    position = 4
    printed = re.findall(r"([a-z]+) ([+-]\d\.\d{3})", _rows(result.stdout)[position])
    assert [(n, float(v)) for n, v in printed] == [(n, pytest.approx(v, abs=6e-4)) for n, v in want[position]]


@slow
def test_monitor_chat_wraps_the_text_in_the_template(loaded, vector_file):
    result = invoke("monitor", "--vectors", str(vector_file), "--chat", "Hello there")
    assert result.exit_code == 0, result.output
    wrapped = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}], tokenize=False,
                                                   add_generation_prompt=False)
    count = len(loaded.tokenizer(wrapped, add_special_tokens=False)["input_ids"])
    rows = _rows(result.stdout)
    assert len(rows) == count and f"{count} tokens" in result.stdout
    assert "<|im_start|>" in rows[0] and any("user" in r for r in rows.values())
    assert any("Hello" in r for r in rows.values()) and any("there" in r for r in rows.values())


@slow
def test_monitor_html_page(loaded, vector_file, tmp_path):
    page_path = tmp_path / "page.html"
    result = invoke("monitor", "--vectors", str(vector_file), "--html", str(page_path), "--emotion", "sad", TEXT)
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"]  # no temporary file left
    page = page_path.read_text()
    spans = re.findall(r'<span class="tok[^"]*" style="background:[^"]+" title="([^"]*)">(.*?)</span>', page)
    assert [text for _, text in spans] == _tokens(loaded, TEXT)
    for tip, _ in spans:
        assert len(tip.split("\n")) == 5 and all(line.split()[0] in NAMES for line in tip.split("\n"))
    for name in NAMES:
        assert f">{name}</option>" in page
    assert '<option value="3" selected>sad</option>' in page and 'id="tip"' in page
    assert "http://" not in page and "https://" not in page

    line = one_line_error(invoke("monitor", "--vectors", str(vector_file), "--html", str(page_path),
                                 "--emotion", "sadd", TEXT))
    assert "unknown concept 'sadd'" in line and "Did you mean 'sad'" in line


@slow
def test_steer_strong_changes_the_text_and_zero_does_not(loaded, vector_file, tmp_path):
    out = tmp_path / "steer.json"
    prompt = "The weather today is"
    result = invoke("steer", "--vectors", str(vector_file), "--add", "calm=8.0", "--max-new-tokens", "6",
                    "--json", str(out), prompt)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["plain"] != data["steered"] and data["recipe"] == {"calm": 8.0} and data["layers"] == [19]
    assert "steered: calm=+8 (relative)" in result.stdout and "plain" in result.stdout
    assert data["plain"].split()[0] in result.stdout and "identical" not in result.stdout

    result = invoke("steer", "--vectors", str(vector_file), "--add", "calm=0", "--max-new-tokens", "6", "--chat",
                    "--json", str(out), "Tell me a joke")
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["plain"] == data["steered"] and data["plain"].strip()
    assert "identical" in result.stdout


@slow
def test_errors_are_one_clear_line(loaded, vector_file, tmp_path):
    line = one_line_error(invoke("steer", "--vectors", str(vector_file), "--add", "calmm=0.1", "hello"))
    assert "unknown concept 'calmm'" in line
    missing = tmp_path / "nothing.safetensors"
    line = one_line_error(invoke("monitor", "--vectors", str(missing), "hello"))
    assert str(missing) in line and "does not exist" in line
    line = one_line_error(invoke("monitor", "--vectors", str(vector_file), "--layer", "40", "hello"))
    assert "40" in line
    no_norms = VectorSet.from_tensor(torch.randn(len(NAMES), 576), NAMES).save(tmp_path / "no_norms.safetensors")
    line = one_line_error(invoke("steer", "--vectors", str(no_norms), "--add", "calm=1", "hello"))
    assert "--absolute" in line and "mean norms" in line
    line = one_line_error(invoke("steer", "--vectors", str(vector_file), "--absolute", "--add", "calm=1",
                                 "--layer", "0.5", "--model", str(tmp_path), "hello"))
    assert "config.json" in line


@slow
def test_chat_replies_and_shows_emotions(loaded, vector_file):
    result = invoke("chat", "--vectors", str(vector_file), "--max-new-tokens", "6", input="Hi\n/quit\n")
    assert result.exit_code == 0, result.output
    reply = re.search(r"assistant> (.*)", result.stdout).group(1)
    assert reply.strip()
    emotions = re.search(r"emotions: (.*)", result.stdout).group(1)
    shown = re.findall(r"([a-z]+) [+-]\d\.\d{3}", emotions)
    assert len(shown) == 5 and set(shown) <= set(NAMES)


@slow
def test_chat_commands_and_eof(loaded, vector_file):
    result = invoke("chat", "--vectors", str(vector_file), "--add", "calm=0.1",
                    input="/steer foo=1\n/steer calm\n/steer sad=0.2\n/bogus\n/reset\n")  # EOF, no /quit
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "steering: calm=+0.1 (relative)" in out
    assert "error: unknown concept 'foo'" in out and "error: bad steering term 'calm'" in out
    assert "(steering: sad=+0.2 (relative))" in out and "unknown command '/bogus'" in out
    assert "(conversation forgotten)" in out and "Traceback" not in result.output
    line = one_line_error(invoke("chat", "--vectors", str(vector_file), "--add", "nope=1", input="/quit\n"))
    assert "unknown concept 'nope'" in line


# ================================================================================================ regulation


def test_parse_cap_and_floor():
    assert cli._parse_bounds(["desperate<=0.02", "afraid <= 0, sad=0.1"], ["calm>=0"]) == {
        "calm": (0.0, None), "desperate": (None, 0.02), "afraid": (None, 0.0), "sad": (None, 0.1)}
    assert cli._parse_bounds(["calm<=0.3"], ["calm>=-0.1"]) == {"calm": (-0.1, 0.3)}
    for bad in ("calm>=0.1", "calm<=x", "calm"):
        with pytest.raises(cli.UserError, match="bad"):
            cli._parse_bounds([bad], [])
    with pytest.raises(cli.UserError, match="--floor"):
        cli._parse_bounds([], ["calm<=0"])
    with pytest.raises(cli.UserError, match="twice"):
        cli._parse_bounds(["calm<=0", "calm<=0.1"], [])
    for bad in ("a==0.1", "<=0.5"):
        with pytest.raises(cli.UserError, match="bad --cap"):
            cli._parse_bounds([bad], [])
    with pytest.raises(cli.UserError, match="never binds"):
        cli._parse_bounds(["calm<=1"], [])
    with pytest.raises(cli.UserError, match="never binds"):
        cli._parse_bounds([], ["calm>=-1.5"])
    with pytest.raises(cli.UserError, match="--regulate-layer needs"):
        cli._parse_bounds([], [], "19")


@slow
def test_monitor_with_a_cap_reads_at_most_the_cap(loaded, vector_file, tmp_path):
    """The cap at the monitored layer: the JSON's cosines for that emotion never exceed it, and the note counts the
    corrected readings; without the cap some tokens read above it."""
    out = tmp_path / "m.json"
    plain = invoke("monitor", "--vectors", str(vector_file), "--emotion", "sad", "--json", str(out), TEXT)
    assert plain.exit_code == 0, plain.output
    readings = [t["emotion"]["cosine"] if "emotion" in t else None for t in json.loads(out.read_text())["tokens"]]
    mon = emovec.VectorSet.load(vector_file)
    with torch.no_grad(), emovec.monitor(loaded.model, mon, [19]) as m:
        loaded.model(**loaded.tokenizer(TEXT, return_tensors="pt"))
    sad = m.result().cosine[0, :, 0, NAMES.index("sad")]
    cap = float(sad.median())
    result = invoke("monitor", "--vectors", str(vector_file), "--layer", "19", "--cap", f"sad<={cap}", "--json",
                    str(out), TEXT)
    assert result.exit_code == 0, result.output
    assert "regulated sad <=" in result.stdout and "readings corrected" in result.stdout
    with torch.no_grad(), emovec.regulate(loaded.model, mon, {"sad": (None, cap)}, [19]), \
            emovec.monitor(loaded.model, mon, [19]) as m2:
        loaded.model(**loaded.tokenizer(TEXT, return_tensors="pt"))
    capped = m2.result().cosine[0, :, 0, NAMES.index("sad")]
    assert (capped <= cap + 1e-5).all() and (sad > cap + 1e-4).any()
    del readings


@slow
def test_steer_with_only_a_floor_and_chat_with_a_cap(loaded, vector_file, tmp_path):
    out = tmp_path / "s.json"
    result = invoke("steer", "--vectors", str(vector_file), "--floor", "calm>=0.5", "--max-new-tokens", "6",
                    "--json", str(out), "The weather today is")
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["bounds"] == {"calm": [0.5, None]} and data["regulate_layers"] == [19]
    assert data["plain"] != data["steered"] and "regulated calm >= 0.5 (cosine): calm: 9/9 readings" in result.stdout
    result = invoke("chat", "--vectors", str(vector_file), "--max-new-tokens", "5", "--cap", "sad<=-0.5",
                    input="Hi\n/quit\n")
    assert result.exit_code == 0, result.output
    assert re.search(r"regulated: sad \d+/\d+ tokens \(mean correction", result.stdout), result.stdout
    line = one_line_error(invoke("steer", "--vectors", str(vector_file), "--cap", "sadd<=0.1", "hello"))
    assert "unknown concept 'sadd'" in line
    line = one_line_error(invoke("chat", "--vectors", str(vector_file), "--cap", "sad<=-2", input="/quit\n"))
    assert "cosines" in line
