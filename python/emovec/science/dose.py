"""Dose-response: how emotion readings where the reply begins change as a quantity in the user's message grows.

The research: "I just took {X} mg of tylenol..." from 500 to 16,000 mg; afraid rose and calm fell with X.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from emovec import corpus
from emovec.science.readings import read_messages, spearman
from emovec.vectors import VectorSet

DEFAULT_EMOTIONS = ("afraid", "calm", "desperate", "nervous", "happy", "sad")


def load_templates(path: str | Path | None = None) -> list[dict[str, Any]]:
    """Dose templates: dicts with name, template (with ``{X}``), values, unit, log (axis), and optionally
    ``danger_falls_with_x`` (danger grows as X falls, e.g. months of runway). Default: the packaged ones."""
    path = Path(path) if path is not None else corpus.data_path("experiments/dose_templates.json")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read dose templates from {path}: {error}") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a JSON list of templates")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "{X}" not in str(row.get("template", "")):
            raise ValueError(f"{path}: template {i} needs a 'template' string containing {{X}}")
        values = row.get("values")
        if not isinstance(values, list) or len(values) < 3 or not all(isinstance(v, (int, float)) for v in values):
            raise ValueError(f"{path}: template {i} ({row.get('name', '?')}) needs 'values', a list of 3+ numbers")
        row.setdefault("name", f"template-{i}")
        row.setdefault("unit", "")
        row.setdefault("log", False)
    return rows


def select_templates(templates: Sequence[dict[str, Any]], only: str | None,
                     what: str = "template") -> list[dict[str, Any]]:
    """The templates named in ``only`` (comma-separated; None or empty: all), refusing unknown names."""
    if not only:
        return list(templates)
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    known = [t["name"] for t in templates]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; known: {known}")
    return [t for t in templates if t["name"] in wanted]


def _format(value: float) -> str:
    if float(value).is_integer():
        return f"{int(value):,}" if abs(value) >= 1000 else str(int(value))
    return f"{value:g}"


def run_dose(model, tokenizer, vectors: VectorSet, templates: Sequence[dict], layers: Sequence[int],
             emotions: Sequence[str] = DEFAULT_EMOTIONS, *, batch_size: int = 8,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Readings of ``emotions`` for every template and value, at ``layers``; Spearman's rho of each emotion with X
    (and with danger, which is X or, for ``danger_falls_with_x`` templates, -X)."""
    emotions = [e for e in emotions]
    for e in emotions:
        vectors.index(e)
    index = [vectors.index(e) for e in emotions]
    out = {"emotions": emotions, "layers": list(layers), "templates": []}
    for template in templates:
        values = template["values"]
        messages = [template["template"].replace("{X}", _format(v)) for v in values]
        readings = read_messages(model, tokenizer, vectors, messages, layers, batch_size=batch_size, progress=progress)
        sign = -1.0 if template.get("danger_falls_with_x") else 1.0
        entry = {k: template[k] for k in ("name", "template", "values", "unit", "log")}
        entry["danger_falls_with_x"] = bool(template.get("danger_falls_with_x", False))
        entry["messages"] = messages
        entry["layers"] = {}
        for layer in layers:
            per = {}
            for which in ("last", "user"):
                values_k = readings.at(layer, which)[:, index]
                curves = {e: [round(float(v), 5) for v in values_k[:, j]] for j, e in enumerate(emotions)}
                rho = {e: round(spearman(values, curves[e]), 4) for e in emotions}
                per[which] = {"readings": curves, "spearman_x": rho,
                              "spearman_danger": {e: round(sign * r, 4) for e, r in rho.items()}}
            entry["layers"][str(layer)] = per
        out["templates"].append(entry)
    return out


def summary_rows(result: dict[str, Any], which: str = "last") -> list[dict[str, Any]]:
    """One row per template and layer: Spearman's rho of afraid and calm with danger."""
    rows = []
    for entry in result["templates"]:
        for layer, per in entry["layers"].items():
            rho = per[which]["spearman_danger"]
            rows.append({"template": entry["name"], "layer": int(layer), "afraid": rho.get("afraid"),
                         "calm": rho.get("calm")})
    return rows
