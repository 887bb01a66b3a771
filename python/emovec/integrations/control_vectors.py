"""llama.cpp control vectors (GGUF): export a steering recipe, import vectors made by llama.cpp, repeng or emovec.

The format, as llama.cpp's ``common_control_vector_load`` reads it: ``general.architecture = "controlvector"``,
``controlvector.model_hint`` (informative; llama.cpp does not check it) and ``controlvector.layer_count``, then one
1-D float32 tensor ``direction.<i>`` of hidden-size values per steered layer. llama.cpp adds ``direction.<i>`` (times
the file's ``--control-vector-scaled`` factor; several files are summed) to the output of decoder layer ``i``, the
same index as ``model.model.layers[i]`` in transformers, for ``i`` in ``--control-vector-layer-range`` (default: every
layer). It never steers layer 0 and rejects a file with a ``direction.0`` tensor, so export refuses layer 0.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from emovec.fileio import atomic_write
from emovec.runtime import Recipe, steering_vector
from emovec.vectors import VectorFileError, VectorSet

ARCHITECTURE = "controlvector"
_LEADING_INT = re.compile(r"\s*[+-]?\d+")  # what std::stoi reads at the start of a string


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF control vectors need the gguf package: pip install gguf") from None
    return gguf


def model_hint(vectors: VectorSet) -> str:
    """The model family for ``controlvector.model_hint``: the config's model_type when the vectors recorded it,
    else their model class without "ForCausalLM" (LlamaForCausalLM -> llama)."""
    meta = vectors.metadata
    if meta.get("model_type"):
        return str(meta["model_type"])
    cls = str(meta.get("model_class", ""))
    return re.sub(r"For(CausalLM|ConditionalGeneration)$", "", cls).lower() or "unknown"


def control_vector(vectors: VectorSet, recipe: Recipe, layers: Sequence[int], *, relative: bool = True,
                   raw: bool = False) -> dict[int, torch.Tensor]:
    """The (d,) fp32 vector ``emovec.steer(model, vectors, recipe, layers, relative=...)`` adds at each layer."""
    if not recipe:
        raise ValueError("the recipe is empty: give at least one NAME=STRENGTH, e.g. calm=0.05")
    layers = sorted({int(layer) for layer in layers})
    if not layers:
        raise ValueError("no layers chosen: give the layers to steer, e.g. 10-20")
    if 0 in layers:
        raise ValueError("llama.cpp never steers layer 0 (it rejects a direction.0 tensor); choose layers from 1, "
                         "e.g. 1-20")
    out = {layer: steering_vector(vectors, recipe, layer, relative=relative, raw=raw) for layer in layers}
    for layer, vector in out.items():
        if not torch.isfinite(vector).all():
            raise ValueError(f"the recipe's vector at layer {layer} overflows float32; use smaller strengths (the "
                             "research used |strength| <= 0.5, relative)")
    return out


def write_control_vector(path: str | os.PathLike, directions: dict[int, torch.Tensor], *, hint: str = "unknown",
                         description: str | None = None) -> Path:
    """Write ``{layer: (d,) tensor}`` as a llama.cpp control-vector GGUF, atomically."""
    gguf = _gguf()
    if not directions:
        raise ValueError("no directions to write")
    sizes = {int(v.numel()) for v in directions.values()}
    if len(sizes) != 1:
        raise ValueError(f"all directions must have the same hidden size, got {sorted(sizes)}")
    if min(directions) < 1:
        raise ValueError("llama.cpp never steers layer 0 (it rejects a direction.0 tensor); leave layer 0 out")
    arrays = {layer: directions[layer].detach().float().cpu().reshape(-1).numpy() for layer in sorted(directions)}

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
        writer.add_string("controlvector.model_hint", hint)
        writer.add_int32("controlvector.layer_count", len(arrays))
        if description:
            writer.add_description(description)
        for layer, values in arrays.items():
            writer.add_tensor(f"direction.{layer}", values)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(path, write)


def export_control_vector(vectors: VectorSet, recipe: Recipe, layers: Sequence[int], path: str | os.PathLike, *,
                          relative: bool = True) -> Path:
    """Fold ``recipe`` (strengths relative to each layer's mean residual norm, or absolute) into one direction per
    layer and write it for llama.cpp: ``llama-cli -m MODEL.gguf --control-vector FILE`` then steers as
    ``emovec.steer(model, vectors, recipe, layers, relative=relative)`` does."""
    directions = control_vector(vectors, recipe, layers, relative=relative)
    terms = ", ".join(f"{name}={strength:+g}" for name, strength in recipe.items())
    description = f"emovec: {terms} ({'relative' if relative else 'absolute'}) at layers {sorted(directions)}"
    return write_control_vector(path, directions, hint=model_hint(vectors), description=description)


def _field_string(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not field.data:
        return None
    try:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    except (IndexError, TypeError):
        return None


def read_control_vector(path: str | os.PathLike) -> tuple[dict[int, torch.Tensor], str | None]:
    """``({layer: (d,) fp32 tensor}, model_hint)`` from a control-vector GGUF, checked as llama.cpp checks it."""
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise VectorFileError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # the gguf package raises ValueError, struct.error, IndexError, ... on bad files
        raise VectorFileError(f"{path} is not a readable GGUF file ({type(error).__name__}: "
                              f"{' '.join(str(error).split())[:200]})") from None
    arch = _field_string(reader, "general.architecture")
    if arch != ARCHITECTURE:
        raise VectorFileError(f"{path} is a GGUF file of architecture {arch!r}, not a control vector "
                              f"({ARCHITECTURE!r}); a model file cannot be imported as vectors")
    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:  # llama.cpp's rules: every tensor is direction.<i>, i >= 1 (std::stoi prefix)
        prefix, dot, rest = tensor.name.partition(".")
        match = _LEADING_INT.match(rest) if prefix == "direction" and dot else None
        if match is None or int(match.group(0)) < 0:
            raise VectorFileError(f"{path}: tensor {tensor.name!r} is not direction.<layer>; llama.cpp rejects such "
                                  "a file")
        layer = int(match.group(0))
        if layer == 0:
            raise VectorFileError(f"{path} has a direction.0 tensor, which llama.cpp rejects (layer 0 is never "
                                  "steered)")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise VectorFileError(f"{path}: {tensor.name} is {tensor.tensor_type.name}, but control vectors are "
                                  "float32 (llama.cpp reads only F32)")
        if len(tensor.shape) != 1:
            raise VectorFileError(f"{path}: {tensor.name} has shape {[int(n) for n in tensor.shape]}; a direction "
                                  "is 1-D (llama.cpp rejects others)")
        values = torch.from_numpy(tensor.data.astype("float32", copy=True)).reshape(-1)
        if layer in directions:  # llama.cpp adds repeated layers up
            if directions[layer].numel() != values.numel():
                raise VectorFileError(f"{path}: the directions have different lengths")
            directions[layer] = directions[layer] + values
        else:
            directions[layer] = values
    if not directions:
        raise VectorFileError(f"{path} has no direction.<layer> tensors")
    sizes = {int(v.numel()) for v in directions.values()}
    if len(sizes) != 1:
        raise VectorFileError(f"{path}: the directions have different lengths {sorted(sizes)}")
    bad = [layer for layer, v in directions.items() if not torch.isfinite(v).all()]
    if bad:
        raise VectorFileError(f"{path}: direction.{bad[0]} contains NaN or infinite values")
    return directions, _field_string(reader, "controlvector.model_hint")


def import_control_vectors(paths: Sequence[str | os.PathLike], names: Sequence[str] | None = None, *,
                           hidden_size: int | None = None, num_layers: int | None = None,
                           model=None) -> VectorSet:
    """A VectorSet with one named vector per file (named by ``names``, else each file's stem) at the union of the
    files' layers (zero where a file has no direction for a layer), vectors as stored (their size is part of
    them: steer them with ``emovec.steer(model, vs, {name: 1.0}, layers=vs.layers, raw=True)``, which adds what
    llama.cpp adds for ``--control-vector-scaled FILE 1.0``).

    ``model`` (or ``hidden_size`` / ``num_layers``) is checked against the files: a file for another hidden size or
    with layers past the model's last is refused."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("give at least one control-vector file")
    names = [str(n) for n in names] if names is not None else [p.stem for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} files; give one name per file")
    if len(set(names)) != len(names):
        raise ValueError(f"the names {names} repeat; give each file its own name (--name)")
    if model is not None:
        from emovec.layers import find_decoder_layers

        found = find_decoder_layers(model)
        hidden_size, num_layers = found.hidden_size, len(found.layers)
    read = [read_control_vector(p) for p in paths]
    for path, (directions, _) in zip(paths, read):
        size = next(iter(directions.values())).numel()
        if hidden_size is not None and size != hidden_size:
            raise VectorFileError(f"{path} holds directions of size {size}, but the model's hidden size is "
                                  f"{hidden_size}: it was made for another model")
        if num_layers is not None and max(directions) >= num_layers:
            raise VectorFileError(f"{path} steers layer {max(directions)}, but the model has layers 0-"
                                  f"{num_layers - 1}: it was made for another model")
    sizes = {next(iter(d.values())).numel() for d, _ in read}
    if len(sizes) != 1:
        raise VectorFileError(f"the files hold directions of different sizes {sorted(sizes)}; import files made for "
                              "one model together")
    layers = sorted(set().union(*(d.keys() for d, _ in read)))
    d = sizes.pop()
    tensor = torch.zeros(len(layers), len(names), d)
    for k, (directions, _) in enumerate(read):
        for layer, values in directions.items():
            tensor[layers.index(layer), k] = values
    hints = sorted({h for _, h in read if h})
    metadata = {"imported_from": [str(p) for p in paths], "format": "llama.cpp control vector",
                "hidden_size": d}
    if hints:
        metadata["model_hint"] = ",".join(hints)
    if num_layers is not None:
        metadata["num_layers"] = num_layers
    return VectorSet(names, layers, tensor, metadata=metadata)
