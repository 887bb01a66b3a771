"""CLI commands for the research's analyses: ``emovec geometry``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from emovec.cli import UserError, _check_outputs, _console, _load_model, _user_errors, _write_atomic, main


@main.command()
@click.option("--vectors", "vectors_path", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="a vector file (default: the default model's emotion vectors)")
@click.option("--model", "model_name", default=None, metavar="NAME_OR_PATH",
              help="the model the vectors belong to (default model when --vectors is not given; needed for --heldout)")
@click.option("--layer", default=None, type=int, help="layer to analyse (default: the vectors' default layer)")
@click.option("--k", "clusters", default=10, show_default=True, type=click.IntRange(min=1), help="k-means clusters")
@click.option("--ratings", default=None, type=click.Path(exists=True, dir_okay=False), metavar="CSV",
              help="word,valence[,arousal] ratings: correlation of each principal component with them")
@click.option("--heldout", default=None, type=click.Path(exists=True, dir_okay=False), metavar="JSONL",
              help="labelled texts to classify by nearest vector at every layer (runs the model); default: the "
                   "accuracies stored in the vector file, if any")
@click.option("--out", "out_dir", default="geometry", show_default=True, type=click.Path(),
              help="folder for geometry.json and the PNG figures")
@click.option("--quiet", is_flag=True, help="no progress bars")
def geometry(vectors_path, model_name, layer, clusters, ratings, heldout, out_dir, quiet) -> None:
    """Principal components, clusters, similarity structure, stability across layers and held-out accuracy of a
    vector file, as PNG figures, a JSON of the numbers and a summary here."""
    from emovec.corpus import read_records
    from emovec.extraction import classify_heldout, resolve_vectors
    from emovec.report.geometry import draw
    from emovec.science.geometry import analyse, read_ratings
    from emovec.vectors import VectorSet

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    _check_outputs(str(out / "geometry.json") if out.is_dir() else str(out))
    with _user_errors():
        table = read_ratings(ratings) if ratings else None
        texts = read_records(heldout, ["text", "label|emotion"])[0] if heldout else None
        model = None
        if vectors_path is None or model_name is not None or texts is not None:
            model = _load_model(model_name, None).model
        vectors = resolve_vectors(vectors_path, model) if model is not None else VectorSet.load(vectors_path)
        if layer is not None and vectors.layers:
            vectors.slice_of(layer)
        accuracy = classify_heldout(model, vectors, texts, progress=not quiet) if texts is not None else None
        result = analyse(vectors, layer, k=clusters, ratings=table, heldout_accuracy=accuracy)
    out.mkdir(parents=True, exist_ok=True)
    figures = draw(result, out)
    _write_atomic(out / "geometry.json", json.dumps(result, indent=1) + "\n")
    _summary(result)
    click.echo(f"wrote {out / 'geometry.json'} and {', '.join(p.name for p in figures)}", err=True)


def _summary(result: dict) -> None:
    from rich.table import Table

    console = _console()
    explained = result["pca"]["explained"]
    grid = Table(title=f"{result.get('model') or 'vectors'} · {result['num_vectors']} vectors · layer {result['layer']}",
                 show_header=False, box=None, pad_edge=False)
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("variance explained", ", ".join(f"PC{i + 1} {100 * v:.1f}%" for i, v in enumerate(explained[:5])))
    for column, info in result["ratings"].items():
        if info["r"] is None:
            grid.add_row(f"r with {column}", f"too few rated words ({info['n']})")
            continue
        best = max(range(len(info["r"])), key=lambda c: abs(info["r"][c]))
        grid.add_row(f"r with {column} ({info['n']} words)",
                     ", ".join(f"PC{i + 1} {r:+.2f}" for i, r in enumerate(info["r"][:5])) +
                     f"; strongest: PC{best + 1} ({info['r'][best]:+.2f})")
    if "heldout" in result:
        h = result["heldout"]
        at = h["at_layer"]
        grid.add_row("held-out top-1 / top-5", (f"{at[0]:.1%} / {at[1]:.1%} at layer {result['layer']}; " if at else "")
                     + f"best {h['best'][0]:.1%} / {h['best'][1]:.1%} at layer {h['best_layer']} "
                       f"(chance {h['chance_top1']:.1%})")
    if "layer_stability" in result:
        vs_layer = result["layer_stability"]["vs_layer"]
        layers = result["layer_stability"]["layers"]
        grid.add_row("similarity vs other layers",
                     ", ".join(f"{layer}: {r:.2f}" for layer, r in zip(layers, vs_layer) if layer % 5 == 0 or
                               layer == layers[-1]))
    for name, pairs in result["neighbours"].items():
        grid.add_row(f"nearest to {name}", ", ".join(f"{n} {c:.2f}" for n, c in pairs))
    for i, members in enumerate(result["clusters"]):
        shown = ", ".join(members[:12]) + (f", … (+{len(members) - 12})" if len(members) > 12 else "")
        grid.add_row(f"cluster {i + 1} ({len(members)})", shown)
    console.print(grid)


__all__ = ["geometry", "UserError"]
