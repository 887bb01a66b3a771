"""The vLLM plugin's monitoring under vLLM-like schedules, without vLLM: the real `_Plugin` driven by a fake runner
(requests joining, chunked prefill, decode steps whose rows a group keeps across steps, preemption and recomputation,
requests finishing and fetched mid-window, steps without emovec requests, steering and caps, padded rows), every
reading against float64 projections of the rows the layers handed it."""

from __future__ import annotations

import random
import zlib
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

import emovec
from emovec.vectors import VectorSet

L, K, D = 6, 5, 32


@pytest.fixture
def worker(monkeypatch):
    import emovec.integrations.vllm.worker as W

    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    g = torch.Generator().manual_seed(0)
    vectors = VectorSet(names=[f"c{i}" for i in range(K)], layers=list(range(L)),
                        vectors=torch.randn(L, K, D, generator=g), mean_norms=torch.full((L,), 10.0), default_layer=2)
    monkeypatch.setattr(W, "find_vectors", lambda config: vectors)
    weights = [torch.randn(D, D, generator=g) / D**0.5 for _ in range(L)]
    unit = torch.nn.functional.normalize(vectors.vectors.double(), dim=-1)
    return W, weights, unit


def _row(rid: str, pos: int) -> torch.Tensor:
    return torch.randn(D, generator=torch.Generator().manual_seed(zlib.crc32(f"{rid}/{pos}".encode())))


def _monitor(layers="1,3,4", names="c0,c2,c4", prompt=False, **more):
    extra = {"emovec_monitor": names, "emovec_monitor_layers": layers, **more}
    if prompt:
        extra["emovec_prompt"] = 1
    return extra


class Engine:
    """What the plugin reads of vLLM's runner, and the float64 reference of what each request should read."""

    def __init__(self, worker, max_tokens=512, dtype=torch.float32, graph_safe=False):
        self.W, self.weights, self.unit = worker
        self.runner = NS(device=torch.device("cpu"), model_config=NS(dtype=dtype, hf_config=None),
                         max_num_tokens=max_tokens, requests={}, speculative_config=None,
                         input_batch=NS(req_ids=[], num_computed_tokens_cpu=np.zeros(256, dtype=np.int64)),
                         query_start_loc=NS(np=np.zeros(257, dtype=np.int32)))
        self.plugin = self.W._Plugin(self.runner, L, graph_safe=graph_safe)
        self.dtype = dtype
        self.computed, self.prompt_len, self.specs = {}, {}, {}
        self.ref, self.last, self.recomputed = {}, {}, {}
        self.steps = 0

    def add(self, rid, extra, prompt_len):
        self.runner.requests[rid] = NS(sampling_params=NS(extra_args=extra), prompt_token_ids=list(range(prompt_len)))
        self.computed[rid], self.prompt_len[rid] = 0, prompt_len
        self.ref[rid], self.last[rid], self.recomputed[rid] = {}, -1, 0

    def step(self, schedule, pad=0, fail_before_layer=None):
        """One forward pass of [(request, tokens)], with `pad` rows more than its tokens."""
        batch = self.runner.input_batch
        batch.req_ids = [r for r, _ in schedule]
        starts = np.cumsum([0] + [n for _, n in schedule])
        self.runner.query_start_loc.np[:] = 0
        self.runner.query_start_loc.np[: len(starts)] = starts
        batch.num_computed_tokens_cpu[: len(schedule)] = [self.computed[r] for r, _ in schedule]
        owners = [(r, self.computed[r] + j) for r, n in schedule for j in range(n)]
        noise = torch.Generator().manual_seed(1000 + self.steps)
        x = torch.stack([_row(r, pos) for r, pos in owners] + [torch.randn(D, generator=noise) * 50 for _ in range(pad)])
        plugin, seen = self.plugin, {}
        with torch.inference_mode():
            plugin.begin_step()
            try:
                hidden, residual = x.to(self.dtype).clone(), None
                for i in range(L):
                    if i == fail_before_layer:
                        raise ZeroDivisionError
                    residual = hidden if residual is None else hidden + residual
                    hidden = (torch.tanh(residual.float() @ self.weights[i].T) * 3).to(self.dtype)
                    if plugin.active:
                        plugin.apply(hidden, residual, i)
                    seen[i] = (hidden.double() + residual.double())[: len(owners)].clone()
                hidden.fill_(float("nan"))  # the model reuses its buffers after the forward pass
                residual.fill_(float("nan"))
            except ZeroDivisionError:
                pass
            finally:
                plugin.end_step()
        if fail_before_layer is not None:
            return
        for index, (r, pos) in enumerate(owners):
            spec = plugin.specs.get(r)
            if spec is not None:
                self.specs[r] = spec
            if r not in self.ref or spec is None or not spec.monitor or pos < (0 if spec.prompt
                                                                             else self.prompt_len[r] - 1):
                continue
            self.ref[r][pos] = torch.stack([seen[i][index] for i in range(L)])
            self.recomputed[r] += pos <= self.last[r]
            self.last[r] = max(self.last[r], pos)
        for r, n in schedule:
            self.computed[r] += n
        self.steps += 1

    def check(self, keys=None, pop=False):
        from emovec.integrations import vllm as ev

        out = self.plugin.fetch(keys, pop)
        tol = 2e-2 if self.dtype == torch.bfloat16 else 1e-4
        for r, data in out.items():
            got = ev.decoded(data)
            assert "error" not in got, got
            spec = self.specs[r]
            positions = sorted(self.ref[r])
            assert list(got["positions"]) == positions, r
            if positions:
                h = torch.stack([self.ref[r][p] for p in positions])
                want = torch.stack([h[:, layer] @ self.unit[layer, spec.monitor_index].T
                                    for layer in spec.monitor_layers], 1).numpy()
                norms = torch.stack([h[:, layer].norm(dim=-1) for layer in spec.monitor_layers], 1).numpy()
                scale = max(1.0, float(np.abs(norms).max()))
                assert np.abs(got["scores"] - want).max() / scale < tol, r
                assert np.abs(got["norms"] - norms).max() / scale < tol, r
            assert got["recomputed"] == self.recomputed[r], r
            if pop:
                self.ref.pop(r)
        if keys is None:
            assert not [r for r in self.ref if self.ref[r] and r not in out]
        return out


@pytest.mark.parametrize("config", [dict(max_tokens=40), dict(max_tokens=64), dict(max_tokens=2048),
                                    dict(max_tokens=64, dtype=torch.bfloat16), dict(max_tokens=64, graph_safe=True),
                                    dict(max_tokens=64, pad=0.3)], ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_schedules_read_what_float64_reads(worker, config, seed):
    config = dict(config)
    pad_chance = config.pop("pad", 0.0)
    engine = Engine(worker, **config)
    rnd = random.Random(seed)
    running, waiting, wanted, high, kept_at_once, count = [], [], {}, {}, 0, 0
    for _ in range(120):
        if rnd.random() < 0.15 or not running and not waiting:
            rid = f"r{count}-abcdefgh"
            count += 1
            extra = None
            if rnd.random() > 0.15:
                extra = _monitor(rnd.choice(["1,3,4", "3", "2", "0,5", "1-4"]), rnd.choice(["c0", "c1,c3", "all"]),
                                 prompt=rnd.random() < 0.3)
                if rnd.random() < 0.3:
                    extra.update(emovec_steer="c1=0.2", emovec_layers="2,3")
                if rnd.random() < 0.1:
                    extra["emovec_cap"] = "c2=0.1"
            prompt = rnd.choice([1, 2, 5, 12, 30, 50])
            engine.add(rid, extra, prompt)
            wanted[rid] = prompt + rnd.randint(1, 40)
            waiting.append(rid)
        if running and rnd.random() < 0.05:  # preempted: its tokens are computed again later
            r = rnd.choice(running)
            running.remove(r)
            high[r] = engine.computed[r]
            engine.computed[r] = 0
            waiting.insert(0, r)
        for r in list(running):
            if engine.computed[r] >= wanted[r]:
                running.remove(r)
                del engine.runner.requests[r]
                if rnd.random() < 0.5:
                    engine.check(keys=[r], pop=True)
        budget, schedule = min(engine.runner.max_num_tokens, 48) - 3, []
        for r in running:
            if budget <= 0:
                break
            target = max(engine.prompt_len[r], high.get(r, 0))
            n = min(target - engine.computed[r] if engine.computed[r] < target else 1, budget)
            schedule.append((r, n))
            budget -= n
        while waiting and budget > 0 and len(schedule) < 8:
            r = waiting.pop(0)
            running.append(r)
            n = min(max(max(engine.prompt_len[r], high.get(r, 0)) - engine.computed[r], 1), budget)
            schedule.append((r, n))
            budget -= n
        if not schedule:
            continue
        rnd.shuffle(schedule)
        engine.step(schedule, pad=rnd.choice([0, 1, 3]) if rnd.random() < pad_chance else 0)
        kept_at_once = max(kept_at_once, len(engine.plugin._pending))
        if rnd.random() < 0.05:
            engine.check()
    engine.check()
    if not config.get("graph_safe"):
        assert kept_at_once > 3  # decode steps were kept across steps
    else:
        assert kept_at_once <= 1 and not engine.plugin._groups


def test_padded_rows_late_in_a_window_start_it_over(worker):
    """A step of more rows than tokens (padding) when the window's kept rows leave no room for them: the kept steps
    are projected first and the step's rows written from the record's first row."""
    engine = Engine(worker, max_tokens=64)
    engine.add("a", _monitor(), 1)
    for _ in range(39):
        engine.step([("a", 1)])
    assert len(engine.plugin._pending) == 39
    engine.step([("a", 1)], pad=31)
    engine.check()


def test_a_step_that_keeps_nothing_runs_the_kept_steps_first(worker):
    """A forward pass that stops before its first monitored layer keeps no rows; the steps kept before it are
    projected before their readings are collected, and their group holds no pointer into the record afterwards."""
    engine = Engine(worker, max_tokens=512)
    engine.add("a", _monitor("1,3", "c0"), 1)
    for _ in range(5):
        engine.step([("a", 1)])
    engine.step([("a", 1)], fail_before_layer=0)
    assert not engine.plugin._pending and all(group.pending == 0 for group in engine.plugin._groups.values())
    engine.recomputed["a"] += 1  # the failed step's position is read again by the step that redoes it
    for _ in range(3):
        engine.step([("a", 1)])
    engine.check()


@pytest.mark.parametrize("steered", [False, True])
def test_layers_returning_strided_rows_read_and_edit_them(worker, steered):
    """A layer that returns one tensor whose rows are not of unit stride (not vLLM's Llama layers, whose rows are
    contiguous) takes the general path: its readings equal float64 projections of its rows, and its steering writes
    the same values a contiguous copy of the rows gets."""
    engine = Engine(worker, max_tokens=512)
    extra = _monitor("1,3", "c0,c2")
    if steered:
        extra.update(emovec_steer="c1=0.2", emovec_layers="1,3")
    engine.add("a", extra, 1)
    plugin, runner = engine.plugin, engine.runner
    runner.input_batch.req_ids = ["a"]
    runner.query_start_loc.np[:2] = [0, 3]
    got_rows = {}
    with torch.inference_mode():
        plugin.begin_step()
        try:
            for layer in range(L):
                contiguous = torch.stack([_row("a", p) * (layer + 1) for p in range(3)])
                strided = torch.empty(D, 3).t()  # rows of stride (1, 3): stride(-1) != 1
                strided.copy_(contiguous)
                plugin.apply(strided, None, layer)
                got_rows[layer] = strided.double().clone()
                if steered and layer in (1, 3):  # the same edit on the contiguous rows
                    plugin._fused(contiguous, {"slots": plugin._slots[layer, :3], "table": plugin._tables[layer]})
                    assert not torch.equal(strided, torch.stack([_row("a", p) * (layer + 1) for p in range(3)]))
                assert torch.equal(strided, contiguous)
        finally:
            plugin.end_step()
    from emovec.integrations import vllm as ev

    got = ev.decoded(plugin.fetch(None, False)["a"])
    spec = plugin.specs["a"]
    for i, layer in enumerate(spec.monitor_layers):
        want = (got_rows[layer] @ engine.unit[layer, spec.monitor_index].T).numpy()
        np.testing.assert_allclose(got["scores"][:, i], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["norms"][:, i], got_rows[layer].norm(dim=-1).numpy(), rtol=1e-5, atol=1e-5)
