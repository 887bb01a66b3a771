"""monitor / steer inside forward() and generate(), each against a plain-torch computation on the same model."""

from __future__ import annotations

import pytest
import torch

import emovec
from conftest import RUNTIME_NAMES as NAMES  # noqa: E402  (the `tiny` fixture lives in conftest)
from emovec.vectors import VectorSet


def state(model):
    """Everything that says whether a model was restored exactly."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [sorted(m.__dict__) for m in model.modules()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()])


def assert_same_state(a, b):
    assert a[1] == b[1] and a[2] == b[2]
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def hidden_at(model, input_ids, layer, attention_mask=None, position_ids=None):
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=True)
    return out.hidden_states[layer + 1]


def test_monitor_forward_matches_hidden_states(tiny):
    model, vectors = tiny
    ids = torch.randint(2, 290, (2, 9))
    with torch.no_grad(), emovec.monitor(model, vectors, layers=[0, 2]) as mon:
        model(input_ids=ids)
    res = mon.result()
    assert res.scores.shape == (2, 9, 2, len(NAMES)) and res.mask.all()
    with torch.no_grad():
        for li, layer in enumerate([0, 2]):
            h = hidden_at(model, ids, layer)
            want = h @ vectors.unit[layer].T
            torch.testing.assert_close(res.scores[:, :, li], want, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(res.norms[:, :, li], h.norm(dim=-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(res.cosine, res.scores / res.norms[..., None])


@pytest.mark.parametrize("length", [9, 70])  # 70 >= 64 tokens fill the record's columns: rows evenly spaced in it
def test_monitor_prefill_of_a_padded_batch_matches_hidden_states(tiny, length):
    """A batch of left-padded sequences: every real token's scores and norms equal the hidden states' (taken with the
    same positions), padded places read 0. From 64 tokens the rows are evenly spaced in the record and each layer's
    call writes straight into it (on the CPU kernel); below, through a scratch buffer: both checked."""
    model, vectors = tiny
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(2, 290, (3, length), generator=g)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :length // 2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), emovec.monitor(model, vectors, layers=[0, 2]) as mon:
        model(input_ids=ids, attention_mask=mask)
        direct = mon._fast is not None
    assert direct == (length >= 64 and emovec.has_cpp_library)
    res = mon.result()
    real = mask.bool()
    assert torch.equal(res.mask, real)
    with torch.no_grad():
        for li, layer in enumerate([0, 2]):
            h = hidden_at(model, ids, layer, attention_mask=mask, position_ids=positions)
            torch.testing.assert_close(res.scores[:, :, li][real], (h @ vectors.unit[layer].T)[real],
                                       rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(res.norms[:, :, li][real], h.norm(dim=-1)[real], rtol=1e-4, atol=1e-4)
    assert (res.scores[~real] == 0).all() and (res.norms[~real] == 0).all()


def test_a_layer_with_a_non_contiguous_output_is_steered_and_read(tiny):
    """A layer whose output tensor is not contiguous (the same values, another memory order): the edits go to a
    contiguous copy, which becomes the layer's output, so steering there equals a manual add, and the monitor reads
    the steered values."""
    model, vectors = tiny
    ids = torch.randint(2, 290, (3, 5), generator=torch.Generator().manual_seed(3))
    layer, strength = 2, 0.5
    block = model.model.layers[layer]
    add = strength * vectors.mean_norm(layer) * vectors.unit[vectors.slice_of(layer), vectors.index("afraid")]
    with torch.no_grad():
        # the steered layer's output: its plain output plus the add (output_hidden_states may be captured by hooks of
        # its own, before or after one added here, so the reference does not go through them)
        want_h = hidden_at(model, ids, layer) + add
        handle = block.register_forward_hook(lambda m, a, o: (o[0] + add, *o[1:]) if isinstance(o, tuple) else o + add)
        try:
            want = model(input_ids=ids).logits
        finally:
            handle.remove()
    plain_forward = block.forward

    def non_contiguous(*args, **kwargs):
        out = plain_forward(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        h = h.transpose(0, 1).contiguous().transpose(0, 1)  # (batch, tokens, d) in token-major memory order
        assert not h.is_contiguous()
        return (h, *out[1:]) if isinstance(out, tuple) else h

    block.forward = non_contiguous
    try:
        with torch.no_grad(), emovec.steer(model, vectors, {"afraid": strength}, layers=layer), \
                emovec.monitor(model, vectors, layers=[layer]) as mon:
            got = model(input_ids=ids).logits
    finally:
        del block.forward
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mon.result().scores[:, :, 0], want_h @ vectors.unit[layer].T, rtol=1e-4, atol=1e-4)


def test_strength_zero_is_bit_identical(tiny):
    model, vectors = tiny
    ids = torch.randint(2, 290, (3, 7))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with emovec.steer(model, vectors, {"calm": 0.0, "sad": 0.0}, layers="all"):
            steered = model(input_ids=ids).logits
    assert torch.equal(plain, steered)


def test_steering_equals_a_manual_add(tiny):
    model, vectors = tiny
    ids = torch.randint(2, 290, (2, 6))
    layer, strength = 2, 0.5
    add = strength * vectors.mean_norm(layer) * vectors.unit[vectors.slice_of(layer), vectors.index("afraid")]

    def hook(module, args, output):
        return output + add

    with torch.no_grad():
        handle = model.model.layers[layer].register_forward_hook(hook)
        try:
            want = model(input_ids=ids).logits
        finally:
            handle.remove()
        with emovec.steer(model, vectors, {"afraid": strength}, layers=layer):
            got = model(input_ids=ids).logits
        absolute = strength * vectors.unit[vectors.slice_of(layer), vectors.index("afraid")]
        handle = model.model.layers[layer].register_forward_hook(lambda m, a, o: o + absolute)
        try:
            want_abs = model(input_ids=ids).logits
        finally:
            handle.remove()
        with emovec.steer(model, vectors, {"afraid": strength}, layers=layer, relative=False):
            got_abs = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_abs, want_abs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, got_abs)


def test_generate_with_kv_cache_records_what_a_full_forward_sees(tiny):
    model, vectors = tiny
    ids = torch.randint(2, 290, (1, 5))
    with torch.no_grad(), emovec.monitor(model, vectors, layers=[1, 2]) as mon:
        out = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    res = mon.result()
    # the last generated token is never fed back, so the record covers all but the last
    assert res.token_ids.shape[1] == out.shape[1] - 1
    assert torch.equal(res.token_ids[0], out[0, :-1])
    with torch.no_grad():
        for li, layer in enumerate([1, 2]):
            want = hidden_at(model, out[:, :-1], layer) @ vectors.unit[layer].T
            torch.testing.assert_close(res.scores[:, :, li], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("window", [5, 64])
def test_decode_rows_kept_across_steps_reach_the_record_before_it_is_read(tiny, monkeypatch, window):
    """On the CPU the monitor keeps the rows of decode steps (up to DEFER_WINDOW_ROWS per layer) and projects them
    together: after generating past the record's first 64 columns (it grows, so kept rows must reach the old one
    first) every token's scores and norms equal plain torch on the full forward's hidden states and the same run
    projected step by step; the record read in the middle of a run (`mon.scores`, here from a hook at a later step)
    already holds every earlier step."""
    import emovec.runtime as runtime

    model, vectors = tiny
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    ids = torch.randint(2, 290, (1, 5), generator=torch.Generator().manual_seed(3))
    seen = []

    def record(rows):
        monkeypatch.setattr(runtime, "DEFER_WINDOW_ROWS", rows)
        with torch.no_grad(), emovec.monitor(model, vectors, layers=[0, 1, 2]) as mon:
            def peek(module, args, kwargs):  # at the forward pass of position 40 (a decode step)
                if rows and mon._width == 40:
                    seen.append(mon.scores[0, :40].clone())
            handle = model.register_forward_pre_hook(peek, with_kwargs=True)
            try:
                out = model.generate(ids, max_new_tokens=70, min_new_tokens=70, do_sample=False, use_cache=True,
                                     pad_token_id=0)
            finally:
                handle.remove()
        return mon, mon.result(), out

    mon, kept, out = record(window)
    assert [group.window for group in mon._groups.values()] == [window]
    stepwise_mon, stepwise, stepwise_out = record(0)
    assert torch.equal(out, stepwise_out) and kept.scores.shape == (1, 74, 3, len(NAMES))
    torch.testing.assert_close(kept.scores, stepwise.scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kept.norms, stepwise.norms, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for li in range(3):
            h = hidden_at(model, out[:, :-1], li)
            torch.testing.assert_close(kept.scores[:, :, li], h @ vectors.unit[li].T, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(kept.norms[:, :, li], h.norm(dim=-1), rtol=1e-4, atol=1e-4)
    assert len(seen) == 1 and (seen[0].abs().sum(-1) > 0).all()  # every position before 40 already there
    torch.testing.assert_close(seen[0], kept.scores[0, :40], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lookup", [10, 30])
def test_kept_rows_never_overwrite_columns_a_cropped_cache_wrote_again(tiny, lookup):
    """Prompt-lookup decoding (transformers' speculative decoding that crops rejected candidates from the cache) goes
    back over columns the monitor already holds kept decode rows for, sometimes in forwards of more rows than are kept
    (written straight into the record): the record then equals plain torch on the final sequence's hidden states."""
    model, vectors = tiny
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    for seed in range(3):
        base = torch.randint(2, 290, (1, 12), generator=torch.Generator().manual_seed(seed))
        ids = torch.cat([base, base, base], 1)  # repeated n-grams: the lookup proposes candidates
        with torch.no_grad(), emovec.monitor(model, vectors, layers=[0, 1, 2]) as mon:
            out = model.generate(ids, max_new_tokens=60, do_sample=False, pad_token_id=0,
                                 prompt_lookup_num_tokens=lookup)
        res = mon.result()
        with torch.no_grad():
            for li in range(3):
                h = hidden_at(model, out[:, :-1], li)
                torch.testing.assert_close(res.scores[:, : h.shape[1], li], h @ vectors.unit[li].T, rtol=1e-4,
                                           atol=1e-4)


@pytest.mark.parametrize("centered", [False, True])
def test_one_row_decode_steps_write_the_record_directly(tiny, centered):
    """At batch 1 on the CPU each decode step's call writes its column of the record through a prepared call: its
    scores and norms equal plain torch on the full forward's hidden states, with and without a center, and the
    prepared calls were the ones used."""
    model, vectors = tiny
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    ids = torch.randint(2, 290, (1, 4))
    center = torch.randn(vectors.hidden_size) * 0.3 if centered else None
    with torch.no_grad(), emovec.monitor(model, vectors, layers=[0, 2], center=center) as mon:
        out = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    assert sorted(position for position, _ in mon._calls) == [0, 1]
    res = mon.result()
    with torch.no_grad():
        for li, layer in enumerate([0, 2]):
            h = hidden_at(model, out[:, :-1], layer)
            if centered:
                h = h - center
            torch.testing.assert_close(res.scores[:, :, li], h @ vectors.unit[layer].T, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(res.norms[:, :, li], h.norm(dim=-1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bf16_probes", [False, True])
def test_decode_layers_run_together_record_the_same_bits(tiny, monkeypatch, bf16_probes):
    """On the CPU a decode step's layers are projected together when the last monitored layer's rows arrive: the
    record is bit-identical to one call per layer (batch 2, one row per sequence per step, and the prefill of a single
    sequence), and a forward that fails before the last layer still records the layers it passed."""
    import emovec.runtime as runtime

    model, vectors = tiny
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    ids = torch.randint(2, 290, (2, 4))

    def record(defer_rows):
        monkeypatch.setattr(runtime, "DEFER_MAX_ROWS", defer_rows)
        with torch.no_grad(), emovec.monitor(model, vectors, layers=[0, 1, 2], bf16_probes=bf16_probes) as mon:
            model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
            model(input_ids=ids[:1])  # one sequence: its 4 rows go through the record directly too
        return mon, mon.result()

    defer_rows = runtime.DEFER_MAX_ROWS
    mon, together = record(defer_rows)
    assert list(mon._groups) == [torch.float32]
    alone_mon, alone = record(0)
    assert not alone_mon._groups
    monkeypatch.setattr(runtime, "DEFER_MAX_ROWS", defer_rows)
    assert torch.equal(together.scores, alone.scores) and torch.equal(together.norms, alone.norms)

    def fail(module, args):
        raise ZeroDivisionError

    handle = model.model.layers[2].register_forward_pre_hook(fail)
    try:
        with pytest.raises(ZeroDivisionError):
            with torch.no_grad(), emovec.monitor(model, vectors, layers=[0, 1, 2]) as mon:
                model(input_ids=ids[:1])
    finally:
        handle.remove()
    assert list(mon._groups) == [torch.float32]  # the failed step's two layers were kept for the third
    res = mon.result()
    with torch.no_grad():
        for li in (0, 1):
            torch.testing.assert_close(res.scores[0, :, li], hidden_at(model, ids[:1], li)[0] @ vectors.unit[li].T,
                                       rtol=1e-4, atol=1e-4)
    assert (res.scores[:, :, 2] == 0).all()


@pytest.mark.parametrize("batch", [1, 2])
def test_bf16_probes_for_fp32_rows_on_the_cpu(tiny, batch):
    """monitor(bf16_probes=True): every step (prefill of two sequences into the scratch, one-row steps into the
    record) reads the probes in bf16. Its scores equal float64 dots of the hidden states with the bf16-rounded unit
    vectors (the rows themselves are not rounded), and differ from the fp32 probes' scores by at most 2^-8 of the
    row's norm (the rounding bound; probe_dtype's docstring)."""
    model, vectors = tiny
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    ids = torch.randint(2, 290, (batch, 4))
    with torch.no_grad(), emovec.monitor(model, vectors, layers=[0, 2], bf16_probes=True) as mon:
        out = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    assert all(p.dtype == torch.bfloat16 for p in mon._probes.values())
    res = mon.result()
    with torch.no_grad():
        for li, layer in enumerate([0, 2]):
            h = hidden_at(model, out[:, :-1], layer).double()
            rounded = vectors.unit[layer].to(torch.bfloat16).double()
            want = h @ rounded.T
            torch.testing.assert_close(res.scores[:, :, li].double(), want, rtol=1e-5, atol=1e-5)
            exact = h @ vectors.unit[layer].double().T
            assert ((res.scores[:, :, li].double() - exact).abs() <= 2**-8 * h.norm(dim=-1, keepdim=True)).all()
            torch.testing.assert_close(res.norms[:, :, li].double(), h.norm(dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch,prompt", [(1, 4), (2, 4), (2, 70)])
def test_bf16_dots_for_fp32_rows_on_the_cpu(tiny, batch, prompt):
    """monitor(bf16_dots=True): every step (a prefill of 70 tokens, which writes straight into the record, or of
    4 into the scratch; decode steps kept in windows) rounds each hidden state to bf16 before its dots with the bf16
    probes. The scores equal float64 dots of the bf16-rounded hidden states with the bf16-rounded unit vectors (torch's
    rounding), within 2^-8 of the row's norm of the exact ones; the norms are the exact rows'."""
    model, vectors = tiny
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    ids = torch.randint(2, 290, (batch, prompt))
    with torch.no_grad(), emovec.monitor(model, vectors, layers=[0, 2], bf16_dots=True) as mon:
        out = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    assert mon.bf16_probes and all(call.bf16_dots for call in mon._calls.values())
    res = mon.result()
    with torch.no_grad():
        for li, layer in enumerate([0, 2]):
            h = hidden_at(model, out[:, :-1], layer)
            rounded = vectors.unit[layer].to(torch.bfloat16).double()
            want = h.to(torch.bfloat16).double() @ rounded.T
            torch.testing.assert_close(res.scores[:, :, li].double(), want, rtol=1e-5, atol=1e-5)
            exact = h.double() @ vectors.unit[layer].double().T
            assert ((res.scores[:, :, li].double() - exact).abs() <= 2**-8 * h.double().norm(dim=-1, keepdim=True)).all()
            torch.testing.assert_close(res.norms[:, :, li].double(), h.double().norm(dim=-1), rtol=1e-5, atol=1e-5)


def _pad_batch(seqs, side):
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        if side == "left":
            ids[b, width - len(s):], mask[b, width - len(s):] = torch.tensor(s), 1
        else:
            ids[b, : len(s)], mask[b, : len(s)] = torch.tensor(s), 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_sequence_alone_equals_inside_a_padded_batch(tiny, side):
    model, vectors = tiny
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(2, 290, (n,), generator=g).tolist() for n in (4, 9, 6)]
    ids, mask = _pad_batch(seqs, side)
    with torch.no_grad(), emovec.monitor(model, vectors, layers="all") as mon:
        model(input_ids=ids, attention_mask=mask)
    batched = mon.result()
    for b, s in enumerate(seqs):
        with torch.no_grad(), emovec.monitor(model, vectors, layers="all") as mon:
            model(input_ids=torch.tensor([s]))
        alone = mon.result()
        got = batched.sequence(b)
        assert got["token_ids"].tolist() == s
        torch.testing.assert_close(got["scores"], alone.sequence(0)["scores"], rtol=1e-4, atol=1e-4)
    assert (batched.scores[~batched.mask] == 0).all()


def test_batched_generate_with_left_padding_equals_each_row_alone(tiny):
    model, vectors = tiny
    g = torch.Generator().manual_seed(6)
    seqs = [torch.randint(2, 290, (n,), generator=g).tolist() for n in (3, 8, 5)]
    ids, mask = _pad_batch(seqs, "left")
    with torch.no_grad(), emovec.monitor(model, vectors, layers=[1, 3]) as mon:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    batched = mon.result()
    width = ids.shape[1]
    for b, s in enumerate(seqs):
        with torch.no_grad(), emovec.monitor(model, vectors, layers=[1, 3]) as mon:
            alone_out = model.generate(torch.tensor([s]), max_new_tokens=5, do_sample=False, pad_token_id=0)
        alone = mon.result()
        assert out[b, width:].tolist() == alone_out[0, len(s):].tolist()
        got = batched.sequence(b)
        assert got["token_ids"].tolist() == alone.sequence(0)["token_ids"].tolist()
        torch.testing.assert_close(got["scores"], alone.sequence(0)["scores"], rtol=1e-4, atol=2e-4)


def test_different_recipes_per_sequence_equal_each_alone(tiny):
    model, vectors = tiny
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(2, 290, (n,), generator=g).tolist() for n in (5, 7, 4)]
    recipes = [{"calm": 0.4}, None, {"afraid": -0.3, "happy": 0.2}]
    ids, mask = _pad_batch(seqs, "left")
    with torch.no_grad(), emovec.steer(model, vectors, recipes, layers=[1, 2]):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
    for b, (s, r) in enumerate(zip(seqs, recipes)):
        with torch.no_grad(), emovec.steer(model, vectors, r or {}, layers=[1, 2]):
            alone = model.generate(torch.tensor([s]), max_new_tokens=4, do_sample=False, pad_token_id=0,
                                   output_scores=True, return_dict_in_generate=True)
        assert out.sequences[b, ids.shape[1]:].tolist() == alone.sequences[0, len(s):].tolist()
        for step_b, step_alone in zip(out.scores, alone.scores):
            torch.testing.assert_close(step_b[b], step_alone[0], rtol=1e-4, atol=2e-4)


def test_positions_prompt_and_generated_split_the_sequence(tiny):
    model, vectors = tiny
    ids = torch.randint(2, 290, (1, 6))
    layer = 1
    add = 2.0 * vectors.mean_norm(layer) * vectors.unit[vectors.slice_of(layer), 0]
    recorded = {}
    for positions in ("prompt", "generated", "all", [(2, 4)]):
        with torch.no_grad(), emovec.monitor(model, vectors, layers=[layer]) as mon:
            with emovec.steer(model, vectors, {"calm": 2.0}, layers=[layer], positions=positions):
                model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        recorded[str(positions)] = mon.result()
    with torch.no_grad(), emovec.monitor(model, vectors, layers=[layer]) as mon:
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    plain = mon.result()
    shift = float(add @ vectors.unit[vectors.slice_of(layer), 0])
    prompt = recorded["prompt"].scores[0, :6, 0, 0] - plain.scores[0, :6, 0, 0]
    torch.testing.assert_close(prompt, torch.full((6,), shift), rtol=1e-4, atol=1e-3)
    span = recorded["[(2, 4)]"].scores[0, :, 0, 0] - plain.scores[0, :, 0, 0]
    assert span[:2].abs().max() < 1e-4 and (span[2:4] - shift).abs().max() < 1e-3
    gen = recorded["generated"].scores[0, :, 0, 0] - plain.scores[0, :, 0, 0]
    assert gen[:6].abs().max() < 1e-4 and (gen[6:] - shift).abs().max() < 1e-2 or not torch.equal(
        recorded["generated"].token_ids, plain.token_ids)


def test_padding_rows_are_never_steered(tiny):
    model, vectors = tiny
    ids, mask = _pad_batch([[5, 6, 7], [8, 9, 10, 11, 12]], "left")
    seen = {}

    def hook(module, args, output):
        seen["h"] = output.clone()

    handle = model.model.layers[1].register_forward_hook(hook)  # registered first: sees the layer's own output
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
            before = seen["h"]
            with emovec.steer(model, vectors, {"sad": 1.0}, layers=[1]):
                model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    # the plain hook runs after emovec's forward wrapper, so it sees the steered output
    after = seen["h"]
    pad = mask == 0
    assert torch.equal(after[pad], before[pad])
    assert not torch.allclose(after[~pad], before[~pad])


def test_model_is_restored_after_an_exception_and_contexts_nest(tiny):
    model, vectors = tiny
    before = state(model)
    with pytest.raises(ZeroDivisionError):
        with emovec.monitor(model, vectors, layers="all"):
            with emovec.steer(model, vectors, {"calm": 0.1}, layers=[0, 1]):
                model(input_ids=torch.randint(2, 290, (1, 4)))
                raise ZeroDivisionError
    assert_same_state(before, state(model))
    with emovec.steer(model, vectors, {"calm": 0.1}, layers=[1]):
        with emovec.steer(model, vectors, {"sad": 0.1}, layers=[1]):
            pass
        assert "forward" in model.model.layers[1].__dict__
    assert_same_state(before, state(model))


def test_clear_errors(tiny):
    model, vectors = tiny
    with pytest.raises(KeyError, match="unknown concept 'clam'.*Did you mean 'calm'"):
        emovec.steer(model, vectors, {"clam": 0.1})
    with pytest.raises(ValueError, match="out of range"):
        emovec.monitor(model, vectors, layers=[7])
    with pytest.raises(ValueError, match="hidden size 32"):
        emovec.monitor(model, VectorSet.from_tensor(torch.randn(2, 32), ["a", "b"]))
    with pytest.raises(ValueError, match="2 steering recipes were given for a batch of 3"):
        with emovec.steer(model, vectors, [{"calm": 0.1}, None]):
            model(input_ids=torch.randint(2, 290, (3, 4)))
    no_norms = VectorSet.from_tensor(torch.randn(3, 64), ["a", "b", "c"])
    with pytest.raises(ValueError, match="mean residual norms"):
        emovec.steer(model, no_norms, {"a": 0.1})


def test_measure_mean_norms_matches_hidden_states(tiny):
    model, vectors = tiny

    class Tok:  # a minimal tokenizer: one id per character
        def __call__(self, texts, return_tensors="pt", padding=True):
            seqs = [[3 + ord(c) % 280 for c in t] for t in texts]
            ids, mask = _pad_batch(seqs, "right")

            class Batch(dict):
                def to(self, device):
                    return self

            return Batch(input_ids=ids, attention_mask=mask)

    texts = ["hello there", "a much longer text to measure norms", "xyz"]
    measured = emovec.measure_mean_norms(model, vectors, texts, tokenizer=Tok())
    batch = Tok()(texts)
    with torch.no_grad():
        for layer in range(3):  # hidden_states of the last layer come after the final norm
            h = hidden_at(model, batch["input_ids"], layer, batch["attention_mask"])
            keep = batch["attention_mask"].bool()
            keep[:, 0] = False  # right padding: column 0 is each text's first token, left out (attention sink)
            want = h[keep].norm(dim=-1).mean()
            assert abs(measured.mean_norm(layer) - float(want)) < 1e-3 * float(want)


def test_monitor_can_leave_position_ids_alone():
    """By default the runtime derives position_ids from the mask (as generate() does); with
    positions_from_mask=False a monitor is fully passive, also for absolute-position models like GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, bos_token_id=1,
                                       eos_token_id=2, pad_token_id=0)).eval()
    vectors = VectorSet.from_tensor(torch.randn(3, 32), ["a", "b", "c"])
    ids, mask = _pad_batch([[5, 6, 7], [8, 9, 10, 11, 12]], "left")
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with emovec.monitor(model, vectors, layers="all", positions_from_mask=False):
            passive = model(input_ids=ids, attention_mask=mask).logits
        with emovec.monitor(model, vectors, layers="all"):
            fixed = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert torch.equal(plain, passive)
    torch.testing.assert_close(fixed[0, 2:], alone[0], rtol=1e-4, atol=1e-4)  # the padded row as if alone


def test_per_sequence_position_spans_equal_each_sequence_alone(tiny):
    """One list of spans per sequence, in a left-padded batch: each row is steered exactly where its own spans say
    (positions count real tokens), as when that sequence runs alone with its spans."""
    model, vectors = tiny
    g = torch.Generator().manual_seed(8)
    seqs = [torch.randint(2, 290, (n,), generator=g).tolist() for n in (6, 3, 8)]
    spans = [[(1, 3)], [], [(0, 2), (5, 7)]]
    ids, mask = _pad_batch(seqs, "left")
    with torch.no_grad(), emovec.monitor(model, vectors, layers=[2]) as mon:
        with emovec.steer(model, vectors, {"calm": 1.0}, layers=[1], positions=spans):
            model(input_ids=ids, attention_mask=mask)
    batched = mon.result()
    for b, (s, span) in enumerate(zip(seqs, spans)):
        with torch.no_grad(), emovec.monitor(model, vectors, layers=[2]) as mon:
            with emovec.steer(model, vectors, {"calm": 1.0}, layers=[1], positions=span):
                model(input_ids=torch.tensor([s]))
        torch.testing.assert_close(batched.sequence(b)["scores"], mon.result().sequence(0)["scores"],
                                   rtol=1e-4, atol=2e-4)
    with torch.no_grad(), emovec.monitor(model, vectors, layers=[2]) as mon:
        model(input_ids=torch.tensor([seqs[1]]))
    torch.testing.assert_close(batched.sequence(1)["scores"], mon.result().sequence(0)["scores"], rtol=1e-4,
                               atol=2e-4)  # an empty span list leaves its sequence untouched
    with pytest.raises(ValueError, match="2 lists of position spans were given for a batch of 3"):
        with torch.no_grad(), emovec.steer(model, vectors, {"calm": 1.0}, layers=[1], positions=[[(0, 1)], []]):
            model(input_ids=ids, attention_mask=mask)


def test_smoothing_is_a_centred_moving_average_over_real_tokens():
    from emovec.runtime import MonitorResult, moving_average

    g = torch.Generator().manual_seed(9)
    values = torch.randn(2, 7, 1, 3, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    values[~mask] = 0
    got = moving_average(values, mask, 3)
    for b in range(2):
        real = values[b][mask[b]]
        want = torch.stack([real[max(0, i - 1): i + 2].mean(0) for i in range(len(real))])
        torch.testing.assert_close(got[b][mask[b]], want)
    assert (got[0, :2] == 0).all()
    result = MonitorResult(["a", "b", "c"], [0], values, torch.ones(2, 7, 1), mask, torch.zeros(2, 7, dtype=torch.long),
                           torch.zeros(2, 7, dtype=torch.long), None)
    assert torch.equal(result.smoothed(1).cosine, result.cosine)
    torch.testing.assert_close(result.smoothed(3).cosine, got)
    with pytest.raises(ValueError, match="window must be >= 1"):
        result.smoothed(0)


def test_probes_in_h_dtype_on_a_gpu_and_their_error_bound():
    """The monitor keeps probes in h's dtype only on a GPU, for bf16/fp16 h, without a center; the rounding of a
    unit probe moves a score by at most 2^-9 ||h|| (bf16) / 2^-11 ||h|| (fp16), checked against float64."""
    from emovec.runtime import probe_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert probe_dtype(cuda, torch.bfloat16, False) == torch.bfloat16
    assert probe_dtype(cuda, torch.float16, False) == torch.float16
    assert probe_dtype(cuda, torch.float32, False) == torch.float32
    assert probe_dtype(cuda, torch.bfloat16, True) == torch.float32
    assert probe_dtype(cpu, torch.bfloat16, False) == torch.float32
    torch.manual_seed(0)
    for dtype, unit_roundoff in ((torch.bfloat16, 2.0**-9), (torch.float16, 2.0**-11)):
        for d in (576, 4096):
            h = (torch.randn(64, d) * 3).to(dtype)
            probes = torch.nn.functional.normalize(torch.randn(171, d, dtype=torch.float64), dim=1)
            scores = emovec.steer_project(h, probes=probes.to(dtype), backend="torch").scores
            exact = h.double() @ probes.T
            bound = unit_roundoff * h.double().norm(dim=1, keepdim=True)
            assert ((scores.double() - exact).abs() <= bound * 1.001 + 1e-6).all()
            assert (scores.double() - exact).abs().max() > bound.max() * 1e-3  # the rounding is really there


def test_unit_directions_are_kept_until_the_vectors_change():
    """VectorSet.unit and unit_on(device, dtype) are computed once and reused (a monitor entered per batch copies
    nothing), recomputed after an in-place change of the vectors, and work for tensors made in inference mode
    (which track no version)."""
    g = torch.Generator().manual_seed(3)
    vs = VectorSet.from_tensor(torch.randn(2, 3, 8, generator=g), ["a", "b", "c"], layers=[0, 1])
    first = vs.unit
    assert vs.unit is first
    torch.testing.assert_close(first, torch.nn.functional.normalize(vs.vectors, dim=-1), rtol=0, atol=0)
    half = vs.unit_on("cpu", torch.bfloat16)
    assert half.dtype == torch.bfloat16 and vs.unit_on("cpu", torch.bfloat16) is half
    assert torch.equal(half, first.to(torch.bfloat16))
    vs.vectors.mul_(-1.0)  # in place: the cached directions are stale and must be recomputed
    torch.testing.assert_close(vs.unit, -first, rtol=0, atol=0)
    assert vs.unit_on("cpu", torch.bfloat16) is not half
    with torch.inference_mode():
        frozen = VectorSet.from_tensor(torch.randn(3, 8, generator=g), ["a", "b", "c"])
    torch.testing.assert_close(frozen.unit, torch.nn.functional.normalize(frozen.vectors, dim=-1), rtol=0, atol=0)


@pytest.mark.parametrize("length", [9, 70])  # 70: a record the prefill fills exactly, handed over without a copy
def test_a_result_keeps_its_values_when_the_monitor_runs_again(tiny, length):
    """A result owns its tensors: the monitor's later runs (a decode step that continues the run, a step that writes
    the same column again, a new prefill that starts over in the same record) never change a result already taken,
    a user's in-place edit of a result changes no later result, and each later result equals a fresh monitor's."""
    from transformers import DynamicCache

    model, vectors = tiny
    g = torch.Generator().manual_seed(length)
    a, b = torch.randint(2, 290, (2, length), generator=g), torch.randint(2, 290, (2, length), generator=g)
    nxt = torch.randint(2, 290, (2, 1), generator=g)

    def fresh(*steps):
        with torch.no_grad(), emovec.monitor(model, vectors, layers=[0, 3]) as m:
            cache = DynamicCache()
            for ids in steps:
                model(input_ids=ids, past_key_values=cache, use_cache=True)
        return m.result(decode=False)

    with torch.no_grad(), emovec.monitor(model, vectors, layers=[0, 3]) as mon:
        cache = DynamicCache()
        model(input_ids=a, past_key_values=cache, use_cache=True)
        first = mon.result(decode=False)
        kept = (first.scores.clone(), first.norms.clone(), first.token_ids.clone(), first.mask.clone())
        edited = mon.result(decode=False)  # a user's in-place edits of a result
        for t in (edited.scores, edited.norms, edited.token_ids, edited.mask):
            t.zero_()
        model(input_ids=nxt, past_key_values=cache, use_cache=True)  # continues the run
        second = mon.result(decode=False)
        cache.crop(-1)  # the same column written again
        model(input_ids=nxt + 1, past_key_values=cache, use_cache=True)
        third = mon.result(decode=False)
        model(input_ids=b, past_key_values=DynamicCache(), use_cache=True)  # a new run
        fourth = mon.result(decode=False)
    for got, want in zip((first.scores, first.norms, first.token_ids, first.mask), kept):
        assert torch.equal(got, want)
    for got, want in ((first, fresh(a)), (second, fresh(a, nxt)), (third, fresh(a, nxt + 1)), (fourth, fresh(b))):
        assert torch.equal(got.token_ids, want.token_ids) and torch.equal(got.mask, want.mask)
        # (not bit for bit: a probes tensor seen again takes the kernel's packed panels, which sum in another order)
        torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.norms, want.norms, rtol=1e-5, atol=1e-6)
    assert not torch.equal(second.token_ids[:, -1], third.token_ids[:, -1])


def test_runs_without_a_result_between_them_record_each_run_alone(tiny):
    """A monitor that runs again before anyone took a result starts over in the same record: the last run's result
    equals a fresh monitor's, with nothing left of the runs before (a longer run, then two of 70 tokens, the last
    one padded)."""
    model, vectors = tiny
    g = torch.Generator().manual_seed(5)
    long, other = torch.randint(2, 290, (2, 80), generator=g), torch.randint(2, 290, (2, 70), generator=g)
    short = torch.randint(2, 290, (2, 70), generator=g)
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :30] = 0
    with torch.no_grad():
        with emovec.monitor(model, vectors, layers=[1, 2]) as mon:
            model(input_ids=long)
            model(input_ids=other)
            record = mon.scores
            model(input_ids=short, attention_mask=mask)
            assert mon.scores is record  # the same record of 70 columns, started over
        got = mon.result(decode=False)
        with emovec.monitor(model, vectors, layers=[1, 2]) as alone:
            model(input_ids=short, attention_mask=mask)
        want = alone.result(decode=False)
    assert got.scores.shape == want.scores.shape == (2, 70, 2, len(NAMES))
    assert torch.equal(got.scores, want.scores) and torch.equal(got.norms, want.norms)
    assert torch.equal(got.token_ids, want.token_ids) and torch.equal(got.mask, want.mask)


def test_a_record_made_in_inference_mode_is_read_and_reused_outside_it(tiny):
    """A run under torch.inference_mode records into inference tensors; result() outside it, and the same monitor's
    next run under no_grad (which starts over in a record of the same size), work and equal a fresh monitor's."""
    model, vectors = tiny
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(2, 290, (2, 70), generator=g)
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :5] = 0

    def fresh():
        with torch.no_grad(), emovec.monitor(model, vectors, layers=[0, 3]) as m:
            model(input_ids=ids, attention_mask=mask)
        return m.result(decode=False)

    mon = emovec.monitor(model, vectors, layers=[0, 3])
    with mon:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)
        first = mon.result(decode=False)
        first.scores.mul_(1.0)  # a result is an ordinary tensor
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        second = mon.result(decode=False)
    want = fresh()
    for got in (first, second):
        torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=1e-6)
        assert torch.equal(got.mask, want.mask) and (got.scores[~want.mask] == 0).all()


def test_prepared_calls_are_kept_with_the_vectors(tiny):
    """A second monitor on the same vectors reuses the prepared CPU calls (no packing again); an in-place change of
    the vectors drops them, and the next monitor reads the changed vectors. Copies and pickles of the vectors carry
    none of them."""
    import copy
    import pickle

    if not emovec.has_cpp_library:
        pytest.skip("prepared calls need emovec._C")
    model, vectors = tiny
    ids = torch.randint(2, 290, (1, 12))

    def run():
        with torch.no_grad(), emovec.monitor(model, vectors, layers=[0, 1]) as m:
            model(input_ids=ids)
        return m

    one, two = run(), run()
    assert one._calls and all(one._calls[key] is two._calls[key] for key in one._calls)
    with emovec.monitor(model, vectors, layers=[0, 1]) as entered:  # prepared on entering, outside the forward pass
        assert set(entered._calls) == {(0, torch.float32), (1, torch.float32)}
        assert all(entered._calls[key] is one._calls[key] for key in one._calls)
    before = two.result(decode=False).scores
    vectors.vectors.mul_(-1.0)
    three = run()
    assert all(three._calls[key] is not one._calls[key] for key in one._calls)
    torch.testing.assert_close(three.result(decode=False).scores, -before, rtol=1e-6, atol=1e-6)
    for clone in (copy.deepcopy(vectors), pickle.loads(pickle.dumps(vectors))):
        assert "_unit_cache" not in clone.__dict__ and torch.equal(clone.vectors, vectors.vectors)
    vectors.vectors.mul_(-1.0)
    # a monitor that took its probes before an in-place change keeps reading those (its own), and prepares its calls
    # from them after the change; a new monitor still reads the changed vectors
    from transformers import DynamicCache

    batch, step = torch.randint(2, 290, (2, 12)), torch.randint(2, 290, (2, 1))
    with torch.no_grad():
        with emovec.monitor(model, vectors, layers=[0, 1]):
            cache = DynamicCache()
            model(input_ids=batch, past_key_values=cache, use_cache=True)  # two rows x 12: probes taken, no call
            vectors.vectors.mul_(-1.0)
            model(input_ids=step, past_key_values=cache, use_cache=True)  # a call prepared from the old probes
        four = run()
    torch.testing.assert_close(four.result(decode=False).scores, -before, rtol=1e-6, atol=1e-6)
    vectors.vectors.mul_(-1.0)


def test_readable_tokens_equal_each_token_decoded_alone(tiny_chat_model):
    """Token strings of a result come from a per-tokenizer memory: the same strings as decoding each token alone,
    on the first call and from the memory."""
    from emovec.runtime import _readable, readable_tokens

    _model, tokenizer, _vectors = tiny_chat_model
    ids = tokenizer("Hello there, how are you? I'm fine   thanks\n\n\u00e9t\u00e9 \U0001F600")["input_ids"] + [5, 5]
    want = [_readable(t, tokenizer) for t in tokenizer.convert_ids_to_tokens(ids)]
    assert readable_tokens(tokenizer, ids) == want
    assert readable_tokens(tokenizer, ids) == want  # from the memory
    assert readable_tokens(tokenizer, []) == []
