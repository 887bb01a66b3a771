"""``emovec bench``: monitoring + steering inside a real model against plain generation and naive PyTorch hooks, and
the fused op against the naive op sequence, interleaved in one run, with ratios to ``plain`` from the same run.

Providers: ``plain`` (no intervention); ``naive`` (a forward hook per layer doing the same math with separate torch
ops: the steering add, ``h @ unit.T`` and ``h.norm()``, copying the scores to the host every step, as most tools
do); ``emovec-<backend>`` (the fused runtime, once per available backend). Scenarios: generation of N tokens at
batch 1 and 8 while monitoring every layer x K vectors and steering one recipe at one layer; prefill of ~256-token
texts while recording every layer x K; the intervention work alone for one decode step (every layer's op on the
same tensors, timed over many repeats; on the CPU, ``emovec-cpu`` runs the calls ``emovec.monitor`` makes there, a
call prepared once per layer and, at a decode step's few rows, the layers run together at the last one;
``emovec-cpu bf16 probes`` the same with ``bf16_probes=True``, where the CPU has AVX-512 bf16, and ``emovec-cpu bf16
dots`` with ``bf16_dots=True``); and op
micro-benchmarks. Timing: medians with p20/p80 over interleaved
rounds (drift on a shared machine hits every provider alike).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from emovec import _ext
from emovec.layers import find_decoder_layers, layer_output_hidden, replace_layer_output
from emovec.ops import backend_status, cpu_steering_call, steer_project, steer_project_trusted
from emovec.reference import naive_sequence
from emovec.runtime import DEFER_MAX_ROWS, DEFER_WINDOW_ROWS, monitor, regulate, steer
from emovec.vectors import VectorSet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _stats(samples: Sequence[float]) -> dict[str, float]:
    s = sorted(samples)
    q = statistics.quantiles(s, n=5) if len(s) > 1 else [s[0]] * 4
    return {"p20": q[0], "p50": statistics.median(s), "p80": q[3], "n": len(s)}


def interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, rounds: int, repeats: int = 1,
                warmup: int = 1) -> dict[str, dict[str, float]]:
    """Per provider, seconds per call (median / p20 / p80): ``rounds`` rounds, each calling every provider
    ``repeats`` times in turn."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(statistics.median(_time(fn, device) for _ in range(repeats)))
    return {name: _stats(v) for name, v in samples.items()}


class NaiveHooks:
    """What tools do today: a forward hook per layer that steers with a separate add, projects with ``h @ unit.T``
    and ``h.norm()`` and copies the scores to the host every step."""

    def __init__(self, model, unit: Sequence[torch.Tensor], steer_layer: int | None = None,
                 steer_vector: torch.Tensor | None = None) -> None:
        self.layers = find_decoder_layers(model).layers
        self.unit = unit
        self.steer_layer, self.steer_vector = steer_layer, steer_vector
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles: list[Any] = []

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_hook(self._hook(i)))
        return self

    def _hook(self, i: int):
        def hook(module, args, output):
            h = layer_output_hidden(output)
            if i == self.steer_layer and self.steer_vector is not None:
                h = h + self.steer_vector.to(h.dtype)
                output = replace_layer_output(output, h)
            hf = h.float()
            self.records.append(((hf @ self.unit[i].T).cpu(), hf.norm(dim=-1).cpu()))
            return output

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


class NnsightRun:
    """The same monitoring and steering done with nnsight (when it is installed): inside its trace, each layer's
    output gets the steering add at the steered layer and ``h @ unit.T`` plus ``h.norm()`` copied to the host, at
    every generation step."""

    def __init__(self, model, tokenizer, unit: Sequence[torch.Tensor], steer_layer: int,
                 steer_vector: torch.Tensor) -> None:
        from functools import reduce

        from nnsight import TransformersModel

        self.wrapped = TransformersModel(model, tokenizer=tokenizer)
        path = find_decoder_layers(model).path
        self.layers = reduce(getattr, path.split("."), self.wrapped)
        self.count = len(find_decoder_layers(model).layers)
        self.unit, self.steer_layer, self.steer_vector = unit, steer_layer, steer_vector

    def _layers(self, records, steering: bool) -> None:
        for i in range(self.count):
            out = self.layers[i].output
            h = out[0] if isinstance(out, tuple) else out
            if steering and i == self.steer_layer:
                h[:] = h + self.steer_vector.to(h.dtype)
            hf = h.float()
            records.append(((hf @ self.unit[i].T).cpu(), hf.norm(dim=-1).cpu()))

    def generate(self, ids: torch.Tensor, new_tokens: int, **kwargs):
        with self.wrapped.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs) as tracer:
            records = list().save()
            for _ in tracer.iter[:new_tokens]:
                self._layers(records, steering=True)
            tokens = tracer.result.save()
        return tokens, records

    def forward(self, ids: torch.Tensor):
        with self.wrapped.trace(ids, use_cache=False):
            records = list().save()
            self._layers(records, steering=False)
        return records


def nnsight_status() -> str | None:
    """None when nnsight can be driven here, else why not."""
    import importlib.util

    if importlib.util.find_spec("nnsight") is None:
        return "nnsight is not installed: skipped (pip install nnsight to compare)"
    try:
        import nnsight  # noqa: F401
    except Exception as error:  # noqa: BLE001 - a broken optional install is reported, not raised
        return f"nnsight is installed but cannot be imported ({type(error).__name__}: {error}): skipped"
    return None


def emovec_backends(device: torch.device) -> list[str]:
    """The fused op's backends that can run on ``device`` (on the CPU: cpu and torch; triton only on a GPU)."""
    status = backend_status()
    if device.type == "cuda":
        wanted = ["cuda", "triton", "torch"]
    else:
        wanted = ["cpu", "torch"]
    return [b for b in wanted if status[b] is None]


def random_vectors(model, k: int, seed: int = 0) -> VectorSet:
    found = find_decoder_layers(model)
    g = torch.Generator().manual_seed(seed)
    layers = list(range(len(found.layers)))
    return VectorSet.from_tensor(torch.randn(len(layers), k, found.hidden_size, generator=g),
                                 [f"v{i}" for i in range(k)], layers=layers, mean_norms=[1.0] * len(layers))


def run_bench(model, tokenizer, *, vectors: VectorSet | None = None, k: int = 171, new_tokens: int = 64,
              batches: Sequence[int] = (1, 8), prefill_batch: int = 4, prefill_tokens: int = 256, rounds: int = 3,
              backends: Sequence[str] | None = None, op_shapes: Sequence[int] = (1, 16, 256),
              scenarios: Sequence[str] = ("generate", "prefill", "step", "op"),
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every scenario's rows: provider, p20/p50/p80 seconds, tokens/s, ratio to plain (or to naive, for the op
    rows), and the memory each provider keeps for its recordings."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    vectors = vectors if vectors is not None else random_vectors(model, k)
    k = len(vectors.names)
    num_layers = len(find_decoder_layers(model).layers)
    layers = list(range(num_layers))
    steer_layer = vectors.default_layer if vectors.default_layer is not None else round(2 * (num_layers - 1) / 3)
    name0 = vectors.names[0]
    recipe = {name0: 0.05}
    unit = [vectors.unit[vectors.slice_of(layer)].to(device) for layer in layers]
    relative_scale = vectors.mean_norm(steer_layer) if vectors.mean_norms is not None else 1.0
    steer_vector = (0.05 * relative_scale * vectors.unit[vectors.slice_of(steer_layer), 0]).to(device)
    backends = list(backends) if backends is not None else emovec_backends(device)
    say = progress or (lambda _: None)
    result: dict[str, Any] = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "K": k,
                              "layers": num_layers, "steer_layer": steer_layer, "recipe": recipe,
                              "backends": backends, "rows": []}
    g = torch.Generator().manual_seed(1)
    vocab = min(getattr(model.config, "vocab_size", 32000), 30000)

    nnsight = NnsightRun(model, tokenizer, unit, steer_layer, steer_vector) if nnsight_status() is None else None

    def providers(run: Callable[[Any], Any], with_cap: bool = False) -> dict[str, Callable[[], Any]]:
        out = {"plain": lambda: run(None), "naive": lambda: run("naive")}
        if nnsight is not None:
            out["nnsight"] = lambda: run("nnsight")
        for b in backends:
            out[f"emovec-{b}"] = lambda b=b: run(b)
        if with_cap and backends:  # the same plus a cosine cap on the steered concept at the steered layer
            out[f"emovec-{backends[0]}+cap"] = lambda: run(("cap", backends[0]))
        return out

    def contexts(kind, recording: bool = True, steering: bool = True):
        import contextlib

        stack = contextlib.ExitStack()
        if kind == "naive":
            stack.enter_context(NaiveHooks(model, unit, steer_layer if steering else None,
                                           steer_vector if steering else None))
        elif kind is not None:
            if isinstance(kind, tuple):  # ("cap", backend)
                kind = kind[1]
                stack.enter_context(regulate(model, vectors, {name0: (None, 0.0)}, [steer_layer], backend=kind))
            if steering:
                stack.enter_context(steer(model, vectors, recipe, [steer_layer], backend=kind))
            if recording:
                stack.enter_context(monitor(model, vectors, layers, backend=kind))
        return stack

    def recorded_mb(batch: int, tokens: int, kind) -> float:
        if kind is None:
            return 0.0
        extra = batch * tokens * 4 if str(kind).endswith("+cap") else 0  # the corrections of one bound, one layer
        return (batch * tokens * num_layers * (k + 1) * 4 + extra) / 2**20

    if "generate" in scenarios:
        prompt_len = 16
        for batch in batches:
            say(f"generate: batch {batch}, {new_tokens} tokens")
            ids = torch.randint(100, vocab, (batch, prompt_len), generator=g).to(device)
            kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)

            @torch.no_grad()
            def gen(kind, ids=ids, kwargs=kwargs):
                if kind == "nnsight":
                    nnsight.generate(ids, new_tokens, attention_mask=torch.ones_like(ids), do_sample=False,
                                     pad_token_id=kwargs["pad_token_id"])
                    return
                with contexts(kind):
                    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)

            timings = interleaved(providers(gen, with_cap=True), device, rounds)
            _rows(result, f"generate b{batch}", timings, batch * new_tokens, "plain",
                  {p: recorded_mb(batch, prompt_len + new_tokens, p if p != "plain" else None) for p in timings})
            if nnsight is not None:
                result.setdefault("nnsight_steps", {})[f"b{batch}"] = new_tokens
    if "prefill" in scenarios:
        say(f"prefill: batch {prefill_batch} x {prefill_tokens} tokens")
        ids = torch.randint(100, vocab, (prefill_batch, prefill_tokens), generator=g).to(device)

        @torch.no_grad()
        def pre(kind):
            if kind == "nnsight":
                nnsight.forward(ids)
                return
            with contexts(kind, steering=False):
                model(input_ids=ids, use_cache=False)

        timings = interleaved(providers(pre), device, rounds)
        _rows(result, "prefill", timings, prefill_batch * prefill_tokens, "plain",
              {p: recorded_mb(prefill_batch, prefill_tokens, p if p != "plain" else None) for p in timings})
    if "step" in scenarios:
        say("one decode step's intervention work alone")
        for batch in batches:
            h = [torch.randn(batch, model.config.hidden_size, generator=g).to(device=device, dtype=dtype)
                 for _ in layers]
            probes = [u.to(dtype) for u in unit]
            scores = torch.empty(batch, k, device=device)
            norms = torch.empty(batch, device=device)
            table = steer_vector[None].to(dtype)
            slots = torch.zeros(batch, dtype=torch.long, device=device)

            steps_per_call: dict[str, int] = {}  # providers timed a window of decode steps per call

            def name_of(b, probe_dtype, bf16_dots=False):
                return f"emovec-{b}" + (" bf16 dots" if bf16_dots else " bf16 probes" if probe_dtype != torch.float32
                                        else "")

            def fused(b, prepared=True, probe_dtype=torch.float32, bf16_dots=False):
                if b == "cpu" and _ext.has_cpp_library and prepared:
                    # what emovec.monitor runs per layer on the CPU: a call prepared once per layer (the op with
                    # its probes fixed; only h's and the outputs' addresses cross from Python), and the op for
                    # the steering
                    # the monitor's CPU probes are the fp32 unit vectors (probe_dtype), contiguous per layer
                    # (with bf16_probes=True, fp32 rows: the probes in bf16, as emovec.monitor keeps them then)
                    kept = [u if probe_dtype == torch.float32 else u.to(probe_dtype).contiguous() for u in unit]
                    calls = [_ext._C.CpuCall(d=h[i].shape[1], h_dtype=_ext.DTYPE_CODES[dtype],
                                             w_dtype=_ext.DTYPE_CODES[probe_dtype], probes=kept[i].data_ptr(),
                                             num_probes=k, center=0, bf16_dots=bf16_dots) for i in layers]
                    threads = torch.get_num_threads()
                    # and at a decode step's few rows, the layers' rows kept (up to DEFER_WINDOW_ROWS per layer, across
                    # steps) and run together, as the monitor does (emovec.runtime.DEFER_MAX_ROWS); the steering
                    # through the runtime's prepared call. Timed a whole window at a time, its last step's flush
                    # included, and reported per step
                    group = (_ext._C.CpuLayers(calls, window=DEFER_WINDOW_ROWS)
                             if batch <= DEFER_MAX_ROWS and (len(calls) > 1 or DEFER_WINDOW_ROWS > 0) else None)
                    window_steps = max(1, DEFER_WINDOW_ROWS // batch) if group is not None else 1
                    steps_per_call[name_of(b, probe_dtype, bf16_dots)] = window_steps
                    steer_calls: dict = {}
                    steer_call = cpu_steering_call(steer_calls, "step", table, h[steer_layer])
                    # each layer its own outputs, as in the monitor's record (the layers run on several threads)
                    layer_scores = torch.empty(len(calls), batch, k, device=device)
                    layer_norms = torch.empty(len(calls), batch, device=device)
                    # addresses, as the runtime computes them (integers, no tensor views per layer and step)
                    at = [(i, h[i].data_ptr(), h[i].stride(0), layer_scores.data_ptr() + i * batch * k * 4,
                           layer_norms.data_ptr() + i * batch * 4, scores.data_ptr(), norms.data_ptr()) for i in layers]
                    slots_at, steer_at = slots.data_ptr(), h[steer_layer].data_ptr()

                    def run_prepared(kept=kept, steer_calls=steer_calls, at=at,
                                     outputs=(layer_scores, layer_norms)):  # what the addresses point at lives on
                        for _ in range(window_steps):
                            for i, h_at, stride, layer_scores_at, layer_norms_at, scores_at, norms_at in at:
                                if i == steer_layer:
                                    steer_call.run(steer_at, batch, stride, slots_at, threads)
                                if group is not None:
                                    group.run(i, h_at, batch, stride, layer_scores_at, layer_norms_at, threads, 0, 0)
                                else:
                                    calls[i].run(h_at, batch, stride, scores_at, norms_at, threads, 0, 0)
                        if group is not None:
                            group.flush()
                    return run_prepared

                def run():  # what the runtime calls per layer: steering at one layer, monitoring at all
                    for i in layers:
                        if i == steer_layer:
                            steer_project_trusted(h[i], slots=slots, table=table, backend=b)
                        steer_project_trusted(h[i], probes=probes[i], scores=scores, norms=norms, backend=b)
                return run

            def naive_step():
                for i in layers:
                    x = h[i] + table if i == steer_layer else h[i]
                    xf = x.float()
                    (xf @ unit[i].T).cpu(), xf.norm(dim=-1).cpu()

            clamp = unit[steer_layer][:1].contiguous()
            bounds = torch.tensor([[[-float("inf"), 0.0]]], device=device)
            corrections = torch.empty(batch, 1, device=device)

            def fused_cap(b):
                def run():
                    for i in layers:
                        if i == steer_layer:
                            steer_project_trusted(h[i], slots=slots, table=table, backend=b)
                            steer_project_trusted(h[i], slots=slots, clamp=clamp, bounds=bounds, relative_bounds=True,
                                                  corrections=corrections, backend=b)
                        steer_project_trusted(h[i], probes=probes[i], scores=scores, norms=norms, backend=b)
                return run

            fns = {"naive": naive_step, **{f"emovec-{b}": fused(b) for b in backends}}
            if "cpu" in backends and _ext.has_cpp_library:  # the op itself at every layer, for comparison
                fns["emovec-cpu (op)"] = fused("cpu", prepared=False)
                if dtype == torch.float32 and _ext._C.cpu_bf16_dot():  # emovec.monitor(..., bf16_probes=True)
                    fns["emovec-cpu bf16 probes"] = fused("cpu", probe_dtype=torch.bfloat16)
                    # emovec.monitor(..., bf16_dots=True): the rows rounded to bf16 too, vdpbf16ps
                    fns["emovec-cpu bf16 dots"] = fused("cpu", probe_dtype=torch.bfloat16, bf16_dots=True)
            if backends:
                fns[f"emovec-{backends[0]}+cap"] = fused_cap(backends[0])
            timings = interleaved(fns, device, rounds=max(3, rounds), repeats=20, warmup=3)
            for name, steps in steps_per_call.items():  # a window of steps per call: per step
                if name in timings and steps > 1:
                    timings[name] = {stat: value / steps if stat != "n" else value for stat, value in timings[name].items()}
            _rows(result, f"step b{batch} ({num_layers} layers)", timings, batch, "naive", {})
            result.setdefault("step_window_steps", {})[f"b{batch}"] = dict(steps_per_call)
    if "op" in scenarios:
        say("op micro-benchmarks")
        d = model.config.hidden_size
        for n in op_shapes:
            h0 = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
            h = h0.clone()
            table = (0.01 * torch.randn(2, d, generator=g)).to(device=device, dtype=dtype)
            slots = ((torch.arange(n) % 3) - 1).to(device)
            probes = unit[0].to(dtype)
            segments = (torch.arange(n) % 2).to(device)
            sums, counts = torch.zeros(2, d, device=device), torch.zeros(2, device=device)
            scores, norms = torch.empty(n, k, device=device), torch.empty(n, device=device)

            def fused_op(b):
                return lambda: steer_project(h, slots=slots, table=table, probes=probes, segments=segments, sums=sums,
                                             counts=counts, scores=scores, norms=norms, backend=b, validate=False)

            fns = {"naive": lambda: naive_sequence(h, slots, table, None, probes, None, segments, sums, counts),
                   **{f"emovec-{b}": fused_op(b) for b in backends}}
            timings = interleaved(fns, device, rounds=max(3, rounds), repeats=50, warmup=5)
            _rows(result, f"op N={n} d={d} K={k}", timings, n, "naive", {})
    return result


def _rows(result: dict, scenario: str, timings: dict[str, dict[str, float]], tokens: int, baseline: str,
          memory: dict[str, float]) -> None:
    base = timings[baseline]["p50"]
    for provider, t in timings.items():
        result["rows"].append({
            "scenario": scenario, "provider": provider, "p20_ms": round(1e3 * t["p20"], 4),
            "p50_ms": round(1e3 * t["p50"], 4), "p80_ms": round(1e3 * t["p80"], 4), "samples": t["n"],
            "tokens_per_s": round(tokens / t["p50"], 1) if t["p50"] > 0 else None,
            "baseline": baseline, "time_vs_baseline": round(t["p50"] / base, 3) if base > 0 else None,
            "recorded_mb": round(memory.get(provider, 0.0), 2),
        })
