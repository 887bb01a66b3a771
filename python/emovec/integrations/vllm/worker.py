"""The worker side of the vLLM plugin: runs in the process that holds the model.

At load time every decoder layer's ``forward`` gets a wrapper that calls one opaque ``torch.library`` op,
``emovec::vllm_layer``, on the layer's output. Dynamo traces the wrapper into vLLM's compiled graph as a single
node, so it works in eager and compiled mode alike, and its body decides at run time what to do.

Per step, before the model runs (``_model_forward``), the host reads the batch layout the runner has already
built (requests in batch order, ``query_start_loc``, computed-token counts) and writes, into preallocated
buffers, one slot per token row per layer (-1: untouched). Each distinct steering setting is one row of a
per-layer table (refcounted by the requests that use it, written once, reused). Inside the forward pass the op
only reads those buffers: no host synchronisation. After the step the monitored rows' scores are copied out.

Without CUDA graphs the op's body skips the layers no request in the step needs, and does nothing at all in a
step without emovec requests. Under CUDA graphs (the graph-safe way) every buffer has a fixed size and address
and every layer always runs the op (all slots -1 when nothing is asked: rows untouched), because a replayed graph
repeats exactly the kernels it captured; the host only rewrites the buffers' contents between replays.

Llama-family layers in vLLM return ``(hidden_states, residual)`` whose sum is the residual stream emovec reads.
On the CPU, while no running request has bounds (and not the graph-safe way), steering adds each edited row's
vector to ``hidden`` (the next layer's fused add sees the steered sum) and monitoring projects ``hidden +
residual``, summed in the kept copy of the rows at a decode step: no torch op per layer (``_apply_cpu``).
Otherwise a layer with edits computes ``x = hidden + residual``, runs the fused op on ``x`` (steer, regulate,
project), and for the edited rows only stores ``x`` as the residual and zero as the hidden part, so the next
layer's fused add sees exactly ``x``. Either way rows of requests without emovec settings are not written at all
(bit-identical to plain vLLM), and layers that only monitor write nothing back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emovec import _ext
from emovec.integrations.vllm.spec import RequestSpec, SpecError, has_emovec, parse
from emovec.ops import cpu_steering_call, steer_project_trusted
from emovec.runtime import DEFER_MAX_ROWS, DEFER_WINDOW_ROWS, steering_vector
from emovec.vectors import VectorSet, config_hash

log = logging.getLogger("emovec.vllm")

MAX_KEPT = int(os.environ.get("EMOVEC_VLLM_MAX_KEPT", "4096"))  # requests whose readings wait to be fetched
# under CUDA graphs the buffers have fixed sizes: distinct settings running at once, and bounded concepts
MAX_SETTINGS = int(os.environ.get("EMOVEC_VLLM_MAX_SETTINGS", "32"))
MAX_CLAMP = int(os.environ.get("EMOVEC_VLLM_MAX_CLAMP", "8"))
# fp32 models on the CPU: monitored layers read their probes in bf16 (half the bytes; a cosine moves by at most
# 2^-9), as emovec.monitor(bf16_probes=True) does. Off by default: readings would change in their third digit.
# EMOVEC_VLLM_BF16_DOTS=1: the rows rounded to bf16 too, dotted in AVX-512 bf16 instructions (a cosine moves by at
# most ~2^-8; norms exact), as emovec.monitor(bf16_dots=True) does; implies EMOVEC_VLLM_BF16_PROBES=1.
BF16_DOTS = os.environ.get("EMOVEC_VLLM_BF16_DOTS", "0") == "1"
BF16_PROBES = os.environ.get("EMOVEC_VLLM_BF16_PROBES", "0") == "1" or BF16_DOTS

_PLUGINS: list[_Plugin] = []  # one per model runner in this process (the op names its runner's by index)


# Defined with the low-level library API, as emovec::steer_project is (see emovec.ops): torch.library.custom_op's
# per-call bookkeeping costs ~17 us even when the plugin has nothing to do, 30 times a step in compiled vLLM.
_LIBRARY = torch.library.Library("emovec", "FRAGMENT")
_LIBRARY.define("vllm_layer(Tensor(a!) hidden, Tensor(b!) residual, int layer, int plugin) -> ()")
_LIBRARY.define("vllm_layer_single(Tensor(a!) hidden, int layer, int plugin) -> ()")


def vllm_layer(hidden: torch.Tensor, residual: torch.Tensor, layer: int, plugin: int) -> None:
    """Apply this step's emovec work for decoder layer ``layer`` to its output (hidden + residual)."""
    runner_plugin = _PLUGINS[plugin]
    if runner_plugin.active:
        runner_plugin.apply(hidden, residual, layer)


def vllm_layer_single(hidden: torch.Tensor, layer: int, plugin: int) -> None:
    """The same for layers whose output is the residual stream itself (no separate residual)."""
    runner_plugin = _PLUGINS[plugin]
    if runner_plugin.active:
        runner_plugin.apply(hidden, None, layer)


_LIBRARY.impl("vllm_layer", vllm_layer, "CompositeExplicitAutograd")
_LIBRARY.impl("vllm_layer_single", vllm_layer_single, "CompositeExplicitAutograd")


@torch.library.register_fake("emovec::vllm_layer", lib=_LIBRARY)
def _(hidden, residual, layer, plugin) -> None:
    return None


@torch.library.register_fake("emovec::vllm_layer_single", lib=_LIBRARY)
def _(hidden, layer, plugin) -> None:
    return None


# ----------------------------------------------------------------------------------------- vectors


def find_vectors(hf_config: Any) -> VectorSet:
    """The vectors to serve with: ``EMOVEC_VECTORS`` (a file from ``emovec extract``), else the vectors shipped
    with emovec for this model (matched by its config)."""
    from emovec import corpus

    class _Model:  # VectorSet.load checks a file against anything with a ``config``
        config = hf_config

    path = os.environ.get("EMOVEC_VECTORS")
    if path:
        return VectorSet.load(path, model=_Model)
    want = config_hash(hf_config)
    from safetensors import safe_open

    for candidate in sorted(Path(corpus.data_path("vectors")).glob("*.safetensors")):
        with safe_open(str(candidate), framework="pt") as f:  # the header only: the tensors load once, below
            metadata = json.loads((f.metadata() or {}).get("metadata", "{}"))
        if metadata.get("config_hash") == want:
            return VectorSet.load(candidate, model=_Model)
    raise SpecError("emovec has no shipped vectors for the served model: set EMOVEC_VECTORS to a vector file "
                    "made with `emovec extract` for it, in the environment that starts vLLM")


# ----------------------------------------------------------------------------------------- readings


@dataclass
class _Readings:
    """What one request's monitoring recorded, in chunks (a recomputed position overrides the earlier one)."""

    key: str  # the caller's key: emovec_id, or the request id the caller gave
    request: str  # the request id the caller gave (vLLM's internal id without its random suffix)
    names: list[str]
    layers: list[int]
    prompt_len: int
    # (position of the first row, scores [rows, layers, concepts], norms [rows, layers]): consecutive positions
    chunks: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list)
    error: str | None = None
    finished: bool = False
    recomputed: int = 0  # positions read again (the request was preempted and its tokens recomputed)
    last: int = -1

    def export(self) -> dict[str, Any]:
        if self.error is not None:
            return {"key": self.key, "request": self.request, "error": self.error}
        if self.chunks:
            pos = np.concatenate([np.arange(c[0], c[0] + len(c[1]), dtype=np.int64) for c in self.chunks])
            scores = np.concatenate([c[1] for c in self.chunks])
            norms = np.concatenate([c[2] for c in self.chunks])
            # the last write of a position wins (preemption recomputes it), then order by position
            order = np.argsort(pos, kind="stable")
            pos, scores, norms = pos[order], scores[order], norms[order]
            last = np.r_[pos[1:] != pos[:-1], True]
            pos, scores, norms = pos[last], scores[last], norms[last]
        else:
            pos = np.zeros(0, dtype=np.int64)
            scores = np.zeros((0, len(self.layers), len(self.names)), dtype=np.float32)
            norms = np.zeros((0, len(self.layers)), dtype=np.float32)
        # the arrays travel as little-endian float32 bytes: vLLM's RPC carries bytes as they are, while lists of
        # Python floats cost ~60 ms per request of 64 tokens x 30 layers x 171 to build, send and read back
        # (emovec.integrations.vllm.decoded turns them back into arrays, json_ready into lists)
        return {"key": self.key, "request": self.request, "names": self.names, "layers": self.layers,
                "prompt_len": self.prompt_len, "positions": pos.tolist(),
                "scores": np.ascontiguousarray(scores, dtype="<f4").tobytes(),
                "norms": np.ascontiguousarray(norms, dtype="<f4").tobytes(),
                "finished": self.finished, "recomputed": self.recomputed}


# ----------------------------------------------------------------------------------------- the plugin


class _Plugin:
    """Per model runner: the layer wrappers' shared state, rebuilt on the host each step."""

    def __init__(self, runner, num_layers: int, graph_safe: bool = False) -> None:
        self.runner = runner
        self.num_layers = num_layers
        self.device = runner.device
        self.dtype = runner.model_config.dtype
        self.max_tokens = int(runner.max_num_tokens)
        self._vectors: VectorSet | None = None
        self._vectors_error: str | None = None
        self.specs: dict[str, RequestSpec | None] = {}
        self.readings: OrderedDict[str, _Readings] = OrderedDict()
        self.recipe_rows: dict[str, int] = {}  # edit key -> table row
        self.recipe_refs: dict[str, set[str]] = {}
        self.recipe_specs: dict[str, RequestSpec] = {}
        self.free_rows: list[int] = []
        self.clamp_names: list[str] = []
        self.active = False
        self.layer_edit = [False] * self.num_layers
        self.layer_monitor = [False] * self.num_layers
        self._slots_host = np.full((self.num_layers, self.max_tokens), -1, dtype=np.int64)
        self._slots = None
        self._tables: list[torch.Tensor] | None = None
        self._clamp: list[torch.Tensor] = []
        self._bounds: list[torch.Tensor] = []
        self._probes: dict[int, torch.Tensor] = {}
        self._scores: dict[int, torch.Tensor] = {}
        self._norms: dict[int, torch.Tensor] = {}
        self._monitored: list[tuple[str, RequestSpec, int, int, int]] = []
        self._row_cache: dict[str, dict[int, torch.Tensor]] = {}
        self.layer_full = [False] * self.num_layers  # every row of the step is edited at this layer
        self._rows = 0
        self._copied = 0  # columns of the device slot buffer written last step
        self._x: torch.Tensor | None = None
        # monitored layers on the CPU: a call prepared once per layer and h dtype (emovec._C.CpuCall), run with
        # only the step's rows and addresses (the general call's Python costs several times more inside a forward
        # pass that streams the weights through the caches)
        self._calls: dict[tuple[int, torch.dtype], Any] = {}
        self._probes_bf16: dict[int, torch.Tensor] = {}  # with EMOVEC_VLLM_BF16_PROBES=1, kept like the calls
        # a decode step's monitored layers run together when the last one's rows arrive (emovec._C.CpuLayers, as
        # emovec.monitor does): per step, the position of each such layer in its group, or None
        self._groups: dict[tuple[tuple[int, ...], torch.dtype], Any] = {}
        self._group_layers: tuple[int, ...] = ()
        self._group: Any = None
        # ... and keeps the rows of several decode steps (up to DEFER_WINDOW_ROWS per layer) before projecting them,
        # as emovec.monitor does: such a step writes the record's rows from _base on, and its readings are collected
        # once its group has run (`_pending`: the steps waiting, (base, rows, monitored requests, layers))
        self._base = 0
        self._pending: list[tuple[int, int, list, list[int]]] = []
        self._pending_group: Any = None
        self._pending_key: tuple[int, ...] = ()  # the layers of the group holding the kept rows (none: ())
        self._group_rows = 0  # the most rows a layer of this step's group took
        self._threads = 1
        self._record: tuple[torch.Tensor, torch.Tensor] | None = None  # CPU: scores [tokens, columns, K], norms
        self._columns: dict[int, int] = {}  # layer -> its column of the record
        self._steer_calls: dict[tuple[int, torch.dtype], tuple[torch.Tensor, Any]] = {}  # see cpu_steering_call
        self._indices: dict[tuple[int, ...], np.ndarray] = {}
        self.graph_safe = graph_safe
        self.disabled = False
        if graph_safe:
            try:
                self._allocate_for_graphs()
            except SpecError as error:  # no vectors for this model: serve as plain vLLM (requests are refused)
                log.warning("emovec: %s; the plugin is off", error)
                self.disabled, self.active = True, False

    def _allocate_for_graphs(self) -> None:
        """Under CUDA graphs the captured kernels replay with the buffers they were captured with, whatever the
        step holds: so every buffer is allocated once at its largest size, every layer always runs the op (slots
        all -1 when no request asks for anything: rows untouched, bit for bit), and per-step state is written into
        the buffers before the replay."""
        vs = self.vectors()
        d, k = vs.hidden_size, len(vs.names)
        self._tables = [torch.zeros(MAX_SETTINGS, d, device=self.device) for _ in range(self.num_layers)]
        self._clamp = [torch.zeros(MAX_CLAMP, d, device=self.device) for _ in range(self.num_layers)]
        self._bounds = []
        for _ in range(self.num_layers):
            b = torch.empty(MAX_SETTINGS, MAX_CLAMP, 2, device=self.device)
            b[..., 0], b[..., 1] = -float("inf"), float("inf")
            self._bounds.append(b)
        self._slots = torch.full((self.num_layers, self.max_tokens), -1, dtype=torch.int64, device=self.device)
        self._x = torch.empty(self.max_tokens, d, dtype=self.dtype, device=self.device)
        for layer in range(self.num_layers):
            if vs.covers(layer):
                self._probes[layer] = self._unit()[vs.slice_of(layer)].to(self.device).contiguous()
            else:
                self._probes[layer] = torch.zeros(k, d, device=self.device)
            self._scores[layer] = torch.zeros(self.max_tokens, k, device=self.device)
            self._norms[layer] = torch.zeros(self.max_tokens, device=self.device)
        self.layer_edit = [True] * self.num_layers
        self.layer_monitor = [True] * self.num_layers
        self.active = True

    # -- vectors and requests ---------------------------------------------------------------------

    def vectors(self) -> VectorSet:
        if self._vectors is None:
            if self._vectors_error is not None:
                raise SpecError(self._vectors_error)
            try:
                vs = find_vectors(self.runner.model_config.hf_config)
            except Exception as error:  # noqa: BLE001 - any failure is reported per request, never kills the engine
                self._vectors_error = str(error)
                raise SpecError(self._vectors_error) from None
            self._vectors = vs
        return self._vectors

    def _spec(self, req_id: str) -> RequestSpec | None:
        if req_id in self.specs:
            return self.specs[req_id]
        state = self.runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        extra = getattr(params, "extra_args", None)
        spec = None
        if has_emovec(extra):
            key = str(extra.get("emovec_id", _external(req_id)))
            try:
                spec = parse(extra, self.vectors(), self.num_layers)
                spec.key = key
                if spec.monitor and getattr(self.runner, "speculative_config", None) is not None:
                    raise SpecError("monitoring is not supported with speculative decoding (draft tokens that are "
                                    "rejected would leave readings at wrong positions)")
                if spec.edits:
                    self._acquire(req_id, spec)
            except SpecError as error:
                log.warning("emovec: request %s: %s (the request runs without emovec)", req_id, error)
                self._keep(req_id, _Readings(key, _external(req_id), [], [], 0, error=str(error), finished=True))
                spec = None
            if spec is not None and spec.monitor:
                prompt_len = len(getattr(state, "prompt_token_ids", None) or [])
                self._keep(req_id, _Readings(key, _external(req_id), list(spec.monitor), list(spec.monitor_layers),
                                             prompt_len))
        self.specs[req_id] = spec
        return spec

    def _keep(self, req_id: str, readings: _Readings) -> None:
        """Readings are stored by vLLM's internal request id (unique, unlike the keys callers choose)."""
        self.readings[req_id] = readings
        self.readings.move_to_end(req_id)
        while len(self.readings) > MAX_KEPT:  # drop the oldest finished request's first, a running one's last
            oldest = next((r for r, v in self.readings.items() if v.finished), next(iter(self.readings)))
            log.warning("emovec: more than %d requests' readings wait to be fetched; dropping %s's", MAX_KEPT, oldest)
            del self.readings[oldest]

    def _forget_finished(self) -> None:
        gone = [r for r in self.specs if r not in self.runner.requests]
        for req_id in gone:
            spec = self.specs.pop(req_id)
            if spec is None:
                continue
            if spec.edits:
                self._release(req_id, spec)
            if spec.monitor and req_id in self.readings:
                self.readings[req_id].finished = True

    # -- steering / regulation table ----------------------------------------------------------------

    def _acquire(self, req_id: str, spec: RequestSpec) -> None:
        key = spec.edit_key()
        if key not in self.recipe_rows:
            if self.graph_safe:
                if not self.free_rows and len(self.recipe_rows) >= MAX_SETTINGS:
                    raise SpecError(f"more than {MAX_SETTINGS} different emovec settings are running at once (the "
                                    "CUDA-graph buffers' size): retry later, or start vLLM with a larger "
                                    "EMOVEC_VLLM_MAX_SETTINGS")
                if len(set(self.clamp_names) | set(spec.bounds)) > MAX_CLAMP:
                    raise SpecError(f"more than {MAX_CLAMP} different concepts are bounded at once: start vLLM with "
                                    "a larger EMOVEC_VLLM_MAX_CLAMP")
            row = self.free_rows.pop() if self.free_rows else len(self.recipe_rows)
            self._ensure_rows(row + 1)
            self.recipe_rows[key] = row
            self.recipe_refs[key] = set()
            self.recipe_specs[key] = spec
            if any(n not in self.clamp_names for n in spec.bounds):
                self._set_clamp_names(set(self.clamp_names) | set(spec.bounds))
            else:
                self._write_row(row, spec)
        self.recipe_refs[key].add(req_id)

    def _release(self, req_id: str, spec: RequestSpec) -> None:
        key = spec.edit_key()
        refs = self.recipe_refs.get(key)
        if refs is None:
            return
        refs.discard(req_id)
        if not refs:
            self.free_rows.append(self.recipe_rows.pop(key))
            del self.recipe_refs[key]
            del self.recipe_specs[key]
            live = {n for other in self.recipe_specs.values() for n in other.bounds}
            if live != set(self.clamp_names):  # a concept no running request bounds any more: its column goes
                self._set_clamp_names(live)

    def _set_clamp_names(self, names: set[str]) -> None:
        """Clamp directions apply one after another, in alphabetical order of the concepts (as a request's own
        bounds are ordered); changing the set changes every row's bounds layout, so every row is rewritten."""
        self.clamp_names = sorted(names)
        self._build_clamp()
        for key, row in self.recipe_rows.items():
            self._write_row(row, self.recipe_specs[key])

    def _ensure_rows(self, rows: int) -> None:
        d = self.vectors().hidden_size
        have = 0 if self._tables is None else self._tables[0].shape[0]
        if rows <= have:  # always so under CUDA graphs (MAX_SETTINGS rows, checked before)
            return
        size = max(rows, 2 * have, 4)
        # fp32 like the probes and clamp directions: the C++ kernels take every weight of a call in one dtype
        tables = [torch.zeros(size, d, device=self.device) for _ in range(self.num_layers)]
        bounds = [torch.empty(size, len(self.clamp_names), 2, dtype=torch.float32, device=self.device)
                  for _ in range(self.num_layers)]
        for b in bounds:
            b[..., 0], b[..., 1] = -float("inf"), float("inf")
        if self._tables is not None:
            for new, old in zip(tables, self._tables):
                new[:have] = old
            for new, old in zip(bounds, self._bounds):
                new[:have] = old
        self._tables, self._bounds = tables, bounds

    def _build_clamp(self) -> None:
        """Directions for every concept any request has bounded so far (bounds are ±inf for the others)."""
        vs = self.vectors()
        names = self.clamp_names
        if self.graph_safe:  # fixed buffers: directions written in place, unused ones zero (never bind)
            for layer in range(self.num_layers):
                self._clamp[layer].zero_()
                if vs.covers(layer) and names:
                    self._clamp[layer][: len(names)] = self._unit()[vs.slice_of(layer)][[vs.index(n) for n in names]]
                self._bounds[layer][..., 0], self._bounds[layer][..., 1] = -float("inf"), float("inf")
            return
        self._clamp = []
        for layer in range(self.num_layers):
            if vs.covers(layer):
                self._clamp.append(self._unit()[vs.slice_of(layer)][[vs.index(n) for n in names]].to(self.device).contiguous())
            else:
                self._clamp.append(torch.zeros(len(names), vs.hidden_size, device=self.device))
        if self._tables is None:
            return
        rows = self._tables[0].shape[0]
        self._bounds = []
        for _ in range(self.num_layers):  # rewritten row by row by the caller
            b = torch.empty(rows, len(names), 2, dtype=torch.float32, device=self.device)
            b[..., 0], b[..., 1] = -float("inf"), float("inf")
            self._bounds.append(b)

    def _steering_rows(self, spec: RequestSpec) -> dict[int, torch.Tensor]:
        """Each steered layer's vector for this setting (remembered: a setting that comes back costs nothing)."""
        key = spec.edit_key()
        rows = self._row_cache.get(key)
        if rows is None:
            vs = self.vectors()
            view = dataclasses.replace(vs, vectors=self._unit())  # unit vectors computed once, not per layer
            rows = {layer: steering_vector(view, spec.steer, layer, relative=spec.relative, raw=True)
                    .to(device=self.device) for layer in spec.steer_layers} if spec.steer else {}
            self._row_cache[key] = rows
            while len(self._row_cache) > 256:
                self._row_cache.pop(next(iter(self._row_cache)))
        return rows

    def _unit(self) -> torch.Tensor:
        return self.vectors().unit  # normalised once: the VectorSet keeps it

    def _write_row(self, row: int, spec: RequestSpec) -> None:
        steering = self._steering_rows(spec)
        for layer in range(self.num_layers):
            if layer in steering:
                self._tables[layer][row] = steering[layer]
            else:
                self._tables[layer][row] = 0
            self._bounds[layer][row, :, 0] = -float("inf")
            self._bounds[layer][row, :, 1] = float("inf")
            if spec.bounds and layer in spec.regulate_layers:
                for name, (lo, hi) in spec.bounds.items():
                    c = self.clamp_names.index(name)
                    if lo is not None:
                        self._bounds[layer][row, c, 0] = lo
                    if hi is not None:
                        self._bounds[layer][row, c, 1] = hi

    # -- per step -------------------------------------------------------------------------------------

    def begin_step(self) -> None:
        if self.disabled:
            return
        runner = self.runner
        batch = runner.input_batch
        req_ids = list(batch.req_ids)
        self._forget_finished()
        specs = [self._spec(r) for r in req_ids]
        self.active = self.graph_safe or any(s is not None for s in specs)
        if not self.active:
            return
        num_reqs = len(req_ids)
        qsl = runner.query_start_loc.np[: num_reqs + 1].astype(np.int64)
        computed = batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64)
        n = int(qsl[num_reqs])
        slots = self._slots_host
        slots[:, : max(n, self._copied, 1)] = -1  # also last step's columns, which are copied again below
        self._monitored = []
        self._threads = torch.get_num_threads()
        edited: set[int] = set()
        watched_set: set[int] = set()
        bounds = qsl.tolist()
        for i, spec in enumerate(specs):
            if spec is None:
                continue
            start, end = bounds[i], bounds[i + 1]
            if spec.edits:
                layers = spec.edit_layers
                if layers:
                    slots[self._index(layers), start:end] = self.recipe_rows[spec.edit_key()]
                    edited.update(layers)
            if spec.monitor:
                watched_set.update(spec.monitor_layers)
                self._monitored.append((req_ids[i], spec, start, end, int(computed[i])))
        if not self.graph_safe:
            self.layer_edit = [layer in edited for layer in range(self.num_layers)]
            self.layer_monitor = [layer in watched_set for layer in range(self.num_layers)]
        self._rows = n
        # a few rows (decode) and several monitored layers on the CPU: their projections run together at the last
        # (each layer's rows are copied when they arrive, edited if the layer edits them)
        watched = tuple(layer for layer in range(self.num_layers) if self.layer_monitor[layer])
        self._group_layers = (watched if self.device.type == "cpu" and not self.graph_safe and watched
                              and (len(watched) > 1 or self._window_rows() > 0) and n <= DEFER_MAX_ROWS
                              and _ext.has_cpp_library else ())
        self._group = None
        new = [layer for layer in watched if layer not in self._probes]
        if self._pending and (not self._group_layers or new or self._group_layers != self._pending_key
                              or self._base + n > self._window_rows()):
            self._settle()  # the kept steps' rows reach the record before it is written from row 0 or regrown
        # the in-place path for fully edited layers is a Python decision per step: never under CUDA graphs
        if self.graph_safe or not any(self.layer_edit):
            self.layer_full = [False] * self.num_layers
        else:
            every = (slots[:, :n] >= 0).all(axis=1).tolist()
            self.layer_full = [e and f for e, f in zip(self.layer_edit, every)]
        if self._slots is None:
            self._slots = torch.full((self.num_layers, self.max_tokens), -1, dtype=torch.int64, device=self.device)
        if self.device.type == "cpu" and not self.graph_safe:
            self._slots = torch.from_numpy(slots)
        else:
            # also the columns written last step, so a padded row never keeps an old slot (synchronous: the host
            # buffer is reused next step)
            width = min(max(n, self._copied), self.max_tokens)
            self._slots[:, :width].copy_(torch.from_numpy(slots[:, :width]))
            self._copied = n
        if new:
            vs = self.vectors()
            for layer in new:
                self._probes[layer] = self._unit()[vs.slice_of(layer)].to(self.device).contiguous()
                if self.device.type != "cpu":
                    self._scores[layer] = torch.zeros(self.max_tokens, len(vs.names), device=self.device)
                    self._norms[layer] = torch.zeros(self.max_tokens, device=self.device)
            if self.device.type == "cpu":
                self._grow_record(new, len(vs.names))

    def _grow_record(self, layers: list[int], k: int) -> None:
        """On the CPU each monitored layer writes a column of one record [tokens, columns, K] (and norms
        [tokens, columns]), so that a step's readings are one slice of it, not 30 buffers stacked. Columns go to
        layers in the order they are first monitored: the record holds as many as layers were ever monitored (the
        memory of one buffer per such layer). It only holds the current step's rows, so growing starts it afresh."""
        for layer in layers:
            self._columns[layer] = len(self._columns)
        width = len(self._columns)
        self._record = (torch.zeros(self.max_tokens, width, k), torch.zeros(self.max_tokens, width))
        for layer, column in self._columns.items():
            self._scores[layer], self._norms[layer] = self._record[0][:, column], self._record[1][:, column]

    def _index(self, layers: list[int]) -> np.ndarray:
        """Layer indices as an array, to write a request's slot at all its layers in one assignment."""
        key = tuple(layers)
        index = self._indices.get(key)
        if index is None:
            if len(self._indices) > 1024:
                self._indices.clear()
            index = self._indices[key] = np.asarray(layers, dtype=np.int64)
        return index

    def apply(self, hidden: torch.Tensor, residual: torch.Tensor | None, layer: int) -> None:
        edit, watch = self.layer_edit[layer], self.layer_monitor[layer]
        if not (edit or watch):
            return
        rows = hidden.shape[0]
        if residual is not None and not self.clamp_names and self._prepared(hidden) and residual.stride(-1) == 1:
            self._apply_cpu(hidden, residual, layer, edit, watch, rows)
            return
        full = self.layer_full[layer] and rows == self._rows
        if residual is None:
            x = hidden
        elif full:  # every row is edited: the sum becomes the residual in place, no scratch, no masks
            residual.add_(hidden)
            hidden.zero_()
            x = residual
        else:
            x = self._sum(hidden, residual, rows)
        # on the CPU a layer's monitoring takes the call prepared for it (and, at a decode step, runs with the other
        # monitored layers' at the last one); elsewhere it is part of the one fused call below
        prepared = watch and self._prepared(x)
        if edit:
            slots = self._slots[layer, :rows]
            kwargs: dict[str, Any] = {"slots": slots, "table": self._tables[layer]}
            if self.clamp_names or self.graph_safe:
                kwargs.update(clamp=self._clamp[layer], bounds=self._bounds[layer], relative_bounds=True)
            if watch and not prepared:
                scores, norms = self._outputs(layer, rows)
                kwargs.update(probes=self._probes[layer], scores=scores, norms=norms)
            self._fused(x, kwargs)
            if residual is not None and not full:  # only the edited rows change; the others are not written
                mask = (slots >= 0)[:, None]
                residual.copy_(torch.where(mask, x, residual))
                hidden.masked_fill_(mask, 0)
        elif watch and not prepared:
            scores, norms = self._outputs(layer, rows)
            self._fused(x, {"probes": self._probes[layer], "scores": scores, "norms": norms})
        if prepared:  # the rows as edited: what the fused call would have projected
            self._project(layer, x, rows)

    def _apply_cpu(self, hidden: torch.Tensor, residual: torch.Tensor, layer: int, edit: bool, watch: bool,
                   rows: int) -> None:
        """On the CPU, for a layer that returns (hidden, residual) and no bounds among the running requests:
        steering adds each row's vector to the hidden part (the stream is hidden + residual: the same sum, rounded
        in another order), through a call prepared per table; rows of requests without settings are not written.
        Monitoring then projects hidden + residual through the call prepared for the layer; at a decode step the
        monitored layers run together at the last one, whose copy of fp32 rows sums the two parts (the bits
        torch.add writes). So a decode step runs no torch op here."""
        if edit:
            call = cpu_steering_call(self._steer_calls, (layer, hidden.dtype), self._tables[layer], hidden)
            slots = self._slots
            call.run(hidden.data_ptr(), rows, hidden.stride(0),
                     slots.data_ptr() + layer * slots.stride(0) * slots.element_size(), self._threads)
        if not watch:
            return
        if self._group_layers and hidden.dtype == torch.float32 and residual.dtype == torch.float32:
            self._project(layer, hidden, rows, plus=residual)
        else:
            self._project(layer, self._sum(hidden, residual, rows), rows)

    def _project(self, layer: int, x: torch.Tensor, rows: int, plus: torch.Tensor | None = None) -> None:
        """This layer's monitoring of rows x (+ plus: fp32 rows at a decode step only) through its prepared CPU call,
        into its column of the record; at a decode step, kept for the last monitored layer's call."""
        if self._group_layers:
            group = self._group
            if group is None:
                if self._pending and self._base + rows > self.max_tokens:
                    self._settle()  # more rows than the step's tokens (padding) past the record: from row 0 again
                group = self._group = self._prepare_group(x)
                self._group_rows = 0
            if self._base + rows > self.max_tokens:  # (a step's rows fit, as begin_step keeps _base low)
                raise RuntimeError(f"emovec: a decode step of {rows} rows does not fit the record after {self._base} "
                                   "kept rows; please report this")
            self._group_rows = max(self._group_rows, rows)
            scores, norms = self._outputs(layer, rows)  # (after any settle)
            extra = () if plus is None else (plus.data_ptr(), plus.stride(0))
            group.run(self._group_layers.index(layer), x.data_ptr(), rows, x.stride(0), scores.data_ptr(),
                      norms.data_ptr(), self._threads, scores.stride(0), norms.stride(0), *extra)
            return
        scores, norms = self._outputs(layer, rows)
        call = self._calls.get((layer, x.dtype))
        if call is None:
            call = self._prepare_call(layer, x)
        call.run(x.data_ptr(), rows, x.stride(0), scores.data_ptr(), norms.data_ptr(), self._threads,
                 scores.stride(0), norms.stride(0))

    def _outputs(self, layer: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where this step's `rows` scores and norms of a layer go: its record rows from _base on."""
        return (self._scores[layer][self._base:self._base + rows], self._norms[layer][self._base:self._base + rows])

    def _sum(self, hidden: torch.Tensor, residual: torch.Tensor, rows: int) -> torch.Tensor:
        """hidden + residual in a scratch the plugin keeps."""
        if self._x is None or self._x.shape[0] < rows or self._x.dtype != hidden.dtype:
            self._x = torch.empty(self.max_tokens, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
        return torch.add(hidden, residual, out=self._x[:rows])

    @staticmethod
    def _fused(x: torch.Tensor, kwargs: dict[str, Any]) -> None:
        """One call of the fused op; outputs that are a layer's column of the CPU record (strided rows, which the
        op writes only contiguously) go through a scratch."""
        if x.stride(-1) != 1:  # (vLLM's rows are contiguous) the op reads unit-stride rows: a copy, edits written back
            rows = x.contiguous()
            _Plugin._fused(rows, kwargs)
            if "slots" in kwargs:
                x.copy_(rows)
            return
        scores, norms = kwargs.get("scores"), kwargs.get("norms")
        if scores is None or (scores.is_contiguous() and norms.is_contiguous()):
            steer_project_trusted(x, **kwargs)
            return
        kwargs.update(scores=torch.empty_like(scores, memory_format=torch.contiguous_format),
                      norms=torch.empty_like(norms, memory_format=torch.contiguous_format))
        steer_project_trusted(x, **kwargs)
        scores.copy_(kwargs["scores"])
        norms.copy_(kwargs["norms"])

    def _prepared(self, x: torch.Tensor) -> bool:
        """Whether this layer's monitoring can take the prepared CPU call: CPU rows of unit column stride, the
        compiled kernel, and not the graph-safe way (whose buffers and calls are fixed for CUDA graphs)."""
        return (x.device.type == "cpu" and not self.graph_safe and _ext.has_cpp_library
                and x.dtype in _ext.DTYPE_CODES and x.stride(-1) == 1)

    def _prepare_call(self, layer: int, x: torch.Tensor):
        probes = self._probes[layer]  # kept as long as the plugin: the call holds its address
        if BF16_PROBES and x.dtype == torch.float32:
            probes = self._probes_bf16.setdefault(layer, probes.to(torch.bfloat16))
        call = _ext._C.CpuCall(d=x.shape[1], h_dtype=_ext.DTYPE_CODES[x.dtype], w_dtype=_ext.DTYPE_CODES[probes.dtype],
                               probes=probes.data_ptr(), num_probes=probes.shape[0], center=0,
                               bf16_dots=BF16_DOTS and probes.dtype == torch.bfloat16 and x.dtype == torch.float32)
        self._calls[(layer, x.dtype)] = call
        return call

    def _prepare_group(self, x: torch.Tensor):
        key = (self._group_layers, x.dtype)
        group = self._groups.get(key)
        if group is None:
            if len(self._groups) >= 16:  # sets of monitored layers come and go with the requests: keep a few
                self._groups.clear()
            calls = [self._calls.get((layer, x.dtype)) or self._prepare_call(layer, x) for layer in self._group_layers]
            group = self._groups[key] = _ext._C.CpuLayers(calls, window=self._window_rows())
        return group

    def end_step(self) -> None:
        if not self.active:
            return
        group, self._group = self._group, None
        self.active = self.graph_safe
        if self._monitored:
            layers = [layer for layer in range(self.num_layers) if self.layer_monitor[layer]]
            n = max(end for _, _, _, end, _ in self._monitored)
            self._pending.append((self._base, n, self._monitored, layers))
            if group is not None:  # its rows were written from _base on; the next kept step writes after them
                self._pending_group = group
                self._pending_key = self._group_layers
                self._base += max(self._rows, self._group_rows)
        # a step's readings are collected once every row of it is projected: at once without a group, or when its
        # group ran (a window full: nothing kept); else with the steps after it. (A step that kept nothing, its
        # rows not prepared, runs the steps kept before it first.)
        if group is None or not group.pending:
            self._settle()

    def _window_rows(self) -> int:
        """Rows of decode steps kept per layer: what emovec.monitor keeps, within the record's rows (a kept step
        writes from _base on, with up to DEFER_MAX_ROWS rows)."""
        return max(0, min(DEFER_WINDOW_ROWS, self.max_tokens - DEFER_MAX_ROWS))

    def _settle(self) -> None:
        """Project what the decode steps kept (their group's rows) and collect those steps' readings."""
        if self._pending_group is not None:
            self._pending_group.flush()
        self._resolve()

    def _resolve(self) -> None:
        pending, self._pending = self._pending, []
        self._base, self._pending_group, self._pending_key = 0, None, ()
        for base, n, monitored, layers in pending:
            self._collect(base, n, monitored, layers)

    def _collect(self, base: int, n: int, monitored: list, layers: list[int]) -> None:
        """A step's readings (its rows from `base` in the record, `n` of them read) into its requests' chunks."""
        # one copy of the step's rows of every monitored layer, then per-request slices on the host
        where = {layer: i for i, layer in enumerate(layers)}
        if self._record is not None:  # the CPU record: this step's rows of the monitored layers, one copy each
            columns = [self._columns[layer] for layer in layers]
            scores_np = self._record[0][base:base + n].numpy()
            norms_np = self._record[1][base:base + n].numpy()
            if columns == list(range(scores_np.shape[1])):
                all_scores, all_norms = scores_np.copy(), norms_np.copy()
            else:
                all_scores, all_norms = scores_np[:, columns], norms_np[:, columns]
        else:
            all_scores = torch.stack([self._scores[layer][base:base + n] for layer in layers], 1).cpu().numpy()
            all_norms = torch.stack([self._norms[layer][base:base + n] for layer in layers], 1).cpu().numpy()
        every_concept = list(range(all_scores.shape[2]))
        for req_id, spec, start, end, computed in monitored:
            readings = self.readings.get(req_id)
            if readings is None:
                continue
            first_kept = (0 if spec.prompt else readings.prompt_len - 1) - computed  # rows before it are not kept
            first = start + max(first_kept, 0)
            if first >= end:
                continue
            position, last = computed + first - start, computed + end - start - 1  # of rows first and end - 1
            scores, norms = all_scores[first:end], all_norms[first:end]  # views of this step's own arrays
            if spec.monitor_layers != layers:  # a subset of the step's layers (the usual case reads all of them)
                cols = [where[layer] for layer in spec.monitor_layers]
                scores, norms = scores[:, cols], norms[:, cols]
            if spec.monitor_index != every_concept:
                scores = scores[:, :, spec.monitor_index]
            readings.recomputed += max(0, min(last, readings.last) - position + 1)  # positions read before
            readings.last = max(readings.last, last)
            readings.chunks.append((position, scores, norms))

    def fetch(self, keys: list[str] | None, pop: bool) -> dict[str, Any]:
        """Readings of the requests with these keys or request ids (all when None), by internal request id. A key
        also finds the requests vLLM made from it: ``KEY-<n>`` (the completions endpoint numbers a response's prompts) and
        ``<i>_KEY`` (the n > 1 samples of one request); nothing else. ``pop`` drops what it returns: fetch once
        the request is done (a step of a request still running would find its readings gone)."""
        with torch.inference_mode():  # releasing rows rewrites tables made inside the (inference-mode) forward
            self._settle()  # readings of decode steps whose rows a group still keeps
            self._forget_finished()
        chosen = [r for r, v in self.readings.items()
                  if keys is None or any(_matches(k, v.key) or _matches(k, v.request) for k in keys)]
        out = {r: self.readings[r].export() for r in chosen}
        if pop:
            for r in chosen:
                self.readings.pop(r, None)
        return out


def _matches(asked: str, key: str) -> bool:
    return re.fullmatch(rf"(\d+_)?{re.escape(asked)}(-\d+)?", key) is not None


def _external(req_id: str) -> str:
    """The id the caller gave (vLLM appends '-' and 8 random characters to make its internal id unique)."""
    head, sep, tail = req_id.rpartition("-")
    return head if sep and len(tail) == 8 else req_id


# ----------------------------------------------------------------------------------------- installation


def _layer_wrapper(layer: torch.nn.Module, index: int, plugin: _Plugin, plugin_id: int):
    inner = layer.forward

    def forward(*args, **kwargs):
        output = inner(*args, **kwargs)
        pair = isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], torch.Tensor)
        hidden = output if isinstance(output, torch.Tensor) else (
            output[0] if isinstance(output, tuple) and isinstance(output[0], torch.Tensor) else None)
        if hidden is None:
            return output
        if not torch.compiler.is_compiling():
            # eager: call the plugin directly (no op dispatch, 30 times a step); only a graph being traced needs the
            # op node, whose body then decides at run time
            if plugin.active:
                plugin.apply(hidden, output[1] if pair else None, index)
            return output
        if pair:
            torch.ops.emovec.vllm_layer(hidden, output[1], index, plugin_id)
        else:
            torch.ops.emovec.vllm_layer_single(hidden, index, plugin_id)
        return output

    return forward


def install(runner) -> None:
    """Called after the runner loaded its model: wrap the decoder layers and the runner's forward."""
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    try:
        from emovec.layers import find_decoder_layers

        layers = list(find_decoder_layers(model).layers)
    except Exception as error:  # noqa: BLE001 - an unsupported model serves as plain vLLM, with a warning
        log.warning("emovec: the vLLM plugin cannot find this model's decoder layers (%s); emovec is off", error)
        return
    plugin = _Plugin(runner, len(layers), graph_safe=_uses_cuda_graphs(runner))
    _PLUGINS.append(plugin)
    for index, layer in enumerate(layers):
        if type(layer).__name__ == "PPMissingLayer":
            continue
        layer.forward = _layer_wrapper(layer, index, plugin, len(_PLUGINS) - 1)
    inner_forward = runner._model_forward

    def _model_forward(*args, **kwargs):
        plugin.begin_step()
        try:
            return inner_forward(*args, **kwargs)
        finally:
            plugin.end_step()

    runner._model_forward = _model_forward
    runner.emovec = plugin


def _uses_cuda_graphs(runner) -> bool:
    """Whether the runner replays CUDA graphs (then the plugin runs its graph-safe way); EMOVEC_VLLM_GRAPH_SAFE=1
    forces that way anywhere (the tests run it on the CPU, where its results must not change)."""
    if os.environ.get("EMOVEC_VLLM_GRAPH_SAFE") == "1":
        return True
    if runner.device.type != "cuda":
        return False
    try:
        from vllm.config import CUDAGraphMode

        return runner.vllm_config.compilation_config.cudagraph_mode != CUDAGraphMode.NONE
    except (ImportError, AttributeError):
        return True  # cannot tell: the graph-safe way is correct either way


def fetch_readings(worker, keys: list[str] | None = None, pop: bool = True) -> dict[str, Any]:
    """Worker RPC (``collective_rpc("emovec_readings", ...)``): the readings of these request keys (all when None)."""
    runner = getattr(worker, "model_runner", None)
    plugin = getattr(runner, "emovec", None)
    if plugin is None:
        return {}
    return plugin.fetch(keys, pop)


def status(worker) -> dict[str, Any]:
    """Worker RPC (``collective_rpc("emovec_status")``): whether the plugin is on in this worker, and how."""
    plugin = getattr(getattr(worker, "model_runner", None), "emovec", None)
    if plugin is None:
        return {"installed": False}
    return {"installed": True, "disabled": plugin.disabled, "graph_safe": plugin.graph_safe, "bf16_probes": BF16_PROBES,
            "bf16_dots": BF16_DOTS,
            "layers": plugin.num_layers, "settings_running": len(plugin.recipe_rows),
            "bounded_concepts": list(plugin.clamp_names), "readings_waiting": len(plugin.readings),
            "layers_run_together": [list(layers) for layers, _ in plugin._groups]}

