"""emovec inside stock vLLM: per-request steering, regulation and monitoring, as a plugin (no fork, no patch).

Install emovec into vLLM's environment; vLLM finds the plugin by its ``vllm.general_plugins`` entry point and
loads it in every process. Requests ask for emovec through ``SamplingParams.extra_args`` (offline) or the
OpenAI-compatible server's ``vllm_xargs``; the keys are listed in :mod:`emovec.integrations.vllm.spec`, and
:func:`extra_args` writes them for you::

    from vllm import LLM, SamplingParams
    from emovec.integrations import vllm as ev

    llm = LLM(ev.model_path())                      # the default model as a standard Hugging Face folder
    params = SamplingParams(max_tokens=32, temperature=0,
                            extra_args=ev.extra_args(steer="calm=0.1", layers="10-20", monitor="afraid,calm"))
    outputs = llm.generate(["I just lost my job."], params)
    readings = ev.readings(llm, outputs)            # {request_id: Readings}, one per output

Readings of the server's requests come from a side endpoint, ``GET /emovec/readings/{id}`` (an endpoint plugin:
start the server with ``VLLM_PLUGINS=emovec,emovec-readings``); see the README. Set ``EMOVEC_VLLM=0`` to switch
the plugin off, ``EMOVEC_VECTORS=FILE`` to serve vectors other than the ones shipped for the model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from emovec.integrations.vllm.spec import KEYS, SpecError, has_emovec, parse_bounds, parse_recipe

log = logging.getLogger("emovec.vllm")

__all__ = ["Readings", "SpecError", "decoded", "extra_args", "fetch", "json_ready", "model_path", "readings", "register"]

SALT_PREFIX = "emovec:"


# ------------------------------------------------------------------------------------------- user API


def extra_args(steer: str | dict[str, float] | None = None, layers: str | int | None = None, *,
               absolute: bool = False, cap: str | None = None, floor: str | None = None,
               regulate_layers: str | int | None = None, monitor: str | list[str] | None = None,
               monitor_layers: str | int | None = None, prompt: bool = False, key: str | None = None) -> dict[str, Any]:
    """The ``extra_args`` of a SamplingParams that asks emovec for this (checked for form here; names and layers
    are checked against the served vectors in the worker, and a problem comes back with the readings)."""
    out: dict[str, Any] = {}
    if steer:
        recipe = parse_recipe(steer)
        out["emovec_steer"] = ",".join(f"{k}={v!r}" for k, v in recipe.items())
    if layers is not None:
        out["emovec_layers"] = str(layers)
    if absolute:
        out["emovec_absolute"] = 1
    if cap:
        parse_bounds(cap, "<=", "emovec_cap")
        out["emovec_cap"] = cap
    if floor:
        parse_bounds(floor, ">=", "emovec_floor")
        out["emovec_floor"] = floor
    if regulate_layers is not None:
        out["emovec_regulate_layers"] = str(regulate_layers)
    if monitor:
        out["emovec_monitor"] = monitor if isinstance(monitor, str) else ",".join(monitor)
    if monitor_layers is not None:
        out["emovec_monitor_layers"] = str(monitor_layers)
    if prompt:
        out["emovec_prompt"] = 1
    if key is not None:
        out["emovec_id"] = str(key)
    return out


@dataclass
class Readings:
    """One request's monitoring: ``scores[t, l, k]`` is the projection of the residual stream at ``positions[t]``
    onto concept ``names[k]`` at model layer ``layers[l]``; ``norms[t, l]`` the stream's norm there.

    Without ``prompt`` the first position is the last prompt token (the one that produces the first generated
    token), so row ``t`` belongs to generated token ``t``: the state the model was in when it wrote it."""

    names: list[str]
    layers: list[int]
    positions: np.ndarray
    scores: np.ndarray
    norms: np.ndarray
    prompt_len: int
    finished: bool
    recomputed: int = 0
    token_ids: list[int] | None = None

    @property
    def cosine(self) -> np.ndarray:
        return self.scores / np.maximum(self.norms[..., None], 1e-12)

    def series(self, name: str, layer: int | None = None) -> np.ndarray:
        """One concept's scores over the recorded positions (at ``layer``, default the first monitored layer)."""
        li = 0 if layer is None else self.layers.index(layer)
        return self.scores[:, li, self.names.index(name)]


def decoded(data: dict[str, Any]) -> dict[str, Any]:
    """A worker's readings of one request with ``scores`` ([T, layers, concepts]) and ``norms`` ([T, layers]) as
    float32 arrays and ``positions`` as int64 (the worker sends the arrays as bytes; an ``error`` entry is kept)."""
    if "error" in data:
        return dict(data)
    out = dict(data)
    layers, names = len(data["layers"]), len(data["names"])
    for key, shape in (("scores", (-1, layers, names)), ("norms", (-1, layers))):
        value = data[key]
        if isinstance(value, (bytes, bytearray, memoryview)):
            out[key] = np.frombuffer(value, dtype="<f4").astype(np.float32).reshape(shape)
        else:  # lists (readings as JSON, e.g. from the server's endpoint)
            out[key] = np.asarray(value, dtype=np.float32).reshape(shape)
    out["positions"] = np.asarray(data["positions"], dtype=np.int64)
    return out


def json_ready(data: dict[str, Any]) -> dict[str, Any]:
    """The same readings with every array as (nested) lists: what the server's endpoint answers."""
    out = decoded(data)
    for key in ("scores", "norms", "positions"):
        if key in out:
            out[key] = out[key].tolist()
    return out


def _readings_from(data: dict[str, Any]) -> Readings:
    if "error" in data:
        raise SpecError(data["error"])
    data = decoded(data)
    return Readings(data["names"], data["layers"], data["positions"], data["scores"], data["norms"],
                    int(data["prompt_len"]), bool(data["finished"]), int(data.get("recomputed", 0)))


def _merged(parts: Any) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        merged.update(part or {})
    return merged


def fetch(engine, keys: list[str] | None = None, pop: bool = True) -> dict[str, dict[str, Any]]:
    """The raw readings (JSON-ready dicts, each with its ``key``) of the requests with these keys, by vLLM's internal
    request id, from the engine's workers (all when None; see the worker's ``fetch`` for how keys match)."""
    return {k: json_ready(v) for k, v in _merged(engine.collective_rpc("emovec_readings", args=(keys, pop))).items()}


def readings(llm, outputs, pop: bool = True) -> dict[str, Readings]:
    """``{request_id: Readings}`` for the monitored requests among ``outputs`` (``llm.generate``'s result); with
    n > 1 samples, ``{f"{i}_{request_id}": Readings}`` for sample i. A request whose emovec settings were refused in
    the worker raises :class:`SpecError` with its message."""
    wanted = {str(o.request_id): o for o in outputs}
    out: dict[str, Readings] = {}
    for data in _merged(llm.collective_rpc("emovec_readings", args=(list(wanted), pop))).values():
        request = data["request"]
        head, sep, rest = request.partition("_")
        if request in wanted:
            output, sample = wanted[request], 0
        elif sep and head.isdigit() and rest in wanted:  # vLLM names sample i of request R "i_R"
            output, sample = wanted[rest], int(head)
        else:
            continue
        r = _readings_from(data)
        completion = output.outputs[sample] if len(output.outputs) > sample else None
        ids = list(output.prompt_token_ids or []) + (list(completion.token_ids) if completion is not None else [])
        r.token_ids = [ids[p] for p in r.positions if p < len(ids)]
        out[request] = r
    return out


def model_path(name: str | None = None) -> str:
    """The folder vLLM loads emovec's default model from (converted once from the packaged GGUF, then cached)."""
    from emovec.models import DEFAULT_MODEL, _gguf_model_folder

    return str(_gguf_model_folder(name or DEFAULT_MODEL))


# ------------------------------------------------------------------------------------------- the plugin


_registered = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point: runs in every vLLM process, before any model is built."""
    global _registered
    if _registered or os.environ.get("EMOVEC_VLLM", "1") == "0":
        return
    _registered = True
    _patch_workers()
    _patch_requests()
    _patch_validation()


def _wrap_load_model(cls) -> None:
    original = cls.__dict__.get("load_model")
    if original is None or getattr(original, "_emovec", False):
        return

    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        runner = getattr(self, "model_runner", None)
        if runner is not None and getattr(runner, "emovec", None) is None and getattr(runner, "model", None) is not None:
            from emovec.integrations.vllm.worker import install

            install(runner)
        return result

    load_model._emovec = True
    cls.load_model = load_model


def _patch_workers() -> None:
    """Wrap every worker class's ``load_model`` (those defined already and those defined later) and give workers
    the ``emovec_readings`` RPC."""
    from vllm.v1.worker.worker_base import WorkerBase

    from emovec.integrations.vllm.worker import fetch_readings, status

    WorkerBase.emovec_readings = fetch_readings
    WorkerBase.emovec_status = status
    stack = list(WorkerBase.__subclasses__())
    while stack:
        cls = stack.pop()
        _wrap_load_model(cls)
        stack.extend(cls.__subclasses__())
    previous = WorkerBase.__dict__.get("__init_subclass__")

    def __init_subclass__(cls, **kwargs):
        if previous is not None:
            previous.__func__(cls, **kwargs)
        else:
            super(WorkerBase, cls).__init_subclass__(**kwargs)
        _wrap_load_model(cls)

    WorkerBase.__init_subclass__ = classmethod(__init_subclass__)


def _patch_requests() -> None:
    """In the engine core: a request that changes the residual stream gets a prefix-cache salt from its settings,
    so it never reuses KV blocks computed without them (nor another setting's); a request that reads its prompt
    gets a salt of its own, so its prompt is computed (and read) rather than taken from the cache."""
    from vllm.v1.request import Request

    original = Request.__dict__["from_engine_core_request"].__func__
    if getattr(original, "_emovec", False):
        return

    def from_engine_core_request(cls, request, *args, **kwargs):
        salt = _salt(getattr(request.sampling_params, "extra_args", None), request.request_id)
        if salt is not None:
            request.cache_salt = (request.cache_salt or "") + salt
        return original(cls, request, *args, **kwargs)

    from_engine_core_request._emovec = True
    Request.from_engine_core_request = classmethod(from_engine_core_request)


def _patch_validation() -> None:
    """In the process that takes requests (the API server, or the offline LLM's): check each request's emovec
    settings against the served vectors before it is queued, so a bad one is refused with its reason (HTTP 400)
    instead of running without them."""
    try:
        from vllm.v1.engine.input_processor import InputProcessor
    except ImportError:  # another vLLM layout: the worker still checks and reports with the readings
        log.warning("emovec: vLLM's InputProcessor was not found; emovec settings are checked in the worker only")
        return
    original = InputProcessor.__dict__.get("_validate_params")
    if original is None or getattr(original, "_emovec", False):
        return

    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        extra = getattr(params, "extra_args", None)
        if has_emovec(extra):
            from emovec.integrations.vllm.spec import parse
            from emovec.integrations.vllm.worker import find_vectors

            hf_config = self.model_config.hf_config
            try:
                if "_emovec_vectors" not in self.__dict__:  # found (or not) once per server
                    try:
                        self._emovec_vectors = find_vectors(hf_config)
                    except Exception as error:  # noqa: BLE001 - every request is refused with the same reason
                        self._emovec_vectors = SpecError(f"no emovec vectors for this model ({error})")
                if isinstance(self._emovec_vectors, SpecError):
                    raise self._emovec_vectors
                layers = getattr(hf_config, "num_hidden_layers", None) or hf_config.get_text_config().num_hidden_layers
                spec = parse(extra, self._emovec_vectors, int(layers))
                if spec.monitor and getattr(self.vllm_config, "speculative_config", None) is not None:
                    raise SpecError("monitoring is not supported with speculative decoding (draft tokens that are "
                                    "rejected would leave readings at wrong positions)")
            except SpecError as error:
                raise _refused(str(error)) from None
        return result

    _validate_params._emovec = True
    InputProcessor._validate_params = _validate_params


def _refused(message: str) -> Exception:
    """vLLM answers its validation errors with HTTP 400 (other exceptions are 500s); this one is also a SpecError
    (a ValueError) for offline callers."""
    from vllm.exceptions import VLLMValidationError

    class EmovecSettingsError(VLLMValidationError, SpecError):
        pass

    return EmovecSettingsError(f"emovec: {message}")


def _salt(extra: Any, request_id: str) -> str | None:
    if not has_emovec(extra):
        return None
    from emovec.integrations.vllm.spec import _truthy

    parts = []
    edits = {k: extra[k] for k in KEYS if k in extra and k not in ("emovec_monitor", "emovec_monitor_layers",
                                                                    "emovec_prompt", "emovec_id")}
    if "emovec_steer" in edits or "emovec_cap" in edits or "emovec_floor" in edits:
        parts.append(repr(sorted(edits.items())))
    try:
        if _truthy("emovec_prompt", extra.get("emovec_prompt", False)):
            parts.append(request_id)
    except SpecError:
        pass
    return SALT_PREFIX + "|".join(parts) if parts else None
