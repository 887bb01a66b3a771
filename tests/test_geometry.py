"""emovec geometry: PCA, ratings correlation, clusters, similarity order, layer stability, against independent
computations on planted vector sets; and the command end to end."""

from __future__ import annotations

import json

import pytest
import torch

from emovec.science.geometry import analyse, layer_stability, read_ratings
from emovec.vectors import VectorSet
from test_cli_runtime import invoke, one_line_error

D = 40


def planted(n: int = 60, layers: int = 3, seed: int = 0):
    """Vectors whose largest spread is a 'valence' axis and the second an 'arousal' axis, plus small noise."""
    g = torch.Generator().manual_seed(seed)
    axes, _ = torch.linalg.qr(torch.randn(D, 2, generator=g))
    valence = torch.linspace(-1, 1, n)[torch.randperm(n, generator=g)]
    arousal = torch.linspace(-1, 1, n)[torch.randperm(n, generator=g)]
    base = 3.0 * valence[:, None] * axes[:, 0] + 1.5 * arousal[:, None] * axes[:, 1]
    slices = [base + 0.1 * torch.randn(n, D, generator=g) + 2.0 * torch.randn(D, generator=g) for _ in range(layers)]
    names = [f"w{i}" for i in range(n)]
    vs = VectorSet(names, list(range(layers)), torch.stack(slices), default_layer=1)
    ratings = {"valence": dict(zip(names, valence.tolist())), "arousal": dict(zip(names, arousal.tolist()))}
    return vs, ratings


def test_principal_components_follow_the_planted_axes_and_match_sklearn():
    from sklearn.decomposition import PCA

    vs, ratings = planted()
    result = analyse(vs, ratings=ratings)
    r_valence, r_arousal = result["ratings"]["valence"]["r"], result["ratings"]["arousal"]["r"]
    assert r_valence[0] > 0.95 and abs(r_arousal[1]) > 0.9  # PC1 oriented along valence
    reference = PCA(n_components=10).fit(vs.unit[1].double().numpy())
    torch.testing.assert_close(torch.tensor(result["pca"]["explained"], dtype=torch.float64),
                               torch.tensor(reference.explained_variance_ratio_), rtol=1e-3, atol=1e-4)
    coords = torch.tensor(result["pca"]["coords"])
    projected = torch.tensor(reference.transform(vs.unit[1].double().numpy())[:, :2]).float()
    for c in range(2):  # same components up to sign
        assert abs(torch.nn.functional.cosine_similarity(coords[:, c], projected[:, c], dim=0)) > 0.999


def test_clusters_and_similarity_order_recover_planted_groups():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(2, D, generator=g) * 5
    group = torch.tensor([i % 2 for i in range(20)])
    vs = VectorSet([f"c{i}" for i in range(20)], [], centres[group] + 0.2 * torch.randn(20, D, generator=g))
    result = analyse(vs, k=2)
    clusters = sorted(sorted(c) for c in result["clusters"])
    assert clusters == sorted([sorted(f"c{i}" for i in range(20) if i % 2 == s) for s in (0, 1)])
    order = result["similarity"]["order"]
    assert sorted(order) == sorted(vs.names)
    first_half = {int(name[1:]) % 2 for name in order[:10]}
    assert len(first_half) == 1  # the ordering puts each group together
    matrix = torch.tensor(result["similarity"]["matrix"])
    torch.testing.assert_close(matrix, matrix.T)
    torch.testing.assert_close(matrix.diagonal(), torch.ones(20), atol=1e-3, rtol=0)
    assert "layer_stability" not in result


def test_layer_stability_is_one_for_identical_layers_and_low_for_unrelated():
    vs, _ = planted(layers=2)
    same = VectorSet(vs.names, [0, 1, 2], torch.stack([vs.vectors[0], vs.vectors[0], torch.randn(60, D)]))
    stability = layer_stability(same)
    assert stability[0, 1] == pytest.approx(1.0, abs=1e-5)
    assert abs(float(stability[0, 2])) < 0.3
    unit = same.unit
    rows, cols = torch.triu_indices(60, 60, offset=1)
    a, b = (unit[0] @ unit[0].T)[rows, cols], (unit[2] @ unit[2].T)[rows, cols]
    assert float(stability[0, 2]) == pytest.approx(float(torch.corrcoef(torch.stack([a, b]))[0, 1]), abs=1e-4)


def test_geometry_command_writes_figures_json_and_summary(tmp_path):
    vs, ratings = planted()
    vs.metadata["heldout_accuracy"] = {"0": [0.2, 0.5], "1": [0.4, 0.7], "2": [0.3, 0.6]}
    path = vs.save(tmp_path / "v.safetensors")
    csv = tmp_path / "ratings.csv"
    csv.write_text("word,valence,arousal\n" + "".join(f"{w},{v},{ratings['arousal'][w]}\n"
                                                        for w, v in ratings["valence"].items()))
    out = tmp_path / "geo"
    result = invoke("geometry", "--vectors", str(path), "--ratings", str(csv), "--out", str(out), "--k", "4")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "geometry.json").read_text())
    assert data["layer"] == 1 and len(data["clusters"]) == 4 and data["heldout"]["best_layer"] == 1
    assert data["heldout"]["at_layer"] == [0.4, 0.7]
    for name in ("pca.png", "similarity.png", "layers.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "r with valence (60 words)" in result.stdout and "held-out top-1 / top-5" in result.stdout
    other = invoke("geometry", "--vectors", str(path), "--layer", "2", "--out", str(out))
    assert other.exit_code == 0 and json.loads((out / "geometry.json").read_text())["layer"] == 2


def test_geometry_command_bad_input(tmp_path):
    vs, _ = planted()
    path = vs.save(tmp_path / "v.safetensors")
    bad = tmp_path / "bad.csv"
    bad.write_text("word,valence\nw1,high\n")
    assert "valence 'high' is not a number" in one_line_error(invoke("geometry", "--vectors", str(path), "--ratings",
                                                                     str(bad), "--out", str(tmp_path / "o")))
    bad.write_text("emotion;valence\n")
    assert "header 'word,valence" in one_line_error(invoke("geometry", "--vectors", str(path), "--ratings", str(bad)))
    assert "not at layer 9" in one_line_error(invoke("geometry", "--vectors", str(path), "--layer", "9",
                                                     "--out", str(tmp_path / "o")))
    (tmp_path / "afile").write_text("")
    assert "is a file" in one_line_error(invoke("geometry", "--vectors", str(path), "--out", str(tmp_path / "afile")))


def test_read_ratings_skips_blank_cells(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("word,valence,arousal\ncalm,2,\nafraid,-2,3\n")
    assert read_ratings(path) == {"valence": {"calm": 2.0, "afraid": -2.0}, "arousal": {"afraid": 3.0}}
