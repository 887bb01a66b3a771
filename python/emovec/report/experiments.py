"""Figures of the research's experiments (dose-response, implied emotions, preferences, validate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emovec.report.geometry import _figure_saver


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_dose(result: dict[str, Any], folder: str | Path, layer: int | None = None) -> list[Path]:
    """One figure per template: each emotion's reading at the last prompt token against X, at ``layer``."""
    plt = _plt()
    layer = layer if layer is not None else result["layers"][0]
    written = []
    for entry in result["templates"]:
        per = entry["layers"][str(layer)]["last"]
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for emotion, values in per["readings"].items():
            ax.plot(entry["values"], values, marker="o", ms=3,
                    label=f"{emotion} (ρ with danger {per['spearman_danger'][emotion]:+.2f})")
        if entry["log"]:
            ax.set_xscale("log")
        ax.set_xlabel(f"X ({entry['unit']})" if entry["unit"] else "X")
        ax.set_ylabel("cosine where the reply begins")
        ax.set_title(f"{entry['name']}, layer {layer}\n{entry['template']}", fontsize=8)
        ax.legend(fontsize=7)
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in entry["name"])
        written.append(_figure_saver(fig, Path(folder) / f"dose-{safe}.png"))
        plt.close(fig)
    return written


def draw_implied(result: dict[str, Any], folder: str | Path) -> list[Path]:
    plt = _plt()
    items = result["messages"]
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.22 * len(items))))
    labels = [f"{m['emotion']}: {m['text'][:45]}…" if len(m["text"]) > 45 else f"{m['emotion']}: {m['text']}"
              for m in items]
    ax.barh(range(len(items)), [m["rank_last"] for m in items], color="#4477aa")
    ax.axvline(result["chance_median_rank"], color="#cc6677", ls="--", lw=1, label="chance (median rank)")
    ax.set_yticks(range(len(items)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel(f"rank of the intended emotion among {result['num_vectors']} (1 = strongest), layer "
                  f"{result['layer']}")
    ax.legend(fontsize=7)
    path = _figure_saver(fig, Path(folder) / "implied.png")
    plt.close(fig)
    return [path]


def draw_preferences(result: dict[str, Any], folder: str | Path) -> list[Path]:
    plt = _plt()
    written = []
    activities = sorted(result["activities"], key=lambda a: a["elo"])
    categories = sorted({a["category"] for a in activities})
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.2 * len(activities))))
    ax.barh(range(len(activities)), [a["elo"] - 1500 for a in activities], left=1500,
            color=[colours(categories.index(a["category"]) % 10) for a in activities])
    ax.set_yticks(range(len(activities)), [a["activity"][:50] for a in activities], fontsize=6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(i % 10)) for i in range(len(categories))]
    ax.legend(handles, categories, fontsize=7, loc="lower right")
    ax.set_xlabel("Elo (from A/B choices over every ordered pair)")
    written.append(_figure_saver(fig, Path(folder) / "preferences-elo.png"))
    plt.close(fig)
    if "steering" in result:
        shifts = result["steering"]["mean_elo_shift"]
        fig, ax = plt.subplots(figsize=(6, 3))
        names = list(shifts)
        ax.bar(range(len(names)), [shifts[n] for n in names],
               color=["#999" if n.startswith("random") else "#4477aa" for n in names])
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
        ax.axhline(0, color="#333", lw=0.5)
        ax.set_ylabel("mean Elo shift of the steered activity")
        ax.set_title(f"steering at strength {result['steering']['strength']:+g} on the activity's tokens", fontsize=8)
        written.append(_figure_saver(fig, Path(folder) / "preferences-steering.png"))
        plt.close(fig)
    return written


def draw_validate(result: dict[str, Any], folder: str | Path) -> list[Path]:
    plt = _plt()
    written = []
    for run in result["runs"]:
        per = run["per_emotion"]
        names = list(per)
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(6, 5))
        ax.scatter([per[n]["random_max"] for n in names], [per[n]["delta"] for n in names], s=8,
                   c=["#228833" if per[n]["beats_all"] else "#cc6677" for n in names])
        low = min(min(per[n]["random_max"] for n in names), min(per[n]["delta"] for n in names))
        high = max(max(per[n]["random_max"] for n in names), max(per[n]["delta"] for n in names))
        ax.plot([low, high], [low, high], color="#999", lw=0.8)
        ax.set_xlabel("best Δ log P(own word) among random directions")
        ax.set_ylabel("Δ log P(own word) steering with the emotion")
        layers = ",".join(str(x) for x in run["layers"])
        ax.set_title(f"layer {layers}, strength {run['strength']:+g}: "
                     f"{100 * run['share_beating_all_randoms']:.0f}% beat every random direction", fontsize=8)
        written.append(_figure_saver(fig, Path(folder) / f"validate-l{layers.replace(',', '_')}-s{run['strength']:g}.png"))
        plt.close(fig)
    return written


def draw_regulation(result: dict[str, Any], folder: str | Path) -> list[Path]:
    """regulation-dose.png: afraid against danger rank per dose template, plain and capped, at the regulated and the
    later layer; regulation-steer.png: the desperate family's log-probability, plain / steered / steered+capped."""
    plt = _plt()
    written = []
    rows = result["dose"]
    fig, axes = plt.subplots(2, max(1, len(rows)), figsize=(2.6 * max(1, len(rows)), 5), squeeze=False)
    for j, row in enumerate(rows):
        for i, (tag, label) in enumerate((("regulated_layer", f"L{result['layer']}"),
                                          ("later_layer", f"L{result['later_layer']}"))):
            ax = axes[i][j]
            ax.plot(row[tag]["plain"], marker="o", ms=3, label="plain")
            ax.plot(row[tag]["capped"], marker="s", ms=3, label="afraid capped")
            if i == 0:
                ax.axhline(row["cap"], color="grey", lw=0.8, ls=":")
                ax.set_title(row["template"], fontsize=7)
            ax.set_xlabel("dose (index)", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"afraid, {label}", fontsize=8)
            ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    written.append(_figure_saver(fig, Path(folder) / "regulation-dose.png"))
    plt.close(fig)

    checks = result["steer_then_cap"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    kinds = ("plain", "steered", "steered_and_capped")
    width = 0.8 / max(1, len(checks))
    for k, (name, entry) in enumerate(checks.items()):
        values = [entry["desperate_family_logp"][kind] for kind in kinds]
        ax.bar([x + k * width for x in range(len(kinds))], values, width=width, label=f"steer +{name}, cap {name}")
    ax.set_xticks([x + width * (len(checks) - 1) / 2 for x in range(len(kinds))], ["plain", "steered",
                                                                                   "steered + capped"])
    ax.set_ylabel("log P(next word is a desperate word)")
    ax.set_title(f"steer at L{result['layer']} ({result['strength']:+g}), cap at L{result['later_layer']}",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_figure_saver(fig, Path(folder) / "regulation-steer.png"))
    plt.close(fig)
    return written
