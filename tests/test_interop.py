"""llama.cpp control vectors: export a recipe as GGUF, import GGUF files from llama.cpp / repeng / emovec."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

gguf = pytest.importorskip("gguf")

from emovec import corpus  # noqa: E402
from emovec.cli import main  # noqa: E402
from emovec.integrations.control_vectors import (  # noqa: E402
    export_control_vector,
    import_control_vectors,
    read_control_vector,
)
from emovec.vectors import VectorFileError, VectorSet  # noqa: E402

SHIPPED = corpus.data_path("vectors") / "SmolLM2-135M-Instruct.safetensors"


def _vectors(d=8, layers=(0, 1, 2, 3), names=("calm", "desperate", "afraid"), seed=0) -> VectorSet:
    g = torch.Generator().manual_seed(seed)
    return VectorSet(list(names), list(layers), torch.randn(len(layers), len(names), d, generator=g),
                     mean_norms=torch.rand(len(layers), generator=g) * 10 + 1,
                     metadata={"model_class": "LlamaForCausalLM"})


def _expected(vs: VectorSet, recipe: dict, layer: int, relative: bool) -> np.ndarray:
    """Independent float64 numpy reference: sum of strength x (mean norm) x unit vector."""
    s = vs.layers.index(layer)
    out = np.zeros(vs.hidden_size)
    for name, strength in recipe.items():
        v = vs.vectors[s, vs.names.index(name)].double().numpy()
        out += strength * (float(vs.mean_norms[s]) if relative else 1.0) * v / np.linalg.norm(v)
    return out


def _write_raw(path, arch="controlvector", tensors=None, dtype=np.float32, extra_fields=True):
    writer = gguf.GGUFWriter(str(path), arch)
    if extra_fields:
        writer.add_string("controlvector.model_hint", "llama")
        writer.add_int32("controlvector.layer_count", len(tensors or {}))
    for name, values in (tensors or {}).items():
        writer.add_tensor(name, np.asarray(values, dtype=dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("relative", [True, False])
def test_export_follows_llama_cpp_loader_rules_and_holds_the_recipe(tmp_path, relative):
    vs = _vectors()
    recipe = {"calm": 0.05, "desperate": -0.02}
    path = export_control_vector(vs, recipe, [1, 3, 2], tmp_path / "calm.gguf", relative=relative)
    reader = gguf.GGUFReader(path)
    arch = reader.get_field("general.architecture")
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    hint = reader.get_field("controlvector.model_hint")
    assert bytes(hint.parts[hint.data[0]]).decode() == "llama"
    count = reader.get_field("controlvector.layer_count")
    assert int(count.parts[count.data[0]][0]) == 3
    assert sorted(t.name for t in reader.tensors) == ["direction.1", "direction.2", "direction.3"]
    for tensor in reader.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert [int(n) for n in tensor.shape] == [vs.hidden_size]
        layer = int(tensor.name.split(".")[1])
        np.testing.assert_allclose(np.asarray(tensor.data, dtype=np.float64), _expected(vs, recipe, layer, relative),
                                   rtol=1e-5, atol=1e-6)


def test_round_trip_through_import(tmp_path):
    vs = _vectors(layers=(0, 1, 2, 3, 4))
    a = export_control_vector(vs, {"calm": 0.1}, [1, 2], tmp_path / "a.gguf")
    b = export_control_vector(vs, {"afraid": -0.2}, [2, 4], tmp_path / "b.gguf")
    back = import_control_vectors([a, b], hidden_size=8, num_layers=5)
    assert back.names == ["a", "b"] and back.layers == [1, 2, 4]
    for name, path in (("a", a), ("b", b)):
        directions, hint = read_control_vector(path)
        assert hint == "llama"
        for layer in back.layers:
            want = directions.get(layer, torch.zeros(8))
            assert torch.equal(back.vectors[back.layers.index(layer), back.names.index(name)], want)
    saved = back.save(tmp_path / "imported.safetensors")
    again = VectorSet.load(saved)
    assert torch.equal(again.vectors, back.vectors) and again.names == back.names


def test_export_refuses_layer_zero_and_empty_recipes(tmp_path):
    vs = _vectors()
    with pytest.raises(ValueError, match="layer 0"):
        export_control_vector(vs, {"calm": 0.1}, [0, 1], tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="empty"):
        export_control_vector(vs, {}, [1], tmp_path / "x.gguf")
    with pytest.raises(KeyError, match="unknown concept"):
        export_control_vector(vs, {"clam": 0.1}, [1], tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_import_checks_the_file_as_llama_cpp_does(tmp_path):
    d = np.ones(8)
    with pytest.raises(VectorFileError, match="another model"):
        import_control_vectors([_write_raw(tmp_path / "ok.gguf", tensors={"direction.1": d})], hidden_size=16)
    with pytest.raises(VectorFileError, match="another model"):
        import_control_vectors([_write_raw(tmp_path / "deep.gguf", tensors={"direction.9": d})], num_layers=5)
    with pytest.raises(VectorFileError, match="not a control vector"):
        import_control_vectors([_write_raw(tmp_path / "model.gguf", arch="llama", tensors={"direction.1": d})])
    with pytest.raises(VectorFileError, match="direction.0"):
        import_control_vectors([_write_raw(tmp_path / "zero.gguf", tensors={"direction.0": d, "direction.1": d})])
    with pytest.raises(VectorFileError, match="float32"):
        import_control_vectors([_write_raw(tmp_path / "half.gguf", tensors={"direction.1": d}, dtype=np.float16)])
    with pytest.raises(VectorFileError, match="no direction"):
        import_control_vectors([_write_raw(tmp_path / "empty.gguf", tensors={})])
    with pytest.raises(VectorFileError, match="'other' is not direction"):  # llama.cpp rejects the whole file
        import_control_vectors([_write_raw(tmp_path / "other.gguf", tensors={"direction.1": d, "other": d})])
    with pytest.raises(VectorFileError, match="1-D"):
        import_control_vectors([_write_raw(tmp_path / "col.gguf", tensors={"direction.1": d[:, None]})])
    # llama.cpp reads the layer with std::stoi (a leading integer) and adds repeated layers up
    vs = import_control_vectors([_write_raw(tmp_path / "odd.gguf", tensors={"direction.2.weight": d,
                                                                          "direction.02": 2 * d})])
    assert vs.layers == [2] and torch.equal(vs.vectors[0, 0], torch.full((8,), 3.0))
    with pytest.raises(VectorFileError, match="different lengths"):
        import_control_vectors([_write_raw(tmp_path / "ragged.gguf", tensors={"direction.1": d, "direction.2": d[:4]})])
    with pytest.raises(VectorFileError, match="NaN"):
        import_control_vectors([_write_raw(tmp_path / "nan.gguf", tensors={"direction.1": d * np.nan})])
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(VectorFileError, match="not a readable GGUF"):
        import_control_vectors([tmp_path / "junk.gguf"])
    with pytest.raises(ValueError, match="one name per file"):
        import_control_vectors([tmp_path / "ok.gguf"], names=["a", "b"])


def test_import_reads_a_repeng_style_file(tmp_path):
    """repeng writes the same layout (architecture, model_hint, layer_count, direction.<i> float32) for every layer it
    controlled, in its own order; a file without the optional hint still imports."""
    g = np.random.default_rng(0)
    rows = {f"direction.{i}": g.standard_normal(8) for i in (5, 2, 3)}
    path = _write_raw(tmp_path / "happy.gguf", tensors=rows, extra_fields=False)
    vs = import_control_vectors([path])
    assert vs.layers == [2, 3, 5] and vs.names == ["happy"]
    for i in (5, 2, 3):
        np.testing.assert_allclose(vs.vectors[vs.layers.index(i), 0].numpy(), rows[f"direction.{i}"], rtol=1e-6)


def test_cli_export_and_import(tmp_path):
    runner = CliRunner()
    out = tmp_path / "calm.gguf"
    result = runner.invoke(main, ["export", "gguf", "--recipe", "calm=0.05,desperate=-0.02", "--layers", "10-12",
                                  "--out", str(out)])
    assert result.exit_code == 0, result.output
    vs = VectorSet.load(SHIPPED)
    directions, _ = read_control_vector(out)
    assert sorted(directions) == [10, 11, 12]
    np.testing.assert_allclose(directions[11].double().numpy(),
                               _expected(vs, {"calm": 0.05, "desperate": -0.02}, 11, True), rtol=1e-4, atol=1e-5)
    result = runner.invoke(main, ["import", "gguf", str(out), "--name", "calmer", "--out", str(tmp_path / "v.st")])
    assert result.exit_code == 0, result.output
    assert "calmer: 3 layers" in result.output and VectorSet.load(tmp_path / "v.st").names == ["calmer"]

    every = runner.invoke(main, ["export", "gguf", "--recipe", "calm=0.05", "--layers", "all", "--out", str(out)])
    assert every.exit_code == 0 and "at layers 1-29" in every.output, every.output
    assert sorted(read_control_vector(out)[0]) == list(range(1, 30))
    single = runner.invoke(main, ["export", "gguf", "--recipe", "calm=0.05", "--layers", "7", "--out", str(out)])
    assert single.exit_code == 0 and "at layer 7," in single.output
    bad = runner.invoke(main, ["export", "gguf", "--recipe", "calm=1e38", "--layers", "3", "--out", str(out)])
    assert bad.exit_code == 1 and "overflows" in bad.output
    bad = runner.invoke(main, ["export", "gguf", "--recipe", "calm=0.05", "--layers", "0-3", "--out", str(out)])
    assert bad.exit_code == 1 and "layer 0" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(main, ["export", "gguf", "--recipe", "clam=0.05", "--layers", "3", "--out", str(out)])
    assert bad.exit_code == 1 and "unknown concept 'clam'" in bad.output and "calm" in bad.output
    bad = runner.invoke(main, ["export", "gguf", "--recipe", "calm=0.05", "--layers", "40", "--out", str(out)])
    assert bad.exit_code == 1 and "layer" in bad.output
    bad = runner.invoke(main, ["import", "gguf", str(SHIPPED)])
    assert bad.exit_code == 1 and "not a readable GGUF" in bad.output


@pytest.mark.slow
def test_exported_file_steers_like_the_recipe(loaded, tmp_path):
    """Steering with the imported control vector (raw, strength 1: what llama.cpp adds) gives the logits of steering
    with the recipe directly, and both differ from the plain logits."""
    import emovec

    model, tokenizer = loaded.model, loaded.tokenizer
    vectors = VectorSet.load(SHIPPED)
    recipe = {"calm": 0.1, "desperate": -0.05}
    layers = [8, 9, 10, 11, 12]
    path = export_control_vector(vectors, recipe, layers, tmp_path / "calm.gguf")
    imported = import_control_vectors([path], model=model)
    batch = tokenizer(["I waited by the phone all night.", "The results came back today."], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        plain = model(**batch).logits
        with emovec.steer(model, vectors, recipe, layers):
            direct = model(**batch).logits
        with emovec.steer(model, imported, {"calm": 1.0}, layers=imported.layers, raw=True):
            via_file = model(**batch).logits
    torch.testing.assert_close(via_file, direct, rtol=1e-5, atol=1e-5)
    assert (direct - plain).abs().max() > 0.1
    with pytest.raises(ValueError, match="raw=True"):
        emovec.steer(model, imported, {"calm": 1.0}, layers=imported.layers, raw=True, relative=True)
    with pytest.raises(VectorFileError, match="another model"):
        import_control_vectors([_write_raw(tmp_path / "wide.gguf", tensors={"direction.3": np.ones(640)})],
                               model=model)
