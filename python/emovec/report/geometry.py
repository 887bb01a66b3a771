"""Figures of :func:`emovec.science.geometry.analyse`: PC1/PC2 scatter, ordered similarity matrix, layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emovec.fileio import atomic_write


def _figure_saver(fig, path: Path) -> Path:
    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")

    return atomic_write(path, write)


def draw(result: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write pca.png, similarity.png and (with several layers) layers.png into ``folder``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    written = []
    title = f"{result.get('model') or 'vectors'} · layer {result['layer']}"

    coords = result["pca"]["coords"]
    explained = result["pca"]["explained"]
    fig, ax = plt.subplots(figsize=(11, 9))
    xs, ys = [c[0] for c in coords], [c[1] for c in coords]
    valence = result["ratings"].get(next(iter(result["ratings"]), ""), {}) if result["ratings"] else {}
    ax.scatter(xs, ys, s=12, c="#4477aa")
    for name, x, y in zip(result["names"], xs, ys):
        ax.annotate(name, (x, y), fontsize=6.5, alpha=0.85, xytext=(2, 2), textcoords="offset points")
    labels = []
    for c in range(2):
        label = f"PC{c + 1} ({100 * explained[c]:.1f}% of variance)"
        if valence and valence.get("r"):
            label += f", r = {valence['r'][c]:+.2f} with {next(iter(result['ratings']))}"
        labels.append(label)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.axhline(0, color="#bbb", lw=0.5)
    ax.axvline(0, color="#bbb", lw=0.5)
    ax.set_title(f"{title}: first two principal components of {result['num_vectors']} vectors")
    written.append(_figure_saver(fig, folder / "pca.png"))
    plt.close(fig)

    order = result["similarity"]["order"]
    matrix = result["similarity"]["matrix"]
    size = max(8.0, len(order) * 0.09)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(order)), order, rotation=90, fontsize=5)
    ax.set_yticks(range(len(order)), order, fontsize=5)
    fig.colorbar(image, ax=ax, shrink=0.6, label="cosine similarity")
    ax.set_title(f"{title}: cosine similarity, ordered by hierarchical clustering")
    written.append(_figure_saver(fig, folder / "similarity.png"))
    plt.close(fig)

    if "layer_stability" in result or "heldout" in result:
        fig, ax = plt.subplots(figsize=(9, 5))
        if "layer_stability" in result:
            stability = result["layer_stability"]
            ax.plot(stability["layers"], stability["vs_layer"], marker="o", ms=3,
                    label=f"similarity structure: r with layer {result['layer']}")
        if "heldout" in result:
            per_layer = result["heldout"]["per_layer"]
            layers = [int(x) for x in per_layer]
            ax.plot(layers, [per_layer[str(x)][0] for x in layers], marker="s", ms=3, label="held-out top-1 accuracy")
            ax.plot(layers, [per_layer[str(x)][1] for x in layers], marker="^", ms=3, label="held-out top-5 accuracy")
            ax.axhline(result["heldout"]["chance_top1"], color="#999", ls=":", lw=1, label="chance (top-1)")
        ax.axvline(result["layer"], color="#cc6677", lw=1, ls="--", label=f"layer {result['layer']}")
        ax.set_xlabel("layer")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=8)
        ax.set_title(f"{result.get('model') or 'vectors'}: across layers")
        written.append(_figure_saver(fig, folder / "layers.png"))
        plt.close(fig)
    return written
