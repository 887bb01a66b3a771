"""Readings of concept vectors on chat messages, where the assistant's reply begins: the building block of the
research's experiments (dose-response, implied emotions, preferences).

For each message, wrapped in the model's chat template as the user's turn with the generation prompt after it:
``last`` is the cosine of the residual stream with every vector at the last prompt token (where the reply begins),
``user`` the mean cosine over the tokens of the user's message itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from emovec.runtime import monitor
from emovec.vectors import VectorSet


@dataclass
class Readings:
    names: list[str]
    layers: list[int]
    last: torch.Tensor  # (N, L, K) cosine at the last prompt token
    user: torch.Tensor  # (N, L, K) mean cosine over the user message's tokens

    def at(self, layer: int, which: str = "last") -> torch.Tensor:
        """(N, K) readings at ``layer``; ``which`` is "last" or "user"."""
        return getattr(self, which)[:, self.layers.index(layer)]


def wrap(tokenizer, message: str, *, chat: bool = True, system: str | None = None) -> tuple[str, tuple[int, int]]:
    """The text the model reads for ``message`` and the character span of the message inside it."""
    if not chat:
        return message, (0, len(message))
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; pass chat=False (--no-chat) to read plain text")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    start = text.rfind(message)
    if start < 0:
        raise ValueError("the chat template changed the message's text; cannot locate the user's tokens")
    return text, (start, start + len(message))


def encode(tokenizer, texts: Sequence[str], spans: Sequence[tuple[int, int]] | None = None, *,
           special: bool = False):
    """Right-padded ids and mask of ``texts`` and, for each text, the (start, end) token positions covering its
    character span ``spans[i]``. ``special``: add the tokenizer's special tokens (BOS) as for plain text; chat
    templates carry their own, so the default is not to."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        batch = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=special,
                          return_offsets_mapping=spans is not None)
    finally:
        tokenizer.padding_side = side
    token_spans = []
    if spans is not None:
        offsets = batch.pop("offset_mapping")
        for b, (start, end) in enumerate(spans):
            real = batch["attention_mask"][b].bool()
            inside = (offsets[b, :, 1] > start) & (offsets[b, :, 0] < end) & real
            where = inside.nonzero().flatten()
            token_spans.append((int(where[0]), int(where[-1]) + 1) if len(where) else (0, 0))
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, token_spans


@torch.no_grad()
def read_messages(model, tokenizer, vectors: VectorSet, messages: Sequence[str], layers: Sequence[int], *,
                  chat: bool = True, system: str | None = None, batch_size: int = 8,
                  progress: Callable[[int], None] | None = None) -> Readings:
    """Readings of every message at ``layers`` (see the module docstring)."""
    from emovec.layers import find_decoder_layers, resolve_layer_indices

    if not messages:
        raise ValueError("no messages to read")
    device = next(model.parameters()).device
    layers = resolve_layer_indices(list(layers), len(find_decoder_layers(model).layers))  # sorted, as recorded
    last, user = [], []
    for i in range(0, len(messages), batch_size):
        wrapped = [wrap(tokenizer, m, chat=chat, system=system) for m in messages[i : i + batch_size]]
        batch, spans = encode(tokenizer, [w[0] for w in wrapped], [w[1] for w in wrapped])
        with monitor(model, vectors, layers, tokenizer=tokenizer) as mon:
            model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
        cosine = mon.result(decode=False).cosine  # (B, T, L, K)
        lengths = batch["attention_mask"].sum(1)
        for b, (start, end) in enumerate(spans):
            last.append(cosine[b, int(lengths[b]) - 1])
            user.append(cosine[b, start:end].mean(0) if end > start else torch.full_like(cosine[b, 0], float("nan")))
        if progress is not None:
            progress(len(wrapped))
    return Readings(list(vectors.names), layers, torch.stack(last), torch.stack(user))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan when either side is constant."""
    def ranks(values):
        t = torch.tensor(values, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(t), dtype=torch.float64)
        for v in t.unique():  # ties share their mean rank
            same = t == v
            r[same] = r[same].mean()
        return r

    a, b = ranks(x), ranks(y)
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else float("nan")
