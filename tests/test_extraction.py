"""Extraction: a known-answer test with planted directions, determinism, resume, and the vectors file."""

from __future__ import annotations

import re

import pytest
import torch

import emovec
from emovec.extraction import extract
from emovec.vectors import VectorFileError, VectorSet

D = 32
LABELS = ["joy", "fear", "anger", "calm"]


class WordTokenizer:
    """Texts are space-separated integers; one token each. Pads on the right unless told otherwise."""

    def __init__(self, padding_side="right"):
        self.padding_side = padding_side

    def __call__(self, texts, return_tensors="pt", padding=True, truncation=True, max_length=512):
        seqs = [[int(w) for w in t.split()][:max_length] for t in texts]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for b, s in enumerate(seqs):
            sl = slice(width - len(s), width) if self.padding_side == "left" else slice(0, len(s))
            ids[b, sl], mask[b, sl] = torch.tensor(s), 1
        return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def planted():
    """A Llama whose layers pass the residual stream through unchanged (o_proj and down_proj zeroed), so every
    layer's output is the token embedding. Emotion-label tokens carry a planted direction; a 'style' direction
    with large variance appears in neutral text and, at random, in stories: denoising must remove it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=D, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=400, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.data.zero_()
        layer.mlp.down_proj.weight.data.zero_()
    q, _ = torch.linalg.qr(torch.randn(D, len(LABELS) + 1))
    directions, style = q.T[: len(LABELS)], q.T[len(LABELS)]
    emb = model.model.embed_tokens.weight.data
    emb[:] = 0.3 * torch.randn_like(emb)
    # tokens 10..209: label tokens (50 per label); 210..399: neutral tokens, half of them carry +-style
    for i, _ in enumerate(LABELS):
        emb[10 + 50 * i : 60 + 50 * i] += 3.0 * directions[i]
    emb[210:300] += 6.0 * style
    emb[300:390] -= 6.0 * style
    g = torch.Generator().manual_seed(1)
    stories = []
    for i, label in enumerate(LABELS):
        for j in range(5):
            n = int(torch.randint(8, 30, (1,), generator=g))
            words = torch.randint(10 + 50 * i, 60 + 50 * i, (n,), generator=g)
            noise = torch.randint(210, 390, (n // 3,), generator=g)
            text = " ".join(str(int(w)) for w in torch.cat([words, noise])[torch.randperm(n + n // 3, generator=g)])
            stories.append({"id": f"{label}-{j}", "label": label, "text": text})
    neutral = [" ".join(str(int(w)) for w in torch.randint(210, 390, (20,), generator=g)) for _ in range(12)]
    return model, stories, neutral, directions, style


def test_planted_directions_are_recovered_and_style_is_removed(planted):
    model, stories, neutral, directions, style = planted
    vs = extract(model, WordTokenizer(), stories=stories, neutral=neutral, start_token=4, progress=False)
    assert vs.names == LABELS and vs.layers == [0, 1, 2]
    expected = directions - directions.mean(0)
    for layer in range(3):
        got = vs.vectors[vs.slice_of(layer)]
        cos = torch.nn.functional.cosine_similarity(got, expected, dim=1)
        assert (cos > 0.95).all(), cos
        assert (vs.unit[vs.slice_of(layer)] @ style).abs().max() < 0.03  # denoised (the top PC is style + noise)
    no_denoise = extract(model, WordTokenizer(), stories=stories, neutral=neutral, start_token=4,
                         denoise_variance=0, progress=False)
    before, after = (no_denoise.unit[0] @ style).abs().max(), (vs.unit[0] @ style).abs().max()
    assert before > 0.05 and after < before / 5, (before, after)  # the style direction was there before denoising
    assert vs.metadata["neutral_pcs_per_layer"][0] >= 1 and vs.neutral_pcs is not None


def test_extraction_is_deterministic_and_padding_side_does_not_matter(planted):
    model, stories, neutral, *_ = planted
    a = extract(model, WordTokenizer(), stories=stories, neutral=neutral, start_token=4, batch_size=3, progress=False)
    b = extract(model, WordTokenizer(), stories=stories, neutral=neutral, start_token=4, batch_size=3, progress=False)
    c = extract(model, WordTokenizer("left"), stories=stories, neutral=neutral, start_token=4, batch_size=3,
                progress=False)
    assert torch.equal(a.vectors, b.vectors)
    torch.testing.assert_close(a.vectors, c.vectors, rtol=1e-4, atol=1e-4)


def test_start_token_and_short_story_fallback(planted):
    model, stories, neutral, *_ = planted
    vs = extract(model, WordTokenizer(), stories=stories, neutral=neutral, start_token=25, progress=False)
    lengths = [len(s["text"].split()) for s in stories]
    assert vs.metadata["short_story_fallbacks"] == sum(n <= 25 for n in lengths)
    assert vs.metadata["params"]["start_token"] == 25


def test_story_mean_matches_a_manual_computation(planted):
    """Independent check: the vector is the mean of per-story means (from hidden_states), minus the label mean."""
    model, stories, neutral, *_ = planted
    vs = extract(model, WordTokenizer(), stories=stories, denoise_variance=0, start_token=3, layers=[1],
                 progress=False)
    tok = WordTokenizer()
    label_means = []
    with torch.no_grad():
        for label in LABELS:
            means = []
            for s in (s for s in stories if s["label"] == label):
                batch = tok([s["text"]])
                h = model(**batch, output_hidden_states=True).hidden_states[2][0]
                means.append(h[3:].mean(0))
            label_means.append(torch.stack(means).mean(0))
    label_means = torch.stack(label_means)
    torch.testing.assert_close(vs.vectors[0], label_means - label_means.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vs.label_means[0], label_means, rtol=1e-4, atol=1e-5)  # stored before centring
    # re-centring a subset uses only that subset's mean
    sub = vs.recentred(["joy", "calm"])
    pair = label_means[[0, 3]]
    torch.testing.assert_close(sub.vectors[0], pair - pair.mean(0), rtol=1e-4, atol=1e-5)


def test_heldout_accuracy_matches_a_hand_count():
    from emovec.extraction import heldout_accuracy

    g = torch.Generator().manual_seed(5)
    names = ["a", "b", "c", "d", "e", "f", "g"]
    vs = VectorSet(names, [3, 7], torch.randn(2, 7, 16, generator=g), label_means=torch.randn(2, 7, 16, generator=g))
    means = torch.randn(40, 2, 16, generator=g)
    labels = [names[i % 7] for i in range(40)]
    got = heldout_accuracy(vs, means, labels, k=3)
    for s, layer in enumerate([3, 7]):
        centre = vs.label_means[s].mean(0)
        hits1 = hits3 = 0
        for i, label in enumerate(labels):
            x = means[i, s] - centre
            cos = [float(torch.dot(x, v) / (x.norm() * v.norm())) for v in vs.vectors[s]]
            order = sorted(range(7), key=lambda k: -cos[k])
            hits1 += order[0] == names.index(label)
            hits3 += names.index(label) in order[:3]
        assert got[layer] == (round(hits1 / 40, 4), round(hits3 / 40, 4))


def test_heldout_texts_choose_the_default_layer(planted):
    model, stories, neutral, *_ = planted
    heldout = [dict(s, id="h" + s["id"]) for s in stories[::2]]
    vs = extract(model, WordTokenizer(), stories=stories, neutral=neutral, start_token=4, heldout=heldout,
                 progress=False)
    accuracy = vs.metadata["heldout_accuracy"]
    assert sorted(accuracy) == ["0", "1", "2"] and vs.metadata["num_heldout"] == len(heldout)
    assert all(top1 > 0.9 and top5 == 1.0 for top1, top5 in accuracy.values())  # planted directions: easy
    best = max(vs.layers, key=lambda layer: (accuracy[str(layer)][0], accuracy[str(layer)][1], -layer))
    assert vs.default_layer == best and "held-out" in vs.metadata["default_layer_criterion"]
    plain = extract(model, WordTokenizer(), stories=stories, neutral=neutral, start_token=4, progress=False)
    assert "heldout_accuracy" not in plain.metadata and plain.default_layer == 1  # two thirds of 3 layers


def _interrupt_at(model, monkeypatch, call: int) -> None:
    """Make the model's forward pass raise KeyboardInterrupt on its ``call``-th call."""
    calls = {"n": 0}
    original = model.model.forward

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", failing_forward)


@pytest.mark.parametrize("phase", ["stories", "neutral"])
def test_interrupted_extraction_resumes_from_its_checkpoint(planted, tmp_path, monkeypatch, phase):
    from emovec.extraction import _load_checkpoint

    model, stories, neutral, *_ = planted
    run = dict(stories=stories, neutral=neutral, start_token=4, batch_size=4, progress=False)
    full = extract(model, WordTokenizer(), **run)
    story_batches = (len(stories) + 3) // 4
    checkpoint = tmp_path / "run.partial.safetensors"
    _interrupt_at(model, monkeypatch, 3 if phase == "stories" else story_batches + 2)
    with pytest.raises(KeyboardInterrupt):
        extract(model, WordTokenizer(), **run, checkpoint=checkpoint, checkpoint_every=0)
    monkeypatch.undo()
    saved = _load_checkpoint(checkpoint)
    if phase == "stories":
        assert saved["done"] == 2 and "neutral_done" not in saved
    else:
        assert saved["done"] == story_batches and saved["neutral_done"] == 1
    out = tmp_path / "v.safetensors"
    resumed = extract(model, WordTokenizer(), **run, checkpoint=checkpoint, out=out)
    torch.testing.assert_close(resumed.vectors, full.vectors)
    torch.testing.assert_close(resumed.neutral_pcs, full.neutral_pcs)
    assert not checkpoint.exists()  # deleted only once the output was written
    assert torch.equal(VectorSet.load(out).vectors, resumed.vectors)


def test_checkpoint_kept_until_the_output_is_written(planted, tmp_path, monkeypatch):
    model, stories, neutral, *_ = planted
    checkpoint = tmp_path / "run.partial.safetensors"
    run = dict(stories=stories, neutral=neutral, start_token=4, batch_size=4, progress=False, checkpoint=checkpoint)
    extract(model, WordTokenizer(), **run)  # no out: the caller has not saved the result yet
    assert checkpoint.exists()
    import emovec.vectors

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(emovec.vectors.VectorSet, "save", crash)
    with pytest.raises(OSError):
        extract(model, WordTokenizer(), **run, out=tmp_path / "v.safetensors")
    assert checkpoint.exists()  # a crash while saving loses nothing


def test_vector_file_round_trip_and_mismatch(planted, tmp_path):
    model, stories, neutral, *_ = planted
    vs = extract(model, WordTokenizer(), stories=stories, neutral=neutral, start_token=4, progress=False)
    path = vs.save(tmp_path / "v.safetensors")
    back = VectorSet.load(path, model=model)
    assert back.names == vs.names and back.layers == vs.layers and back.default_layer == vs.default_layer
    assert torch.equal(back.vectors, vs.vectors) and torch.equal(back.mean_norms, vs.mean_norms)
    assert torch.equal(back.neutral_pcs, vs.neutral_pcs) and back.metadata == vs.metadata
    sub = back.select(names=["calm", "joy"], layers=[2])
    assert sub.names == ["calm", "joy"] and torch.equal(sub.vectors[0, 0], vs.vectors[2, 3])

    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=100))
    with pytest.raises(VectorFileError, match="hidden size 32 != the model's 48"):
        VectorSet.load(path, model=other)
    same_shape = LlamaForCausalLM(LlamaConfig(hidden_size=D, intermediate_size=96, num_hidden_layers=3,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=400))
    with pytest.raises(VectorFileError, match="config hash"):
        VectorSet.load(path, model=same_shape)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(VectorFileError, match="corrupt"):
        VectorSet.load(corrupt)
    with pytest.raises(VectorFileError, match="does not exist"):
        VectorSet.load(tmp_path / "missing.safetensors")
    with pytest.raises(KeyError, match="unknown concept 'jyo'.*'joy'"):
        back.index("jyo")


def test_bad_labelled_data_is_refused(planted):
    model, *_ = planted
    with pytest.raises(ValueError, match="no 'label'"):
        extract(model, WordTokenizer(), stories=[{"text": "1 2 3"}], progress=False)
    with pytest.raises(ValueError, match="at least two labels"):
        extract(model, WordTokenizer(), stories=[{"label": "a", "text": "1 2 3"}], progress=False, denoise_variance=0)


def test_vectors_drive_monitor_and_steer(planted):
    """A label's own tokens score highest on its vector when monitored."""
    model, stories, neutral, directions, _ = planted
    vs = extract(model, WordTokenizer(), stories=stories, neutral=neutral, start_token=4, progress=False)
    with torch.no_grad(), emovec.monitor(model, vs, layers=[1]) as mon:
        model(input_ids=torch.tensor([[15, 16, 70, 71, 120, 121, 170, 171]]))
    top = [t[0][0] for t in mon.result().top(0)]
    assert top == ["joy", "joy", "fear", "fear", "anger", "anger", "calm", "calm"]


class _Payload:
    """A pickle that writes a file when loaded: what a planted checkpoint could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_planted_as_checkpoint_is_never_loaded(planted, tmp_path):
    from emovec.extraction import CheckpointError

    model, stories, neutral, *_ = planted
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "run.partial.safetensors"
    torch.save({"key": _Payload(marker)}, checkpoint)
    with pytest.raises(CheckpointError, match=re.escape(str(checkpoint)) + ".*corrupt.*--restart"):
        extract(model, WordTokenizer(), stories=stories, neutral=neutral, start_token=4, progress=False,
                checkpoint=checkpoint)
    assert not marker.exists()
    vs = extract(model, WordTokenizer(), stories=stories, neutral=neutral, start_token=4, progress=False,
                 checkpoint=checkpoint, restart=True, out=tmp_path / "v.safetensors")
    assert not marker.exists() and not checkpoint.exists() and len(vs.names) == len(LABELS)


def test_truncated_and_foreign_checkpoints(planted, tmp_path, capsys):
    from emovec.extraction import CheckpointError, _save_checkpoint

    model, stories, neutral, *_ = planted
    run = dict(stories=stories, neutral=neutral, start_token=4, batch_size=4, checkpoint_every=0)
    checkpoint = tmp_path / "run.partial.safetensors"
    extract(model, WordTokenizer(), **run, progress=False, checkpoint=checkpoint)
    good = checkpoint.read_bytes()
    checkpoint.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        extract(model, WordTokenizer(), **run, progress=False, checkpoint=checkpoint)
    _save_checkpoint({"key": "another-run", "done": 1}, checkpoint)
    extract(model, WordTokenizer(), **run, progress=True, checkpoint=checkpoint)
    assert "is from a different run" in capsys.readouterr().err


def test_short_story_fallbacks_are_reported(planted, capsys):
    model, stories, neutral, *_ = planted
    vs = extract(model, WordTokenizer(), stories=stories, neutral=neutral, start_token=25, progress=True)
    short = vs.metadata["short_story_fallbacks"]
    assert 0 < short == sum(len(s["text"].split()) <= 25 for s in stories)
    assert f"{short} of {len(stories)} texts had no token past start_token=25" in capsys.readouterr().err
