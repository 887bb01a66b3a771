"""Locate the decoder layers of a causal language model, choose layers by index, fraction or range, and read or
replace the residual-stream hidden state in a decoder layer's output."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "LAYER_PATHS",
    "SUPPORTED_FAMILIES",
    "DecoderLayers",
    "UnsupportedModelError",
    "find_decoder_layers",
    "layer_output_hidden",
    "replace_layer_output",
    "resolve_layer_indices",
]

# families tested against tiny random models of each (config.model_type, Gemma3's text-only model is "gemma3_text")
SUPPORTED_FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3",
    "gpt2",
    "gpt_neox",
    "opt",
)

# attribute paths of the decoder-layer ModuleList, checked in order; the first that holds a non-empty ModuleList wins
LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 1-3, Phi3 and most decoder-only *ForCausalLM
    "model.language_model.layers",  # transformers 5 multimodal wrappers (Gemma3ForConditionalGeneration, Llava, ...)
    "language_model.model.layers",  # transformers 4 multimodal wrappers
    "model.decoder.layers",  # OPTForCausalLM
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "transformer.blocks",  # MPT
    "base_model.model.model.layers",  # PEFT-wrapped *ForCausalLM
    "language_model.layers",  # multimodal base models (Gemma3Model, LlavaModel in transformers 5)
    "decoder.layers",  # OPTModel
    "layers",  # base models: LlamaModel, GPTNeoXModel, OPTDecoder, ...
    "h",  # GPT2Model
    "blocks",  # MPTModel
)

# output keys that hold the residual stream when a layer returns a ModelOutput or a dict, most specific first
_HIDDEN_KEYS = ("last_hidden_state", "hidden_states")


class UnsupportedModelError(ValueError):
    """The decoder layers of a model could not be found; the message says how to pass them by hand."""


@dataclass
class DecoderLayers:
    """Where a model's decoder layers are, and the module that runs them."""

    base: torch.nn.Module  # the module that owns the layers and receives input_ids / attention_mask / ...
    layers: torch.nn.ModuleList  # the decoder layers, in order
    path: str  # attribute path of the layers from the model given, e.g. "model.layers"
    hidden_size: int
    family: str  # config.model_type, e.g. "llama", "gpt2", or the class name when there is no config

    def __len__(self) -> int:
        return len(self.layers)


def _get_path(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _config_of(*modules: torch.nn.Module) -> Any:
    for module in modules:
        config = getattr(module, "config", None)
        if config is not None:
            return config
    return None


def _family(config: Any, model: torch.nn.Module) -> str:
    model_type = getattr(config, "model_type", None) if config is not None else None
    return model_type if isinstance(model_type, str) and model_type else type(model).__name__


def _hidden_size_from_config(config: Any) -> int | None:
    if config is None:
        return None
    # a multimodal config's text_config describes the language model whose layers we hold
    candidates = []
    text_config = getattr(config, "text_config", None)
    if text_config is not None:
        candidates.append(text_config)
    candidates.append(config)
    for cfg in candidates:
        for name in ("hidden_size", "n_embd", "d_model"):
            value = getattr(cfg, name, None)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0:
                return int(value)
    return None


def _hidden_size_from_modules(model: torch.nn.Module, layers: Sequence[torch.nn.Module]) -> int | None:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        try:
            embeddings = get_embeddings()
        except (NotImplementedError, AttributeError):
            embeddings = None
        if isinstance(embeddings, torch.nn.Embedding):
            return embeddings.embedding_dim
    # the first norm or linear map inside a block reads the residual stream
    for module in layers[0].modules():
        if isinstance(module, torch.nn.LayerNorm):
            return int(module.normalized_shape[-1])
        if isinstance(module, torch.nn.Linear):
            return module.in_features
    return None


def _module_lists(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) and name]


def _unsupported(model: torch.nn.Module) -> UnsupportedModelError:
    name = type(model).__name__
    candidates = _module_lists(model)
    example = f"model.{candidates[0][0]}" if candidates else "model.my_blocks"
    lines = [
        f"cannot find the decoder layers of {name}: none of the known attribute paths "
        f"({', '.join(LAYER_PATHS)}) holds a ModuleList.",
        f"Supported families: {', '.join(SUPPORTED_FAMILIES)} (and base models such as LlamaModel).",
        f"Pass the layers by hand: pass layers={example} (the list of decoder blocks) to emovec.monitor / emovec.steer.",
    ]
    if candidates:
        found = ", ".join(f"{n} ({len(m)} modules)" for n, m in candidates[:5])
        lines.append(f"ModuleLists in this model: {found}.")
    return UnsupportedModelError("\n".join(lines))


def _given_layers(model: torch.nn.Module, layers: torch.nn.ModuleList | list) -> DecoderLayers:
    if isinstance(layers, torch.nn.Module) and not isinstance(layers, (torch.nn.ModuleList, torch.nn.Sequential)):
        raise TypeError(f"layers must be a ModuleList or a list of modules, got a single {type(layers).__name__}")
    if not isinstance(layers, (torch.nn.ModuleList, torch.nn.Sequential, list, tuple)):
        raise TypeError(f"layers must be a ModuleList or a list of modules, got {type(layers).__name__}")
    items = list(layers)
    if not items:
        raise ValueError("layers is empty: pass the list of decoder blocks, e.g. layers=model.my_blocks")
    for i, item in enumerate(items):
        if not isinstance(item, torch.nn.Module):
            raise TypeError(f"layers[{i}] must be a torch.nn.Module, got {type(item).__name__}")
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    missing = [i for i, item in enumerate(items) if id(item) not in names]
    if missing:
        raise ValueError(
            f"layers[{missing[0]}] is not a submodule of {type(model).__name__}: hooks on it would never run; "
            "pass the model's own decoder blocks"
        )
    if id(layers) in names:
        path = names[id(layers)]
    else:
        parents = {names[id(item)].rpartition(".")[0] for item in items}
        path = parents.pop() if len(parents) == 1 else ""
        path = path or "<layers given by hand>"
    module_list = layers if isinstance(layers, torch.nn.ModuleList) else torch.nn.ModuleList(items)
    config = _config_of(model)
    hidden_size = _hidden_size_from_config(config) or _hidden_size_from_modules(model, items)
    if hidden_size is None:
        raise ValueError(
            f"cannot tell the hidden size of {type(model).__name__}: it has no config.hidden_size and its first "
            "layer holds no Linear or LayerNorm"
        )
    return DecoderLayers(
        base=model, layers=module_list, path=path, hidden_size=hidden_size, family=_family(config, model)
    )


def find_decoder_layers(model: torch.nn.Module, layers: torch.nn.ModuleList | list | None = None) -> DecoderLayers:
    """Find the decoder layers of a causal LM (or of a base model such as LlamaModel).

    ``layers``, when given, is used as is (``base`` is then the model itself). Raises UnsupportedModelError when
    no known attribute path holds the layers.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if layers is not None:
        return _given_layers(model, layers)
    for path in LAYER_PATHS:
        found = _get_path(model, path)
        if not isinstance(found, torch.nn.ModuleList) or len(found) == 0:
            continue
        parent_path = path.rpartition(".")[0]
        base = _get_path(model, parent_path) if parent_path else model
        if not isinstance(base, torch.nn.Module):
            continue
        config = _config_of(model, base)
        hidden_size = _hidden_size_from_config(config) or _hidden_size_from_modules(base, list(found))
        if hidden_size is None:
            continue
        return DecoderLayers(base=base, layers=found, path=path, hidden_size=hidden_size, family=_family(config, model))
    raise _unsupported(model)


_RANGE = re.compile(r"^\s*(-?\d+(?:\.\d*)?)\s*-\s*(-?\d+(?:\.\d*)?)\s*$")


def _range_text(num_layers: int) -> str:
    return f"the model has {num_layers} layers (0..{num_layers - 1}, or -{num_layers}..-1)"


def _one_index(value: Any, num_layers: int) -> int:
    """A single int (negative from the end) or fraction of depth, as a non-negative index."""
    if isinstance(value, bool):
        raise ValueError(f"layer {value!r} is not a layer index: use an int, a fraction in [0, 1] or a string")
    if isinstance(value, numbers.Integral):
        index = int(value)
        if not -num_layers <= index < num_layers:
            raise ValueError(f"layer {index} is out of range: {_range_text(num_layers)}")
        return index % num_layers
    if isinstance(value, numbers.Real):
        fraction = float(value)
        if math.isnan(fraction) or not 0.0 <= fraction <= 1.0:
            raise ValueError(
                f"layer fraction {value!r} is out of range: a float means a fraction of depth in [0, 1] "
                f"(use an int for a layer index; {_range_text(num_layers)})"
            )
        return round(fraction * (num_layers - 1))
    raise ValueError(f"layer {value!r} is not a layer index: use an int, a fraction in [0, 1] or a string")


def _parse_number(text: str) -> int | float | None:
    try:
        return int(text)
    except ValueError:
        pass
    if re.fullmatch(r"\s*-?\d*\.\d*\s*", text) and any(c.isdigit() for c in text):
        return float(text)
    return None


def _string_indices(spec: str, num_layers: int) -> list[int]:
    text = spec.strip()
    if not text:
        raise ValueError("empty layer spec: use e.g. 'all', '10', '-1', '0.66', '3,5,7' or '10-14'")
    if text.lower() == "all":
        return list(range(num_layers))
    if "," in text:
        parts = text.split(",")
        if any(not p.strip() for p in parts):
            raise ValueError(f"malformed layer spec {spec!r}: empty item between commas")
        return [i for p in parts for i in _string_indices(p, num_layers)]
    number = _parse_number(text)
    if number is not None:
        return [_one_index(number, num_layers)]
    match = _RANGE.match(text)
    if match:
        start_text, end_text = match.groups()
        start = _one_index(_parse_number(start_text), num_layers)
        end = _one_index(_parse_number(end_text), num_layers)
        if start > end:
            raise ValueError(
                f"layer range {spec!r} is empty: it runs from layer {start} to layer {end}; the start must not "
                "come after the end"
            )
        return list(range(start, end + 1))
    raise ValueError(
        f"malformed layer spec {spec!r}: use an int ('10', '-1'), a fraction of depth ('0.66'), 'all', "
        f"a list ('3,5,7') or an inclusive range ('10-14'); {_range_text(num_layers)}"
    )


def _spec_indices(spec: Any, num_layers: int) -> list[int]:
    if isinstance(spec, str):
        return _string_indices(spec, num_layers)
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError("empty list of layers: name at least one layer")
        return [i for item in spec for i in _spec_indices(item, num_layers)]
    return [_one_index(spec, num_layers)]


def resolve_layer_indices(spec: Any, num_layers: int) -> list[int]:
    """Turn a layer spec into sorted unique non-negative layer indices.

    ``spec`` is an int (negative counts from the end), a float in [0, 1] (fraction of depth,
    ``round(f * (num_layers - 1))``), ``"all"``, a string such as ``"10"``, ``"-1"``, ``"0.66"``, ``"3,5,7"`` or
    ``"10-14"`` (inclusive), or a list / tuple of any of these. Raises ValueError saying what was wrong.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    return sorted(set(_spec_indices(spec, int(num_layers))))


def _is_model_output(output: Any) -> bool:
    # transformers.utils.ModelOutput: an OrderedDict dataclass with to_tuple (duck-typed to avoid the import)
    return isinstance(output, Mapping) and callable(getattr(output, "to_tuple", None))


def _mapping_key(output: Mapping) -> Any:
    for key in _HIDDEN_KEYS:
        if isinstance(output.get(key), torch.Tensor):
            return key
    for key, value in output.items():
        if value is not None:
            return key
    raise TypeError(f"cannot find the hidden state in an empty decoder layer output of type {type(output).__name__}")


def layer_output_hidden(output: Any) -> torch.Tensor:
    """The residual-stream tensor in a decoder layer's output (a tensor, a tuple whose first item it is, or a
    ModelOutput / dict with ``last_hidden_state`` or ``hidden_states``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        hidden = output[0]
    elif isinstance(output, Mapping):
        hidden = output[_mapping_key(output)]
    else:
        hidden = None
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"cannot find the hidden state in a decoder layer output of type {type(output).__name__}")
    return hidden


def replace_layer_output(output: Any, new_hidden: torch.Tensor) -> Any:
    """``output`` with its hidden state replaced by ``new_hidden``, keeping its type; ``output`` is not changed."""
    if isinstance(output, torch.Tensor):
        return new_hidden
    if isinstance(output, (tuple, list)) and output:
        layer_output_hidden(output)  # raises unless the first item is a tensor
        items = [new_hidden, *output[1:]]
        if type(output) is tuple:
            return tuple(items)
        if type(output) is list:
            return items
        if hasattr(type(output), "_make"):  # namedtuple
            return type(output)._make(items)
        return type(output)(items)
    if _is_model_output(output):
        key = _mapping_key(output)
        return type(output)(**{**dict(output.items()), key: new_hidden})
    if isinstance(output, Mapping):
        key = _mapping_key(output)
        updated = dict(output.items())
        updated[key] = new_hidden
        return updated if type(output) is dict else type(output)(updated)
    raise TypeError(f"cannot replace the hidden state in a decoder layer output of type {type(output).__name__}")
