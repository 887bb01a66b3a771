"""Bad and unusual input, as a new user gives it: every CLI command answers with one clear line (no traceback),
every API call with a clear exception, and nothing is written where it should not be."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import emovec
from emovec import cli
from emovec.corpus import DataError, read_records
from emovec.fileio import atomic_write_text
from emovec.vectors import VectorFileError, VectorSet
from test_cli_runtime import invoke, one_line_error, slow

README = Path(__file__).resolve().parents[1] / "README.md"


# ------------------------------------------------------------------------------------------- empty and odd text


@pytest.mark.parametrize("args, stdin", [(["monitor", ""], None), (["monitor", "-"], ""), (["monitor", "   "], None),
                                         (["steer", "", "--add", "calm=0.1"], None)])
def test_empty_text_is_one_clear_line(args, stdin):
    line = one_line_error(invoke(*args, input=stdin))
    assert "the text is empty" in line


@slow
def test_non_utf8_stdin_is_replaced_and_said(loaded, vector_file):
    result = invoke("monitor", "--vectors", str(vector_file), "-", input=b"caf\xe9 au lait\n")
    assert result.exit_code == 0, result.output
    assert "not valid UTF-8" in result.output and "U+FFFD" in result.output


@slow
def test_chat_survives_a_non_utf8_line(loaded, vector_file):
    result = invoke("chat", "--vectors", str(vector_file), "--max-new-tokens", "2", input=b"caf\xe9\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "not valid UTF-8" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------------------------ devices


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_device_without_a_gpu_is_one_clear_line(device):
    line = one_line_error(invoke("monitor", "hi", "--device", device))
    assert "no CUDA device" in line and "--device cpu" in line


def test_unknown_device_is_one_clear_line():
    line = one_line_error(invoke("monitor", "hi", "--device", "gpu7"))
    assert "unknown device 'gpu7'" in line


@slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_chat_checks_the_backend_before_the_first_prompt(loaded, vector_file, backend, monkeypatch):
    monkeypatch.setattr("emovec.triton.interpreting", False)
    monkeypatch.setattr("emovec.ops.interpreting", False)

    monkeypatch.setattr("emovec.ops._STATUS", None)  # recomputed with the interpreter off, restored after
    result = invoke("chat", "--vectors", str(vector_file), "--backend", backend, input="hello\n")
    line = one_line_error(result)
    assert f"backend {backend!r}" in line and "assistant>" not in result.output


# ------------------------------------------------------------------------------------------------ data files


def _jsonl(tmp_path: Path, lines: list[bytes]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


GOOD = b'{"text": "a calm day", "label": "calm"}'


@pytest.mark.parametrize("bad, message", [
    (b'{"text": "broken", "label": ', "not valid JSON"),
    (b'["a list", "calm"]', "a JSON list, not an object"),
    (b'{"text": "caf\xe9", "label": "calm"}', "not valid UTF-8"),
    (b'{"text": null, "label": "calm"}', "field 'text' must be a non-empty string, got null"),
    (b'{"label": "calm"}', "no 'text' field"),
])
def test_bad_jsonl_lines_name_file_and_line(tmp_path, bad, message):
    path = _jsonl(tmp_path, [GOOD, b"", GOOD, bad, GOOD])
    with pytest.raises(DataError, match=re.escape(f"{path}, line 4: {message}")):
        read_records(path, ["text", "label|emotion"])
    rows, skipped = read_records(path, ["text", "label|emotion"], on_error="skip")
    assert len(rows) == 3 and skipped == 1
    line = one_line_error(invoke("extract", "--data", str(path), "--out", str(tmp_path / "v.safetensors")))
    assert f"line 4: {message}" in line and "--on-error skip" in line


def test_extract_refuses_an_unwritable_output_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr("emovec.cli_data._load", lambda name: pytest.fail("the model must not be loaded"))
    line = one_line_error(invoke("extract", "--out", str(tmp_path / "missing" / "v.safetensors")))
    assert "does not exist" in line


@pytest.mark.parametrize("option", ["--html", "--json"])
def test_monitor_refuses_an_unwritable_output_before_any_work(tmp_path, option, monkeypatch):
    monkeypatch.setattr(cli, "_setup", lambda *a: pytest.fail("the model must not be loaded"))
    line = one_line_error(invoke("monitor", "hi", option, str(tmp_path / "nope" / "page")))
    assert "does not exist" in line


def test_extraction_rows_are_counted_from_one_and_text_must_be_a_string():
    from emovec.extraction import _normalise_rows

    with pytest.raises(ValueError, match="record 2 of the labelled data: 'text' must be a non-empty string"):
        _normalise_rows([{"text": "fine", "label": "a"}, {"text": None, "label": "b"}])
    with pytest.raises(ValueError, match="record 1 of the labelled data has no 'label'"):
        _normalise_rows([{"text": "x"}])


# ------------------------------------------------------------------------------------------------ vector files


def _crafted(tmp_path: Path, **changes) -> Path:
    tensors = {"vectors": torch.randn(2, 3, 8), "mean_norms": torch.tensor([1.0, 2.0])}
    header = {"format": "emovec.VectorSet", "format_version": "1", "names": json.dumps(["a", "b", "c"]),
              "layers": json.dumps([0, 1]), "default_layer": "1", "metadata": "{}"}
    for key, value in changes.items():
        (tensors if isinstance(value, torch.Tensor) else header)[key] = value
    path = tmp_path / "crafted.safetensors"
    save_file(tensors, str(path), metadata=header)
    return path


@pytest.mark.parametrize("changes, message", [
    ({"metadata": "[1, 2]"}, "'metadata' must be a JSON object"),
    ({"metadata": "not json"}, "field 'metadata' is not valid JSON"),
    ({"format_version": "abc"}, "format_version 'abc' is not a whole number"),
    ({"mean_norms": torch.tensor([1.0, float("nan")])}, "mean_norms must be finite and non-negative"),
    ({"mean_norms": torch.tensor([1.0, 2.0, 3.0])}, "mean_norms must have 2 values"),
    ({"names": '["a", 3, "c"]'}, "'names' must be a list of non-empty strings"),
    ({"layers": '[0, "x"]'}, "'layers' must be a list of distinct non-negative integers"),
    ({"default_layer": "7"}, "default_layer 7 is not one of the layers"),
    ({"neutral_pcs": torch.full((2, 1, 8), float("inf"))}, "neutral_pcs contain NaN"),
    ({"vectors": torch.zeros(2, 3, 8, dtype=torch.int32)}, "not a float type"),
])
def test_crafted_vector_headers_are_refused_on_load(tmp_path, changes, message):
    path = _crafted(tmp_path, **changes)
    with pytest.raises(VectorFileError, match=re.escape(message)):
        VectorSet.load(path)
    line = one_line_error(invoke("monitor", "hi", "--vectors", str(path)))
    assert message in line


def test_a_sound_crafted_file_loads(tmp_path):
    assert VectorSet.load(_crafted(tmp_path)).names == ["a", "b", "c"]


# ------------------------------------------------------------------------------------------------ steering


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=50)).eval()
    vectors = VectorSet.from_tensor(torch.randn(2, 3, 16), ["calm", "afraid", "happy"], layers=[0, 1],
                                    mean_norms=[4.0, 4.0])
    return model, vectors


def test_overflowing_strength_is_refused_and_large_strength_warned(tiny):
    model, vectors = tiny
    with pytest.raises(ValueError, match=r"calm=1e\+30 .* too large for the model \(float32 overflows\)"):
        emovec.steer(model, vectors, {"calm": 1e30})
    with pytest.raises(ValueError, match="too large"):
        emovec.steer(model, vectors, {"calm": 1e20}, relative=False)
    with pytest.warns(UserWarning, match=r"calm=0\.8 is 0\.8 times layer 1's mean residual norm"):
        emovec.steer(model, vectors, {"calm": 0.8})
    with pytest.warns(UserWarning, match="times layer"):
        emovec.steer(model, vectors, {"calm": 3.0}, relative=False)  # 3 / 4 = 0.75 of the mean norm


@slow
def test_steer_command_refuses_overflow_in_one_line(loaded, vector_file):
    line = one_line_error(invoke("steer", "hello", "--vectors", str(vector_file), "--add", "calm=1e30"))
    assert "too large for the model" in line
    warned = invoke("steer", "hello", "--vectors", str(vector_file), "--add", "calm=0.9", "--max-new-tokens", "2")
    assert warned.exit_code == 0 and "warning: steering strength calm=0.9" in warned.output


def test_runtime_raises_when_the_op_reports_bad_indices(tiny):
    """The runtime's own index bookkeeping is checked once per context: a table too short for the slots (a bug
    simulated here) leaves rows unsteered and raises a clear error when the context exits."""
    model, vectors = tiny
    context = emovec.steer(model, vectors, [{"calm": 0.1}, {"afraid": 0.1}], layers=[1])
    with pytest.raises(RuntimeError, match="steering slot outside"):
        with torch.no_grad(), context:
            context._table = lambda position, device, dtype: torch.zeros(1, 16, dtype=dtype)
            model(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]))


# ------------------------------------------------------------------------------------------------ long text


@slow
def test_text_longer_than_the_context_is_refused_or_truncated(loaded, vector_file, monkeypatch):
    monkeypatch.setattr(loaded.model.config, "max_position_embeddings", 8)
    text = "one two three four five six seven eight nine ten eleven twelve"
    line = one_line_error(invoke("monitor", text, "--vectors", str(vector_file)))
    assert "more than the model's context of 8" in line and "--truncate" in line
    cut = invoke("monitor", text, "--vectors", str(vector_file), "--truncate")
    assert cut.exit_code == 0 and "keeping the first 8" in cut.output and "8 tokens" in cut.stdout


# ------------------------------------------------------------------------------------------------ files


def test_written_files_follow_the_umask_and_keep_an_existing_mode(tmp_path):
    old = os.umask(0o022)
    try:
        fresh = atomic_write_text(tmp_path / "fresh.json", "{}")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        vs = VectorSet.from_tensor(torch.randn(2, 4), ["a", "b"]).save(tmp_path / "v.safetensors")
        assert stat.S_IMODE(vs.stat().st_mode) == 0o644
        kept = tmp_path / "kept.json"
        kept.write_text("old")
        kept.chmod(0o600)
        atomic_write_text(kept, "new")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and kept.read_text() == "new"
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.json", "kept.json", "v.safetensors"]  # no temp left


# ------------------------------------------------------------------------------------------------ documented API


def test_every_name_the_readme_documents_exists():
    names = set(re.findall(r"\bemovec\.([A-Za-z]\w*)(?![\w/])", README.read_text(encoding="utf-8")))  # not schema ids
    assert {"extract", "load_model", "steer", "monitor"} <= names
    # an attribute, or a subpackage (emovec.integrations is imported on use: alone, this test must not depend on
    # another test having imported it first)
    missing = [name for name in sorted(names)
               if not hasattr(emovec, name) and importlib.util.find_spec(f"emovec.{name}") is None]
    assert not missing, f"the README documents emovec.{missing} but emovec has no such attribute or subpackage"


@slow
def test_chat_refuses_an_overflowing_strength_and_goes_on(loaded, vector_file):
    result = invoke("chat", "--vectors", str(vector_file), input="/steer calm=1e30\n/steer calm=0.1\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "error: steering strength calm=1e+30" in result.stdout and "(steering: calm=+0.1" in result.stdout
    line = one_line_error(invoke("chat", "--vectors", str(vector_file), "--add", "calm=1e30", input="/quit\n"))
    assert "too large for the model" in line
