"""CLI commands for the research's analyses: ``emovec geometry``."""

from __future__ import annotations

import json
import sys
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


# ============================================================================================ the research's experiments


def _science_setup(model_name, vectors_path, layer_spec, default_to_vectors: bool = True):
    """(loaded model, vectors, layer indices) for an experiment command; errors as one line."""
    from emovec.cli import _setup
    from emovec.layers import find_decoder_layers, resolve_layer_indices

    loaded, vectors = _setup(model_name, vectors_path, None)
    with _user_errors():
        if layer_spec is None and default_to_vectors and vectors.default_layer is not None:
            layers = [vectors.default_layer]
        else:
            layers = resolve_layer_indices(layer_spec if layer_spec is not None else 0.66,
                                           len(find_decoder_layers(loaded.model).layers))
        for layer in layers:
            vectors.slice_of(layer)
    return loaded, vectors, layers


def _experiment_options(command):
    options = [
        click.option("--model", "model_name", default=None, metavar="NAME_OR_PATH",
                     help="a local model folder, gemma-3-270m, or a cached hub id (default: SmolLM2-135M-Instruct)"),
        click.option("--vectors", "vectors_path", default=None, type=click.Path(dir_okay=False), metavar="FILE",
                     help="a vector file (default: the model's emotion vectors)"),
        click.option("--out", "out_dir", required=True, type=click.Path(), help="folder for the JSON and figures"),
        click.option("--quiet", is_flag=True, help="no progress bar"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _prepare_out(out_dir: str) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    _check_outputs(str(out / "result.json") if out.is_dir() else str(out))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _bar(total: int, quiet: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, file=sys.stderr)


def _finish(out: Path, name: str, result: dict, figures: list[Path]) -> None:
    _write_atomic(out / f"{name}.json", json.dumps(result, indent=1) + "\n")
    click.echo(f"wrote {out / (name + '.json')}" + (f" and {', '.join(p.name for p in figures)}" if figures else ""),
               err=True)


@main.command()
@_experiment_options
@click.option("--templates", "templates_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="JSON list of templates (template with {X}, values, unit, log); default: the packaged seven")
@click.option("--only", default=None, help="comma-separated template names to run (default: all)")
@click.option("--emotions", default="afraid,calm,desperate,nervous,happy,sad", show_default=True)
@click.option("--layer", "layer_spec", default=None, help="layer(s): 19, 10-20, all (default: the vectors' default)")
def dose(model_name, vectors_path, out_dir, quiet, templates_path, only, emotions, layer_spec) -> None:
    """Dose-response: readings where the reply begins as a quantity in the message grows (e.g. mg of tylenol)."""
    from emovec.report.experiments import draw_dose
    from emovec.science.dose import load_templates, run_dose, select_templates, summary_rows

    out = _prepare_out(out_dir)
    with _user_errors():
        templates = select_templates(load_templates(templates_path), only)
    loaded, vectors, layers = _science_setup(model_name, vectors_path, layer_spec)
    names = [e.strip() for e in emotions.split(",") if e.strip()]
    with _user_errors(), _bar(sum(len(t["values"]) for t in templates), quiet, "dose") as bar:
        result = run_dose(loaded.model, loaded.tokenizer, vectors, templates, layers, names, progress=bar.update)
    result["model"] = loaded.name
    figures = draw_dose(result, out, layers[0])
    _finish(out, "dose", result, figures)
    _table(["template", "layer", "afraid", "calm"], summary_rows(result),
           "Spearman ρ with danger where the reply begins (research: afraid rises, calm falls)")


@main.command()
@_experiment_options
@click.option("--messages", "messages_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="JSONL of {text, emotion} (default: the packaged 36)")
@click.option("--layer", "layer_spec", default=None, help="layer (default: the vectors' default)")
def implied(model_name, vectors_path, out_dir, quiet, messages_path, layer_spec) -> None:
    """Implied emotions: the rank of each message's intended emotion where the reply begins."""
    from emovec.report.experiments import draw_implied
    from emovec.science.implied import load_messages, run_implied

    out = _prepare_out(out_dir)
    with _user_errors():
        rows = load_messages(messages_path)
    loaded, vectors, layers = _science_setup(model_name, vectors_path, layer_spec)
    with _user_errors(), _bar(len(rows), quiet, "implied") as bar:
        result = run_implied(loaded.model, loaded.tokenizer, vectors, rows, layers[0], progress=bar.update)
    result["model"] = loaded.name
    figures = draw_implied(result, out)
    _finish(out, "implied", result, figures)
    _table(["emotion", "rank_last", "rank_user", "top"], [
        {**m, "top": ", ".join(n for n, _ in m["top_last"][:3])} for m in result["messages"]],
        f"rank of the intended emotion among {result['num_vectors']} (median {result['summary']['last']['median_rank']},"
        f" chance {result['chance_median_rank']:.0f})")


@main.command()
@_experiment_options
@click.option("--activities", "activities_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="JSON list of {activity, category} (default: the packaged 42)")
@click.option("--limit", default=None, type=click.IntRange(min=3), help="use only the first N activities")
@click.option("--layer", "layer_spec", default=None, help="layer (default: the vectors' default)")
@click.option("--steer", "steer_names", default="", help="comma-separated emotions to steer on each target activity")
@click.option("--strength", default=0.1, show_default=True, help="relative steering strength")
@click.option("--targets", default=4, show_default=True, type=click.IntRange(min=1),
              help="activities steered (spread evenly over the activity list)")
@click.option("--randoms", default=2, show_default=True, type=click.IntRange(min=0),
              help="random directions of equal norm steered as controls")
def preferences(model_name, vectors_path, out_dir, quiet, activities_path, limit, layer_spec, steer_names, strength,
                targets, randoms) -> None:
    """Preferences: A/B choices between activities, Elo, emotion-Elo correlations, Elo shifts under steering."""
    from emovec.report.experiments import draw_preferences
    from emovec.science.preferences import load_activities, run_preferences

    out = _prepare_out(out_dir)
    with _user_errors():
        activities = load_activities(activities_path)[:limit]
    loaded, vectors, layers = _science_setup(model_name, vectors_path, layer_spec)
    names = [e.strip() for e in steer_names.split(",") if e.strip()]
    with _user_errors():
        for name in names:
            vectors.index(name)
    n = len(activities)
    count = min(targets, n)
    chosen = sorted({round(i * (n - 1) / max(1, count - 1)) for i in range(count)}) if names or randoms else []
    total = n * (n - 1) + (len(names) + randoms) * len(chosen) * 2 * (n - 1)
    with _user_errors(), _bar(total, quiet, "preferences") as bar:
        result = run_preferences(loaded.model, loaded.tokenizer, vectors, activities, layers[0],
                                 steer_emotions=names, strength=strength, targets=chosen, randoms=randoms,
                                 progress=bar.update)
    result["model"] = loaded.name
    figures = draw_preferences(result, out)
    _finish(out, "preferences", result, figures)
    top = list(result["elo_correlation"].items())[:8]
    _table(["emotion", "r"], [{"emotion": e, "r": r} for e, r in top], "emotions whose reading best tracks Elo")
    if "steering" in result:
        _table(["steering", "mean Elo shift"], [{"steering": k, "mean Elo shift": v}
                                                 for k, v in result["steering"]["mean_elo_shift"].items()],
               f"steering on the activity's tokens at {strength:+g}")


@main.command()
@_experiment_options
@click.option("--emotions", default=None, help="comma-separated subset (default: every vector)")
@click.option("--strengths", default="0.1,0.2", show_default=True, help="comma-separated relative strengths")
@click.option("--layer", "layer_spec", default=None, help="layer(s) steered together (default: the vectors' default)")
@click.option("--randoms", default=8, show_default=True, type=click.IntRange(min=1),
              help="random directions of equal norm")
@click.option("--samples", "sample_names", default="afraid,calm,happy,sad", show_default=True,
              help="emotions for the plain vs steered sample generations ('' for none)")
def validate(model_name, vectors_path, out_dir, quiet, emotions, strengths, layer_spec, randoms, sample_names) -> None:
    """Does steering with each vector raise its own word's probability more than random directions do?"""
    from emovec.report.experiments import draw_validate
    from emovec.science.validate import PREFIXES, run_validate, samples

    out = _prepare_out(out_dir)
    loaded, vectors, layers = _science_setup(model_name, vectors_path, layer_spec)
    try:
        values = [float(s) for s in strengths.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values:
        raise UserError(f"--strengths must be comma-separated numbers, got {strengths!r}")
    names = [e.strip() for e in emotions.split(",") if e.strip()] if emotions else None
    with _user_errors():
        for name in names or []:
            vectors.index(name)
        count = len(names) if names else len(vectors.names)
        with _bar(len(values) * len(PREFIXES) * (1 + count + randoms), quiet, "validate") as bar:
            result = run_validate(loaded.model, loaded.tokenizer, vectors, emotions=names, strengths=values,
                                  layers=[layers], randoms=randoms, progress=bar.update)
        shown = [e.strip() for e in sample_names.split(",") if e.strip() and e.strip() in vectors.names]
        result["samples"] = samples(loaded.model, loaded.tokenizer, vectors, shown, values[-1], layers) if shown else []
    result["model"] = loaded.name
    figures = draw_validate(result, out)
    _finish(out, "validate", result, figures)
    _table(["layers", "strength", "share"], [{"layers": ",".join(map(str, r["layers"])), "strength": r["strength"],
                                              "share": r["share_beating_all_randoms"]} for r in result["runs"]],
           f"share of emotions whose steering beats all {randoms} random directions on their own word")


@main.command()
@_experiment_options
@click.option("--layer", "layer_spec", default=None,
              help="the regulated (dose) and steered layer (default: the vectors' default layer)")
@click.option("--later", default=4, show_default=True, type=click.IntRange(min=1),
              help="layers after --layer: the downstream reading, and where (b)/(c) cap")
@click.option("--strength", default=0.2, show_default=True, type=float, help="relative steering strength of (b)/(c)")
@click.option("--only", default=None, help="comma-separated dose template names (default: all)")
def regulation(model_name, vectors_path, out_dir, quiet, layer_spec, later, strength, only) -> None:
    """Show that regulation works: dose-response with afraid capped, +desperate steering pulled back by a cap at a
    later layer, a random direction as the control, and the caps' effect on text within bounds (zero)."""
    from emovec.report.experiments import draw_regulation
    from emovec.science.dose import load_templates, select_templates
    from emovec.science.regulation import run_regulation, summary_lines

    out = _prepare_out(out_dir)
    loaded, vectors, layers = _science_setup(model_name, vectors_path, layer_spec)
    if len(layers) != 1:
        raise UserError("--layer names one layer for this command")
    with _user_errors():
        vectors.index("afraid")
        vectors.index("desperate")
        templates = select_templates(load_templates(), only, what="dose template")
        if not quiet:
            click.echo("emovec regulation: dose curves, steering with and without caps ...", err=True)
        result = run_regulation(loaded.model, loaded.tokenizer, vectors, layer=layers[0], later=later,
                                strength=strength, templates=templates)
    result["model"] = loaded.name
    from emovec.cli import _command_line

    result["command"] = _command_line()
    figures = draw_regulation(result, out)
    _finish(out, "regulation", result, figures)
    for line in summary_lines(result):
        click.echo(line)


def _table(columns: list[str], rows: list[dict], title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*[f"{row.get(c):+.3f}" if isinstance(row.get(c), float) else str(row.get(c)) for c in columns])
    _console().print(table)
