"""emovec.generate: greedy generation with monitoring and steering in a static cache, eager and under torch.compile,
against the eager runtime (emovec.steer + emovec.monitor around model.generate) on the same model."""

from __future__ import annotations

import pytest
import torch

import emovec
from conftest import RUNTIME_NAMES as NAMES


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 290, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding
    return ids, mask


def _reference(model, vectors, ids, mask, recipe, positions, new=5):
    with torch.no_grad(), emovec.steer(model, vectors, recipe, [1], positions=positions), \
            emovec.monitor(model, vectors, "all") as mon:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    return out, mon.result(decode=False)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_eager_static_loop_matches_the_runtime(tiny, positions):
    model, vectors = tiny
    ids, mask = _batch()
    recipe = [{"calm": 0.5, "sad": -0.3}, None]
    got = emovec.generate(model, ids, mask, max_new_tokens=5, vectors=vectors, monitor_layers="all", recipe=recipe,
                          steer_layers=[1], positions=positions)
    want, mon = _reference(model, vectors, ids, mask, recipe, positions)
    assert got.sequences.tolist() == want.tolist()
    assert torch.equal(got.monitor.mask, mon.mask) and got.monitor.layers == [0, 1, 2, 3]
    torch.testing.assert_close(got.monitor.scores, mon.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.monitor.norms, mon.norms, rtol=1e-5, atol=1e-5)
    assert got.monitor.names == NAMES
    assert "forward" not in model.model.layers[1].__dict__  # restored


def test_cpu_decode_rows_are_kept_across_steps_and_reach_the_record(tiny):
    """On the CPU the static loop keeps each decode step's monitored rows (a window of 64 rows per layer: 32 steps of
    2 rows, so 40 steps cross one window and end inside another) and projects them into the record at the window's
    end or the call's; the record equals the eager runtime's, eager and compiled, and nothing stays kept after a
    call."""
    from emovec import generation

    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    model, vectors = tiny
    ids, mask = _batch(3)
    recipe = [{"calm": 0.5}, {"sad": 0.3}]
    want, mon = _reference(model, vectors, ids, mask, recipe, "all", new=40)
    for compile in (False, True):
        got = emovec.generate(model, ids, mask, max_new_tokens=40, vectors=vectors, monitor_layers="all",
                              recipe=recipe, steer_layers=[1], compile=compile)
        run = generation._RUNS[model]
        assert run.group is not None and run.group.window == 64 and run.group.kept_rows == 0
        assert got.sequences.tolist() == want.tolist()
        torch.testing.assert_close(got.monitor.scores, mon.scores, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.monitor.norms, mon.norms, rtol=1e-5, atol=1e-5)
        assert (got.monitor.scores[:, -1].abs() > 0).any()  # the last step's rows were flushed in


def test_other_vectors_of_the_same_shape_are_read_at_decode_steps(tiny):
    """A second call with other vectors of the same names and layers reuses the run's buffers (the probes copied in
    place): its decode steps read the new vectors, not the first call's packed ones (found by a review), eager and
    compiled, against the eager runtime."""
    import copy

    model, vectors = tiny
    other = copy.deepcopy(vectors)
    g = torch.Generator().manual_seed(11)
    other.vectors = torch.randn(other.vectors.shape, generator=g)
    ids, mask = _batch(4)
    for compile in (False, True):
        for v in (vectors, other, vectors):
            got = emovec.generate(model, ids, mask, max_new_tokens=6, vectors=v, monitor_layers=[0, 2],
                                  compile=compile)
            with torch.no_grad(), emovec.monitor(model, v, [0, 2]) as mon:
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
            torch.testing.assert_close(got.monitor.scores, mon.result(decode=False).scores, rtol=1e-5, atol=1e-5)


def test_compiled_without_graph_breaks_and_without_recompiling(tiny):
    """fullgraph=True: a graph break would raise. One graph for the prefill, one for the decode step; a second call
    with other prompts and other strengths reuses them (the counter does not move) and still matches eager."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model, vectors = tiny
    counter = CompileCounter()
    ids, mask = _batch(1)
    for call, (recipe, seed) in enumerate((([{"calm": 0.5}, None], 1), ([None, {"happy": -0.4, "calm": 0.2}], 2))):
        ids, mask = _batch(seed)
        eager = emovec.generate(model, ids, mask, max_new_tokens=4, vectors=vectors, monitor_layers=[0, 2],
                                recipe=recipe, steer_layers=[1])
        compiled = emovec.generate(model, ids, mask, max_new_tokens=4, vectors=vectors, monitor_layers=[0, 2],
                                   recipe=recipe, steer_layers=[1], compile=True, compile_kwargs={"backend": counter})
        assert compiled.sequences.tolist() == eager.sequences.tolist()
        torch.testing.assert_close(compiled.monitor.scores, eager.monitor.scores, rtol=1e-5, atol=1e-5)
        assert counter.frame_count == 2, f"call {call}: {counter.frame_count} graphs compiled"


@pytest.mark.slow
def test_inductor_compiles_once(tiny):
    """The real compiler (inductor, C++ on the CPU): same tokens as eager, and a second call compiles nothing."""
    from torch._dynamo.utils import counters
    from torch._inductor.compile_fx import compile_fx

    torch._dynamo.reset()
    model, vectors = tiny
    compiled_graphs = []

    def backend(gm, example_inputs):
        compiled_graphs.append(gm)
        return compile_fx(gm, example_inputs)

    ids, mask = _batch(3)
    kwargs = dict(max_new_tokens=3, vectors=vectors, monitor_layers="all", recipe={"afraid": 0.3}, steer_layers=[2])
    eager = emovec.generate(model, ids, mask, **kwargs)
    first = emovec.generate(model, ids, mask, compile=True, compile_kwargs={"backend": backend}, **kwargs)
    assert first.sequences.tolist() == eager.sequences.tolist() and len(compiled_graphs) == 2
    torch.testing.assert_close(first.monitor.scores, eager.monitor.scores, rtol=1e-4, atol=1e-4)
    emovec.generate(model, ids.flip(0), mask.flip(0), compile=True, compile_kwargs={"backend": backend}, **kwargs)
    assert len(compiled_graphs) == 2 and counters["stats"]["unique_graphs"] >= 2


def test_bad_arguments(tiny):
    model, vectors = tiny
    ids, mask = _batch()
    with pytest.raises(ValueError, match="need vectors"):
        emovec.generate(model, ids, recipe={"calm": 0.1}, steer_layers=[1])
    with pytest.raises(ValueError, match="positions"):
        emovec.generate(model, ids, vectors=vectors, monitor_layers=[1], positions="some")
    with pytest.raises(ValueError, match="recipes for a batch of 1"):
        emovec.generate(model, ids[:1], vectors=vectors, recipe=[{"calm": 0.1}, None], steer_layers=[1])
    with pytest.raises(KeyError, match="unknown concept"):
        emovec.generate(model, ids, vectors=vectors, recipe={"clam": 0.1}, steer_layers=[1])
    with pytest.raises(ValueError, match="at least one token"):
        emovec.generate(model, ids[:, :0], vectors=vectors, monitor_layers=[1])


def test_compiled_with_a_named_backend(tiny):
    """A named backend (backend="cpu" / "torch") is resolved while tracing without calling into the extension."""
    from torch._dynamo.testing import CompileCounter

    model, vectors = tiny
    ids, mask = _batch(4)
    kwargs = dict(max_new_tokens=3, vectors=vectors, monitor_layers=[1], recipe={"calm": 0.2}, steer_layers=[1])
    for backend in ("torch", "cpu") if emovec.has_cpp_library else ("torch",):
        torch._dynamo.reset()
        eager = emovec.generate(model, ids, mask, backend=backend, **kwargs)
        compiled = emovec.generate(model, ids, mask, backend=backend, compile=True,
                                   compile_kwargs={"backend": CompileCounter()}, **kwargs)
        assert compiled.sequences.tolist() == eager.sequences.tolist()


def test_many_prompt_lengths_compile_a_bounded_number_of_graphs(tiny):
    """Each new shape must not add two graphs forever (fullgraph turns dynamo's recompile limit into an error):
    after the second length, sizes are dynamic and later lengths reuse the graphs."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model, vectors = tiny
    counter = CompileCounter()
    g = torch.Generator().manual_seed(9)
    for length in range(3, 12):
        ids = torch.randint(2, 290, (1, length), generator=g)
        kwargs = dict(max_new_tokens=3, vectors=vectors, monitor_layers=[1], recipe={"calm": 0.3}, steer_layers=[1])
        eager = emovec.generate(model, ids, **kwargs)
        compiled = emovec.generate(model, ids, compile=True, compile_kwargs={"backend": counter}, **kwargs)
        assert compiled.sequences.tolist() == eager.sequences.tolist()
    assert counter.frame_count <= 4


def test_copies_and_pickles_of_the_model_carry_nothing(tiny, tmp_path):
    """Nothing of emovec.generate lives on the model: a deep copy generates with its own weights, and the model
    still pickles after a compiled call."""
    import copy

    from torch._dynamo.testing import CompileCounter

    model, vectors = tiny
    ids, mask = _batch(5)
    kwargs = dict(max_new_tokens=3, vectors=vectors, monitor_layers=[1], compile=True,
                  compile_kwargs={"backend": CompileCounter()})
    emovec.generate(model, ids, mask, **kwargs)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(-1)
    assert emovec.generate(twin, ids, mask, **kwargs).sequences.tolist() == \
        emovec.generate(twin, ids, mask, max_new_tokens=3, vectors=vectors, monitor_layers=[1]).sequences.tolist()
    torch.save(model, tmp_path / "model.pt")
    assert not any(k.startswith("_emovec") for k in model.__dict__)


def test_refuses_active_contexts_and_right_padding(tiny):
    model, vectors = tiny
    ids, mask = _batch()
    with emovec.monitor(model, vectors, [3]), pytest.raises(RuntimeError, match="leave those blocks"):
        emovec.generate(model, ids, mask, vectors=vectors, monitor_layers=[1])
    with pytest.raises(ValueError, match="left padding"):
        emovec.generate(model, ids, mask.flip(1), vectors=vectors, monitor_layers=[1])
    with pytest.raises(ValueError, match="too large for the model"):
        emovec.generate(model, ids, mask, vectors=vectors, recipe={"calm": 1e38}, steer_layers=[1])
    out = emovec.generate(model, ids, mask, max_new_tokens=2, vectors=vectors, recipe=[None, None])
    assert out.sequences.shape == (2, 8)  # all-None recipes: plain generation
