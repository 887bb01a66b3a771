"""What one vLLM request asks of emovec, read from ``SamplingParams.extra_args`` (no vLLM import here).

The keys are flat strings and numbers, so the same settings travel through the OpenAI-compatible server's
``vllm_xargs`` (which accepts only str / int / float / lists of them) and through the offline API:

=======================  ==========================================================================================
``emovec_steer``         recipe ``"calm=0.05,desperate=-0.02"`` (or a dict offline): strength × the layer's mean
                         residual norm × the unit vector, as ``emovec steer``
``emovec_layers``        layers to steer (``"10-20"``, ``"15"``, ``"all"``); default: the vectors' default layer
``emovec_absolute``      1 / true: strength multiplies the unit vector instead (no mean norms)
``emovec_cap``           cosine caps ``"desperate<=0.02"`` (regulation, as ``emovec steer --cap``)
``emovec_floor``         cosine floors ``"calm>=0"``
``emovec_regulate_layers`` layers to regulate; default: the steered layers, else the default layer
``emovec_monitor``       concepts to read, ``"afraid,calm"`` or ``"all"``
``emovec_monitor_layers`` layers to read (default: the vectors' default layer)
``emovec_prompt``        1 / true: also read the prompt tokens (not only the tokens the model generates from)
``emovec_id``            a key of your own to fetch the readings with (default: the request id)
=======================  ==========================================================================================
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from emovec.layers import resolve_layer_indices
from emovec.vectors import VectorSet

KEYS = ("emovec_steer", "emovec_layers", "emovec_absolute", "emovec_cap", "emovec_floor", "emovec_regulate_layers",
        "emovec_monitor", "emovec_monitor_layers", "emovec_prompt", "emovec_id")


class SpecError(ValueError):
    """A request's emovec settings are malformed; the message says which key and how to write it."""


@dataclass
class RequestSpec:
    """One request's emovec settings, resolved against the served model's vectors."""

    steer: dict[str, float] = field(default_factory=dict)
    steer_layers: list[int] = field(default_factory=list)
    relative: bool = True
    bounds: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    regulate_layers: list[int] = field(default_factory=list)
    monitor: list[str] = field(default_factory=list)
    monitor_layers: list[int] = field(default_factory=list)
    monitor_index: list[int] = field(default_factory=list)  # positions of ``monitor`` in the vectors
    prompt: bool = False
    key: str | None = None
    # what the worker derives from the settings once (it reads them every step): a spec is not changed once parsed
    _derived: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def edits(self) -> bool:
        """Whether the request changes the residual stream (then its KV blocks are its own)."""
        return bool(self.steer) or bool(self.bounds)

    def edit_key(self) -> str:
        """A stable digest of everything that changes the residual stream (the prefix-cache salt)."""
        key = self._derived.get("edit_key")
        if key is None:
            data = {"steer": sorted(self.steer.items()), "layers": self.steer_layers, "relative": self.relative,
                    "bounds": sorted((k, list(v)) for k, v in self.bounds.items()),
                    "reg_layers": self.regulate_layers}
            key = self._derived["edit_key"] = hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]
        return key

    @property
    def edit_layers(self) -> list[int]:
        """The layers whose stream this request changes: steered, or regulated."""
        layers = self._derived.get("edit_layers")
        if layers is None:
            chosen = set(self.steer_layers if self.steer else []) | set(self.regulate_layers if self.bounds else [])
            layers = self._derived["edit_layers"] = sorted(chosen)
        return layers


def has_emovec(extra_args: Any) -> bool:
    """Any ``emovec_*`` key (a misspelt one too, so that it is refused rather than ignored)."""
    return isinstance(extra_args, dict) and any(isinstance(k, str) and k.startswith("emovec_") for k in extra_args)


def _truthy(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "0", "false", "no", ""):
        return value.strip().lower() in ("1", "true", "yes")
    raise SpecError(f"{key} must be true or false (1 / 0), got {value!r}")


def _terms(key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [t for t in re.split(r"[,\s]+", re.sub(r"\s*(<=|>=|=)\s*", r"\1", value)) if t]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [t for v in value for t in _terms(key, v)]
    raise SpecError(f"{key} must be a string such as 'calm=0.05,desperate=-0.02', got {value!r}")


def parse_recipe(value: Any, key: str = "emovec_steer") -> dict[str, float]:
    """``"calm=0.05,desperate=-0.02"`` (or a dict) -> {"calm": 0.05, "desperate": -0.02}."""
    if isinstance(value, dict):
        items = list(value.items())
    else:
        items = []
        for term in _terms(key, value):
            name, sep, number = term.rpartition("=")
            if not sep or not name:
                raise SpecError(f"bad term {term!r} in {key}: write NAME=STRENGTH, e.g. calm=0.05")
            items.append((name, number))
    recipe: dict[str, float] = {}
    for name, number in items:
        try:
            strength = float(number)
        except (TypeError, ValueError):
            raise SpecError(f"bad strength {number!r} for {name!r} in {key}: it must be a number") from None
        if not math.isfinite(strength):
            raise SpecError(f"bad strength {number!r} for {name!r} in {key}: it must be finite")
        if name in recipe:
            raise SpecError(f"{name!r} is given twice in {key}")
        recipe[str(name)] = strength
    return recipe


def parse_bounds(value: Any, op: str, key: str) -> dict[str, float]:
    """``"desperate<=0.02"`` (op "<=") -> {"desperate": 0.02}; cosines, so within (-1, 1)."""
    out: dict[str, float] = {}
    for term in _terms(key, value):
        match = re.fullmatch(r"([^<>=]+?)(<=|>=|=)([^<>=]+)", term)
        if not match or match.group(2) not in (op, "="):
            raise SpecError(f"bad term {term!r} in {key}: write NAME{op}COSINE, e.g. "
                            f"{'desperate<=0.02' if op == '<=' else 'calm>=0'}")
        try:
            bound = float(match.group(3))
        except ValueError:
            raise SpecError(f"bad bound {match.group(3)!r} in {key}: it must be a number (a cosine)") from None
        if not math.isfinite(bound) or not -1 < bound < 1:
            raise SpecError(f"bad bound {bound!r} in {key}: a cosine bound must lie strictly between -1 and 1")
        out[match.group(1)] = bound
    return out


def _layers(key: str, value: Any, num_layers: int, default: list[int]) -> list[int]:
    if value is None:
        return list(default)
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    try:
        return resolve_layer_indices(value if isinstance(value, str) else int(value), num_layers)
    except (ValueError, TypeError) as error:
        raise SpecError(f"{key}: {error}") from None


def parse(extra_args: dict[str, Any], vectors: VectorSet, num_layers: int) -> RequestSpec:
    """Read and check one request's emovec keys; raise SpecError with a one-line message on anything wrong."""
    unknown = [k for k in extra_args if k.startswith("emovec_") and k not in KEYS]
    if unknown:
        raise SpecError(f"unknown emovec setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(KEYS)}")
    default = [vectors.default_layer] if vectors.default_layer is not None else list(vectors.layers[-1:] or [0])
    spec = RequestSpec()
    spec.relative = not _truthy("emovec_absolute", extra_args.get("emovec_absolute", False))
    if "emovec_steer" in extra_args:
        spec.steer = parse_recipe(extra_args["emovec_steer"])
    spec.steer_layers = _layers("emovec_layers", extra_args.get("emovec_layers"), num_layers, default)
    caps = parse_bounds(extra_args["emovec_cap"], "<=", "emovec_cap") if "emovec_cap" in extra_args else {}
    floors = parse_bounds(extra_args["emovec_floor"], ">=", "emovec_floor") if "emovec_floor" in extra_args else {}
    for name in sorted(set(caps) | set(floors)):
        lo, hi = floors.get(name), caps.get(name)
        if lo is not None and hi is not None and lo > hi:
            raise SpecError(f"{name}: the floor {lo} is above the cap {hi}")
        spec.bounds[name] = (lo, hi)
    spec.regulate_layers = _layers("emovec_regulate_layers", extra_args.get("emovec_regulate_layers"), num_layers,
                                   spec.steer_layers if spec.steer else default)
    if "emovec_monitor" in extra_args:
        names = extra_args["emovec_monitor"]
        if isinstance(names, str) and names.strip().lower() == "all":
            spec.monitor = list(vectors.names)
        else:
            spec.monitor = _terms("emovec_monitor", names)
    spec.monitor_layers = _layers("emovec_monitor_layers", extra_args.get("emovec_monitor_layers"), num_layers, default)
    spec.prompt = _truthy("emovec_prompt", extra_args.get("emovec_prompt", False))
    key = extra_args.get("emovec_id")
    spec.key = None if key is None else str(key)
    if spec.steer and spec.relative and vectors.mean_norms is None:
        raise SpecError("relative strengths need the vectors' mean residual norms, which these vectors lack; "
                        "set emovec_absolute=1 or serve vectors with mean norms")
    try:
        for name in [*spec.steer, *spec.bounds]:
            vectors.index(name)
        spec.monitor_index = [vectors.index(name) for name in spec.monitor]
        for layer in set(spec.steer_layers if spec.steer else []) | set(spec.monitor_layers if spec.monitor else []) \
                | set(spec.regulate_layers if spec.bounds else []):
            vectors.slice_of(layer)
    except (KeyError, ValueError) as error:
        raise SpecError(str(error.args[0]) if error.args else str(error)) from None
    return spec
