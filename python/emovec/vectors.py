"""VectorSet: named concept directions per layer, with what is needed to steer and score with them.

Saved as one safetensors file with JSON metadata (written atomically); loading checks the file against a model.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emovec.fileio import atomic_write

FORMAT_VERSION = 1


class VectorFileError(ValueError):
    """A vector file is corrupt, incomplete, or does not match the model it is used with."""


def config_hash(config: Any) -> str:
    """A short hash of the parts of a model config that decide the residual stream's meaning."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "vocab_size", "n_embd", "n_layer", "n_head", "rope_theta", "rms_norm_eps", "max_position_embeddings")
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    chosen = {k: data.get(k) for k in keys if k in data}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class VectorSet:
    """Named directions in the residual stream, one set per layer.

    Attributes
    ----------
    names : the K concept names, in order.
    layers : the L model layer indices the vectors belong to; empty means one set that serves every layer.
    vectors : (max(L, 1), K, d) fp32, the raw (unnormalised) directions.
    mean_norms : (max(L, 1),) fp32 mean residual-stream norm at each layer (for relative steering), or None.
    neutral_pcs : (max(L, 1), P, d) fp32 principal components of neutral text projected out, or None.
    default_layer : the layer to use when a caller names none (from the data when extraction had held-out
        stories; else about two thirds of the depth).
    metadata : JSON-serialisable facts: model id, config hash, hidden size, layer count, parameters, ...
    label_means : (max(L, 1), K, d) fp32 mean activation of each label's texts before centring, or None; with them
        any subset of labels can be re-centred (:meth:`recentred`).
    """

    names: list[str]
    layers: list[int]
    vectors: torch.Tensor
    mean_norms: torch.Tensor | None = None
    neutral_pcs: torch.Tensor | None = None
    default_layer: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    label_means: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.names = [str(n) for n in self.names]
        self.layers = [int(layer) for layer in self.layers]
        self.vectors = self.vectors.detach().float()
        if self.vectors.ndim == 2:
            self.vectors = self.vectors[None]
        slices = max(len(self.layers), 1)
        if self.vectors.ndim != 3 or self.vectors.shape[:2] != (slices, len(self.names)):
            raise ValueError(f"vectors must have shape ({slices}, {len(self.names)}, d) for {len(self.layers)} layers "
                             f"and {len(self.names)} names, got {tuple(self.vectors.shape)}")
        if len(set(self.names)) != len(self.names):
            raise ValueError("names must be unique")
        if self.mean_norms is not None:
            if self.mean_norms.numel() != slices:
                raise ValueError(f"mean_norms must have {slices} values (one per layer), got {self.mean_norms.numel()}")
            self.mean_norms = self.mean_norms.detach().float().reshape(slices)
            if not (torch.isfinite(self.mean_norms).all() and (self.mean_norms >= 0).all()):
                raise ValueError("mean_norms must be finite and non-negative")
        if not torch.isfinite(self.vectors).all():
            raise ValueError("vectors contain NaN or infinite values")
        if self.neutral_pcs is not None:
            self.neutral_pcs = self.neutral_pcs.detach().float()
            if self.neutral_pcs.ndim != 3 or self.neutral_pcs.shape[0] != slices or \
                    self.neutral_pcs.shape[2] != self.hidden_size:
                raise ValueError(f"neutral_pcs must have shape ({slices}, P, {self.hidden_size}), "
                                 f"got {tuple(self.neutral_pcs.shape)}")
            if not torch.isfinite(self.neutral_pcs).all():
                raise ValueError("neutral_pcs contain NaN or infinite values")
        if self.label_means is not None:
            self.label_means = self.label_means.detach().float()
            if self.label_means.shape != self.vectors.shape:
                raise ValueError(f"label_means must have the vectors' shape {tuple(self.vectors.shape)}, "
                                 f"got {tuple(self.label_means.shape)}")
            if not torch.isfinite(self.label_means).all():
                raise ValueError("label_means contain NaN or infinite values")
        if self.default_layer is not None and self.layers and self.default_layer not in self.layers:
            raise ValueError(f"default_layer {self.default_layer} is not one of the layers {_ranges(self.layers)}")
        if self.default_layer is None and self.layers:
            self.default_layer = self.layers[min(len(self.layers) - 1, round(2 * (len(self.layers) - 1) / 3))]

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, names: Sequence[str], layers: Sequence[int] | None = None,
                    mean_norms: torch.Tensor | Sequence[float] | None = None, **metadata: Any) -> VectorSet:
        """Wrap a (K, d) tensor (one set for every layer) or an (L, K, d) tensor with its layer indices."""
        if tensor.ndim == 3 and layers is None:
            raise ValueError("a 3-D (L, K, d) tensor needs layers=[...] naming the model layer of each slice")
        if mean_norms is not None and not isinstance(mean_norms, torch.Tensor):
            mean_norms = torch.tensor(list(mean_norms), dtype=torch.float32)
        return cls(list(names), list(layers or []), tensor, mean_norms=mean_norms, metadata=dict(metadata))

    # ------------------------------------------------------------------ access

    @property
    def hidden_size(self) -> int:
        return self.vectors.shape[-1]

    @property
    def unit(self) -> torch.Tensor:
        """(max(L, 1), K, d) unit-norm directions (fp32, on the vectors' device). Computed once and kept while
        ``self.vectors`` is the same tensor, unmodified: treat the result as read-only."""
        return self.unit_on(self.vectors.device, torch.float32)

    def unit_on(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """:attr:`unit` as a contiguous tensor on ``device`` in ``dtype``, made once per device and dtype and kept
        while ``self.vectors`` is the same tensor, unmodified (a runtime entered per batch copies nothing then).
        Treat the result as read-only."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        units = self._derived()
        if (device, dtype) not in units:
            unit = units.get((self.vectors.device, torch.float32))
            if unit is None:
                unit = units[(self.vectors.device, torch.float32)] = torch.nn.functional.normalize(self.vectors, dim=-1)
            units[(device, dtype)] = unit.to(device=device, dtype=dtype).contiguous()
        return units[(device, dtype)]

    def _derived(self) -> dict:
        """What is derived from ``self.vectors`` (unit copies, prepared calls), dropped when the tensor is replaced or
        modified in place."""
        try:
            version = self.vectors._version
        except RuntimeError:  # an inference tensor (made under torch.inference_mode) tracks no version
            version = None
        cache = self.__dict__.get("_unit_cache")  # (the vectors tensor itself, its version, {key: derived object})
        if cache is None or cache[0] is not self.vectors or cache[1] != version:
            cache = self.__dict__["_unit_cache"] = (self.vectors, version, {})
        return cache[2]

    def __getstate__(self) -> dict:
        # copies and pickles carry no derived objects (a prepared call holds addresses, and cannot be pickled)
        state = self.__dict__.copy()
        state.pop("_unit_cache", None)
        return state

    def kept(self, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()``, made once per ``key`` and kept while ``self.vectors`` is the same tensor, unmodified, like
        :meth:`unit_on`'s copies: the runtimes keep their prepared CPU calls here, so a monitor entered per batch
        prepares none again."""
        derived = self._derived()
        key = ("kept", *key)
        if key not in derived:
            derived[key] = make()
        return derived[key]

    def covers(self, layer: int) -> bool:
        return not self.layers or layer in self.layers

    def slice_of(self, layer: int) -> int:
        """Position of model layer ``layer`` in this set's tensors."""
        if not self.layers:
            return 0
        try:
            return self.layers.index(layer)
        except ValueError:
            raise ValueError(f"these vectors were extracted at layers {_ranges(self.layers)}, not at layer {layer}; "
                             f"pick layers from those, or extract at layer {layer}") from None

    def index(self, name: str) -> int:
        """Position of a concept by name; an unknown name lists the closest known ones."""
        try:
            return self.names.index(name)
        except ValueError:
            close = difflib.get_close_matches(name, self.names, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise KeyError(f"unknown concept {name!r}: this vector set has {len(self.names)} names "
                           f"(e.g. {', '.join(self.names[:5])}).{hint}") from None

    def select(self, names: Sequence[str] | None = None, layers: Sequence[int] | None = None) -> VectorSet:
        """A new VectorSet with only these names (in the given order) and these layers."""
        name_idx = [self.index(n) for n in names] if names is not None else list(range(len(self.names)))
        if layers is not None and self.layers:
            slice_idx = [self.slice_of(layer) for layer in layers]
            new_layers = list(layers)
        else:
            slice_idx = list(range(max(len(self.layers), 1)))
            new_layers = list(self.layers)
        pick = torch.tensor(slice_idx)
        names_out = [self.names[i] for i in name_idx]
        default = self.default_layer if self.default_layer in new_layers else None
        return VectorSet(
            names_out, new_layers, self.vectors[pick][:, name_idx],
            mean_norms=self.mean_norms[pick] if self.mean_norms is not None else None,
            neutral_pcs=self.neutral_pcs[pick] if self.neutral_pcs is not None else None,
            default_layer=default, metadata=dict(self.metadata),
            label_means=self.label_means[pick][:, name_idx] if self.label_means is not None else None,
        )

    def recentred(self, names: Sequence[str]) -> VectorSet:
        """These labels' vectors re-derived from their own means: label mean minus the mean over ``names`` (not
        over every label), with the neutral components projected out, as extraction does."""
        if self.label_means is None:
            raise ValueError("these vectors carry no label means (extract them again with this emovec to re-centre)")
        chosen = self.select(names)
        means = chosen.label_means
        raw = means - means.mean(1, keepdim=True)
        if chosen.neutral_pcs is not None:
            pcs = chosen.neutral_pcs
            raw = raw - torch.einsum("lkp,lpd->lkd", torch.einsum("lpd,lkd->lkp", pcs, raw), pcs)
        chosen.vectors = raw.contiguous()
        chosen.metadata = {**chosen.metadata, "recentred_on": list(names)}
        return chosen

    def mean_norm(self, layer: int) -> float:
        if self.mean_norms is None:
            raise ValueError("this vector set has no mean residual norms, needed for relative strength; "
                             "use emovec.measure_mean_norms(model, vectors) or relative=False")
        return float(self.mean_norms[self.slice_of(layer)])

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
        """Write a safetensors file atomically (temporary file in the same folder, then rename).

        ``dtype=torch.float16`` halves the file (vectors, label means and neutral components; they load as fp32).
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"vectors": self.vectors.to(dtype).contiguous().cpu()}
        if self.mean_norms is not None:
            tensors["mean_norms"] = self.mean_norms.contiguous().cpu()
        if self.neutral_pcs is not None:
            tensors["neutral_pcs"] = self.neutral_pcs.to(dtype).contiguous().cpu()
        if self.label_means is not None:
            tensors["label_means"] = self.label_means.to(dtype).contiguous().cpu()
        for key, tensor in tensors.items():
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{key} does not fit in {str(dtype).replace('torch.', '')} (values overflow); save "
                                 "in float32")
        header = {
            "format": "emovec.VectorSet", "format_version": str(FORMAT_VERSION),
            "names": json.dumps(self.names), "layers": json.dumps(self.layers),
            "default_layer": json.dumps(self.default_layer), "metadata": json.dumps(self.metadata, default=str),
        }
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None) -> VectorSet:
        """Read a file written by :meth:`save`; with ``model``, check it matches (hidden size, layers, config)."""

        path = Path(path)
        if not path.exists():
            raise VectorFileError(f"vector file {path} does not exist; create one with `emovec extract --out {path}`")
        try:
            header, tensors = read_safetensors(path)
        except Exception as error:  # safetensors raises several types for corrupt files
            raise VectorFileError(f"{path} is not a readable safetensors file ({error}); it may be truncated or "
                                  "corrupt: extract the vectors again") from None
        if header.get("format") != "emovec.VectorSet" or "vectors" not in tensors:
            raise VectorFileError(f"{path} is a safetensors file but not an emovec vector file (no emovec header)")
        try:
            version = int(header.get("format_version", "0"))
        except ValueError:
            raise VectorFileError(f"{path} has a corrupt header: format_version {header['format_version']!r} is not "
                                  "a whole number; extract the vectors again") from None
        if version > FORMAT_VERSION:
            raise VectorFileError(f"{path} was written by a newer emovec (format {version}); upgrade emovec")
        try:
            names, layers, default_layer, metadata = _parse_header(header)
            for key, tensor in tensors.items():
                if not tensor.is_floating_point():
                    raise ValueError(f"tensor {key!r} has dtype {tensor.dtype}, not a float type")
            vs = cls(names, layers, tensors["vectors"], mean_norms=tensors.get("mean_norms"),
                     neutral_pcs=tensors.get("neutral_pcs"), default_layer=default_layer, metadata=metadata,
                     label_means=tensors.get("label_means"))
        except (KeyError, ValueError, TypeError) as error:
            raise VectorFileError(f"{path} has an inconsistent emovec header or tensors ({_one_line(error)}); "
                                  "extract the vectors again") from None
        if model is not None:
            vs.check_model(model, source=str(path))
        return vs

    def check_model(self, model: Any, source: str = "these vectors") -> None:
        """Raise VectorFileError when the vectors were not made for ``model`` (hidden size, layers, config hash)."""
        config = getattr(model, "config", None)
        if config is None:
            return
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
        problems = []
        if hidden is not None and hidden != self.hidden_size:
            problems.append(f"hidden size {self.hidden_size} != the model's {hidden}")
        if layers is not None and self.layers and max(self.layers) >= layers:
            problems.append(f"layers up to {max(self.layers)} but the model has {layers}")
        want = self.metadata.get("config_hash")
        if not problems and want and want != config_hash(config):
            problems.append(f"config hash {want} != the model's {config_hash(config)} "
                            f"(made for {self.metadata.get('model', 'another model')})")
        if problems:
            raise VectorFileError(f"{source} do not match this model: {'; '.join(problems)}. "
                                  "Extract vectors for this model with `emovec extract --model ...`")


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The header metadata and every tensor of a safetensors file (no pickle); raises what safetensors raises for
    a corrupt or truncated file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}, {key: handle.get_tensor(key) for key in handle.keys()}


def _parse_header(header: dict[str, str]) -> tuple[list[str], list[int], int | None, dict[str, Any]]:
    """names, layers, default_layer, metadata of a vector file's header, each checked for its type."""
    def field(key: str, default: str | None = None) -> Any:
        if key not in header and default is None:
            raise KeyError(f"missing field {key!r}")
        try:
            return json.loads(header.get(key, default))
        except json.JSONDecodeError:
            raise ValueError(f"field {key!r} is not valid JSON") from None

    names, layers = field("names"), field("layers")
    default_layer, metadata = field("default_layer", "null"), field("metadata", "{}")
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError("'names' must be a list of non-empty strings")
    if not isinstance(layers, list) or not all(type(x) is int and x >= 0 for x in layers) or \
            len(set(layers)) != len(layers):
        raise ValueError("'layers' must be a list of distinct non-negative integers")
    if default_layer is not None and type(default_layer) is not int:
        raise ValueError("'default_layer' must be an integer or null")
    if not isinstance(metadata, dict):
        raise ValueError(f"'metadata' must be a JSON object, got a {type(metadata).__name__}")
    return names, layers, default_layer, metadata


def _one_line(error: BaseException) -> str:
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    return " ".join(str(message).split())


def _ranges(values: Sequence[int]) -> str:
    values = sorted(values)
    if not values:
        return "none"
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(parts)
