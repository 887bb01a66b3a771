"""Regulation in the fused op (clamp directions with bounds per slot), on every backend, against hand-worked cases.

The float64 oracle comparison over random shapes lives in test_ops.py (cases with C > 0); here: the properties the
contract promises, checked independently of the reference."""

from __future__ import annotations

import math

import pytest
import torch

import emovec
from test_ops import backend_params

INF = math.inf


def _dev(backend, device):
    return torch.device("cuda") if backend == "cuda" else device


@pytest.mark.parametrize("backend", list(backend_params()))
def test_a_hand_worked_example_in_two_dimensions(backend, device):
    """d = 2, u1 = x axis, u2 = the diagonal (not orthogonal to u1): the second clamp sees the row as the first left
    it. h = (3, 1): clamp x to <= 1 gives (1, 1); then its projection on the diagonal is 2/√2 = √2 > 0.5, so it moves
    back along the diagonal by √2 - 0.5, to (1 - (√2-0.5)/√2, 1 - (√2-0.5)/√2)."""
    device = _dev(backend, device)
    u = torch.tensor([[1.0, 0.0], [1 / math.sqrt(2), 1 / math.sqrt(2)]], device=device)
    bounds = torch.tensor([[[-INF, 1.0], [-INF, 0.5]]], device=device)
    h = torch.tensor([[3.0, 1.0], [0.2, 0.1]], device=device)
    corrections = torch.zeros(2, 2, device=device)
    emovec.steer_project(h, clamp=u, bounds=bounds, corrections=corrections, backend=backend)
    step = (math.sqrt(2) - 0.5) / math.sqrt(2)
    torch.testing.assert_close(h[0].cpu(), torch.tensor([1 - step, 1 - step]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(corrections[0].cpu(), torch.tensor([2.0, math.sqrt(2) - 0.5]), rtol=1e-6, atol=1e-6)
    assert torch.equal(h[1].cpu(), torch.tensor([0.2, 0.1]))  # within both bounds: untouched
    assert torch.equal(corrections[1].cpu(), torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", list(backend_params()))
def test_rows_within_bounds_and_unsteered_rows_are_bit_identical(backend, dtype, device):
    device = _dev(backend, device)
    g = torch.Generator().manual_seed(5)
    n, d = 40, 48
    h = torch.randn(n, d, generator=g).to(dtype).to(device)
    u = torch.nn.functional.normalize(torch.randn(3, d, generator=g), dim=1).to(device)
    center = (torch.randn(d, generator=g) * 0.1).to(device)
    p = ((h.double() - center.double().to(device)) @ u.double().T).cpu()
    # slot 0: wide bounds (every row inside); slot 1: tight bounds (most rows corrected)
    wide = torch.stack([p.min(0).values - 1, p.max(0).values + 1], -1)
    tight = torch.tensor([[-0.05, 0.05]] * 3, dtype=torch.float64)
    bounds = torch.stack([wide, tight]).float().to(device)
    slots = torch.tensor([[0, 1, -1][i % 3] for i in range(n)], device=device)
    out = h.clone()
    corrections = torch.full((n, 3), math.nan, device=device)
    emovec.steer_project(out, slots=slots, clamp=u, bounds=bounds, center=center, corrections=corrections,
                         backend=backend)
    inside = (slots != 1).cpu()
    assert torch.equal(out.cpu()[inside], h.cpu()[inside])
    assert (corrections.cpu()[inside] == 0).all()
    tight_rows = (slots == 1).cpu()
    assert (corrections.cpu()[tight_rows] != 0).any(dim=1).all()
    after = ((out.double() - center.double()) @ u.double().T).cpu()[tight_rows]
    # the last direction is met exactly (up to h's rounding); earlier ones may be moved again by later ones
    tolerance = 1e-4 if dtype == torch.float32 else 0.05
    assert (after[:, 2].abs() <= 0.05 + tolerance).all()


@pytest.mark.parametrize("backend", list(backend_params()))
def test_relative_bounds_hold_the_cosine_exactly(backend, device):
    """One direction, cosine bounds: after the op each corrected row's cosine with u (of h - center) equals the
    bound it hit; rows between the bounds keep their cosine."""
    device = _dev(backend, device)
    g = torch.Generator().manual_seed(7)
    n, d = 30, 64
    u = torch.nn.functional.normalize(torch.randn(1, d, generator=g), dim=1)
    h = torch.randn(n, d, generator=g) + 0.4 * torch.randn(n, 1, generator=g) * u * d**0.5  # spread of cosines
    center = torch.randn(d, generator=g) * 0.1
    cos_before = torch.nn.functional.cosine_similarity((h - center).double(), u.double(), dim=1)
    lo, hi = -0.1, 0.2
    assert (cos_before < lo).any() and (cos_before > hi).any() and ((cos_before > lo) & (cos_before < hi)).any()
    out = h.clone().to(device)
    emovec.steer_project(out, clamp=u.to(device), bounds=torch.tensor([[[lo, hi]]], device=device),
                         center=center.to(device), relative_bounds=True, backend=backend)
    cos_after = torch.nn.functional.cosine_similarity((out.cpu() - center).double(), u.double(), dim=1)
    want = cos_before.clamp(lo, hi)
    torch.testing.assert_close(cos_after, want, rtol=0, atol=1e-5)
    # the part orthogonal to u is unchanged: only the component along u moved
    ortho = lambda x: (x - center) - ((x - center) @ u.T) * u  # noqa: E731
    torch.testing.assert_close(ortho(out.cpu()), ortho(h), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", list(backend_params()))
def test_clamp_runs_after_steering_and_scores_show_the_regulated_state(backend, device):
    """Steering adds +5 along u, the cap holds the projection at 1: the score of probe u reads 1, not 5."""
    device = _dev(backend, device)
    d = 16
    u = torch.zeros(1, d)
    u[0, 3] = 1.0
    h = torch.zeros(2, d)
    table = 5.0 * u
    out = h.clone().to(device)
    result = emovec.steer_project(out, slots=torch.tensor([0, -1], device=device), table=table.to(device),
                                  clamp=u.to(device), bounds=torch.tensor([[[-INF, 1.0]]], device=device),
                                  probes=u.to(device), backend=backend)
    assert result.scores.cpu().flatten().tolist() == [1.0, 0.0]


def test_bad_regulation_arguments_get_clear_errors():
    h = torch.randn(4, 8)
    u = torch.nn.functional.normalize(torch.randn(2, 8), dim=1)
    good = torch.tensor([[[-1.0, 1.0], [-INF, 0.5]]])
    with pytest.raises(ValueError, match="clamp needs bounds"):
        emovec.steer_project(h, clamp=u)
    with pytest.raises(ValueError, match="bounds were given without clamp"):
        emovec.steer_project(h, bounds=good)
    with pytest.raises(ValueError, match="unit vectors"):
        emovec.steer_project(h, clamp=u * 2, bounds=good)
    with pytest.raises(ValueError, match="lower bound is above"):
        emovec.steer_project(h, clamp=u, bounds=good.flip(-1))
    with pytest.raises(ValueError, match="NaN"):
        emovec.steer_project(h, clamp=u, bounds=torch.full((1, 2, 2), math.nan))
    with pytest.raises(ValueError, match="cosines"):
        emovec.steer_project(h, clamp=u, bounds=torch.tensor([[[1.5, 2.0], [-1.0, 1.0]]]), relative_bounds=True)
    with pytest.raises(ValueError, match="bounds must have shape"):
        emovec.steer_project(h, clamp=u, bounds=torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="bounds must have shape"):  # without slots, one row of bounds
        emovec.steer_project(h, clamp=u, bounds=torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="bounds must have shape"):  # with a table, one row of bounds per table row
        emovec.steer_project(h, slots=torch.zeros(4, dtype=torch.long), table=torch.zeros(3, 8), clamp=u, bounds=good)
    with pytest.raises(ValueError, match="slots values"):
        emovec.steer_project(h, slots=torch.tensor([0, 1, 0, 0]), clamp=u, bounds=good)
    with pytest.raises(TypeError, match="bounds must have dtype float32"):
        emovec.steer_project(h, clamp=u, bounds=good.double())
    with pytest.raises(ValueError, match="corrections must have shape"):
        emovec.steer_project(h, clamp=u, bounds=good, corrections=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="corrections was given without clamp"):
        emovec.steer_project(h, corrections=torch.zeros(4, 2))
