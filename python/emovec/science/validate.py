"""Does steering with a vector do what its name says? For each emotion, the change in the log-probability of its
own word family as the next token after prefixes like "I feel", when steering with that emotion, against random
directions of equal norm. This is the control a replication of the research found missing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from emovec.corpus import _EXTRA_FORMS
from emovec.runtime import steer
from emovec.science.preferences import random_like
from emovec.science.readings import encode
from emovec.vectors import VectorSet

PREFIXES = ("I feel", "He feels", "She was", "They were so", "Right now I am")


def family_tokens(tokenizer, emotion: str) -> list[int]:
    """First tokens of " word" for the emotion word and its family forms (a leading whitespace-only piece
    skipped); forms whose first token has fewer than 3 characters ("at" of "at ease", "on" of "on edge") are
    left out. Forms that share a first token with other words (" self" of the self- emotions) are kept."""
    ids = set()
    for form in (emotion, *_EXTRA_FORMS.get(emotion, ())):
        tokens = tokenizer.encode(" " + form, add_special_tokens=False)
        tokens = [t for t in tokens if tokenizer.decode([t]).strip()] or tokens  # a lone "▁" piece is not the word
        if len(tokenizer.decode([tokens[0]]).strip()) >= 3:
            ids.add(tokens[0])
    return sorted(ids)


@torch.no_grad()
def _next_logprobs(model, tokenizer, texts: Sequence[str], recipes: Sequence[dict | None], vectors: VectorSet,
                   layers: Sequence[int], batch_size: int, progress) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        batch, _ = encode(tokenizer, texts[i : i + batch_size], special=True)  # plain text: BOS where the model uses it
        batch = {k: v.to(device) for k, v in batch.items()}
        chunk = list(recipes[i : i + batch_size])
        if any(chunk):
            with steer(model, vectors, chunk, list(layers)):
                logits = model(**batch, use_cache=False).logits
        else:
            logits = model(**batch, use_cache=False).logits
        last = batch["attention_mask"].sum(1) - 1
        out.append(torch.log_softmax(logits[torch.arange(len(chunk)), last].float(), dim=-1).cpu())
        if progress is not None:
            progress(len(chunk))
    return torch.cat(out)


def run_validate(model, tokenizer, vectors: VectorSet, *, emotions: Sequence[str] | None = None,
                 strengths: Sequence[float] = (0.1, 0.2), layers: Sequence[Sequence[int]] | None = None,
                 prefixes: Sequence[str] = PREFIXES, randoms: int = 8, batch_size: int = 64, seed: int = 0,
                 progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """For every strength and layer set: Δ log P(own word family) per emotion when steered with it, the same Δ
    under each random direction, and whether the emotion beats every random control (Δ averaged over prefixes)."""
    if randoms < 1:
        raise ValueError("validate needs at least one random direction to compare against")
    emotions = list(emotions) if emotions is not None else list(vectors.names)
    layers = [list(x) for x in layers] if layers is not None else [[vectors.default_layer]]
    extended = random_like(vectors, randoms, seed)
    targets = {e: family_tokens(tokenizer, e) for e in emotions}
    scored = [e for e in emotions if targets[e]]
    conditions = [None] + [{e: 1.0} for e in scored] + [{f"random-{i}": 1.0} for i in range(randoms)]
    result: dict[str, Any] = {"prefixes": list(prefixes), "randoms": randoms, "emotions": scored,
                              "not_scored": [e for e in emotions if not targets[e]], "runs": []}
    for layer_set in layers:
        for strength in strengths:
            recipes, texts = [], []
            for condition in conditions:
                for prefix in prefixes:
                    texts.append(prefix)
                    recipes.append(None if condition is None else {k: v * strength for k, v in condition.items()})
            logp = _next_logprobs(model, tokenizer, texts, recipes, extended, layer_set, batch_size, progress)
            logp = logp.view(len(conditions), len(prefixes), -1)
            per = {}
            for j, e in enumerate(scored):
                own = _family_delta(logp[1 + j], logp[0], targets[e])
                random = [_family_delta(logp[1 + len(scored) + r], logp[0], targets[e]) for r in range(randoms)]
                per[e] = {"delta": round(own, 4), "random": [round(r, 4) for r in random],
                          "random_max": round(max(random), 4), "random_mean": round(sum(random) / len(random), 4),
                          "beats_all": own > max(random)}
            share = sum(v["beats_all"] for v in per.values()) / max(len(per), 1)
            result["runs"].append({"layers": layer_set, "strength": strength, "share_beating_all_randoms":
                                   round(share, 4), "per_emotion": per})
    return result


def _family_delta(steered: torch.Tensor, plain: torch.Tensor, ids: list[int]) -> float:
    """Mean over prefixes of the change in log P(next token is one of ``ids``)."""
    return float((torch.logsumexp(steered[:, ids], -1) - torch.logsumexp(plain[:, ids], -1)).mean())


@torch.no_grad()
def samples(model, tokenizer, vectors: VectorSet, emotions: Sequence[str], strength: float, layers: Sequence[int],
            prefix: str = "Today I feel", max_new_tokens: int = 16) -> list[dict[str, str]]:
    """Greedy continuations of ``prefix``, plain and steered with each emotion."""
    device = next(model.parameters()).device
    batch, _ = encode(tokenizer, [prefix] * (len(emotions) + 1), special=True)
    batch = {k: v.to(device) for k, v in batch.items()}
    recipes = [None] + [{e: strength} for e in emotions]
    with steer(model, vectors, recipes, list(layers), positions="all"):
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [{"steering": "plain" if r is None else f"{e}={strength:+g}", "prefix": prefix, "text": t.strip()}
            for r, e, t in zip(recipes, ["plain", *emotions], texts)]
