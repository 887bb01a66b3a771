"""Preferences between activities: A/B choices from next-token logits for every ordered pair, Elo ratings, the
correlation of each emotion's reading on the activity with its Elo, and Elo shifts when an emotion is steered
on an activity's tokens (against random directions of equal norm)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from emovec import corpus
from emovec.runtime import steer
from emovec.science.readings import encode, read_messages, wrap
from emovec.vectors import VectorSet

PROMPT = ("Which would you rather do?\n(A) {a}\n(B) {b}\nAnswer with the letter A or B only.")
ELO_SCALE = 400 / math.log(10)


def load_activities(path: str | Path | None = None) -> list[dict[str, str]]:
    path = Path(path) if path is not None else corpus.data_path("experiments/activities.json")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read activities from {path}: {error}") from None
    if not isinstance(rows, list) or len(rows) < 3 or not all(isinstance(r, dict) and r.get("activity") for r in rows):
        raise ValueError(f"{path}: expected a JSON list of 3+ objects with 'activity' (and 'category')")
    return [{"activity": str(r["activity"]), "category": str(r.get("category", ""))} for r in rows]


def _letter_ids(tokenizer, letter: str) -> list[int]:
    """Token ids of the answer letter, bare and after a space (the last piece: a SentencePiece "▁" prefix is
    not the letter)."""
    ids = {tokenizer.encode(form, add_special_tokens=False)[-1] for form in (letter, " " + letter)}
    return sorted(ids)


@torch.no_grad()
def choice_probabilities(model, tokenizer, activities: Sequence[str], pairs: Sequence[tuple[int, int]], *,
                         batch_size: int = 16, steering: tuple[VectorSet, dict, list[int], int] | None = None,
                         progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """P(the model answers A) for each ordered pair (a, b) of activity indices, from the next-token logits of
    "A" vs "B" after the chat template's generation prompt.

    ``steering`` = (vectors, recipe, layers, target): steer ``recipe`` on the tokens of activity ``target`` only,
    wherever it appears in a pair."""
    device = next(model.parameters()).device
    a_ids, b_ids = _letter_ids(tokenizer, "A"), _letter_ids(tokenizer, "B")
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        texts, spans = [], []
        for a, b in chunk:
            text, _ = wrap(tokenizer, PROMPT.format(a=activities[a], b=activities[b]))
            texts.append(text)
            target = steering[3] if steering else a
            marker = "(A) " if target == a else "(B) "
            start = text.rfind(marker) + len(marker)
            spans.append((start, start + len(activities[target])))
        batch, token_spans = encode(tokenizer, texts, spans)
        batch = {k: v.to(device) for k, v in batch.items()}
        if steering is not None:
            vectors, recipe, layers, target = steering
            positions = [[span] if target in pair else [] for span, pair in zip(token_spans, chunk)]
            with steer(model, vectors, recipe, layers, positions=positions):
                logits = model(**batch, use_cache=False).logits
        else:
            logits = model(**batch, use_cache=False).logits
        last = batch["attention_mask"].sum(1) - 1
        logp = torch.log_softmax(logits[torch.arange(len(chunk)), last].float(), dim=-1)
        score_a = torch.logsumexp(logp[:, a_ids], dim=-1)
        score_b = torch.logsumexp(logp[:, b_ids], dim=-1)
        out.append(torch.sigmoid(score_a - score_b).cpu())
        if progress is not None:
            progress(len(chunk))
    return torch.cat(out)


def fit_elo(n: int, pairs: Sequence[tuple[int, int]], p_first: torch.Tensor, *, fixed: torch.Tensor | None = None,
            free: Sequence[int] | None = None, steps: int = 500) -> torch.Tensor:
    """Elo ratings (mean 1500) of a Bradley-Terry model fitted to soft outcomes: P(a beats b) = p_first for each
    ordered pair. With ``fixed`` ratings, only the ``free`` ones are refitted (the others held)."""
    idx = torch.tensor(pairs)
    target = p_first.double().clamp(1e-6, 1 - 1e-6)
    strength = torch.zeros(n, dtype=torch.float64) if fixed is None else (fixed.double() - 1500) / ELO_SCALE
    strength = strength.clone().requires_grad_(True)
    mask = torch.ones(n, dtype=torch.float64) if free is None else torch.zeros(n, dtype=torch.float64).index_fill_(
        0, torch.tensor(list(free)), 1.0)
    optimiser = torch.optim.LBFGS([strength], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        logit = strength[idx[:, 0]] - strength[idx[:, 1]]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, target) + 1e-4 * (strength**2).sum()
        loss.backward()
        strength.grad *= mask
        return loss

    optimiser.step(closure)
    result = strength.detach()
    if fixed is None:
        result = result - result.mean()
    return (1500 + ELO_SCALE * result).float()


def random_like(vectors: VectorSet, count: int, seed: int = 0) -> VectorSet:
    """``vectors`` plus ``count`` random unit directions named random-0, random-1, ... (same layers, mean norms)."""
    g = torch.Generator().manual_seed(seed)
    slices = vectors.vectors.shape[0]
    randoms = torch.nn.functional.normalize(torch.randn(slices, count, vectors.hidden_size, generator=g), dim=-1)
    return VectorSet(vectors.names + [f"random-{i}" for i in range(count)], vectors.layers,
                     torch.cat([vectors.unit, randoms], dim=1), mean_norms=vectors.mean_norms,
                     default_layer=vectors.default_layer, metadata=dict(vectors.metadata))


def run_preferences(model, tokenizer, vectors: VectorSet, activities: Sequence[dict], layer: int, *,
                    steer_emotions: Sequence[str] = (), strength: float = 0.1, targets: Sequence[int] | None = None,
                    randoms: int = 1, batch_size: int = 16,
                    progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Elo of every activity from all ordered pairs; each emotion's reading on the activity (mean cosine over its
    tokens as a user message, at ``layer``) correlated with Elo; and, for ``steer_emotions`` and ``randoms`` random
    directions, the mean Elo shift of the ``targets`` when steered with ``strength`` on their own tokens."""
    texts = [a["activity"] for a in activities]
    n = len(texts)
    pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
    p = choice_probabilities(model, tokenizer, texts, pairs, batch_size=batch_size, progress=progress)
    elo = fit_elo(n, pairs, p)
    readings = read_messages(model, tokenizer, vectors, texts, [layer], batch_size=batch_size).at(layer, "user")
    elo_c = elo.double() - elo.double().mean()
    r = []
    for k in range(len(vectors.names)):
        x = readings[:, k].double() - readings[:, k].double().mean()
        denominator = float(x.norm() * elo_c.norm())
        r.append(float(x @ elo_c) / denominator if denominator > 0 else float("nan"))
    order = sorted(range(len(r)), key=lambda k: -abs(r[k]) if not math.isnan(r[k]) else 0)
    result: dict[str, Any] = {
        "layer": layer, "prompt": PROMPT,
        "activities": [{"activity": a["activity"], "category": a["category"], "elo": round(float(e), 1)}
                       for a, e in zip(activities, elo)],
        "position_bias_p_a": round(float(p.mean()), 4),
        "elo_correlation": {vectors.names[k]: round(r[k], 4) for k in order},
    }
    by_category: dict[str, list[float]] = {}
    for a, e in zip(activities, elo.tolist()):
        by_category.setdefault(a["category"], []).append(e)
    result["elo_by_category"] = {c: round(sum(v) / len(v), 1) for c, v in by_category.items()}
    if steer_emotions or randoms:
        extended = random_like(vectors, randoms)
        targets = list(targets) if targets is not None else list(range(n))
        if not targets:
            raise ValueError("steering needs at least one target activity")
        shifts: dict[str, list[float]] = {}
        conditions = list(steer_emotions) + [f"random-{i}" for i in range(randoms)]
        for name in conditions:
            extended.index(name)
            shifts[name] = []
            for t in targets:
                rows = [i for i, (a, b) in enumerate(pairs) if t in (a, b)]
                involved = [pairs[i] for i in rows]
                steered = choice_probabilities(model, tokenizer, texts, involved, batch_size=batch_size,
                                               steering=(extended, {name: strength}, [layer], t), progress=progress)
                # the same refit on the unsteered choices is the baseline, so the fit itself shifts nothing
                baseline = fit_elo(n, involved, p[rows], fixed=elo, free=[t])
                new = fit_elo(n, involved, steered, fixed=elo, free=[t])
                shifts[name].append(float(new[t] - baseline[t]))
        result["steering"] = {"strength": strength, "layer": layer, "targets": [texts[t] for t in targets],
                              "mean_elo_shift": {k: round(sum(v) / len(v), 2) for k, v in shifts.items()},
                              "elo_shifts": {k: [round(x, 2) for x in v] for k, v in shifts.items()}}
    return result
