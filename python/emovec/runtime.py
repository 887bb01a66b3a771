"""In-forward runtime: run the fused op on the residual stream that chosen decoder layers output.

``monitor`` records per-token scores into preallocated device buffers; ``steer`` adds vectors in place, per
sequence and per position. Both are context managers that wrap each chosen layer's ``forward`` (an instance
attribute, removed on exit) and read the batch layout from a pre-hook on the model that owns the layers.
Per step the host does only row bookkeeping from tensor shapes: no host-device synchronisation.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from emovec import _ext
from emovec.layers import (
    find_decoder_layers,
    layer_output_hidden,
    replace_layer_output,
    resolve_layer_indices,
)
from emovec.ops import cpu_steering_call, steer_project_trusted
from emovec.vectors import VectorSet


@dataclass
class _Step:
    """The layout of the current forward call, set by the pre-hook on the model that owns the layers."""

    batch: int
    length: int  # new tokens in this call
    past: int  # columns already processed (KV cache)
    real: torch.Tensor | None  # (B, T) bool on device, None = every row real
    input_ids: torch.Tensor | None


def _hidden_2d(hidden: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(rows, whether they are not a plain view): a view of a contiguous residual stream, else its reshape (a copy,
    or a strided view), which then becomes the layer's output."""
    if hidden.dim() != 3:
        raise RuntimeError(f"emovec expected a (batch, tokens, hidden) residual stream, got shape {tuple(hidden.shape)}")
    if hidden.is_contiguous():
        return hidden.view(-1, hidden.size(2)), False
    return hidden.reshape(-1, hidden.size(2)), True


class _LayerSlot:
    """The one forward wrapper emovec installs on a layer, shared by every active context on that layer."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.had_own = "forward" in layer.__dict__
        self.previous = layer.__dict__.get("forward")
        self.inner = layer.forward
        self.entries: list[tuple[_LayerRuntime, int]] = []

    def __call__(self, *args, **kwargs):
        output = self.inner(*args, **kwargs)
        hidden = flat = None
        copied = False
        for runtime, position in self.entries:  # kept in order: steering before monitoring
            if runtime.step is None:
                continue
            if flat is None:
                hidden = layer_output_hidden(output)
                flat, copied = _hidden_2d(hidden)
            runtime.apply(position, flat)
        if copied:  # the edits went to a copy: it becomes the layer's output
            output = replace_layer_output(output, flat.view_as(hidden))
        return output


def _attach(layer: torch.nn.Module, runtime: _LayerRuntime, position: int) -> None:
    slot = layer.__dict__.get("forward")
    if not isinstance(slot, _LayerSlot):
        slot = _LayerSlot(layer)
        layer.forward = slot
    slot.entries.append((runtime, position))
    slot.entries.sort(key=lambda e: e[0].order)  # stable: contexts of one kind keep their nesting order


def _detach(layer: torch.nn.Module, runtime: _LayerRuntime) -> None:
    slot = layer.__dict__.get("forward")
    if not isinstance(slot, _LayerSlot):
        return
    slot.entries = [e for e in slot.entries if e[0] is not runtime]
    if not slot.entries:  # the last context on this layer: put back exactly what was there
        if slot.had_own:
            layer.forward = slot.previous
        else:
            layer.__dict__.pop("forward", None)


class _LayerRuntime:
    """Shared machinery of monitor and steer: layer wrapping, the pre-hook, exact restoration."""

    def __init__(self, model: torch.nn.Module, vectors: VectorSet | None, layers: Any = None,
                 layer_modules: Sequence[torch.nn.Module] | None = None, backend: str | None = None,
                 positions_from_mask: bool = True) -> None:
        self.model = model
        self.positions_from_mask = positions_from_mask
        self.found = find_decoder_layers(model, layer_modules)
        num_layers = len(self.found.layers)
        if vectors is not None and vectors.hidden_size != self.found.hidden_size:
            raise ValueError(f"the vectors have hidden size {vectors.hidden_size} but the model's residual stream "
                             f"has {self.found.hidden_size}; use vectors extracted for this model")
        if layers is None:
            if vectors is not None and vectors.default_layer is not None:
                layers = [vectors.default_layer]
            elif vectors is not None and vectors.layers:
                layers = list(vectors.layers)
            else:
                layers = round(2 * (num_layers - 1) / 3)
        self.layer_indices = resolve_layer_indices(layers, num_layers)
        if vectors is not None:
            for layer in self.layer_indices:
                vectors.slice_of(layer)  # raises a clear error for layers the vectors do not cover
        self.vectors = vectors
        self.backend = backend
        self.step: _Step | None = None
        self._handles: list[Any] = []
        self._attached: list[torch.nn.Module] = []
        self._active = False
        self._errors: dict[torch.device, torch.Tensor] = {}

    def error_flag(self, device: torch.device) -> torch.Tensor:
        """The fused op's out-of-range flag for ``device``: written on the device, read once when the context exits."""
        flag = self._errors.get(device)
        if flag is None:
            flag = self._errors[device] = torch.zeros(1, dtype=torch.int32, device=device)
        return flag

    def check_errors(self) -> None:
        """Raise when any op call in this context met an out-of-range slot or segment (one host sync per device)."""
        from emovec.ops import index_error_message

        code = 0
        for flag in self._errors.values():
            code |= int(flag)
            flag.zero_()
        message = index_error_message(code)
        if message:
            raise RuntimeError(f"emovec: {message}")

    # -- hooks -------------------------------------------------------------------------------------

    def _pre_hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape_source = input_ids if input_ids is not None else embeds
        if shape_source is None:
            raise RuntimeError("emovec could not find input_ids or inputs_embeds in the model call")
        batch, length = shape_source.shape[0], shape_source.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            past = mask.shape[1] - length
            real = mask[:, -length:].bool()
            if self.positions_from_mask and kwargs.get("position_ids") is None:
                # positions count real tokens only, so a left-padded sequence sees the positions it would alone
                # (what generate() does; without it, absolute-position models such as GPT-2 shift padded rows)
                kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        else:
            cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5.2x renamed it "cache"
            past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
            real = None
        self.step = _Step(batch, length, past, real, input_ids)
        self.begin_step(self.step)
        return args, kwargs

    def __enter__(self):
        if self._active:
            raise RuntimeError("this emovec context is already active; create a new one to nest")
        try:
            self._handles.append(self.found.base.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self.enter()
            for position, index in enumerate(self.layer_indices):
                _attach(self.found.layers[index], self, position)
                self._attached.append(self.found.layers[index])
        except BaseException:
            self._restore()
            raise
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._restore()
        self._active = False
        if exc_type is None:
            self.check_errors()
        else:  # the block failed anyway: do not report stale flags on a later use of this context
            for flag in self._errors.values():
                flag.zero_()

    def _restore(self) -> None:
        for layer in reversed(self._attached):
            _detach(layer, self)
        self._attached.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.step = None

    # -- for subclasses ----------------------------------------------------------------------------

    order = 1  # within one layer, steering (0) runs before monitoring (1), whatever the nesting order

    def enter(self) -> None: ...

    def begin_step(self, step: _Step) -> None: ...

    def apply(self, position: int, flat: torch.Tensor) -> None: ...


# ======================================================================================== monitor


@dataclass
class MonitorResult:
    """Per-token projections recorded by :func:`monitor`.

    scores : (B, T, L, K) fp32, ``(h - center) · unit_vector`` at each monitored layer, 0 at padding.
    norms : (B, T, L) fp32, ``‖h - center‖``.  cosine = scores / norms.
    mask : (B, T) bool, True at real tokens (prompt and generated).
    token_ids : (B, T) int64.  positions : (B, T) int64, index among the sequence's real tokens, -1 at padding.
    tokens : per sequence, the token strings of the real tokens (when a tokenizer is known).
    smoothing : window of the moving average that :attr:`cosine` applies over real tokens (1 = none); see
        :meth:`smoothed`. ``scores`` and ``norms`` stay raw.
    """

    names: list[str]
    layers: list[int]
    scores: torch.Tensor
    norms: torch.Tensor
    mask: torch.Tensor
    token_ids: torch.Tensor
    positions: torch.Tensor
    tokens: list[list[str]] | None
    smoothing: int = 1

    @property
    def cosine(self) -> torch.Tensor:
        """(B, T, L, K) cosine of each real token with each vector (0 at padding), moving-averaged over
        ``smoothing`` neighbouring real tokens (centred, shorter at the ends) when ``smoothing > 1``."""
        raw = self.scores / self.norms.clamp(min=1e-12)[..., None]
        if self.smoothing <= 1:
            return raw
        return moving_average(raw, self.mask, self.smoothing)

    def smoothed(self, window: int) -> MonitorResult:
        """This result with :attr:`cosine` averaged over ``window`` neighbouring real tokens (the research smoothed
        token-level readings too); ``window=1`` turns it off."""
        if int(window) < 1:
            raise ValueError(f"the smoothing window must be >= 1 token, got {window}")
        return dataclasses.replace(self, smoothing=int(window))

    def sequence(self, b: int = 0) -> dict[str, Any]:
        """The real tokens of sequence ``b``: scores (T_b, L, K), cosine, norms, token_ids, tokens."""
        keep = self.mask[b]
        return {"scores": self.scores[b][keep], "cosine": self.cosine[b][keep], "norms": self.norms[b][keep],
                "token_ids": self.token_ids[b][keep], "tokens": self.tokens[b] if self.tokens else None}

    def top(self, b: int = 0, layer: int | None = None, k: int = 5, use_cosine: bool = True) -> list[list[tuple[str, float]]]:
        """For each real token of sequence ``b``, the ``k`` strongest concepts at ``layer`` (default: first)."""
        li = self.layers.index(layer) if layer is not None else 0
        values = (self.cosine if use_cosine else self.scores)[b][self.mask[b]][:, li]
        best = values.topk(min(k, values.shape[-1]), dim=-1)
        return [[(self.names[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())]
                for vals, idx in zip(best.values, best.indices)]


def moving_average(values: torch.Tensor, mask: torch.Tensor, window: int) -> torch.Tensor:
    """Centred moving average of ``values`` (B, T, ...) over the real tokens of ``mask`` (B, T), padding skipped:
    each real token averages the real tokens within ``window // 2`` real positions before and ``(window - 1) // 2``
    after it. Padding stays 0."""
    out = torch.zeros_like(values)
    before, after = window // 2, (window - 1) // 2
    for b in range(values.shape[0]):
        real = values[b][mask[b]]
        if real.shape[0] == 0:
            continue
        zero = torch.zeros_like(real[:1])
        total = torch.cat([zero, real.cumsum(0)])
        index = torch.arange(real.shape[0])
        lo, hi = (index - before).clamp(min=0), (index + after + 1).clamp(max=real.shape[0])
        shape = (-1,) + (1,) * (real.ndim - 1)
        out[b][mask[b]] = (total[hi] - total[lo]) / (hi - lo).to(real.dtype).view(shape)
    return out


class Monitor(_LayerRuntime):
    """Context that records every real token's projection onto the vectors at the chosen layers."""

    def __init__(self, model, vectors: VectorSet, layers=None, *, center: torch.Tensor | None = None,
                 tokenizer=None, layer_modules=None, backend: str | None = None, positions_from_mask: bool = True,
                 bf16_probes: bool = False, bf16_dots: bool = False) -> None:
        super().__init__(model, vectors, layers, layer_modules, backend, positions_from_mask)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "emovec_tokenizer", None)
        self.center = center
        # fp32 rows on the CPU: the compiled kernel reads the probes in bf16 (half the bytes; a cosine moves by at
        # most 2^-9, see probe_dtype). Off by default: the recorded scores would change in their third digit.
        # bf16_dots: the rows rounded to bf16 too, and dotted with AVX-512 bf16 instructions (twice the
        # multiply-adds of fp32 ones; a cosine moves by at most ~2^-8); implies bf16_probes; the norms stay exact.
        self.bf16_dots = bool(bf16_dots)
        self.bf16_probes = bool(bf16_probes) or self.bf16_dots
        self._centers: dict[torch.device, torch.Tensor] = {}
        self._probes: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self._capacity = 0
        self._width = 0
        self._scores = self._norms = self.real = self.ids = None
        self._scratch: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._calls: dict[tuple[int, torch.dtype], Any] = {}  # prepared CPU calls, per layer position and h dtype
        self._groups: dict[torch.dtype, Any] = {}  # every layer's prepared call, run together at decode steps
        self._fast: tuple[int, ...] | None = None  # this step's record addresses and strides, for CPU steps

    @property
    def scores(self) -> torch.Tensor | None:
        """The record of scores, (batch, capacity, layers, K) fp32, with every kept decode step run into it."""
        self._flush()
        return self._scores

    @property
    def norms(self) -> torch.Tensor | None:
        """The record of the rows' norms, (batch, capacity, layers) fp32, like ``scores``."""
        self._flush()
        return self._norms

    def enter(self) -> None:
        self._slices = [self.vectors.slice_of(layer) for layer in self.layer_indices]
        # a CPU model's prepared calls, for its dtype, made here rather than at the first forward pass: inside it each
        # took ~100 us (objects out of the caches, the collector's runs), 3 ms for 30 layers, where here it takes ~8
        if self.backend in (None, "cpu") and _ext.has_cpp_library and not torch.compiler.is_compiling():
            param = next(self.model.parameters(), None)
            if param is not None and param.device.type == "cpu" and param.dtype in _ext.DTYPE_CODES:
                for position in range(len(self.layer_indices)):
                    self._prepare_call(position, param.device, param.dtype, self.found.hidden_size)

    def _center(self, device: torch.device) -> torch.Tensor | None:
        if self.center is None:
            return None
        if device not in self._centers:  # copied once per device, never inside the forward pass again
            self._centers[device] = self.center.to(device=device, dtype=torch.float32).contiguous()
        return self._centers[device]

    def _probe(self, position: int, device: torch.device, h_dtype: torch.dtype = torch.float32,
               prepared: bool = False) -> torch.Tensor:
        dtype = probe_dtype(device, h_dtype, self.center is not None)
        if prepared and self.bf16_probes and h_dtype == torch.float32 and self.center is None:
            dtype = torch.bfloat16  # the prepared CPU call takes fp32 rows with bf16 probes
        key = (position, device, dtype)
        if key not in self._probes:  # the vectors keep their device copies: a monitor entered per batch copies none
            self._probes[key] = self.vectors.unit_on(device, dtype)[self._slices[position]]
        return self._probes[key]

    def _flush(self) -> None:
        """Run the rows the decode steps kept (a window's, or those of a step that stopped before its last layer)
        into the record, which is intact until then."""
        for group in self._groups.values():
            group.flush()

    def begin_step(self, step: _Step) -> None:
        device = step.input_ids.device if step.input_ids is not None else (step.real.device if step.real is not None else None)
        if device is None:
            device = next(self.model.parameters()).device
        L, K = len(self.layer_indices), len(self.vectors.names)
        end = step.past + step.length
        new_run = step.past == 0 or self._scores is None or self._scores.shape[0] != step.batch
        if new_run or end > self._capacity or step.past < self._width:
            # the kept rows' scores go to this record: before it is started over or replaced, and before a step
            # that goes back over columns (a cropped cache) writes them again
            self._flush()
        if new_run:
            # a new run: start over in the same record when it has the size a new one would have (no fresh pages
            # to fault in inside the forward pass; results own copies). Not in a record made in inference mode
            # from outside it: torch forbids editing inference tensors there.
            if (self._scores is not None and self._scores.shape[0] == step.batch and self._scores.device == device
                    and self._capacity == max(end, 64)
                    and (torch.is_inference_mode_enabled() or not self._scores.is_inference())):
                for t in (self._scores, self._norms, self.real, self.ids):
                    t.zero_()
            else:
                self._capacity = 0
        if end > self._capacity:
            capacity = max(end, 2 * self._capacity, 64)
            old = (self._scores, self._norms, self.real, self.ids, self._capacity)
            self._scores = torch.zeros(step.batch, capacity, L, K, device=device, dtype=torch.float32)
            self._norms = torch.zeros(step.batch, capacity, L, device=device, dtype=torch.float32)
            self.real = torch.zeros(step.batch, capacity, dtype=torch.bool, device=device)
            self.ids = torch.zeros(step.batch, capacity, dtype=torch.long, device=device)
            if old[4]:
                for new, prev in zip((self._scores, self._norms, self.real, self.ids), old[:4]):
                    new[:, : old[4]] = prev[:, : old[4]]
            self._capacity = capacity
        cols = slice(step.past, end)
        self.real[:, cols] = step.real if step.real is not None else True
        if step.input_ids is not None:
            self.ids[:, cols] = step.input_ids
        self._width = end
        # on the CPU with the compiled kernel, whenever the step's rows are evenly spaced in the record: a decode step
        # (one token per sequence: cap x L x K floats apart), a single sequence, or a first step that fills the
        # record's columns exactly (a prefill of 64 tokens or more: L x K apart), each layer's call writes its scores
        # and norms straight into the record, through a call prepared once per layer. Inside a forward pass that
        # streams the weights through the caches, the general path's Python (a scratch buffer, two indexed copies,
        # the argument list) costs several times what it costs warm; at a prefill, the copy of every layer's scores.
        self._fast = None
        evenly = step.batch == 1 or step.length == 1 or self._capacity == step.length
        if (evenly and device.type == "cpu" and self.backend in (None, "cpu") and _ext.has_cpp_library
                and not torch.compiler.is_compiling()):
            per_column = self._capacity * L if step.length == 1 else L  # floats between rows' norms
            rows = step.batch * step.length
            # a few rows (decode): the layers' rows are kept, and run together when a window of DEFER_WINDOW_ROWS
            # rows per layer is full (or the record is read): one parallel region and one read of the probes per
            # window instead of one per layer and step
            together = rows <= DEFER_MAX_ROWS and (L > 1 or DEFER_WINDOW_ROWS > 0)
            self._fast = (self._scores.data_ptr() + step.past * L * K * 4, K * 4, self._norms.data_ptr() + step.past * L * 4,
                          torch.get_num_threads(), per_column * K, per_column, rows, together)

    def apply(self, position: int, flat: torch.Tensor) -> None:
        fast = self._fast
        # (inside a forward pass that streams the weights through the caches each attribute read here can miss:
        # is_cpu and size(0) make no objects, where device.type and shape cost ~7 us a layer more at a decode step)
        if fast is not None and flat.is_cpu and flat.size(0) == fast[6]:
            scores_at, width, norms_at, threads, scores_stride, norms_stride, rows, together = fast
            if together:
                group = self._groups.get(flat.dtype)
                if group is None:
                    group = self._prepare_group(flat)
                group.run(position, flat.data_ptr(), rows, flat.stride(0), scores_at + position * width,
                          norms_at + position * 4, threads, scores_stride, norms_stride)
                return
            call = self._call(position, flat)
            call.run(flat.data_ptr(), rows, flat.stride(0), scores_at + position * width, norms_at + position * 4,
                     threads, scores_stride, norms_stride)
            return
        key = (flat.shape[0], flat.device)
        if key not in self._scratch:
            self._scratch[key] = (torch.empty(flat.shape[0], len(self.vectors.names), device=flat.device,
                                              dtype=torch.float32),
                                  torch.empty(flat.shape[0], device=flat.device, dtype=torch.float32))
        scores, norms = self._scratch[key]
        if (self.bf16_probes and flat.device.type == "cpu" and self.backend in (None, "cpu") and _ext.has_cpp_library
                and flat.stride(-1) == 1 and not torch.compiler.is_compiling()):
            # the same prepared call (bf16 probes) into the scratch, so every step reads the same probes
            call = self._call(position, flat)
            call.run(flat.data_ptr(), flat.shape[0], flat.stride(0), scores.data_ptr(), norms.data_ptr(),
                     torch.get_num_threads(), 0, 0)
        else:
            center = self._center(flat.device)
            steer_project_trusted(flat, probes=self._probe(position, flat.device, flat.dtype), center=center,
                                  scores=scores, norms=norms, backend=self.backend)
        step = self.step
        cols = slice(step.past, step.past + step.length)
        self._scores[:, cols, position] = scores.view(step.batch, step.length, -1)
        self._norms[:, cols, position] = norms.view(step.batch, step.length)

    def _call(self, position: int, flat: torch.Tensor):
        """This layer's prepared CPU call for the rows' dtype (made on entering for the model's dtype)."""
        call = self._calls.get((position, flat.dtype))
        return call if call is not None else self._prepare_call(position, flat.device, flat.dtype, flat.shape[1])

    def _prepare_call(self, position: int, device: torch.device, h_dtype: torch.dtype, d: int):
        probes = self._probe(position, device, h_dtype, prepared=True)  # kept by self._probes, like the call
        center = self._center(device)
        # bf16 dots: fp32 rows with the bf16 probes (_probe gives them whenever bf16_dots can apply)
        bf16_dots = self.bf16_dots and h_dtype == torch.float32 and probes.dtype == torch.bfloat16

        def make():
            return _ext._C.CpuCall(d=d, h_dtype=_ext.DTYPE_CODES[h_dtype],
                                   w_dtype=_ext.DTYPE_CODES[probes.dtype], probes=probes.data_ptr(),
                                   num_probes=probes.shape[0], center=center.data_ptr() if center is not None else 0,
                                   bf16_dots=bf16_dots)

        if center is None:
            # kept with the vectors, with the probes it reads (so their memory is never another tensor's while the
            # call lives): the next monitor on these vectors finds it by those probes' address and prepares none
            key = ("cpu call", probes.data_ptr(), tuple(probes.shape), probes.dtype, h_dtype, bf16_dots)
            call, _ = self.vectors.kept(key, lambda: (make(), probes))
        else:
            call = make()
        self._calls[(position, h_dtype)] = call
        return call

    def _prepare_group(self, flat: torch.Tensor):
        calls = [self._call(position, flat) for position in range(len(self.layer_indices))]
        # positions run in layer order; the rows of decode steps are kept up to DEFER_WINDOW_ROWS per layer
        group = self._groups[flat.dtype] = _ext._C.CpuLayers(calls, window=DEFER_WINDOW_ROWS)
        return group

    def _restore(self) -> None:
        self._flush()  # a forward that stopped between layers: its kept rows still go to the record
        super()._restore()

    def result(self, decode: bool = True) -> MonitorResult:
        """Everything recorded so far (copied to the CPU); ``decode`` turns token ids into strings."""
        self._flush()
        if self._scores is None:
            raise RuntimeError("nothing was recorded: run the model inside the `with emovec.monitor(...)` block")
        w = self._width
        # copies, all of them (later steps write the record again: a new run starts over in it), zero where there is
        # no real token (padding): zeroing the few padded places costs a fraction of a masked copy of everything
        mask = self.real[:, :w].to("cpu", copy=True)
        scores = self._scores[:, :w].to("cpu", copy=True)
        norms = self._norms[:, :w].to("cpu", copy=True)
        if not bool(mask.all()):
            scores[~mask] = 0.0
            norms[~mask] = 0.0
        ids = self.ids[:, :w].to("cpu", copy=True)
        positions = torch.where(mask, mask.long().cumsum(1) - 1, -1)
        tokens = None
        if decode and self.tokenizer is not None:
            tokens = [readable_tokens(self.tokenizer, ids[b][mask[b]].tolist()) for b in range(ids.shape[0])]
        return MonitorResult(list(self.vectors.names), list(self.layer_indices), scores, norms, mask, ids, positions, tokens)


# decode steps of at most this many rows defer each layer's projection to the last monitored layer (kCpuRowTile in
# src/steer_project.h: one tile of rows, whose probes the kernel splits among threads)
DEFER_MAX_ROWS = 24
# ... and keep them across decode steps, up to this many rows per layer (64 steps at batch 1, 8 at batch 8), before
# projecting them in one call per layer: inside a forward pass the model's weights evict the probes (12 MB for 30
# layers x 171 in fp32) from the caches, so each step read them from DRAM again. The record is complete whenever it
# is read (`result()`, `scores`, `norms`, leaving the block); 0 projects at every step.
DEFER_WINDOW_ROWS = 64


def probe_dtype(device: torch.device, h_dtype: torch.dtype, has_center: bool) -> torch.dtype:
    """The dtype the monitor keeps its probes in: on a GPU with bf16/fp16 activations and no center, h's dtype
    (half the bytes the decode kernel streams per call; products still accumulate in fp32, and rounding a unit
    probe moves a score by at most 2^-9 ‖h‖ in bf16, 2^-11 ‖h‖ in fp16: a cosine by at most 0.002 / 0.0005, by
    Cauchy-Schwarz; tests/test_runtime.py checks the bound); fp32 otherwise (the CPU kernel
    makes its own bf16 copy where the CPU has bf16 dot instructions; the C++ core takes center and probes in one
    dtype, and a rounded center would shift every score)."""
    if device.type == "cuda" and h_dtype in (torch.bfloat16, torch.float16) and not has_center:
        return h_dtype
    return torch.float32


def _readable(token: str, tokenizer) -> str:
    text = tokenizer.convert_tokens_to_string([token])
    return text if text else token


# per tokenizer (kept weakly), each token id's readable string: a result of 4 x 256 tokens decoded token by token
# took 2-8 ms
_READABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def readable_tokens(tokenizer, ids: list[int]) -> list[str]:
    """Each token id as readable text (``convert_tokens_to_string`` of the token alone; the raw token where that is
    empty), remembered per tokenizer."""
    try:
        cache = _READABLE.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced or hashed: no memory
        cache = {}
    missing = list(dict.fromkeys(i for i in ids if i not in cache))
    if missing:
        for i, token in zip(missing, tokenizer.convert_ids_to_tokens(missing)):
            cache[i] = _readable(token, tokenizer)
    return [cache[i] for i in ids]


def monitor(model, vectors: VectorSet, layers=None, **kwargs) -> Monitor:
    """Record, for every real token (prompt and generated), each vector's score at each chosen layer.

    >>> with emovec.monitor(model, vectors, layers="all") as mon:
    ...     model.generate(**inputs, max_new_tokens=20)
    >>> result = mon.result()          # MonitorResult: scores (B, T, L, K), cosine, mask, tokens, ...

    Options: ``center`` (subtracted before projecting), ``backend``, ``tokenizer``, and ``bf16_probes=True``: on
    the CPU with fp32 activations (no center), read the probes in bf16, half the bytes (a decode step's 30 x 171
    probes of the default model: 6 MB instead of 12). A unit probe's rounding moves a score by at most 2^-9 of the
    row's norm; off by default, so recorded scores do not change. ``bf16_dots=True`` (implies ``bf16_probes``; like
    it, CPU and fp32 activations only, and ignored with a ``center``) also rounds each row to bf16 before its dots,
    which then run in AVX-512 bf16 instructions where the CPU has them
    (twice the multiply-adds per instruction of fp32): a score moves by at most ~2^-8 of the row's norm, the norms
    stay exact; for many rows at once (prefill, decode windows at batch 8) it is ~1.5x faster than fp32 dots.
    """
    return Monitor(model, vectors, layers, **kwargs)


# ========================================================================================== steer


Recipe = dict[str, float]


SANE_RELATIVE_STRENGTH = 0.5  # the research steered with |s| <= 0.5 times the layer's mean residual norm


def steering_vector(vectors: VectorSet, recipe: Recipe, layer: int, *, relative: bool = True,
                    raw: bool = False) -> torch.Tensor:
    """The (d,) fp32 vector that ``recipe`` adds to layer ``layer``'s residual stream: the sum over its terms of
    ``strength × scale × direction``, where direction is the unit vector (or, with ``raw=True``, the stored vector
    as it is) and scale is the layer's mean residual norm when ``relative`` (else 1). The one definition used by
    :func:`steer` and by the GGUF export."""
    s = vectors.slice_of(layer)
    if relative and vectors.mean_norms is None:
        raise ValueError("relative strength needs the layers' mean residual norms: use vectors with mean_norms "
                         "(emovec.measure_mean_norms(model, vectors, texts)) or relative=False")
    scale = float(vectors.mean_norms[s]) if relative else 1.0
    directions = vectors.vectors[s] if raw else vectors.unit[s]
    total = torch.zeros(vectors.hidden_size, dtype=torch.float32)
    for name, strength in recipe.items():
        total = total + float(strength) * scale * directions[vectors.index(name)]
    return total


class _PerSequence(_LayerRuntime):
    """Shared by steer and regulate: one spec (a dict, or None) per sequence or one for all, and the positions
    they apply to; each step turns them into the op's per-row slots (-1: row untouched), on the device."""

    def _init_specs(self, spec, positions) -> None:
        self.recipes = [spec] if isinstance(spec, dict) else list(spec)
        self.per_sequence = not isinstance(spec, dict)
        if isinstance(positions, str):
            if positions not in ("all", "prompt", "generated"):
                raise ValueError(f"positions must be 'all', 'prompt', 'generated' or a list of (start, end) spans, "
                                 f"got {positions!r}")
            self._spans = None
        else:
            positions = list(positions)
            per_sequence = bool(positions) and all(isinstance(p, list) for p in positions)
            groups = positions if per_sequence else [positions]
            try:
                groups = [[(int(a), int(b)) for a, b in group] for group in groups]
            except (TypeError, ValueError):
                raise ValueError("positions spans are (start, end) pairs of token positions: [(0, 5), ...] for every "
                                 "sequence, or one such list per sequence") from None
            width = max(1, max(len(g) for g in groups))
            spans = torch.full((len(groups), width, 2), -1, dtype=torch.long)  # (-1, -1): an empty span
            for i, group in enumerate(groups):
                if group:
                    spans[i, : len(group)] = torch.tensor(group)
            self._spans = spans
            self._spans_per_sequence = per_sequence
        self.positions = positions

    def _init_steps(self) -> None:
        distinct = [r for r in self.recipes if r is not None]
        self._recipe_ids = [None if r is None else distinct.index(r) for r in self.recipes]
        self._first_width = None
        self._real_count = None
        self.slots = None
        self._slots_on: dict[torch.device, torch.Tensor] = {}
        self._recipe_tensors: dict[tuple[int, torch.device], torch.Tensor] = {}

    def begin_step(self, step: _Step) -> None:
        device = step.input_ids.device if step.input_ids is not None else next(self.model.parameters()).device
        batch, length = step.batch, step.length
        if self.per_sequence and len(self._recipe_ids) != batch:
            raise ValueError(f"{len(self._recipe_ids)} {self.what} were given for a batch of {batch} sequences; "
                             "give one (or None) per sequence, or a single dict for all")
        recipe_id = self._recipe_tensor(batch, device)
        real = step.real if step.real is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
        if step.past == 0 or self._first_width is None:
            self._first_width = length
            self._real_count = torch.zeros(batch, dtype=torch.long, device=device)
        # (each small torch op costs ~10 us inside a forward pass, at every decode step: only what the positions need)
        if self.positions == "all":
            chosen = real
        elif self.positions in ("prompt", "generated"):
            columns = torch.arange(step.past, step.past + length, device=device)
            first = (columns < self._first_width)[None, :]
            chosen = real & (first if self.positions == "prompt" else ~first)
        else:
            if self._spans_per_sequence and self._spans.shape[0] != batch:
                raise ValueError(f"{self._spans.shape[0]} lists of position spans were given for a batch of {batch} "
                                 "sequences; give one list per sequence")
            position = self._real_count[:, None] + real.long().cumsum(1) - 1
            spans = self._spans.to(device)
            start, end = spans[:, None, :, 0], spans[:, None, :, 1]  # (B or 1, 1, S)
            inside = ((position[:, :, None] >= start) & (position[:, :, None] < end)).any(-1)
            chosen = real & inside
            self._real_count = self._real_count + real.long().sum(1)  # only spans count real tokens
        self.slots = torch.where(chosen, recipe_id[:, None], -1).reshape(-1)
        self._slots_on = {self.slots.device: self.slots}

    def _recipe_tensor(self, batch: int, device) -> torch.Tensor:
        """The spec index of each sequence (-1: none), built once per batch size and device (no per-step copy)."""
        key = (batch, device)
        if key not in self._recipe_tensors:
            ids = self._recipe_ids if self.per_sequence else self._recipe_ids * batch
            self._recipe_tensors[key] = torch.tensor([-1 if i is None else i for i in ids], device=device)
        return self._recipe_tensors[key]

    def _slots(self, device) -> torch.Tensor:
        slots = self._slots_on.get(device)
        if slots is None:  # a model split across devices: one copy per device per step
            slots = self._slots_on[device] = self.slots.to(device)
        return slots


class Steer(_PerSequence):
    """Context that adds vectors to the residual stream, per sequence and per position."""

    order = 0
    what = "steering recipes"

    def __init__(self, model, vectors: VectorSet, recipe: Recipe | Sequence[Recipe | None], layers=None, *,
                 positions: str | Sequence[tuple[int, int]] = "all", relative: bool | None = None,
                 raw: bool = False, layer_modules=None, backend: str | None = None,
                 positions_from_mask: bool = True) -> None:
        super().__init__(model, vectors, layers, layer_modules, backend, positions_from_mask)
        if not isinstance(recipe, (dict, list, tuple)):
            raise TypeError(f"a steering recipe is a dict of name -> strength (e.g. {{'calm': 0.05}}), got {recipe!r}")
        for r in [recipe] if isinstance(recipe, dict) else list(recipe):
            if r is None:
                continue
            if not isinstance(r, dict):
                raise TypeError(f"a steering recipe is a dict of name -> strength (e.g. {{'calm': 0.05}}), got {r!r}")
            for name, strength in r.items():
                vectors.index(name)
                if not isinstance(strength, (int, float)):
                    raise TypeError(f"strength of {name!r} must be a number, got {strength!r}")
        self._init_specs(recipe, positions)
        if raw and relative:
            raise ValueError("raw=True multiplies the stored vectors as they are (their size is part of them); it "
                             "cannot be combined with relative=True")
        relative = not raw if relative is None else bool(relative)
        self.relative = relative
        self.raw = bool(raw)
        if relative and vectors.mean_norms is None:
            raise ValueError("relative strength needs the layers' mean residual norms: use vectors with mean_norms "
                             "(emovec.measure_mean_norms(model, vectors, texts)) or relative=False")
        self._check_strengths()

    def _check_strengths(self) -> None:
        """Refuse strengths whose steering vector cannot be represented (its squared norm overflows fp32, or an
        element overflows the model's dtype); warn above the research's range, |s| <= SANE_RELATIVE_STRENGTH."""
        dtype = next(self.model.parameters()).dtype
        limit = min(torch.finfo(dtype).max, math.sqrt(torch.finfo(torch.float32).max))
        warned: set[str] = set()
        for layer in self.layer_indices:
            scale = self.vectors.mean_norm(layer) if self.relative else 1.0
            for r in self.recipes:
                for name, strength in (r or {}).items():
                    length = float(self.vectors.vectors[self.vectors.slice_of(layer), self.vectors.index(name)].norm())
                    size = abs(float(strength)) * scale * (length if self.raw else 1.0)
                    if not math.isfinite(size) or size >= limit:
                        raise ValueError(f"steering strength {name}={strength:g} gives a vector of norm {size:.3g} at "
                                         f"layer {layer}, too large for the model ({str(dtype).replace('torch.', '')}"
                                         f" overflows); the research used |strength| <= {SANE_RELATIVE_STRENGTH} "
                                         "(relative)")
                    norm = self.vectors.mean_norm(layer) if self.vectors.mean_norms is not None else 0.0
                    relative = size / norm if norm > 0 else None
                    if relative is not None and relative > SANE_RELATIVE_STRENGTH and name not in warned:
                        warned.add(name)
                        warnings.warn(f"steering strength {name}={strength:g} is {relative:.3g} times layer {layer}'s "
                                      f"mean residual norm; above {SANE_RELATIVE_STRENGTH} the model usually degrades "
                                      "into repetition or nonsense (the research stayed within 0.5)", stacklevel=3)

    def enter(self) -> None:
        self._init_steps()
        distinct = [r for r in self.recipes if r is not None]
        tables = []
        for layer in self.layer_indices:
            rows = [steering_vector(self.vectors, r, layer, relative=self.relative, raw=self.raw) for r in distinct]
            tables.append(torch.stack(rows) if rows else torch.zeros(1, self.vectors.hidden_size, dtype=torch.float32))
        self._tables_cpu = tables
        self._tables: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self._steer_calls: dict[tuple[int, torch.dtype], tuple[torch.Tensor, Any]] = {}  # see cpu_steering_call

    def _table(self, position: int, device, dtype) -> torch.Tensor:
        key = (position, device, dtype)
        if key not in self._tables:
            self._tables[key] = self._tables_cpu[position].to(device=device, dtype=dtype).contiguous()
        return self._tables[key]

    def apply(self, position: int, flat: torch.Tensor) -> None:
        slots, table = self._slots(flat.device), self._table(position, flat.device, flat.dtype)
        errors = self.error_flag(flat.device)
        if (flat.is_cpu and self.backend in (None, "cpu") and _ext.has_cpp_library and flat.stride(-1) == 1
                and flat.dtype in _ext.DTYPE_CODES and slots.is_contiguous() and not torch.compiler.is_compiling()):
            # on the CPU: a call prepared per table, run with the rows and the step's slots (the general call's
            # Python costs ~30 us a layer inside a decode step that streams the weights through the caches)
            call = cpu_steering_call(self._steer_calls, (position, flat.dtype), table, flat)
            call.run(flat.data_ptr(), flat.shape[0], flat.stride(0), slots.data_ptr(), torch.get_num_threads(),
                     errors.data_ptr())
            return
        steer_project_trusted(flat, slots=slots, table=table, backend=self.backend, errors=errors)


def steer(model, vectors: VectorSet, recipe: Recipe | Sequence[Recipe | None], layers=None, **kwargs) -> Steer:
    """Add ``strength × vector`` to the residual stream at the chosen layers while the context is active.

    ``recipe`` is ``{"calm": 0.05, ...}`` for every sequence, or a list with one dict (or None) per sequence.
    With ``relative=True`` (default) strength is in units of the layer's mean residual norm (the research's
    convention: ``s × mean‖h‖ × unit vector``); with ``relative=False`` it multiplies the unit vector; with
    ``raw=True`` it multiplies the stored vector as it is (an imported control vector, whose size is part of it).
    ``positions``: "all", "prompt", "generated", [(start, end), ...] spans of real-token positions (counted from
    0 at each sequence's first real token, padding excluded), or one such list per sequence.
    Padding rows are never touched.
    """
    return Steer(model, vectors, recipe, layers, **kwargs)


# ===================================================================================== regulate


Bounds = dict[str, tuple[float | None, float | None]]


@dataclass
class RegulationResult:
    """Per-token corrections made by :func:`regulate`.

    corrections : (B, T, L, C) fp32, ``p - clamped p`` of each bound's direction at each regulated layer (projection
        units, on the residual stream as steering left it): > 0 where a cap pulled the reading down, < 0 where a
        floor pushed it up, 0 within bounds, at untouched positions and at padding.
    mask : (B, T) bool, True at real tokens.
    """

    names: list[str]
    layers: list[int]
    corrections: torch.Tensor
    mask: torch.Tensor

    def share_corrected(self) -> dict[str, float]:
        """Per name, the share of real (token, layer) readings that a bound had to correct."""
        real = self.mask[:, :, None].expand(*self.corrections.shape[:3])
        total = max(int(real.sum()), 1)
        return {name: float((self.corrections[..., c] != 0)[real].sum()) / total for c, name in enumerate(self.names)}


def _parse_bounds(spec: Any, vectors: VectorSet, relative: bool) -> Bounds:
    if not isinstance(spec, dict) or not spec:
        raise TypeError(f"bounds are a dict of name -> (lower, upper), e.g. {{'desperate': (None, 0.02)}}, got {spec!r}")
    out: Bounds = {}
    for name, pair in spec.items():
        vectors.index(name)
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"the bounds of {name!r} must be a (lower, upper) pair, None for no bound on a side, "
                            f"e.g. (None, 0.02); got {pair!r}")
        lo, hi = (None if v is None else float(v) for v in pair)
        for v in (lo, hi):
            if v is not None and math.isnan(v):
                raise ValueError(f"a bound of {name!r} is NaN; use None for no bound")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"the lower bound of {name!r} ({lo:g}) is above its upper bound ({hi:g})")
        if relative and ((lo is not None and lo >= 1) or (hi is not None and hi <= -1)):
            raise ValueError(f"the bounds of {name!r} are cosines (relative=True): a floor must be below 1 and a cap "
                             "above -1")
        out[name] = (lo, hi)
    return out


class Regulate(_PerSequence):
    """Context that holds each named concept's reading within bounds, per token, inside the forward pass."""

    order = 0.5  # after steering (0), before monitoring (1): the monitor reads the regulated stream
    what = "bound sets"

    def __init__(self, model, vectors: VectorSet, bounds: Bounds | Sequence[Bounds | None], layers=None, *,
                 positions: str | Sequence[tuple[int, int]] = "all", relative: bool = True, record: bool = True,
                 layer_modules=None, backend: str | None = None, positions_from_mask: bool = True) -> None:
        super().__init__(model, vectors, layers, layer_modules, backend, positions_from_mask)
        specs = [bounds] if isinstance(bounds, dict) else list(bounds) if isinstance(bounds, (list, tuple)) else None
        if specs is None:
            raise TypeError(f"bounds are a dict of name -> (lower, upper), or a list with one such dict (or None) per "
                            f"sequence; got {bounds!r}")
        parsed = [None if b is None else _parse_bounds(b, vectors, relative) for b in specs]
        self._init_specs(parsed[0] if isinstance(bounds, dict) else parsed, positions)
        names: list[str] = []
        for b in parsed:
            for name in b or {}:
                if name not in names:
                    names.append(name)
        if not names:
            raise ValueError("no bounds were given: name at least one concept, e.g. {'desperate': (None, 0.02)}")
        self.names = names
        self.relative = bool(relative)
        self.record = record

    def enter(self) -> None:
        self._init_steps()
        distinct = [r for r in self.recipes if r is not None]
        unit = self.vectors.unit
        index = [self.vectors.index(n) for n in self.names]
        self._clamp_cpu = [unit[self.vectors.slice_of(layer)][index].contiguous() for layer in self.layer_indices]
        rows = [[(-math.inf if r.get(n, (None, None))[0] is None else r[n][0],
                  math.inf if r.get(n, (None, None))[1] is None else r[n][1]) for n in self.names] for r in distinct]
        self._bounds_cpu = torch.tensor(rows, dtype=torch.float32)
        self._on: dict[tuple[str, int, torch.device], torch.Tensor] = {}
        self.corrections = self.real = None
        self._capacity = self._width = 0
        self._scratch: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _tensor(self, kind: str, position: int, device) -> torch.Tensor:
        key = (kind, position, device)
        if key not in self._on:
            source = self._clamp_cpu[position] if kind == "clamp" else self._bounds_cpu
            self._on[key] = source.to(device).contiguous()
        return self._on[key]

    def begin_step(self, step: _Step) -> None:
        super().begin_step(step)
        if not self.record:
            return
        device = self.slots.device
        L, C = len(self.layer_indices), len(self.names)
        end = step.past + step.length
        if step.past == 0 or self.corrections is None or self.corrections.shape[0] != step.batch:
            self._capacity = 0
        if end > self._capacity:
            capacity = max(end, 2 * self._capacity, 64)
            old = (self.corrections, self.real, self._capacity)
            self.corrections = torch.zeros(step.batch, capacity, L, C, device=device, dtype=torch.float32)
            self.real = torch.zeros(step.batch, capacity, dtype=torch.bool, device=device)
            if old[2]:
                self.corrections[:, : old[2]] = old[0][:, : old[2]]
                self.real[:, : old[2]] = old[1][:, : old[2]]
            self._capacity = capacity
        self.real[:, step.past:end] = step.real if step.real is not None else True
        self._width = end

    def apply(self, position: int, flat: torch.Tensor) -> None:
        corrections = None
        if self.record:
            key = (flat.shape[0], flat.device)
            if key not in self._scratch:
                self._scratch[key] = torch.empty(flat.shape[0], len(self.names), device=flat.device, dtype=torch.float32)
            corrections = self._scratch[key]
        steer_project_trusted(flat, slots=self._slots(flat.device), clamp=self._tensor("clamp", position, flat.device),
                              bounds=self._tensor("bounds", 0, flat.device), relative_bounds=self.relative,
                              corrections=corrections, backend=self.backend, errors=self.error_flag(flat.device))
        if corrections is not None:
            step = self.step
            self.corrections[:, step.past: step.past + step.length, position] = corrections.view(
                step.batch, step.length, -1)

    def result(self) -> RegulationResult:
        """The corrections recorded so far (copied to the CPU)."""
        if self.corrections is None:
            raise RuntimeError("nothing was recorded: run the model inside the `with emovec.regulate(...)` block "
                               "(with record=True)")
        w = self._width
        mask = self.real[:, :w].cpu()
        return RegulationResult(list(self.names), list(self.layer_indices),
                                torch.where(mask[:, :, None, None], self.corrections[:, :w].cpu(), 0.0), mask)


def regulate(model, vectors: VectorSet, bounds: Bounds | Sequence[Bounds | None], layers=None, **kwargs) -> Regulate:
    """Hold concepts' readings within bounds, per token, while the context is active.

    ``bounds`` is ``{"desperate": (None, 0.02), "calm": (0.0, None)}`` (None: no bound on that side) for every
    sequence, or a list with one such dict (or None: unregulated) per sequence. With ``relative=True`` (default) the
    bounds are cosines of the residual stream with the concept's unit vector (the monitor's ``cosine`` reading at
    that layer, with no center, as the monitor reads by default), met exactly up to fp32 rounding (which grows as a
    bound nears ±1); with ``relative=False`` they are projections ``h · unit vector``. At each chosen layer
    and position, after any steering, each bound is applied in the order the names first appear: a token whose
    reading is out of bounds is moved along the concept's direction just onto the bound; a token within bounds is
    left bit-identical. ``positions`` as for :func:`steer`; padding is never touched. ``result()`` gives per-token
    corrections (``record=False`` skips recording).

    >>> with emovec.regulate(model, vectors, {"desperate": (None, 0.02)}, layers=[15, 20]):
    ...     model.generate(**inputs, max_new_tokens=40)
    """
    return Regulate(model, vectors, bounds, layers, **kwargs)


@torch.no_grad()
def measure_mean_norms(model, vectors: VectorSet, texts: Sequence[str], tokenizer=None, layers=None,
                       batch_size: int = 8, skip: int = 1) -> VectorSet:
    """Return ``vectors`` with ``mean_norms`` measured as the mean ‖h‖ over the real tokens of ``texts``.

    The first ``skip`` tokens of each text are left out: the first token is an attention sink whose norm can
    be ~100x the others', which would make relative steering far too strong.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "emovec_tokenizer", None)
    if tokenizer is None:
        raise ValueError("measure_mean_norms needs a tokenizer (pass tokenizer=...)")
    target_layers = list(vectors.layers) or resolve_layer_indices("all", len(find_decoder_layers(model).layers))
    if layers is not None:
        target_layers = resolve_layer_indices(layers, len(find_decoder_layers(model).layers))
    totals = torch.zeros(len(target_layers), dtype=torch.float64)
    count = 0
    device = next(model.parameters()).device
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True).to(device)
        with Monitor(model, vectors, target_layers) as mon:
            model(**batch)
        res = mon.result(decode=False)
        keep = res.mask & (res.positions >= skip)
        totals += res.norms[keep].double().sum(0)
        count += int(keep.sum())
    norms = (totals / max(count, 1)).float()
    if vectors.layers:
        full = vectors.mean_norms.clone() if vectors.mean_norms is not None else torch.zeros(len(vectors.layers))
        for layer, value in zip(target_layers, norms):
            full[vectors.slice_of(layer)] = value
        norms = full
    elif len(target_layers) > 1:
        norms = norms.mean(0, keepdim=True)
    return dataclasses.replace(vectors, mean_norms=norms, metadata=dict(vectors.metadata))
