"""The emotion vectors shipped for the default model: what the CLI and API use without extracting, and equal to
a fresh extraction from the packaged story grid."""

from __future__ import annotations

import pytest
import torch

from emovec import corpus
from emovec.extraction import default_vectors, extract, shipped_vectors_path
from emovec.vectors import VectorSet

SHIPPED = corpus.data_path("vectors") / "SmolLM2-135M-Instruct.safetensors"


def test_the_shipped_file_is_complete():
    vs = VectorSet.load(SHIPPED)
    assert vs.names == corpus.load_emotions() and vs.layers == list(range(30)) and vs.hidden_size == 576
    assert vs.label_means is not None and vs.neutral_pcs is not None and (vs.mean_norms > 0).all()
    meta = vs.metadata
    assert meta["num_stories"] == len(corpus.load_grid()) and meta["num_heldout"] == len(corpus.load_heldout())
    accuracy = {int(layer): top for layer, top in meta["heldout_accuracy"].items()}
    assert sorted(accuracy) == vs.layers and "held-out" in meta["default_layer_criterion"]
    assert vs.default_layer == max(accuracy, key=lambda layer: (accuracy[layer][0], accuracy[layer][1], -layer))


@pytest.mark.slow
def test_default_model_uses_the_shipped_file_without_extracting(default_model, monkeypatch):
    monkeypatch.setattr("emovec.extraction.extract", lambda *a, **k: pytest.fail("extraction must not run"))
    assert shipped_vectors_path(default_model.model) == SHIPPED
    vs = default_vectors(default_model.model)
    assert len(vs.names) == 171 and vs.metadata["config_hash"]


@pytest.mark.slow
def test_shipped_label_means_equal_a_fresh_extraction(default_model):
    """Re-extract three emotions at the default layer from the packaged grid: their label means (which do not depend
    on the other emotions) equal the shipped ones up to float order and the file's float16 rounding."""
    model, tokenizer, _ = default_model
    shipped = VectorSet.load(SHIPPED)
    names, layer = ["afraid", "calm", "desperate"], shipped.default_layer
    fresh = extract(model, tokenizer, labels=names, layers=[layer], denoise_variance=0, heldout=[], progress=False)
    want = shipped.select(names, [layer]).label_means[0]
    got = fresh.label_means[0]
    assert ((got - want).abs() <= 2e-3 * want.abs() + 2e-3 * want.abs().mean()).all()
    assert torch.nn.functional.cosine_similarity(got, want, dim=1).min() > 0.99999
    torch.testing.assert_close(fresh.mean_norms[0] / shipped.mean_norms[shipped.slice_of(layer)],
                               torch.tensor(1.0), rtol=0.05, atol=0)  # three emotions' stories vs all 171
