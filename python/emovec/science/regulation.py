"""Does closed-loop regulation do what it says? Three checks on a real model, with every setting fixed in advance.

(a) Dose with a cap: the dose-response templates read at the regulated layer L and a later layer, plain and with
    afraid capped at L at its reading (last prompt token, layer L) on the template's most harmless dose. The curve
    at L should flatten; the later layer shows how much of the dose signal still gets through.
(b) Steering +desperate at L, with and without a cap on desperate at a later layer L2 (cap = the highest reading of
    desperate at L2 on the unsteered prefixes, so unsteered text is never corrected): the log-probability of the
    desperate word family after "I feel"-style prefixes, and greedy continuations, should move back toward plain.
(c) The same with a random direction (steered and capped the same way) as a control.
Plus: how much the caps change the logits of unsteered text, which stays within them (it must be exactly zero).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from emovec.runtime import regulate, steer
from emovec.science.dose import load_templates, run_dose
from emovec.science.preferences import random_like
from emovec.science.readings import encode
from emovec.science.validate import PREFIXES, family_tokens
from emovec.vectors import VectorSet

GENERATION_PROMPTS = ("Today I feel", "When I saw the deadline, I", "The test results came back and I")


def _entered(contexts: Sequence[Callable[[], Any]]) -> contextlib.ExitStack:
    """An ExitStack with a fresh context from each factory entered, in order."""
    stack = contextlib.ExitStack()
    try:
        for make in contexts:
            stack.enter_context(make())
    except BaseException:
        stack.close()  # the contexts already entered are left before the error goes on
        raise
    return stack


@torch.no_grad()
def _last_logprobs(model, tokenizer, texts: Sequence[str], contexts=()) -> torch.Tensor:
    device = next(model.parameters()).device
    batch, _ = encode(tokenizer, list(texts), special=True)
    batch = {k: v.to(device) for k, v in batch.items()}
    with _entered(contexts):
        logits = model(**batch, use_cache=False).logits
    last = batch["attention_mask"].sum(1) - 1
    return torch.log_softmax(logits[torch.arange(len(texts)), last].double(), dim=-1).cpu()


@torch.no_grad()
def _max_reading(model, tokenizer, vectors: VectorSet, name: str, layer: int, texts: Sequence[str]) -> float:
    """The highest cosine of ``name`` at ``layer`` over every real token of ``texts`` (unsteered)."""
    from emovec.runtime import monitor

    device = next(model.parameters()).device
    batch, _ = encode(tokenizer, list(texts), special=True)
    with monitor(model, vectors.select([name]), [layer]) as mon:
        model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
    res = mon.result(decode=False)
    return float(res.cosine[..., 0, 0][res.mask].max())


def _family_logp(logp: torch.Tensor, ids: list[int]) -> float:
    return float(torch.logsumexp(logp[:, ids], -1).mean())


@torch.no_grad()
def _generate(model, tokenizer, prompts: Sequence[str], contexts, max_new_tokens: int) -> list[str]:
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    finally:
        tokenizer.padding_side = side
    with _entered(contexts):
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return [t.strip() for t in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]


def run_regulation(model, tokenizer, vectors: VectorSet, *, layer: int | None = None, later: int = 4,
                   strength: float = 0.2, templates: Sequence[dict] | None = None, seed: int = 0,
                   max_new_tokens: int = 20, batch_size: int = 8) -> dict[str, Any]:
    """The three checks of the module docstring. ``layer`` (default: the vectors' default layer) is where the
    dose cap applies and where (b)/(c) steer; ``later`` layers after it, the downstream reading and the cap of (b)."""
    layer = vectors.default_layer if layer is None else layer
    num_layers = len(vectors.layers) if vectors.layers else None
    layer2 = min(layer + later, (num_layers or layer + later + 1) - 1)
    templates = list(templates) if templates is not None else load_templates()
    out: dict[str, Any] = {"layer": layer, "later_layer": layer2, "strength": strength}

    # (a) dose with afraid capped at its harmless-dose reading
    dose_rows = []
    plain = run_dose(model, tokenizer, vectors, templates, [layer, layer2], ["afraid"], batch_size=batch_size)
    for template, entry in zip(templates, plain["templates"]):
        curve = entry["layers"][str(layer)]["last"]["readings"]["afraid"]
        sign = -1.0 if entry["danger_falls_with_x"] else 1.0
        harmless = min(range(len(entry["values"])), key=lambda i: sign * entry["values"][i])
        cap = curve[harmless]
        with regulate(model, vectors, {"afraid": (None, cap)}, [layer]) as reg:
            capped = run_dose(model, tokenizer, vectors, [template], [layer, layer2], ["afraid"],
                              batch_size=batch_size)["templates"][0]
        corrected = reg.result().share_corrected()["afraid"]
        row = {"template": entry["name"], "cap": round(cap, 5), "share_of_readings_corrected": round(corrected, 4)}
        for tag, where in (("regulated_layer", layer), ("later_layer", layer2)):
            p = entry["layers"][str(where)]["last"]
            c = capped["layers"][str(where)]["last"]
            row[tag] = {"plain": p["readings"]["afraid"], "capped": c["readings"]["afraid"],
                        "spearman_danger_plain": p["spearman_danger"]["afraid"],
                        "spearman_danger_capped": c["spearman_danger"]["afraid"],
                        "range_plain": round(max(p["readings"]["afraid"]) - min(p["readings"]["afraid"]), 5),
                        "range_capped": round(max(c["readings"]["afraid"]) - min(c["readings"]["afraid"]), 5)}
        dose_rows.append(row)
    out["dose"] = dose_rows

    # (b) and (c): steer at `layer`, cap the same direction at `layer2`
    extended = random_like(vectors, 1, seed)
    prefixes = list(PREFIXES)
    targets = family_tokens(tokenizer, "desperate")
    base = _last_logprobs(model, tokenizer, prefixes)
    checks = {}
    for name in ("desperate", "random-0"):
        cap = _max_reading(model, tokenizer, extended, name, layer2, prefixes + list(GENERATION_PROMPTS))
        bounds = {name: (None, cap)}
        steer_it = lambda name=name: steer(model, extended, {name: strength}, [layer])  # noqa: E731
        made: list = []

        def cap_it(bounds=bounds, made=made):
            made.append(regulate(model, extended, bounds, [layer2]))
            return made[-1]

        steered = _last_logprobs(model, tokenizer, prefixes, [steer_it])
        both = _last_logprobs(model, tokenizer, prefixes, [steer_it, cap_it])
        share = made[-1].result().share_corrected()[name]
        capped_only = _last_logprobs(model, tokenizer, prefixes, [cap_it])
        distance = lambda a: float((a - base).abs().mean())  # noqa: E731  mean |Δ log p| over the vocabulary
        entry = {
            "cap": round(cap, 5),
            "share_of_readings_corrected_when_steered": round(share, 4),
            "desperate_family_logp": {"plain": round(_family_logp(base, targets), 4),
                                      "steered": round(_family_logp(steered, targets), 4),
                                      "steered_and_capped": round(_family_logp(both, targets), 4)},
            "mean_abs_logp_change_from_plain": {"steered": round(distance(steered), 5),
                                                "steered_and_capped": round(distance(both), 5)},
            "cap_alone_max_abs_logit_change": float((capped_only - base).abs().max()),
        }
        d_s, d_b = entry["mean_abs_logp_change_from_plain"].values()
        entry["share_of_steering_effect_removed"] = round(1 - d_b / d_s, 4) if d_s > 0 else None
        entry["generations"] = {
            "plain": _generate(model, tokenizer, GENERATION_PROMPTS, [], max_new_tokens),
            "steered": _generate(model, tokenizer, GENERATION_PROMPTS, [steer_it], max_new_tokens),
            "steered_and_capped": _generate(model, tokenizer, GENERATION_PROMPTS, [steer_it, cap_it], max_new_tokens),
        }
        checks[name] = entry
    out["steer_then_cap"] = checks
    out["prompts"] = list(GENERATION_PROMPTS)
    out["prefixes"] = prefixes
    return out


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A few lines for the terminal."""
    lines = [f"regulated layer {result['layer']}, later layer {result['later_layer']}, steering strength "
             f"{result['strength']}"]
    for row in result["dose"]:
        a, b = row["regulated_layer"], row["later_layer"]
        lines.append(f"dose {row['template']}: afraid vs danger rho at L{result['layer']} {a['spearman_danger_plain']:+.2f}"
                     f" -> {a['spearman_danger_capped']:+.2f} (range {a['range_plain']:.4f} -> {a['range_capped']:.4f});"
                     f" at L{result['later_layer']} {b['spearman_danger_plain']:+.2f} -> {b['spearman_danger_capped']:+.2f}")
    for name, entry in result["steer_then_cap"].items():
        fam = entry["desperate_family_logp"]
        lines.append(f"steer +{name}: log P(desperate words) plain {fam['plain']:.3f}, steered {fam['steered']:.3f}, "
                     f"steered+capped {fam['steered_and_capped']:.3f}; share of the steering effect removed by the cap "
                     f"{entry['share_of_steering_effect_removed']} (it corrected {entry['share_of_readings_corrected_when_steered']:.0%} of "
                     f"the steered readings); cap alone changes logits by at most "
                     f"{entry['cap_alone_max_abs_logit_change']:.3g}")
    return lines
