"""``emovec export gguf`` and ``emovec import gguf``: llama.cpp control vectors in and out."""

from __future__ import annotations

import click

from emovec.cli import UserError, _check_outputs, _parse_recipe, _user_errors, main


def _vectors_for_export(vectors_path: str | None, model_name: str | None, device: str | None):
    """The vectors named by --vectors, else the default model's (or --model's) emotion vectors."""
    from emovec.vectors import VectorSet

    with _user_errors():
        if vectors_path is not None:
            return VectorSet.load(vectors_path)
        if model_name is None:
            from emovec import corpus
            from emovec.models import DEFAULT_MODEL

            shipped = corpus.data_path("vectors") / f"{DEFAULT_MODEL}.safetensors"
            if shipped.is_file():
                return VectorSet.load(shipped)
        from emovec.cli import _setup

        return _setup(model_name, None, device)[1]


@main.group("export")
def export_group() -> None:
    """Write vectors in other tools' formats (llama.cpp control vectors)."""


@export_group.command("gguf")
@click.option("--vectors", "vectors_path", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="a vector file (default: the default model's emotion vectors)")
@click.option("--model", "model_name", default=None, metavar="NAME_OR_PATH",
              help="without --vectors: export this model's default emotion vectors")
@click.option("--device", default=None, hidden=True)
@click.option("--recipe", "recipe_items", multiple=True, required=True, metavar="NAME=STRENGTH,...",
              help='what to steer, e.g. "calm=0.05,desperate=-0.02" (repeatable)')
@click.option("--layers", "layer_spec", required=True, metavar="SPEC",
              help="layers to steer: 10-20, 12, 3,5,7 or all (all from layer 1: llama.cpp never steers layer 0)")
@click.option("--absolute", is_flag=True,
              help="strengths multiply the unit vectors (default: relative, in units of each layer's mean residual "
                   "norm, as `emovec steer`)")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), metavar="FILE.gguf")
def export_gguf(vectors_path, model_name, device, recipe_items, layer_spec, absolute, out_path) -> None:
    """Fold a steering recipe into a llama.cpp control vector (GGUF).

    \b
    Use it with llama.cpp (direction.<i> is added to decoder layer i's output, as `emovec steer` does):
      llama-cli -m model.gguf --control-vector calm.gguf
      llama-cli -m model.gguf --control-vector-scaled calm.gguf 0.5     (half the strength)
      llama-cli -m model.gguf --control-vector calm.gguf --control-vector-layer-range 12 16   (only those layers)
    """
    from emovec.integrations.control_vectors import export_control_vector
    from emovec.layers import resolve_layer_indices

    recipe = _parse_recipe(recipe_items)
    if not recipe:
        raise UserError('give a recipe, e.g. --recipe "calm=0.05,desperate=-0.02"')
    _check_outputs(out_path)
    vectors = _vectors_for_export(vectors_path, model_name, device)
    if not vectors.layers:
        raise UserError("these vectors are one set for every layer; a control vector needs vectors extracted at "
                        "named layers (emovec extract --layers ...)")
    try:
        num_layers = int(vectors.metadata.get("num_layers", max(vectors.layers) + 1))
    except (TypeError, ValueError):
        num_layers = max(vectors.layers) + 1
    with _user_errors():
        for name in recipe:
            vectors.index(name)
        layers = resolve_layer_indices(layer_spec, num_layers)
        if str(layer_spec).strip().lower() == "all":  # llama.cpp never steers layer 0: "all" means all it can
            layers = [layer for layer in layers if layer != 0]
        if not absolute and vectors.mean_norms is None:
            raise ValueError("these vectors have no mean residual norms, which relative strengths are measured in; "
                             "pass --absolute or use vectors with mean norms")
        export_control_vector(vectors, recipe, layers, out_path, relative=not absolute)
    terms = ", ".join(f"{n}={s:+g}" for n, s in recipe.items())
    if len(layers) == 1:
        where = f"layer {layers[0]}"
    elif layers == list(range(layers[0], layers[-1] + 1)):
        where = f"layers {layers[0]}-{layers[-1]}"
    else:
        where = "layers " + ",".join(map(str, layers))
    click.echo(f"wrote {out_path}: {terms} ({'absolute' if absolute else 'relative'}) at {where}, hidden size "
               f"{vectors.hidden_size}")
    click.echo(f"use: llama-cli -m MODEL.gguf --control-vector {out_path}")


@main.group("import")
def import_group() -> None:
    """Read vectors made by other tools (llama.cpp and repeng control vectors)."""


@import_group.command("gguf")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--name", "names", multiple=True, metavar="NAME",
              help="the vector's name, once per file in order (default: each file's name without .gguf)")
@click.option("--model", "model_name", default=None, metavar="NAME_OR_PATH",
              help="check the files against this model (hidden size, layers)")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="write an emovec vector file (default: only describe the files)")
def import_gguf(files, names, model_name, out_path) -> None:
    """Read llama.cpp / repeng control-vector GGUF FILES into one emovec vector file.

    Each file becomes one named vector at its layers, kept at its stored size: steer with it as llama.cpp would
    with emovec.steer(model, vectors, {"NAME": 1.0}, layers=vectors.layers, raw=True).
    """
    from emovec.integrations.control_vectors import import_control_vectors

    if names and len(names) != len(files):
        raise UserError(f"{len(names)} --name for {len(files)} files; give one --name per file, or none")
    _check_outputs(out_path)
    model = None
    if model_name is not None:
        from emovec.cli import _load_model

        with _user_errors():
            model = _load_model(model_name).model
    with _user_errors():
        vectors = import_control_vectors(files, names or None, model=model)
    click.echo(f"{len(vectors.names)} vector(s), hidden size {vectors.hidden_size}, layers "
               f"{vectors.layers[0]}-{vectors.layers[-1]} ({len(vectors.layers)} layers)")
    for k, name in enumerate(vectors.names):
        norms = vectors.vectors[:, k].norm(dim=-1)
        steered = [layer for layer, n in zip(vectors.layers, norms.tolist()) if n > 0]
        click.echo(f"  {name}: {len(steered)} layers, norm {float(norms[norms > 0].min()) if steered else 0:.3g}"
                   f"-{float(norms.max()):.3g}")
    if out_path is not None:
        with _user_errors():
            vectors.save(out_path)
        click.echo(f"wrote {out_path}")
