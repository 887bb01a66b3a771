"""Extraction of concept vectors from labelled text, following the emotion research.

For every chosen layer: each story's mean residual stream over its tokens from ``start_token`` on; the mean
over a label's stories; minus the mean over labels; then the top principal components of neutral-dialogue
activations (those explaining ``denoise_variance`` of their variance) are projected out. Activations are never
stored: the fused op's segment capture sums them per story inside the forward pass.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from emovec import corpus
from emovec.fileio import atomic_write
from emovec.layers import find_decoder_layers, resolve_layer_indices
from emovec.ops import steer_project
from emovec.runtime import _LayerRuntime
from emovec.vectors import VectorSet, config_hash, read_safetensors


@dataclass(frozen=True)
class ExtractionParams:
    layers: Any = "all"
    start_token: int = 50
    denoise_variance: float = 0.5
    batch_size: int = 8
    max_length: int = 512
    neutral_skip: int = 1  # the first token is an attention sink (norm ~100x the rest): keep it out of the PCA

    def key(self, corpus_hash: str, model_hash: str) -> str:
        blob = json.dumps({**asdict(self), "corpus": corpus_hash, "model": model_hash}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _StopForward(Exception):
    """Raised after the deepest captured layer: extraction needs nothing above it (no further layers, no logits)."""


class _Capture(_LayerRuntime):
    """Per-layer capture during extraction: per-segment sums and counts, norms of captured rows, or a Gram matrix."""

    order = 1

    def __init__(self, model, layers, *, gram: bool = False) -> None:
        super().__init__(model, None, layers)
        self.gram = gram
        self.segments: torch.Tensor | None = None  # (B*T,), set by the caller before each forward
        self.num_segments = 0

    def enter(self) -> None:
        self.reset()

    def reset(self) -> None:
        L, d = len(self.layer_indices), self.found.hidden_size
        self.sums = torch.zeros(L, max(self.num_segments, 1), d)
        self.counts = torch.zeros(L, max(self.num_segments, 1))
        self.norm_sum = torch.zeros(L, dtype=torch.float64)
        if self.gram:
            self.gram_sum = torch.zeros(L, d, d, dtype=torch.float64)
            self.row_sum = torch.zeros(L, d, dtype=torch.float64)

    def run(self, batch: dict[str, torch.Tensor]) -> None:
        """One forward pass of the layers' owner (no language-model head), stopped after the deepest layer."""
        try:
            self.found.base(**batch)
        except _StopForward:
            pass

    def apply(self, position: int, flat: torch.Tensor) -> None:
        self._capture(position, flat)
        if position == len(self.layer_indices) - 1:
            raise _StopForward

    def _capture(self, position: int, flat: torch.Tensor) -> None:
        keep = self.segments >= 0
        if self.gram:  # neutral text: second moments of every real token (extraction only, not the hot path)
            rows = flat[keep.to(flat.device)].float()
            # one batch's Gram matrix in fp32 (fast), accumulated across batches in fp64
            self.gram_sum[position] += (rows.T @ rows).double().cpu()
            self.row_sum[position] += rows.sum(0).double().cpu()
            self.norm_sum[position] += rows.norm(dim=1).double().sum().cpu()
            return
        segments = self.segments.to(flat.device)
        sums = self.sums[position].to(flat.device)
        counts = self.counts[position].to(flat.device)
        norms = torch.empty(flat.shape[0], device=flat.device)
        steer_project(flat, segments=segments, sums=sums, counts=counts, norms=norms, validate=False,
                      errors=self.error_flag(flat.device))
        self.norm_sum[position] += float((norms * keep.to(flat.device)).double().sum())
        if sums.device != self.sums.device:
            self.sums[position], self.counts[position] = sums.cpu(), counts.cpu()


def _tokenize(tokenizer, texts: Sequence[str], max_length: int, device) -> dict[str, torch.Tensor]:
    batch = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def corpus_hash(stories: Sequence[dict], neutral: Sequence[str], heldout: Sequence[dict] = ()) -> str:
    digest = hashlib.sha256()
    for row in stories:
        digest.update(f"{row['label']}\t{row['text']}\n".encode())
    digest.update(b"--neutral--\n")
    for text in neutral:
        digest.update(text.encode() + b"\n")
    if heldout:
        digest.update(b"--heldout--\n")
        for row in heldout:
            digest.update(f"{row['label']}\t{row['text']}\n".encode())
    return digest.hexdigest()[:16]


CHECKPOINT_FORMAT = "emovec.extraction-checkpoint"


class CheckpointError(ValueError):
    """An extraction checkpoint is corrupt, truncated or not an emovec checkpoint."""


def _save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Tensors in safetensors, everything else as JSON in its header: no pickle, ever."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    header = {"format": CHECKPOINT_FORMAT, "state": json.dumps(rest)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def _load_checkpoint(path: Path) -> dict[str, Any]:

    restart = "delete it, or rerun with --restart (restart=True) to start over"
    try:
        header, tensors = read_safetensors(path)
    except Exception as error:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"the extraction checkpoint {path} is corrupt or truncated ({_short(error)}); "
                              f"{restart}") from None
    if header.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an emovec extraction checkpoint; {restart}")
    try:
        rest = json.loads(header["state"])
        if not isinstance(rest, dict):
            raise ValueError("state is not an object")
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"the extraction checkpoint {path} has a corrupt header ({error}); {restart}") from None
    return {**rest, **tensors}


def _short(error: BaseException) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__


@torch.no_grad()
def extract(
    model,
    tokenizer=None,
    *,
    stories: Sequence[dict] | None = None,
    neutral: Sequence[str] | None = None,
    layers: Any = "all",
    start_token: int = 50,
    denoise_variance: float = 0.5,
    batch_size: int = 8,
    max_length: int = 512,
    labels: Sequence[str] | None = None,
    neutral_skip: int = 1,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_every: float = 30.0,
    restart: bool = False,
    out: str | Path | None = None,
    heldout: Sequence[dict] | None = None,
) -> VectorSet:
    """Extract one direction per label at each chosen layer.

    Parameters
    ----------
    stories : dicts with ``text`` and ``label`` (or ``emotion``); default: the packaged story grid (every emotion
        about the same 24 topics, so the mean over emotions cancels the topic).
    heldout : labelled texts not used for the vectors; each is classified by its nearest vector at every layer,
        and the layer with the best top-1 accuracy becomes the default layer (accuracies in the metadata).
        Default: the packaged held-out stories when ``stories`` is the default, else none (then the default layer
        is the chosen layer nearest two thirds of the depth).
    neutral : texts whose top principal components are projected out; default: the packaged neutral
        dialogues. ``denoise_variance`` (default 0.5) is the fraction of their variance those components
        explain; 0 turns denoising off.
    layers : layer spec ("all", indices, fractions). ``start_token``: tokens before it are skipped (the story
        must set up its emotion first); a story with no token past it falls back to its second half (counted
        in ``metadata["short_story_fallbacks"]``).
    labels : restrict to these labels, in this order.
    neutral_skip : leading tokens of each neutral text left out of the PCA (the first token is an attention
        sink whose norm dwarfs every other token's; with it the top component is just that sink).
    checkpoint : a file where progress is saved (safetensors + JSON, never pickle; at most every
        ``checkpoint_every`` seconds, and at the end of each pass); a rerun with the same inputs resumes there.
        A checkpoint from a different run is replaced (with a message); a corrupt one raises CheckpointError
        unless ``restart=True``, which ignores any checkpoint and starts over.
    out : when given, the vectors are saved there (atomically) and only then is the checkpoint deleted. Without
        ``out`` the checkpoint is kept: delete it once you have saved the result.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "emovec_tokenizer", None)
    if tokenizer is None:
        raise ValueError("extract needs the model's tokenizer: pass tokenizer=..., or load the model with emovec.load_model")
    if not 0 <= denoise_variance < 1:
        raise ValueError(f"denoise_variance must be in [0, 1), got {denoise_variance}")
    if start_token < 0 or batch_size < 1:
        raise ValueError("start_token must be >= 0 and batch_size >= 1")
    rows = _normalise_rows(stories if stories is not None else corpus.load_grid())
    if labels is not None:
        known = {r["label"] for r in rows}
        missing = [label for label in labels if label not in known]
        if missing:
            raise KeyError(f"no stories for {missing}; known labels include {sorted(known)[:8]}")
        rows = [r for r in rows if r["label"] in set(labels)]
        label_list = list(labels)
    else:
        label_list = sorted({r["label"] for r in rows}, key=[r["label"] for r in rows].index)
    if len(label_list) < 2:
        raise ValueError("extraction needs stories for at least two labels (vectors are relative to their mean)")
    neutral_texts = list(neutral) if neutral is not None else [r["text"] for r in corpus.load_neutral()]
    if denoise_variance == 0:
        neutral_texts = []
    if heldout is None:
        heldout = corpus.load_heldout() if stories is None else []
    heldout_rows = _normalise_rows(heldout, allow_empty=True)

    found = find_decoder_layers(model)
    layer_indices = resolve_layer_indices(layers, len(found.layers))
    device = next(model.parameters()).device
    params = ExtractionParams(layer_indices, start_token, denoise_variance, batch_size, max_length, neutral_skip)
    c_hash = corpus_hash(rows, neutral_texts, heldout_rows)
    m_hash = config_hash(model.config)
    run_key = params.key(c_hash, m_hash)

    L, d = len(layer_indices), found.hidden_size
    num_batches = (len(rows) + batch_size - 1) // batch_size
    state = {"key": run_key, **_story_state("", len(rows), L, d)}
    checkpoint = Path(checkpoint) if checkpoint else None
    if checkpoint is not None and checkpoint.exists():
        if restart:
            checkpoint.unlink()
        else:
            saved = _load_checkpoint(checkpoint)
            if saved.get("key") != run_key:
                _say(progress, f"emovec: the checkpoint {checkpoint} is from a different run (other texts, model or "
                               "parameters); starting over, and it will be overwritten")
            elif saved.get("story_means") is None or saved["story_means"].shape != state["story_means"].shape:
                raise CheckpointError(f"the extraction checkpoint {checkpoint} does not hold this run's story means; "
                                      "delete it, or rerun with --restart (restart=True) to start over")
            else:
                state = saved
                _say(progress, f"resuming extraction from {checkpoint} ({state['done']}/{num_batches} story batches"
                               f"{', neutral pass ' + str(state['neutral_done']) if 'neutral_done' in state else ''} done)")

    def save(update: dict[str, Any] | None = None) -> None:
        state.update(update or {})
        _save_checkpoint(state, checkpoint)

    saver = save if checkpoint is not None else None
    passes = dict(start_token=start_token, batch_size=batch_size, max_length=max_length, device=device,
                  progress=progress, save=saver, save_every=checkpoint_every)
    _story_pass(model, tokenizer, rows, layer_indices, state, "", desc="stories", **passes)

    label_index = {label: i for i, label in enumerate(label_list)}
    story_label = torch.tensor([label_index[r["label"]] for r in rows])
    label_means = torch.zeros(len(label_list), L, d).index_add_(0, story_label, state["story_means"])
    label_means /= torch.bincount(story_label, minlength=len(label_list)).clamp(min=1)[:, None, None]
    raw = (label_means - label_means.mean(0, keepdim=True)).permute(1, 0, 2).contiguous()  # (L, K, d)

    pcs, explained_info = None, {}
    if neutral_texts:
        pcs, explained_info = _neutral_components(model, tokenizer, neutral_texts, layer_indices, denoise_variance,
                                                  batch_size, max_length, device, progress, neutral_skip, state,
                                                  saver, checkpoint_every)
        projection = torch.einsum("lpd,lkd->lkp", pcs, raw)
        raw = raw - torch.einsum("lkp,lpd->lkd", projection, pcs)
    mean_norms = (state["norm_sum"] / max(state["norm_count"], 1)).float()
    vectors = VectorSet(label_list, layer_indices, raw, mean_norms=mean_norms, neutral_pcs=pcs,
                        label_means=label_means.permute(1, 0, 2).contiguous())

    target = round(2 * (len(found.layers) - 1) / 3)
    default_layer = min(layer_indices, key=lambda layer: abs(layer - target))
    choice = {"default_layer_criterion": "the chosen layer nearest two thirds of the depth"}
    heldout_rows = [r for r in heldout_rows if r["label"] in label_index]
    if heldout_rows:
        if "heldout_done" not in state:
            state.update(_story_state("heldout_", len(heldout_rows), L, d))
        _story_pass(model, tokenizer, heldout_rows, layer_indices, state, "heldout_", desc="held-out", **passes)
        accuracy = heldout_accuracy(vectors, state["heldout_story_means"], [r["label"] for r in heldout_rows])
        default_layer = max(layer_indices, key=lambda layer: (accuracy[layer][0], accuracy[layer][1], -layer))
        choice = {"default_layer_criterion": "held-out nearest-vector top-1 accuracy (ties: top-5, then the earlier "
                                             "layer)",
                  "heldout_accuracy": {str(layer): list(accuracy[layer]) for layer in layer_indices},
                  "num_heldout": len(heldout_rows)}
    metadata = {
        "model": getattr(model, "emovec_name", getattr(model.config, "_name_or_path", type(model).__name__)),
        "model_class": type(model).__name__, "config_hash": m_hash, "hidden_size": d,
        "num_layers": len(found.layers), "params": asdict(params), "corpus_hash": c_hash,
        "num_stories": len(rows), "num_neutral": len(neutral_texts),
        "short_story_fallbacks": state["fallbacks"], "emovec_version": _version(), **explained_info, **choice,
    }
    if state["fallbacks"]:
        _say(progress, f"emovec: {state['fallbacks']} of {len(rows)} texts had no token past start_token="
                       f"{start_token}; their second half was used instead")
    vectors.default_layer, vectors.metadata = default_layer, metadata
    if out is not None:
        vectors.save(out)  # the result is safe on disk before the checkpoint goes
        if checkpoint is not None and checkpoint.exists():
            checkpoint.unlink()
    return vectors


def _neutral_components(model, tokenizer, texts, layer_indices, variance, batch_size, max_length, device, progress,
                        skip, resume: dict[str, Any] | None = None, save=None, save_every: float = 30.0):
    """Top principal components of the neutral texts' activations; resumable from ``resume`` (a checkpoint's
    state with ``neutral_done``, ``neutral_count``, ``gram_sum``, ``row_sum``), saving through ``save(state)``."""
    capture = _Capture(model, layer_indices, gram=True)
    batches = range(0, len(texts), batch_size)
    done = int(resume.get("neutral_done", 0)) if resume else 0
    count = int(resume.get("neutral_count", 0)) if resume else 0
    last_save = time.monotonic()
    bar = _progress(progress, total=len(batches), initial=done, desc="neutral")
    with capture:
        if done:
            capture.gram_sum.copy_(resume["gram_sum"])
            capture.row_sum.copy_(resume["row_sum"])
        for b in range(done, len(batches)):
            i = batches[b]
            batch = _tokenize(tokenizer, texts[i : i + batch_size], max_length, device)
            mask = batch["attention_mask"].bool()
            kept = mask & (mask.long().cumsum(1) > skip)
            capture.segments = torch.where(kept, 0, -1).reshape(-1).to(device)
            capture.run(batch)
            count += int(kept.sum())
            bar.update(1)
            if save is not None and (time.monotonic() - last_save >= save_every or b + 1 == len(batches)):
                save({"neutral_done": b + 1, "neutral_count": count, "gram_sum": capture.gram_sum,
                      "row_sum": capture.row_sum})
                last_save = time.monotonic()
    bar.close()
    mean = capture.row_sum / count
    covariance = capture.gram_sum / count - mean[:, :, None] * mean[:, None, :]
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(-1).clamp(min=0), eigenvectors.flip(-1)
    fractions = eigenvalues.cumsum(-1) / eigenvalues.sum(-1, keepdim=True)
    per_layer = [int((f < variance).sum()) + 1 for f in fractions]
    width = max(per_layer)
    pcs = torch.zeros(len(layer_indices), width, covariance.shape[-1])
    for li, p in enumerate(per_layer):
        pcs[li, :p] = eigenvectors[li, :, :p].T.float()
    return pcs, {"neutral_pcs_per_layer": per_layer, "neutral_tokens": count}


def _story_state(prefix: str, n: int, layers: int, d: int) -> dict[str, Any]:
    """Fresh progress of a story pass (keys prefixed, so several passes share one checkpoint)."""
    return {f"{prefix}done": 0, f"{prefix}story_means": torch.zeros(n, layers, d), f"{prefix}fallbacks": 0,
            f"{prefix}norm_sum": torch.zeros(layers, dtype=torch.float64), f"{prefix}norm_count": 0}


def _story_pass(model, tokenizer, rows, layer_indices, state, prefix, *, start_token, batch_size, max_length, device,
                progress, save, save_every, desc) -> None:
    """Each text's mean residual stream from ``start_token`` on, at every layer, into ``state[prefix +
    "story_means"]`` (with norm sums for the mean norms); resumes at ``state[prefix + "done"]`` batches and saves
    through ``save()`` at most every ``save_every`` seconds and at the end."""
    # longest first: similar lengths share a batch (less padding); the order is fixed, so runs are deterministic
    lengths = [len(r["text"]) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (-lengths[i], rows[i]["id"]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    key = {name: prefix + name for name in ("done", "story_means", "fallbacks", "norm_sum", "norm_count")}
    capture = _Capture(model, layer_indices)
    capture.num_segments = batch_size
    last_save = time.monotonic()
    bar = _progress(progress, total=len(batches), initial=state[key["done"]], desc=desc)
    with capture:
        for b in range(state[key["done"]], len(batches)):
            members = batches[b]
            batch = _tokenize(tokenizer, [rows[i]["text"] for i in members], max_length, device)
            mask = batch["attention_mask"].cpu()
            lengths_b = mask.sum(1)
            positions = mask.long().cumsum(1) - 1  # index among the story's real tokens, whichever side pads
            starts = torch.where(lengths_b > start_token, torch.full_like(lengths_b, start_token), lengths_b // 2)
            state[key["fallbacks"]] += int((lengths_b <= start_token).sum())
            chosen = (positions >= starts[:, None]) & mask.bool()
            capture.segments = torch.where(chosen, torch.arange(len(members))[:, None], -1).reshape(-1).to(device)
            capture.reset()
            capture.run(batch)
            means = capture.sums[:, : len(members)] / capture.counts[:, : len(members), None].clamp(min=1)
            state[key["story_means"]][members] = means.permute(1, 0, 2)
            state[key["norm_sum"]] += capture.norm_sum
            state[key["norm_count"]] += int(chosen.sum())
            state[key["done"]] = b + 1
            if save is not None and (time.monotonic() - last_save >= save_every or b + 1 == len(batches)):
                save()
                last_save = time.monotonic()
            bar.update(1)
    bar.close()


def heldout_accuracy(vectors: VectorSet, story_means: torch.Tensor, labels: Sequence[str],
                     k: int = 5) -> dict[int, tuple[float, float]]:
    """Nearest-vector classification of held-out texts: for each layer, the fraction whose own label is the
    vector of highest cosine with (text mean - centre) (top-1), or among the ``k`` highest (top-k).

    ``story_means`` (n, L, d) at ``vectors.layers``; the centre is the mean of the label means when the vectors
    carry them (what extraction subtracted), else the mean of the held-out texts."""
    targets = torch.tensor([vectors.index(label) for label in labels])
    result = {}
    for s, layer in enumerate(vectors.layers or [0]):
        means = story_means[:, s].float()
        centre = vectors.label_means[s].mean(0) if vectors.label_means is not None else means.mean(0)
        cos = torch.nn.functional.normalize(means - centre, dim=1) @ vectors.unit[s].T
        ranked = cos.topk(min(k, cos.shape[1]), dim=1).indices
        top1 = float((ranked[:, 0] == targets).float().mean())
        topk = float((ranked == targets[:, None]).any(1).float().mean())
        result[layer] = (round(top1, 4), round(topk, 4))
    return result


def _normalise_rows(stories: Sequence[dict], allow_empty: bool = False) -> list[dict]:
    rows = []
    for i, row in enumerate(stories):
        if not isinstance(row, dict):
            raise ValueError(f"record {i + 1} of the labelled data is a {type(row).__name__}, not a dict with "
                             "'text' and 'label'")
        label = row.get("label", row.get("emotion"))
        if label is None or "text" not in row:
            raise ValueError(f"record {i + 1} of the labelled data has no 'label' (or 'emotion') and 'text'; "
                             f"got keys {sorted(row)}")
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise ValueError(f"record {i + 1} of the labelled data: 'text' must be a non-empty string, got "
                             f"{row['text']!r:.40}")
        rows.append({"id": str(row.get("id", i)), "label": str(label), "text": str(row["text"])})
    if not rows and not allow_empty:
        raise ValueError("no labelled texts to extract from")
    return rows


def _progress(enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, file=sys.stderr, **kwargs)


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr)


def _version() -> str:
    from emovec import __version__

    return __version__


def shipped_vectors_path(model) -> Path | None:
    """The emotion vectors shipped in the package for ``model`` (by name), or None when none are shipped."""
    path = corpus.data_path("vectors") / f"{str(getattr(model, 'emovec_name', '')).replace('/', '--')}.safetensors"
    return path if path.is_file() else None


def default_vectors_path(model) -> Path:
    """Where vectors extracted from the packaged grid for a model without shipped vectors are cached."""
    from emovec.models import cache_dir

    name = str(getattr(model, "emovec_name", "model")).replace("/", "--")
    stories = _normalise_rows(corpus.load_grid())
    neutral = [r["text"] for r in corpus.load_neutral()]
    heldout = _normalise_rows(corpus.load_heldout())
    key = ExtractionParams().key(corpus_hash(stories, neutral, heldout), config_hash(model.config))
    return cache_dir() / "vectors" / f"{name}-{key}.safetensors"


def default_vectors(model, progress: bool = True) -> VectorSet:
    """The 171 emotion vectors for ``model`` at every layer: the shipped file for the default model; for other
    models, extracted once from the packaged story grid, then cached."""
    shipped = shipped_vectors_path(model)
    if shipped is not None:
        return VectorSet.load(shipped, model=model)
    path = default_vectors_path(model)
    if path.exists():
        return VectorSet.load(path, model=model)
    _say(progress, f"emovec: extracting the emotion vectors for {getattr(model, 'emovec_name', 'this model')} once "
                   f"(minutes to an hour on a CPU); they are cached at {path}")
    checkpoint = path.with_suffix(".partial.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    return extract(model, progress=progress, checkpoint=checkpoint, out=path)


def resolve_vectors(path: str | Path | None, model) -> VectorSet:
    """The VectorSet from ``path`` (checked against ``model``), or the cached default emotion vectors."""
    if path is not None:
        return VectorSet.load(path, model=model)
    return default_vectors(model)


@torch.no_grad()
def classify_heldout(model, vectors: VectorSet, texts: Sequence[dict], tokenizer=None, *, start_token: int = 50,
                     batch_size: int = 8, max_length: int = 512, progress: bool = True) -> dict[int, tuple[float, float]]:
    """Held-out nearest-vector accuracy (top-1, top-5) of ``texts`` (dicts with text and label/emotion) at each of
    the vectors' layers; texts whose label the vectors lack are left out."""
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "emovec_tokenizer", None)
    if tokenizer is None:
        raise ValueError("classify_heldout needs the model's tokenizer: pass tokenizer=...")
    rows = [r for r in _normalise_rows(texts, allow_empty=True) if r["label"] in set(vectors.names)]
    if not rows:
        raise ValueError(f"none of the held-out texts has a label among the vectors' names ({vectors.names[:5]}...)")
    if not vectors.layers:
        raise ValueError("these vectors are one set for every layer; held-out accuracy is per layer: give vectors "
                         "extracted at named layers")
    found = find_decoder_layers(model)
    layer_indices = vectors.layers
    state = _story_state("", len(rows), len(layer_indices), found.hidden_size)
    _story_pass(model, tokenizer, rows, layer_indices, state, "", start_token=start_token, batch_size=batch_size,
                max_length=max_length, device=next(model.parameters()).device, progress=progress, save=None,
                save_every=0.0, desc="held-out")
    return heldout_accuracy(vectors, state["story_means"], [r["label"] for r in rows])
