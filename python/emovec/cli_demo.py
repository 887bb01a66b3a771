"""``emovec demo``: the whole story on the default model, as one self-contained HTML report.

Each part runs the same code as its own command (the report shows that command) at a size that keeps the whole
demo within about five minutes on 2 CPU cores. Parts are cached in ``<out>/parts/``: a rerun with the same model,
vectors and sizes reuses them (``--fresh`` recomputes).
"""

from __future__ import annotations

import hashlib
import html
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from emovec import __version__
from emovec.cli import UserError, _check_outputs, _load_model, _user_errors, _write_atomic, main

FULL = {
    "dose": {"only": ["tylenol", "fasting", "missing-pet", "chest-pain"], "values": None,
             "emotions": ["afraid", "calm", "desperate", "nervous", "happy", "sad"]},
    "implied": {"limit": None},
    "preferences": {"per_category": 2, "steer": ["happy", "afraid"], "strength": 0.1, "targets": 3, "randoms": 1},
    "validate": {"emotions": None, "strengths": [0.1], "randoms": 8, "prefixes": None,
                 "samples": ["afraid", "calm", "happy", "sad"]},
    "conversation": {"max_new_tokens": 32},
    "steering": {"max_new_tokens": 32, "recipes": [{"calm": 0.1}, {"desperate": 0.1}]},
    "bench": {"repeats": 30},
}
QUICK = {
    "dose": {"only": ["tylenol"], "values": 3, "emotions": ["afraid", "calm"]},
    "implied": {"limit": 6},
    "preferences": {"per_category": 1, "steer": ["happy"], "strength": 0.1, "targets": 1, "randoms": 1,
                    "limit": 4},
    "validate": {"emotions": 10, "strengths": [0.1], "randoms": 2, "prefixes": 2, "samples": ["calm"]},
    "conversation": {"max_new_tokens": 4},
    "steering": {"max_new_tokens": 4, "recipes": [{"calm": 0.1}]},
    "bench": {"repeats": 3},
}
CONVERSATIONS = [("I took a whole bottle of pills an hour ago and I feel strange", "afraid"),
                 ("My dog died this morning.", "sad")]
STEER_PROMPT = "Write one sentence about deadlines."


class _Parts:
    """Run-or-reuse of the demo's parts, keyed by what they depend on."""

    def __init__(self, folder: Path, base_key: dict, fresh: bool) -> None:
        self.folder = folder / "parts"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.base_key = base_key
        self.fresh = fresh
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []

    def get(self, name: str, params: dict, run: Callable[[], Any]) -> Any:
        key = hashlib.sha256(json.dumps({**self.base_key, "part": name, "params": params}, sort_keys=True,
                                        default=str).encode()).hexdigest()[:16]
        path = self.folder / f"{name}.json"
        if not self.fresh and path.exists():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
                if saved.get("key") == key:
                    self.seconds[name] = saved["seconds"]
                    self.reused.append(name)
                    return saved["result"]
            except (OSError, ValueError, KeyError):
                pass  # an unreadable cache entry is recomputed
        click.echo(f"demo: {name} ...", err=True)
        started = time.perf_counter()
        result = run()
        self.seconds[name] = round(time.perf_counter() - started, 2)
        _write_atomic(path, json.dumps({"key": key, "seconds": self.seconds[name], "result": result}) + "\n")
        return result


@main.command()
@click.option("--out", "out_dir", default="report", show_default=True, type=click.Path(),
              help="folder for index.html, summary.json, figures and the cached parts")
@click.option("--quick", is_flag=True, help="tiny sizes (seconds): checks the pipeline, not the findings")
@click.option("--fresh", is_flag=True, help="recompute every part instead of reusing cached ones")
@click.option("--smooth", default=1, show_default=True, type=click.IntRange(min=1), metavar="TOKENS",
              help="moving average of the monitored conversation's readings over this many tokens (1 = raw)")
def demo(out_dir, quick, fresh, smooth) -> None:
    """The whole story on the default model: geometry, a monitored conversation, dose-response, implied emotions,
    preferences, steering validated against random directions, steered generations and a benchmark, as
    report/index.html (self-contained) and report/summary.json."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    _check_outputs(str(out / "index.html") if out.is_dir() else str(out))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with _user_errors():
        loaded = _load_model(None, None)
        from emovec.extraction import resolve_vectors

        vectors = resolve_vectors(None, loaded.model)
    sizes = {**(QUICK if quick else FULL)}
    sizes["conversation"] = {**sizes["conversation"], "smooth": smooth}
    base_key = {"model": loaded.name, "config": vectors.metadata.get("config_hash"),
                "corpus": vectors.metadata.get("corpus_hash"), "emovec": __version__}
    parts = _Parts(out, base_key, fresh)
    with _user_errors():
        results = _run_parts(loaded, vectors, sizes, parts)
    figures = _draw(results, out)
    wall = round(time.perf_counter() - started, 1)
    summary = _summary(loaded.name, vectors, results, parts, wall, quick)
    _write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    _write_atomic(out / "index.html", _page(loaded.name, vectors, results, figures, summary))
    click.echo(f"wrote {out / 'index.html'} and {out / 'summary.json'} in {wall:.0f} s"
               + (f" (reused: {', '.join(parts.reused)})" if parts.reused else ""), err=True)


def _run_parts(loaded, vectors, sizes, parts: _Parts) -> dict[str, Any]:
    from emovec.science import dose, implied, preferences, validate
    from emovec.science.geometry import analyse

    model, tokenizer = loaded.model, loaded.tokenizer
    layer = vectors.default_layer
    results: dict[str, Any] = {"layer": layer}
    results["geometry"] = parts.get("geometry", {"ratings": _ratings() is not None},
                                    lambda: analyse(vectors, layer, ratings=_ratings()))
    results["conversation"] = parts.get("conversation", sizes["conversation"],
                                        lambda: _conversations(loaded, vectors, sizes["conversation"]))

    def run_dose():
        templates = [t for t in dose.load_templates() if t["name"] in sizes["dose"]["only"]]
        if sizes["dose"]["values"]:
            for t in templates:
                t["values"] = t["values"][:: max(1, len(t["values"]) // sizes["dose"]["values"])]
        return dose.run_dose(model, tokenizer, vectors, templates, [layer], sizes["dose"]["emotions"])

    results["dose"] = parts.get("dose", sizes["dose"], run_dose)
    results["implied"] = parts.get("implied", sizes["implied"], lambda: implied.run_implied(
        model, tokenizer, vectors, implied.load_messages()[: sizes["implied"]["limit"]], layer))

    def run_preferences():
        p = sizes["preferences"]
        activities, seen = [], {}
        for a in preferences.load_activities():
            if seen.get(a["category"], 0) < p["per_category"]:
                seen[a["category"]] = seen.get(a["category"], 0) + 1
                activities.append(a)
        activities = activities[: p.get("limit")]
        n = len(activities)
        targets = [round(i * (n - 1) / max(1, p["targets"] - 1)) for i in range(p["targets"])]
        return preferences.run_preferences(model, tokenizer, vectors, activities, layer, steer_emotions=p["steer"],
                                           strength=p["strength"], targets=targets, randoms=p["randoms"])

    results["preferences"] = parts.get("preferences", sizes["preferences"], run_preferences)

    def run_validate():
        v = sizes["validate"]
        emotions = vectors.names[: v["emotions"]] if v["emotions"] else None
        prefixes = validate.PREFIXES[: v["prefixes"]] if v["prefixes"] else validate.PREFIXES
        result = validate.run_validate(model, tokenizer, vectors, emotions=emotions, strengths=v["strengths"],
                                       layers=[[layer]], prefixes=prefixes, randoms=v["randoms"])
        result["samples"] = validate.samples(model, tokenizer, vectors, v["samples"], v["strengths"][-1], [layer])
        return result

    results["validate"] = parts.get("validate", sizes["validate"], run_validate)
    results["steering"] = parts.get("steering", sizes["steering"],
                                    lambda: _steering(loaded, vectors, sizes["steering"]))

    def run_bench():
        from emovec.bench.quick import op_ratios

        return op_ratios(repeats=sizes["bench"]["repeats"])

    results["bench"] = parts.get("bench", sizes["bench"], run_bench)
    return results


def _ratings():
    """AFINN valences of the emotion words when the optional `afinn` package is installed, else None."""
    try:
        from afinn import Afinn
    except ImportError:
        return None
    from emovec.corpus import load_emotions

    lexicon = Afinn()._dict
    return {"valence (AFINN)": {w: float(lexicon[w]) for w in load_emotions() if w in lexicon}}


def _conversations(loaded, vectors, size) -> list[dict[str, Any]]:
    import torch

    from emovec import render
    from emovec.cli import _generation_config, _special_flags
    from emovec.runtime import monitor

    model, tokenizer = loaded.model, loaded.tokenizer
    out = []
    for message, emotion in CONVERSATIONS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
        encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        config = _generation_config(model, tokenizer, size["max_new_tokens"])
        with torch.no_grad(), monitor(model, vectors, [vectors.default_layer], tokenizer=tokenizer) as mon:
            generated = model.generate(**encoded, generation_config=config)
        result = mon.result().smoothed(size.get("smooth", 1))
        ids = result.sequence(0)["token_ids"].tolist()
        spans, scale = render.token_spans(result, emotion=emotion, layer=vectors.default_layer,
                                          special=_special_flags(tokenizer, ids))
        prompt_length = encoded["input_ids"].shape[1]
        reply = tokenizer.decode(generated[0, prompt_length:], skip_special_tokens=True).strip()
        top_reply = render.mean_emotions(result.smoothed(1), start=prompt_length, k=5)  # the mean: raw readings
        out.append({"message": message, "emotion": emotion, "reply": reply, "spans": spans, "scale": round(scale, 4),
                    "smooth": size.get("smooth", 1),
                    "prompt_tokens": prompt_length, "reply_top": [[n, round(v, 4)] for n, v in top_reply]})
    return out


def _steering(loaded, vectors, size) -> list[dict[str, str]]:
    import torch

    from emovec.cli import _generation_config
    from emovec.runtime import steer

    model, tokenizer = loaded.model, loaded.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": STEER_PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    recipes = [None] + list(size["recipes"])
    encoded = tokenizer([text] * len(recipes), return_tensors="pt", add_special_tokens=False)
    config = _generation_config(model, tokenizer, size["max_new_tokens"])
    with torch.no_grad(), steer(model, vectors, recipes, [vectors.default_layer], positions="all"):
        generated = model.generate(**encoded, generation_config=config)
    replies = tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    return [{"steering": "plain" if r is None else ", ".join(f"{k}={v:+g}" for k, v in r.items()), "reply": t.strip()}
            for r, t in zip(recipes, replies)]


def _draw(results: dict[str, Any], out: Path) -> dict[str, list[Path]]:
    from emovec.report import experiments
    from emovec.report.geometry import draw

    return {"geometry": draw(results["geometry"], out), "dose": experiments.draw_dose(results["dose"], out),
            "implied": experiments.draw_implied(results["implied"], out),
            "preferences": experiments.draw_preferences(results["preferences"], out),
            "validate": experiments.draw_validate(results["validate"], out)}


def _summary(model_name, vectors, results, parts: _Parts, wall: float, quick: bool) -> dict[str, Any]:
    dose_rows = [{"template": t["name"], "afraid": t["layers"][str(results["layer"])]["last"]["spearman_danger"].get(
        "afraid"), "calm": t["layers"][str(results["layer"])]["last"]["spearman_danger"].get("calm")}
        for t in results["dose"]["templates"]]
    geometry = results["geometry"]
    validate_run = results["validate"]["runs"][0]
    pref = results["preferences"]
    return {
        "schema": "emovec.demo/1", "model": model_name, "emovec": __version__, "quick": quick,
        "layer": results["layer"], "wall_seconds": wall, "part_seconds": parts.seconds, "reused": parts.reused,
        "geometry": {"pc_variance": geometry["pca"]["explained"][:2], "ratings": geometry["ratings"],
                     "heldout": geometry.get("heldout")},
        "dose_spearman_with_danger": dose_rows,
        "implied": results["implied"]["summary"],
        "preferences": {"top_elo_correlations": list(pref["elo_correlation"].items())[:5],
                        "mean_elo_shift": pref.get("steering", {}).get("mean_elo_shift"),
                        "elo_by_category": pref["elo_by_category"]},
        "validate": {"strength": validate_run["strength"], "share_beating_all_randoms":
                     validate_run["share_beating_all_randoms"], "randoms": results["validate"]["randoms"]},
        "bench": results["bench"],
    }


def _page(model_name, vectors, results, figures, summary) -> str:
    from emovec.report import html as h

    layer = results["layer"]
    geometry = results["geometry"]
    sections = []
    explained = geometry["pca"]["explained"]
    rows = [["PC1 / PC2 variance", f"{100 * explained[0]:.1f}% / {100 * explained[1]:.1f}%"]]
    for column, info in geometry["ratings"].items():
        if info["r"]:
            rows.append([f"r of PC1 / PC2 with {column} ({info['n']} words)", f"{info['r'][0]:+.2f} / {info['r'][1]:+.2f}"])
    if geometry.get("heldout"):
        held = geometry["heldout"]
        rows.append(["held-out story classification (top-1 / top-5)",
                     f"{100 * held['at_layer'][0]:.0f}% / {100 * held['at_layer'][1]:.0f}% at layer {layer} "
                     f"(chance {100 * held['chance_top1']:.1f}%)"])
    neighbours = [[name, ", ".join(f"{n} {c:.2f}" for n, c in pairs)] for name, pairs in geometry["neighbours"].items()]
    sections.append(h.section(
        "1. The emotion vectors", h.paragraph(
            f"{len(vectors.names)} emotion vectors of {model_name} at layer {layer}, extracted from 4,104 stories "
            "(every emotion told about the same 24 situations) and shipped with emovec."),
        h.command("emovec geometry --out report/geometry"), h.table(["measure", "value"], rows),
        h.table(["emotion", "nearest vectors (cosine)"], neighbours),
        '<div class="figs">' + "".join(h.image(p, p.stem) for p in figures["geometry"]) + "</div>", anchor="geometry"))

    chats = []
    for convo in results["conversation"]:
        chats.append(
            f'<div class="chat"><div class="role">coloured by <b>{html.escape(convo["emotion"])}</b> '
            f'(full colour at |cosine| {convo["scale"]:.3f}; hover a token for its top 5)</div>'
            f'<div>{"".join(convo["spans"])}</div><div class="role">reply: {html.escape(convo["reply"])}</div>'
            f'<div class="role">strongest over the reply: '
            f'{html.escape(", ".join(f"{n} {v:+.3f}" for n, v in convo["reply_top"]))}</div></div>')
    sections.append(h.section(
        "2. A monitored conversation", h.paragraph(
            "Every token of the prompt and of the model's reply, coloured by the cosine of one emotion at the default "
            "layer" + (f", averaged over {results['conversation'][0]['smooth']} neighbouring tokens."
                       if results["conversation"][0].get("smooth", 1) > 1 else " (raw readings; --smooth N averages).")),
        h.command(f'emovec monitor --chat "{CONVERSATIONS[0][0]}" --emotion afraid --html page.html'),
        "".join(chats), anchor="conversation"))

    dose_rows = [[r["template"], r["afraid"], r["calm"]] for r in summary["dose_spearman_with_danger"]]
    rising = sum(1 for r in summary["dose_spearman_with_danger"] if (r["afraid"] or 0) > 0)
    falling = sum(1 for r in summary["dose_spearman_with_danger"] if (r["calm"] or 0) < 0)
    sections.append(h.section(
        "3. Dose-response", h.paragraph("Readings where the assistant's reply begins, as the danger in the user's "
                                        "message grows. The research found afraid rising and calm falling."),
        h.command("emovec dose --only " + ",".join(t["name"] for t in results["dose"]["templates"]) + " --out dose"),
        f'<p class="finding">afraid rose with danger in {rising} of {len(dose_rows)} templates; calm fell in '
        f"{falling} of {len(dose_rows)}.</p>",
        h.table(["template", "Spearman ρ afraid", "Spearman ρ calm"], dose_rows, numeric={1, 2}),
        '<div class="figs">' + "".join(h.image(p, p.stem) for p in figures["dose"]) + "</div>", anchor="dose"))

    imp = results["implied"]
    sections.append(h.section(
        "4. Implied emotions", h.paragraph("Messages that imply an emotion without naming it: the rank of the "
                                           f"intended emotion among {imp['num_vectors']} where the reply begins."),
        h.command("emovec implied --out implied"),
        "".join(f'<p class="finding">{label}: median rank {imp["summary"][which]["median_rank"]} (chance '
                f'{imp["chance_median_rank"]:.0f}); in the top 5 for {imp["summary"][which]["top5"]} of '
                f'{len(imp["messages"])} messages, top 10 for {imp["summary"][which]["top10"]}.</p>'
                for which, label in (("last", "where the reply begins"),
                                     ("centred", "there, each emotion centred on its mean over the messages"),
                                     ("user", "mean over the user's tokens"))),
        h.table(["message", "intended", "rank", "rank centred", "strongest three (centred)"],
                [[m["text"], m["emotion"], m["rank_last"], m["rank_centred"],
                  ", ".join(n for n, _ in m["top_centred"][:3])] for m in imp["messages"]], numeric={2, 3}),
        h.image(figures["implied"][0], "implied"), anchor="implied"))

    pref = results["preferences"]
    shifts = pref.get("steering", {}).get("mean_elo_shift") or {}
    shift_rows = [[k, v] for k, v in shifts.items()]
    steered = [k for k in shifts if not k.startswith("random-")]
    randoms = len(shifts) - len(steered)
    sections.append(h.section(
        "5. Preferences", h.paragraph("A/B choices between activities from next-token logits, every ordered pair, "
                                      "fitted to Elo ratings; emotion readings on the activities against Elo; steering "
                                      "an emotion on one activity's tokens, against a random direction."),
        h.command(f"emovec preferences --steer {','.join(steered)} --randoms {randoms} --out preferences"),
        h.table(["category", "mean Elo"], [[k, f"{v:.0f}"] for k, v in sorted(pref["elo_by_category"].items(),
                                                                             key=lambda kv: -kv[1])], numeric={1}),
        h.table(["emotion", "r with Elo"], [[k, v] for k, v in list(pref["elo_correlation"].items())[:8]],
                numeric={1}),
        h.table(["steering", "mean Elo shift"], shift_rows, numeric={1}) if shift_rows else "",
        '<div class="figs">' + "".join(h.image(p, p.stem) for p in figures["preferences"]) + "</div>",
        anchor="preferences"))

    val = results["validate"]
    run = val["runs"][0]
    sections.append(h.section(
        "6. Does steering do what the name says?",
        h.paragraph("For each emotion, the change in log-probability of its own word after prefixes such as "
                    "\"I feel\", steering with that emotion, against random directions of equal norm."),
        h.command(f"emovec validate --strengths {run['strength']} --randoms {val['randoms']} --out validate"),
        f'<p class="finding">{100 * run["share_beating_all_randoms"]:.0f}% of {len(run["per_emotion"])} emotions '
        f'beat all {val["randoms"]} random directions at strength {run["strength"]:+g}.</p>',
        h.image(figures["validate"][0], "validate"),
        h.table(["steering", "continuation of “" + (val["samples"][0]["prefix"] if val["samples"] else "") + "”"],
                [[s["steering"], s["text"]] for s in val["samples"]]), anchor="validate"))

    sections.append(h.section(
        "7. Steered generations", h.command(f'emovec steer --chat "{STEER_PROMPT}" --add calm=0.1'),
        h.table(["steering", "reply"], [[s["steering"], s["reply"]] for s in results["steering"]]), anchor="steering"))

    sections.append(h.section(
        "8. The fused op", h.paragraph("Steering + projection onto 171 vectors + capture in one pass, against the "
                                       "same work as separate torch ops, on this machine's CPU (interleaved medians)."),
        h.command("python benchmarks/bench_op.py"),
        h.table(["N", "d", "K", "fused µs", "naive µs", "speed-up"],
                [[r["N"], r["d"], r["K"], r["fused_us"], r["naive_us"], r["speedup"]] for r in results["bench"]],
                numeric={0, 1, 2, 3, 4, 5}), anchor="bench"))
    subtitle = (f"{model_name} · layer {layer} · emovec {__version__} · {summary['wall_seconds']:.0f} s on this "
                f"machine{' (quick sizes)' if summary['quick'] else ''} · command: emovec demo")
    return h.page("emovec: emotion vectors in " + model_name, subtitle, sections)

