"""Extraction on the default model: the geometry the research reports shows up even on a 135M model."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from emovec.cli import main
from emovec.extraction import extract
from emovec.vectors import VectorSet

LABELS = ["afraid", "terrified", "scared", "calm", "peaceful", "happy", "sad", "angry", "loving", "proud",
          "bored", "desperate"]


@pytest.mark.slow
def test_afraid_is_closer_to_terrified_and_scared_than_to_calm(default_model):
    model, tokenizer, _ = default_model
    vs = extract(model, tokenizer, labels=LABELS, layers=[12, 20], heldout=[], progress=False)
    for layer in vs.layers:
        unit = vs.unit[vs.slice_of(layer)]
        cos = unit @ unit.T
        afraid = cos[vs.index("afraid")]
        assert afraid[vs.index("terrified")] > afraid[vs.index("calm")], (layer, afraid)
        assert afraid[vs.index("scared")] > afraid[vs.index("calm")], (layer, afraid)
    assert vs.default_layer == 20 and vs.mean_norms.shape == (2,) and (vs.mean_norms > 0).all()
    assert vs.metadata["num_stories"] == 24 * len(LABELS) and vs.metadata["hidden_size"] == 576


@pytest.mark.slow
def test_extract_command_writes_a_loadable_file(default_model, tmp_path, monkeypatch):
    import emovec.cli_data

    monkeypatch.setattr(emovec.cli_data, "_load", lambda name: default_model)
    out = tmp_path / "v.safetensors"
    result = CliRunner().invoke(main, ["extract", "--out", str(out), "--emotions", "calm,afraid,happy",
                                       "--layers", "3,-10", "--quiet", "--denoise-variance", "0"])
    assert result.exit_code == 0, result.output
    assert "3 vectors x 2 layers" in result.output
    vs = VectorSet.load(out, model=default_model.model)
    assert vs.names == ["calm", "afraid", "happy"] and vs.layers == [3, 20]
    assert not (tmp_path / "v.safetensors.partial.safetensors").exists()
    bad = CliRunner().invoke(main, ["extract", "--out", str(out), "--emotions", "calm,clam", "--quiet"])
    assert bad.exit_code != 0 and "no stories for ['clam']" in bad.output
    assert torch.equal(VectorSet.load(out).vectors, vs.vectors)  # a failed run leaves the earlier file intact
