"""``emovec.generate``: greedy generation with monitoring and steering that ``torch.compile`` captures whole.

The eager runtime (``emovec.monitor`` / ``emovec.steer`` around ``model.generate``) reads each step's layout from the
model call in Python, which is right for any caller but changes Python state every step: under ``torch.compile``
that means guards and recompiles. Here the loop is emovec's own and every piece of per-step bookkeeping lives in
device tensors allocated once:

- a static KV cache (transformers' ``StaticCache``) of ``prompt + max_new_tokens`` columns and a full-length
  attention mask, so the prefill call and every decode call keep their shapes;
- the steering slots of the prefill rows and of a decode row, fixed for the whole run;
- the monitor's buffers ``(B, L, T, K)`` and the column the current step writes, a (1,) tensor updated in place
  between steps (``fill_``, outside the graph; the CUDA-graph way of feeding a captured step).

Inside the decoder layers a wrapper calls the fused op (the ``torch.ops.emovec.steer_project`` custom op when
compiling) into per-step scratch buffers, copied into the record after each step: no Python value depends on the
step, so the prefill and the decode step compile once each (``fullgraph=True``: no graph breaks) and later calls and
later generations with the same shapes reuse them. On the CPU (compiled kernel) a decode step's monitored rows go
instead to an opaque op, ``torch.ops.emovec.keep_decode_rows``, which keeps them (``emovec._C.CpuLayers``, as
``emovec.monitor`` does) and projects a window of up to 64 rows per layer at a time straight into the record; the
step's column is a Python value it reads when it runs, which the compiled graph never sees. With ``compile=False``
the same loop runs eagerly and gives the same tokens and scores.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from emovec import _ext
from emovec.layers import find_decoder_layers, layer_output_hidden, replace_layer_output, resolve_layer_indices
from emovec.ops import steer_project_trusted
from emovec.runtime import DEFER_WINDOW_ROWS, MonitorResult, Recipe, steering_vector
from emovec.vectors import VectorSet


@dataclass
class GenerateResult:
    sequences: torch.Tensor  # (B, P + new) token ids, the prompt (left padding kept) then the generated tokens
    monitor: MonitorResult | None  # every real token's scores at the monitored layers (None without monitoring)


class _StaticLayer:
    """The forward wrapper of one decoder layer: steer (fixed slots per phase), then project and record."""

    def __init__(self, layer: torch.nn.Module, run: _StaticRun, index: int) -> None:
        self.inner = layer.forward
        self.run = run
        self.index = index

    def __call__(self, *args, **kwargs):
        output = self.inner(*args, **kwargs)
        hidden = layer_output_hidden(output)
        flat = hidden.reshape(-1, hidden.shape[-1])
        run = self.run
        decode = run.decode  # a Python bool with two values: one compiled graph per phase
        table = run.tables.get(self.index)
        if table is not None:
            steer_project_trusted(flat, slots=run.decode_slots if decode else run.prefill_slots, table=table,
                                  backend=run.backend)
        probes = run.probes.get(self.index)
        if probes is not None and decode and run.group is not None:
            # on the CPU a decode step's rows are kept (emovec._C.CpuLayers, as emovec.monitor does) and projected a
            # window of steps at a time, straight into the record: the probes are read once per window instead of
            # once per step (inside a forward pass they come from DRAM). An opaque op: its Python reads the step's
            # column, which the compiled graph never sees.
            torch.ops.emovec.keep_decode_rows(run.token, flat, run.ident, run.positions[self.index])
        elif probes is not None:
            # this layer's rows of the step's scratch: the record is filled from it after the step, in one copy
            # outside the graph (an index_copy_ into the record per layer, inside the compiled graph, cost ~9 ms per
            # decode step on the CPU, nearly a fifth of a step)
            position = run.positions[self.index]
            scores = (run.decode_scores if decode else run.prefill_scores)[position]
            norms = (run.decode_norms if decode else run.prefill_norms)[position]
            steer_project_trusted(flat, probes=probes, scores=scores, norms=norms, backend=run.backend)
        if not hidden.is_contiguous():  # reshape copied: hand the edited copy on (a static property when compiling)
            output = replace_layer_output(output, flat.view_as(hidden))
        return output


class _StaticRun:
    """Buffers, tables and KV cache of the current generation shape, plus the layer wrappers: one object per model
    (kept weakly, outside the model, so copies and pickles of the model carry none of it), whose wrappers live as
    long as it does. A call of the same shape refills its tensors in place; another shape replaces the tensors
    (not the object or its wrappers), so compiled graphs see the same objects and only the new sizes."""

    def __init__(self) -> None:
        self.key = None
        self.decode = False
        self.backend = None
        self.wrappers: dict[int, _StaticLayer] = {}
        self.group = None  # CPU: the monitored layers' prepared calls, keeping decode rows across steps
        self.token = torch.zeros(1)  # what keep_decode_rows marks as written, so a compiled graph keeps and orders it
        self.column = 0  # the record's column of the current decode step (read by keep_decode_rows, outside graphs)
        self.ident = next(_IDENTS)
        _BY_IDENT[self.ident] = self

    def flush(self) -> None:
        """Project the decode rows still kept into the record."""
        if self.group is not None:
            self.group.flush()

    def regroup(self) -> None:
        """A new CpuLayers on the current probes, when the CPU path applies: a CpuCall packs its fp32 probes once (at
        its first run of 2 rows or more), so probes copied in afresh need new calls."""
        self.flush()
        self.group = None
        if self.grouped:
            calls = [_ext._C.CpuCall(d=self.d, h_dtype=_ext.DTYPE_CODES[self.h_dtype],
                                     w_dtype=_ext.DTYPE_CODES[torch.float32], probes=self.probes[layer].data_ptr(),
                                     num_probes=self.k, center=0) for layer in self.monitor_at]
            self.group = _ext._C.CpuLayers(calls, window=DEFER_WINDOW_ROWS)

    def allocate(self, model, key, *, batch: int, prompt: int, total: int, steer_at: Sequence[int],
                 monitor_at: Sequence[int], k: int, recipes: int, backend: str | None) -> None:
        from transformers import StaticCache

        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        f32 = dict(device=device, dtype=torch.float32)
        self.key = key
        self.backend = backend
        d = find_decoder_layers(model).hidden_size
        self.tables = {layer: torch.zeros(recipes, d, device=device, dtype=dtype) for layer in steer_at}
        self.prefill_slots = torch.full((batch * prompt,), -1, dtype=torch.long, device=device)
        self.decode_slots = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.probes = {layer: torch.zeros(k, d, **f32) for layer in monitor_at}
        self.probe_source = None  # the unit tensor the probes were copied from (kept, so it is never a new one)
        self.positions = {layer: i for i, layer in enumerate(monitor_at)}
        self.scores = torch.zeros(len(monitor_at), batch, total, k, **f32)
        self.norms = torch.zeros(len(monitor_at), batch, total, **f32)
        # per step, every monitored layer's rows (flattened batch x tokens), copied into the record after the step
        self.prefill_scores = torch.empty(len(monitor_at), batch * prompt, k, **f32)
        self.prefill_norms = torch.empty(len(monitor_at), batch * prompt, **f32)
        self.decode_scores = torch.empty(len(monitor_at), batch, k, **f32)
        self.decode_norms = torch.empty(len(monitor_at), batch, **f32)
        self.group = None
        self.monitor_at, self.h_dtype, self.d = list(monitor_at), dtype, d
        self.batch, self.total, self.k = batch, total, k
        self.grouped = (device.type == "cpu" and bool(monitor_at) and _ext.has_cpp_library and backend in (None, "cpu")
                        and dtype in _ext.DTYPE_CODES)
        self.regroup()
        self.cache = None  # the previous shape's cache goes before the new one is made
        self.cache = StaticCache(config=model.config, max_cache_len=total)
        config = model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache.early_initialization(batch, heads, head_dim, dtype, device)
        if device.type == "cuda":
            # under CUDA graphs (compile mode "reduce-overhead"), tensors marked static are read and written where they
            # are; any other input is copied into the graph's own buffers before every replay
            for t in (*self.tables.values(), self.prefill_slots, self.decode_slots, *self.probes.values(),
                      self.prefill_scores, self.prefill_norms, self.decode_scores, self.decode_norms):
                torch._dynamo.mark_static_address(t)
        found = find_decoder_layers(model)
        for index in sorted(set(steer_at) | set(monitor_at)):
            if index not in self.wrappers:
                self.wrappers[index] = _StaticLayer(found.layers[index], self, index)
        self.active = sorted(set(steer_at) | set(monitor_at))

    def install(self, model) -> list[torch.nn.Module]:
        found = find_decoder_layers(model)
        if any("forward" in layer.__dict__ for layer in found.layers):
            raise RuntimeError("a decoder layer already carries a wrapper (is an emovec.monitor, steer or regulate "
                               "block active?); emovec.generate records and steers by itself: leave those blocks first")
        installed = []
        for index in self.active:
            layer = found.layers[index]
            layer.forward = self.wrappers[index]
            installed.append(layer)
        return installed


_RUNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _StaticRun
_BY_IDENT: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # the ident keep_decode_rows gets -> _StaticRun
_IDENTS = iter(range(1, 1 << 62))

_LIBRARY = torch.library.Library("emovec", "FRAGMENT")
_LIBRARY.define("keep_decode_rows(Tensor(a!) token, Tensor h, int run, int position) -> ()")


def _keep_decode_rows(token: torch.Tensor, h: torch.Tensor, run: int, position: int) -> None:
    """A decode step's rows of one monitored layer, kept by the run's CpuLayers for its record at the step's column
    (row b of layer position l at scores[l, b, column]); projected when the window is full or at the run's end."""
    static = _BY_IDENT[run]
    rows = h.shape[0]
    if h.stride(-1) != 1:
        h = h.contiguous()
    column, total, k = static.column, static.total, static.k
    scores = static.scores.data_ptr() + ((position * static.batch) * total + column) * k * 4
    norms = static.norms.data_ptr() + (position * static.batch * total + column) * 4
    static.group.run(position, h.data_ptr(), rows, h.stride(0), scores, norms, torch.get_num_threads(), total * k,
                     total)


_LIBRARY.impl("keep_decode_rows", _keep_decode_rows, "CompositeExplicitAutograd")


@torch.library.register_fake("emovec::keep_decode_rows", lib=_LIBRARY)
def _(token, h, run, position) -> None:
    return None

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {options: compiled forward}


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 32, vectors: VectorSet | None = None, monitor_layers: Any = None,
             recipe: Recipe | Sequence[Recipe | None] | None = None, steer_layers: Any = None,
             positions: str = "all", relative: bool = True, compile: bool = False, compile_kwargs: dict | None = None,
             backend: str | None = None, tokenizer=None, timings: dict | None = None) -> GenerateResult:
    """Greedy generation of ``max_new_tokens`` with monitoring (``vectors`` at ``monitor_layers``) and steering
    (``recipe`` at ``steer_layers``, strengths as in :func:`emovec.steer`, ``positions`` "all", "prompt" or
    "generated"), in a static KV cache; with ``compile=True`` the model's forward is compiled with
    ``torch.compile(fullgraph=True, **compile_kwargs)`` once per phase (prefill, decode) and reused by later calls
    of the same shape.

    Returns the sequences and a :class:`MonitorResult` (scores, norms, mask, token ids) like ``emovec.monitor``'s.
    Generation does not stop at end-of-sequence tokens (every sequence gets ``max_new_tokens``), so shapes stay
    fixed. Left padding (``attention_mask``) is handled: padding rows are neither steered nor recorded. What
    compiles once per shape: batch, prompt length, ``max_new_tokens``, the layers, the number of vectors and the
    number of distinct recipes; prompts, strengths and the concepts named may change freely between calls. On a
    GPU, ``compile_kwargs={"mode": "reduce-overhead"}`` has inductor capture each phase in a CUDA graph.

    ``timings``: a dict that receives the seconds spent setting up (``setup_s``), in the prefill step
    (``prefill_s``), in the decode steps (``decode_s``) and gathering the result (``result_s``), with the device
    synchronised at each boundary (for benchmarks; leave it None otherwise)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be a (batch, tokens) tensor with at least one token")
    clock = _Clock(timings, input_ids.device)
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if positions not in ("all", "prompt", "generated"):
        raise ValueError(f"positions must be 'all', 'prompt' or 'generated', got {positions!r}")
    if (recipe is not None or monitor_layers is not None) and vectors is None:
        raise ValueError("monitoring and steering need vectors=")
    device = input_ids.device
    batch, prompt = input_ids.shape
    total = prompt + max_new_tokens
    num_layers = len(find_decoder_layers(model).layers)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("emovec.generate needs left padding (the last prompt column real in every row); "
                         "set tokenizer.padding_side = 'left'")
    mask = torch.cat([attention_mask.long(), torch.ones(batch, max_new_tokens, dtype=torch.long, device=device)], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    recipes = [] if recipe is None else ([recipe] * batch if isinstance(recipe, dict) else list(recipe))
    if recipe is not None and len(recipes) != batch:
        raise ValueError(f"{len(recipes)} recipes for a batch of {batch}; give one per sequence or one dict")
    distinct: list[dict] = []
    for r in recipes:
        if r is not None and r not in distinct:
            distinct.append(r)
    steer_at: list[int] = []
    if distinct:  # the eager runtime's checks: names, strengths, layers (default: the vectors' default layer)
        from emovec.runtime import Steer

        check = Steer(model, vectors, recipes, steer_layers, positions=positions, relative=relative)
        steer_at = list(check.layer_indices)
    monitor_at = resolve_layer_indices(monitor_layers, num_layers) if monitor_layers is not None else []
    for layer in monitor_at:
        vectors.slice_of(layer)
    if vectors is not None and vectors.hidden_size != find_decoder_layers(model).hidden_size:
        raise ValueError(f"the vectors have hidden size {vectors.hidden_size} but the model's residual stream has "
                         f"{find_decoder_layers(model).hidden_size}; use vectors extracted for this model")
    k = len(vectors.names) if vectors is not None and monitor_at else 0
    key = (batch, prompt, total, tuple(steer_at), tuple(monitor_at), k, len(distinct), str(device),
           next(model.parameters()).dtype, backend)
    run = _RUNS.get(model)
    if run is None:
        run = _RUNS[model] = _StaticRun()
    if run.key != key:
        run.allocate(model, key, batch=batch, prompt=prompt, total=total, steer_at=steer_at, monitor_at=monitor_at,
                     k=k, recipes=len(distinct), backend=backend)
    # refill the run's tensors in place for this call
    if distinct:
        ids = torch.tensor([-1 if r is None else distinct.index(r) for r in recipes], device=device)
        for layer in steer_at:
            rows = [steering_vector(vectors, r, layer, relative=relative) for r in distinct]
            run.tables[layer].copy_(torch.stack(rows))
        real = attention_mask.bool()
        run.prefill_slots.copy_(torch.where(real & (positions in ("all", "prompt")), ids[:, None], -1).reshape(-1))
        run.decode_slots.copy_(ids if positions in ("all", "generated") else torch.full_like(ids, -1))
    if monitor_at:  # the vectors keep their unit directions on the device: copied only when they changed
        unit = vectors.unit_on(device)
        if run.probe_source is not unit:
            for layer in monitor_at:
                run.probes[layer].copy_(unit[vectors.slice_of(layer)])
            run.probe_source = unit
            run.regroup()  # the old calls' packed probes are the old vectors'
    run.flush()  # (nothing is kept between calls: each call flushes at its end; a failed one's rows land here)
    run.scores.zero_()
    run.norms.zero_()
    run.cache.reset()
    forward = _compiled_forward(model, compile_kwargs) if compile else model.forward
    sequences = torch.empty(batch, total, dtype=torch.long, device=device)
    sequences[:, :prompt] = input_ids
    installed = run.install(model)
    clock.lap("setup_s")
    try:
        for step in range(max_new_tokens):
            if step == 1:
                clock.lap("prefill_s")
            if step == 0:
                run.decode = False
                step_ids, step_positions = input_ids, position_ids[:, :prompt]
            else:
                column = prompt + step - 1
                run.decode = True
                run.column = column
                step_ids, step_positions = sequences[:, column:column + 1], position_ids[:, column:column + 1]
            if compile and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are read: replay over them
            out = forward(input_ids=step_ids, attention_mask=mask, position_ids=step_positions, cache=run.cache,
                          use_cache=True)
            if monitor_at:  # the step's scratch into the record: one device copy each, no host synchronisation
                if step == 0:
                    run.scores[:, :, :prompt].copy_(run.prefill_scores.view(len(monitor_at), batch, prompt, k))
                    run.norms[:, :, :prompt].copy_(run.prefill_norms.view(len(monitor_at), batch, prompt))
                elif run.group is None:
                    run.scores[:, :, column].copy_(run.decode_scores)
                    run.norms[:, :, column].copy_(run.decode_norms)
            sequences[:, prompt + step] = out.logits[:, -1].argmax(-1)
    finally:
        run.flush()  # the decode rows still kept, into the record
        for layer in installed:
            layer.__dict__.pop("forward", None)
    clock.lap("decode_s" if max_new_tokens > 1 else "prefill_s")
    result = None
    if monitor_at:
        width = total - 1  # the last token is generated, never read
        real = mask[:, :width].bool().cpu()
        scores = torch.where(real[:, :, None, None], run.scores[:, :, :width].permute(1, 2, 0, 3).cpu(), 0.0)
        norms = torch.where(real[:, :, None], run.norms[:, :, :width].permute(1, 2, 0).cpu(), 0.0)
        ids = sequences[:, :width].cpu()
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "emovec_tokenizer", None)
        tokens = None
        if tokenizer is not None:
            from emovec.runtime import readable_tokens

            tokens = [readable_tokens(tokenizer, ids[b][real[b]].tolist()) for b in range(batch)]
        result = MonitorResult(list(vectors.names), list(monitor_at), scores, norms, real, ids,
                               torch.where(real, real.long().cumsum(1) - 1, -1), tokens)
    clock.lap("result_s")
    return GenerateResult(sequences, result)


class _Clock:
    """Laps of generate() into a caller's dict (device synchronised at each lap); does nothing without one."""

    def __init__(self, timings: dict | None, device: torch.device) -> None:
        self.timings, self.device = timings, device
        if timings is not None:
            self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now


def _compiled_forward(model, compile_kwargs: dict | None):
    """``torch.compile(model.forward, fullgraph=True)``, made once per model and options and kept on the model."""
    options = {"fullgraph": True, **(compile_kwargs or {})}
    key = tuple(sorted((k, v if isinstance(v, (str, int, float, bool, type(None))) else id(v))
                       for k, v in options.items()))
    cache = _COMPILED.setdefault(model, {})
    if key not in cache:  # the class's forward, so the cache holds no reference to the model itself
        cache[key] = torch.compile(type(model).forward, **options)
    compiled = cache[key]
    return lambda **kwargs: compiled(model, **kwargs)
