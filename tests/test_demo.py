"""emovec demo at quick sizes on the default model: the report is well-formed, self-contained, follows its schema,
reuses cached parts on a rerun, and (when Chromium is installed) renders to a screenshot."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from test_cli_runtime import invoke, slow

SUMMARY_KEYS = {"schema", "model", "emovec", "quick", "layer", "wall_seconds", "part_seconds", "reused", "geometry",
                "dose_spearman_with_danger", "implied", "preferences", "validate", "bench"}
PARTS = {"geometry", "conversation", "dose", "implied", "preferences", "validate", "steering", "bench"}


@pytest.fixture(scope="module")
def report(loaded, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = invoke("demo", "--quick", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


@slow
def test_demo_report_is_well_formed_and_self_contained(report):
    import html5lib

    page = (report / "index.html").read_text(encoding="utf-8")
    html5lib.HTMLParser(strict=True).parse(page)  # raises on any HTML5 parse error
    references = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert references and all(r.startswith(("data:image/png;base64,", "#")) for r in references)
    assert "<script" not in page  # readable without JavaScript
    for section in ("The emotion vectors", "A monitored conversation", "Dose-response", "Implied emotions",
                    "Preferences", "Does steering do what the name says?", "Steered generations", "The fused op"):
        assert section in page
    assert page.count('class="cmd"') >= 8  # the command behind every part


@slow
def test_demo_summary_follows_its_schema(report):
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS and summary["schema"] == "emovec.demo/1" and summary["quick"] is True
    assert set(summary["part_seconds"]) == PARTS
    assert 0 <= summary["validate"]["share_beating_all_randoms"] <= 1
    assert [row["template"] for row in summary["dose_spearman_with_danger"]] == ["tylenol"]
    for part in PARTS:
        assert json.loads((report / "parts" / f"{part}.json").read_text())["key"]


@slow
def test_demo_rerun_reuses_every_part(report):
    result = invoke("demo", "--quick", "--out", str(report))
    assert result.exit_code == 0, result.output
    assert set(json.loads((report / "summary.json").read_text())["reused"]) == PARTS


@slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (apt-get install chromium)")
def test_demo_report_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    "--window-size=1100,2400", f"--screenshot={shot}", (report / "index.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
