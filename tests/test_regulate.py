"""emovec.regulate inside forward() and generate(): bounds hold per token, composition with steer and monitor,
per-sequence bounds, padding and the KV cache, each checked against plain-torch computations on the same model."""

from __future__ import annotations

import pytest
import torch

import emovec
from conftest import RUNTIME_NAMES as NAMES
from test_runtime import assert_same_state, hidden_at, state


def cosines(model, ids, layer, unit, **kwargs):
    h = hidden_at(model, ids, layer, **kwargs)
    return torch.nn.functional.cosine_similarity(h, unit[None, None], dim=-1)


def test_a_cap_holds_the_reading_and_leaves_tokens_within_it_alone(tiny):
    model, vectors = tiny
    ids = torch.randint(2, 290, (2, 12), generator=torch.Generator().manual_seed(1))
    layer, name = 1, "afraid"
    unit = vectors.unit[layer, NAMES.index(name)]
    with torch.no_grad():
        before = cosines(model, ids, layer, unit)
    cap = float(before.median())  # about half of the tokens read above it
    assert (before > cap + 1e-3).any() and (before < cap - 1e-3).any()
    with torch.no_grad(), emovec.regulate(model, vectors, {name: (None, cap)}, layers=[layer]) as reg, \
            emovec.monitor(model, vectors, layers=[layer]) as mon:
        model(input_ids=ids)
    got = mon.result().cosine[:, :, 0, NAMES.index(name)]
    torch.testing.assert_close(got, before.clamp(max=cap), rtol=0, atol=1e-5)
    corr = reg.result()
    assert corr.corrections.shape == (2, 12, 1, 1) and corr.names == [name]
    assert ((corr.corrections[..., 0, 0] > 0) == (before > cap)).all()
    assert 0 < corr.share_corrected()[name] < 1


def test_bounds_that_never_bite_leave_logits_bit_identical(tiny):
    model, vectors = tiny
    ids = torch.randint(2, 290, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with emovec.regulate(model, vectors, {"calm": (-0.99, 0.99), "sad": (None, None)}, layers="all") as reg:
            regulated = model(input_ids=ids).logits
    assert torch.equal(plain, regulated)
    assert (reg.result().corrections == 0).all()


def test_projection_bounds_and_the_effect_downstream(tiny):
    """relative=False: bounds on the projection h·u; the correction changes later layers and the logits."""
    model, vectors = tiny
    ids = torch.randint(2, 290, (1, 8), generator=torch.Generator().manual_seed(3))
    layer = 1
    unit = vectors.unit[layer, NAMES.index("calm")]
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        proj = hidden_at(model, ids, layer) @ unit
        floor = float(proj.max()) + 0.5  # every token is pushed up to it
        with emovec.regulate(model, vectors, {"calm": (floor, None)}, layers=[layer], relative=False):
            out = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[layer + 1] @ unit, torch.full_like(proj, floor), rtol=0, atol=1e-4)
    assert (out.logits - plain).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:steering strength")
def test_steer_then_regulate_in_one_pass(tiny):
    """Steering +afraid pushes the reading above the cap; the cap (applied after steering, at the same layer) brings
    every steered token back to it; the monitor sees the regulated state."""
    model, vectors = tiny
    ids = torch.randint(2, 290, (1, 9), generator=torch.Generator().manual_seed(4))
    layer, k = 2, NAMES.index("afraid")
    with torch.no_grad(), emovec.steer(model, vectors, {"afraid": 2.0}, layers=[layer]), \
            emovec.monitor(model, vectors, layers=[layer]) as steered:
        model(input_ids=ids)
    assert (steered.result().cosine[0, :, 0, k] > 0.3).all()
    with torch.no_grad(), emovec.regulate(model, vectors, {"afraid": (None, 0.1)}, layers=[layer]), \
            emovec.steer(model, vectors, {"afraid": 2.0}, layers=[layer]), \
            emovec.monitor(model, vectors, layers=[layer]) as both:
        model(input_ids=ids)
    torch.testing.assert_close(both.result().cosine[0, :, 0, k], torch.full((9,), 0.1), rtol=0, atol=5e-5)


def test_per_sequence_bounds_with_padding_and_the_kv_cache(tiny):
    """Left-padded batch: sequence 0 unregulated generates exactly what it generates alone without regulation;
    sequence 1 regulated generates what it generates alone with the same bounds; cached generation equals
    recomputing the whole sequence each step (use_cache=False); padding rows are never corrected."""
    model, vectors = tiny
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(2, 290, (1, 5), generator=g), torch.randint(2, 290, (1, 8), generator=g)
    bounds = {"happy": (None, 0.0), "calm": (0.05, None)}
    before = state(model)

    def generate(ids, mask, spec, cache=True):
        with torch.no_grad(), emovec.regulate(model, vectors, spec, layers=[1, 2]) as reg:
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                 use_cache=cache, pad_token_id=0)
        return out, reg.result()

    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), a], 1), b])
    mask = (torch.arange(8)[None] >= torch.tensor([[3], [0]])).long()
    together, res = generate(batch, mask, [None, bounds])
    with torch.no_grad():
        alone_a = model.generate(input_ids=a, attention_mask=torch.ones_like(a), max_new_tokens=6, do_sample=False,
                                 pad_token_id=0)
    alone_b, res_b = generate(b, torch.ones_like(b), [bounds])
    assert together[0, 3:].tolist() == alone_a[0].tolist()
    assert together[1].tolist() == alone_b[0].tolist()
    assert (res.corrections[0] == 0).all() and (res.corrections[1] != 0).any()
    assert (res.corrections[~res.mask] == 0).all()
    no_cache, _ = generate(b, torch.ones_like(b), [bounds], cache=False)
    assert no_cache.tolist() == alone_b.tolist()
    assert_same_state(before, state(model))


def test_positions_limit_where_bounds_apply(tiny):
    model, vectors = tiny
    ids = torch.randint(2, 290, (1, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), emovec.regulate(model, vectors, {"sad": (None, -0.5)}, layers=[1],
                                          positions=[(2, 5)]) as reg:
        model(input_ids=ids)
    corrected = (reg.result().corrections[0, :, 0, 0] != 0).nonzero().flatten().tolist()
    assert corrected and set(corrected) <= {2, 3, 4}


def test_bad_bounds_get_clear_errors(tiny):
    model, vectors = tiny
    with pytest.raises(KeyError, match="unknown concept 'desprate'"):
        emovec.regulate(model, vectors, {"desprate": (None, 0.1)})
    with pytest.raises(TypeError, match=r"\(lower, upper\) pair"):
        emovec.regulate(model, vectors, {"calm": 0.1})
    with pytest.raises(ValueError, match="above its upper bound"):
        emovec.regulate(model, vectors, {"calm": (0.5, 0.1)})
    with pytest.raises(ValueError, match="cosines"):
        emovec.regulate(model, vectors, {"calm": (None, -1.5)})
    emovec.regulate(model, vectors, {"calm": (None, -1.5)}, relative=False)  # projections may be anything
    with pytest.raises(ValueError, match="no bounds"):
        emovec.regulate(model, vectors, [None, None])
    with pytest.raises(ValueError, match="bound sets were given for a batch of 1"):
        with torch.no_grad(), emovec.regulate(model, vectors, [{"calm": (0, None)}, None], layers=[1]):
            model(input_ids=torch.randint(2, 290, (1, 4)))


@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16])
def test_buffers_are_fp32_whatever_the_default_dtype(tiny, default):
    """The kernels write fp32 scores, norms and corrections: the runtime's buffers must be fp32 even when torch's
    default dtype is not (a bf16 default would otherwise be written past its end)."""
    model, vectors = tiny
    ids = torch.randint(2, 290, (1, 6), generator=torch.Generator().manual_seed(8))

    def run():
        with torch.no_grad(), emovec.regulate(model, vectors, {"sad": (None, 0.0)}, layers=[1]) as reg, \
                emovec.monitor(model, vectors, layers=[1, 2]) as mon:
            model(input_ids=ids)
        return mon.result().scores, reg.result().corrections

    want = run()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        got = run()
    finally:
        torch.set_default_dtype(previous)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b)
