"""Geometry of a VectorSet: principal components (and how they line up with human ratings), k-means clusters,
the cosine-similarity structure and its stability across layers, and held-out classification accuracy.

Everything here is numbers (JSON-serialisable dicts); :mod:`emovec.report.geometry` draws them.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from emovec.vectors import VectorSet

NEIGHBOUR_PROBES = ("afraid", "calm", "desperate", "happy", "loving")


class RatingsError(ValueError):
    """A ratings CSV cannot be used (missing columns, no number, no word in common with the vectors)."""


def read_ratings(path: str | Path) -> dict[str, dict[str, float]]:
    """``word,valence[,arousal,...]`` CSV with a header -> {column: {word: value}} (blank cells skipped)."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or reader.fieldnames[0].strip().lower() != "word" or len(reader.fieldnames) < 2:
            raise RatingsError(f"{path}: the first line must be a header 'word,valence[,arousal]', "
                               f"got {reader.fieldnames}")
        columns = [c.strip() for c in reader.fieldnames[1:]]
        ratings: dict[str, dict[str, float]] = {c: {} for c in columns}
        for line, row in enumerate(reader, 2):
            word = (row.get(reader.fieldnames[0]) or "").strip()
            for raw, column in zip(reader.fieldnames[1:], columns):
                cell = (row.get(raw) or "").strip()
                if not word or not cell:
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    raise RatingsError(f"{path}, line {line}: {column} {cell!r} is not a number") from None
                if not math.isfinite(value):
                    raise RatingsError(f"{path}, line {line}: {column} must be finite")
                ratings[column][word] = value
    return ratings


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    a = torch.tensor(x, dtype=torch.float64)
    b = torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a @ b) / denominator) if denominator > 0 else float("nan")


def principal_components(unit: torch.Tensor, n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(explained variance ratio of the top ``n`` components, coordinates (K, n)) of unit vectors (K, d),
    centred over the K concepts."""
    centred = (unit - unit.mean(0)).double()
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    variance = s**2
    n = min(n, len(s))
    return (variance / variance.sum())[:n].float(), (u[:, :n] * s[:n]).float()


def similarity_order(cos: torch.Tensor) -> list[int]:
    """Order of concepts by average-linkage hierarchical clustering on cosine distance."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    distance = (1 - cos.double()).clamp(min=0).numpy()
    distance = (distance + distance.T) / 2
    distance[range(len(distance)), range(len(distance))] = 0
    return leaves_list(linkage(squareform(distance, checks=False), method="average")).tolist()


def kmeans_clusters(unit: torch.Tensor, names: Sequence[str], k: int, seed: int = 0) -> list[list[str]]:
    from sklearn.cluster import KMeans

    k = max(1, min(k, len(names)))
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(unit.double().numpy())
    clusters = [[names[i] for i in range(len(names)) if labels[i] == c] for c in range(k)]
    return sorted(clusters, key=len, reverse=True)


def layer_stability(vectors: VectorSet) -> torch.Tensor:
    """(L, L) Pearson correlation between the layers' cosine-similarity matrices (upper triangles)."""
    unit = vectors.unit
    rows, cols = torch.triu_indices(unit.shape[1], unit.shape[1], offset=1)
    flat = torch.stack([(u @ u.T)[rows, cols] for u in unit]).double()
    flat = flat - flat.mean(1, keepdim=True)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return (flat @ flat.T).float()


def analyse(vectors: VectorSet, layer: int | None = None, *, k: int = 10,
            ratings: dict[str, dict[str, float]] | None = None, components: int = 10, seed: int = 0,
            heldout_accuracy: dict[int, tuple[float, float]] | None = None) -> dict[str, Any]:
    """The geometry of ``vectors`` at ``layer`` (default: their default layer) as a JSON-ready dict."""
    layers = vectors.layers or [0]
    layer = layer if layer is not None else (vectors.default_layer if vectors.default_layer is not None else layers[0])
    s = vectors.slice_of(layer) if vectors.layers else 0
    names = vectors.names
    unit = vectors.unit[s]
    explained, coords = principal_components(unit, components)
    result: dict[str, Any] = {"layer": layer, "names": list(names), "num_vectors": len(names),
                              "hidden_size": vectors.hidden_size, "model": vectors.metadata.get("model")}

    correlations: dict[str, list[float]] = {}
    coverage: dict[str, int] = {}
    for column, table in (ratings or {}).items():
        common = [i for i, name in enumerate(names) if name in table]
        coverage[column] = len(common)
        if len(common) < 3:
            continue
        values = [table[names[i]] for i in common]
        correlations[column] = [_pearson(coords[common, c].tolist(), values) for c in range(coords.shape[1])]
    # orient PC1 and PC2 along the first rating column (e.g. valence) when there is one, so plots read the same way
    if correlations:
        first = next(iter(correlations))
        for c in range(min(2, coords.shape[1])):
            if correlations[first][c] < 0:
                coords[:, c] = -coords[:, c]
                for column in correlations:
                    correlations[column][c] = -correlations[column][c]
    result["pca"] = {"explained": [round(float(v), 5) for v in explained],
                     "coords": [[round(float(v), 5) for v in row[:2]] for row in coords]}
    result["ratings"] = {column: {"n": coverage[column],
                                  "r": [round(v, 4) for v in correlations[column]] if column in correlations else None}
                         for column in coverage}
    cos = unit @ unit.T
    order = similarity_order(cos)
    result["similarity"] = {"order": [names[i] for i in order],
                            "matrix": [[round(float(cos[i, j]), 4) for j in order] for i in order]}
    result["clusters"] = kmeans_clusters(unit, names, k, seed)
    result["neighbours"] = {}
    for probe in NEIGHBOUR_PROBES:
        if probe in names:
            i = names.index(probe)
            ranked = [j for j in cos[i].argsort(descending=True).tolist() if j != i][:5]
            result["neighbours"][probe] = [[names[j], round(float(cos[i, j]), 4)] for j in ranked]
    if len(layers) > 1:
        stability = layer_stability(vectors)
        result["layer_stability"] = {"layers": layers, "matrix": [[round(float(v), 4) for v in row] for row in stability],
                                     "vs_layer": [round(float(v), 4) for v in stability[s]]}
    accuracy = heldout_accuracy
    if accuracy is None and "heldout_accuracy" in vectors.metadata:
        accuracy = {int(layer_): tuple(v) for layer_, v in vectors.metadata["heldout_accuracy"].items()}
    if accuracy:
        best = max(accuracy, key=lambda layer_: (accuracy[layer_][0], accuracy[layer_][1], -layer_))
        result["heldout"] = {"per_layer": {str(layer_): list(v) for layer_, v in sorted(accuracy.items())},
                             "at_layer": list(accuracy[layer]) if layer in accuracy else None, "best_layer": best,
                             "best": list(accuracy[best]), "chance_top1": round(1 / len(names), 4)}
    return result
