"""The torch reference of the fused steer/project/capture op: short, obviously right, the oracle for every test.

It is also the ``torch`` backend and the naive baseline in benchmarks (see :func:`naive_sequence`).
"""

from __future__ import annotations

import torch

# error bits of the ``errors`` flag (shared with the C++ core's IndexError enum and the Triton kernel)
SLOT_OUT_OF_RANGE = 1
SEGMENT_OUT_OF_RANGE = 2


def steer_project_reference(
    h: torch.Tensor,
    slots: torch.Tensor | None,
    table: torch.Tensor | None,
    ablate: torch.Tensor | None,
    probes: torch.Tensor | None,
    center: torch.Tensor | None,
    scores: torch.Tensor | None,
    norms: torch.Tensor | None,
    segments: torch.Tensor | None,
    sums: torch.Tensor | None,
    counts: torch.Tensor | None,
    errors: torch.Tensor | None = None,
    clamp: torch.Tensor | None = None,
    bounds: torch.Tensor | None = None,
    relative_bounds: bool = False,
    corrections: torch.Tensor | None = None,
) -> None:
    """Same contract as :func:`emovec.ops.steer_project`, on already validated arguments.

    ``h[i] += table[slots[i]]`` (slot -1: row untouched), then ``h[i] -= sum_a (h[i]·u_a) u_a`` for the
    rows that are steered (all rows when ``slots`` is None), then each clamp direction in order (see
    :func:`clamp_rows`); ``scores[i, k] = (h[i] - center)·probes[k]``
    and ``norms[i] = ‖h[i] - center‖`` on the stored value of ``h[i]``; ``sums[segments[i]] += h[i]`` and
    ``counts[segments[i]] += 1`` for rows with ``segments[i] >= 0``. Computes in fp32, or in float64 when
    ``h`` is float64 (the tests' oracle).
    """
    acc = torch.promote_types(h.dtype, torch.float32)
    x = h.to(acc)
    if corrections is not None:
        corrections.zero_()
    if table is not None or ablate is not None or clamp is not None:
        if slots is not None:  # out-of-range slots (< -1, or past the table) leave their row untouched
            rows = table.shape[0] if table is not None else (bounds.shape[0] if bounds is not None else None)
            bad = (slots < -1) | (slots >= rows) if rows is not None else slots < -1
            active = (slots >= 0) & ~bad
            _report(errors, bad, SLOT_OUT_OF_RANGE)
        else:
            active = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        if table is not None:
            x = x + torch.where(active[:, None], table.to(acc)[torch.where(active, slots, 0)], 0.0)
        if ablate is not None:
            u = ablate.to(acc)
            x = torch.where(active[:, None], x - (x @ u.T) @ u, x)
        if clamp is not None:
            rows_bounds = bounds[torch.where(active, slots, 0)] if slots is not None else bounds[0].expand(
                x.shape[0], *bounds.shape[1:])
            clamped, corr = clamp_rows(x, clamp.to(acc), rows_bounds.to(acc),
                                       center.to(acc) if center is not None else None, relative_bounds)
            x = torch.where(active[:, None], clamped, x)
            corr = torch.where(active[:, None], corr, 0.0)
            if corrections is not None:
                corrections.copy_(corr)
        h.copy_(x)
        x = h.to(acc)  # project what is stored, after rounding to h's dtype
    centered = x - center.to(acc) if center is not None else x
    if scores is not None:
        scores.copy_(centered @ probes.to(acc).T)
    if norms is not None:
        norms.copy_(centered.norm(dim=1))
    if sums is not None:
        bad = (segments < -1) | (segments >= sums.shape[0])
        _report(errors, bad, SEGMENT_OUT_OF_RANGE)
        keep = (segments >= 0) & ~bad
        # every row is added, the rows not captured as -0.0 into segment 0: no boolean-mask indexing, whose output
        # size needs the host (a synchronisation, and a failure under CUDA-graph capture). -0.0 is the exact additive
        # identity (s + -0.0 == s bit for bit, -0.0 included), and torch.where, unlike a multiplication by 0, keeps
        # an inf or NaN in a row not captured out of the sums
        idx = torch.where(keep, segments, 0)
        sums.index_add_(0, idx, torch.where(keep[:, None], x.to(sums.dtype), -0.0))
        counts.index_add_(0, idx, torch.where(keep, 1.0, -0.0).to(counts.dtype))


def cosine_bound(bound: torch.Tensor, orthogonal_sq: torch.Tensor) -> torch.Tensor:
    """The projection whose cosine with a unit direction is ``bound`` for a row whose part orthogonal to the direction
    has squared norm ``orthogonal_sq``: ``b·r / sqrt(1 - b²)`` (cosine = p / sqrt(r² + p²) rises with p), and ±inf
    for |b| >= 1 (no bound on that side)."""
    r = orthogonal_sq.clamp_min(0).sqrt()
    inside = bound.abs() < 1
    safe = torch.where(inside, bound, torch.zeros_like(bound))
    return torch.where(inside, safe * r / (1 - safe * safe).sqrt(), torch.where(bound > 0, torch.inf, -torch.inf))


def clamp_rows(x: torch.Tensor, clamp: torch.Tensor, bounds: torch.Tensor, center: torch.Tensor | None,
               relative: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Regulate rows ``x`` (N, d) along unit directions ``clamp`` (C, d), one direction after the other, in order:
    ``p = (x - center)·u_c``; ``x -= (p - min(max(p, lo), hi)) u_c`` with ``lo, hi = bounds[:, c]`` ((N, C, 2));
    with ``relative`` the bounds are cosines, turned into projections for each row (:func:`cosine_bound`), so the
    row's cosine with u_c ends within [lo, hi]. Returns (x, corrections (N, C): p - clamped p, 0 within bounds).
    Directions need not be orthogonal: a later one sees the rows as the earlier ones left them."""
    x = x.clone()
    corrections = torch.zeros(x.shape[0], clamp.shape[0], dtype=x.dtype, device=x.device)
    for c in range(clamp.shape[0]):
        u = clamp[c]
        y = x - center if center is not None else x
        p = y @ u
        lo, hi = bounds[:, c, 0], bounds[:, c, 1]
        if relative:
            orthogonal = (y * y).sum(1) - p * p
            lo, hi = cosine_bound(lo, orthogonal), cosine_bound(hi, orthogonal)
        delta = p - torch.minimum(torch.maximum(p, lo), hi)
        x = torch.where((delta != 0)[:, None], x - delta[:, None] * u, x)  # rows within bounds stay bit-identical
        corrections[:, c] = delta
    return x, corrections


def _report(errors: torch.Tensor | None, bad: torch.Tensor, bit: int) -> None:
    """errors |= bit where any row is bad, on the device (no host synchronisation)."""
    if errors is not None:
        errors.bitwise_or_(bad.any().to(errors.dtype) * bit)


def naive_sequence(h, slots, table, ablate, probes, center, segments, sums, counts):
    """What a user writes with plain torch ops, one op per step, in h's dtype: the benchmark baseline.

    Steering by gather-and-add, ablation, a matmul, a norm and an index_add, each a separate kernel.
    Weights must already be in h's dtype. Returns (scores, norms).
    """
    active = slots >= 0 if slots is not None else None
    if table is not None:
        h[active] += table[slots[active]]
    if ablate is not None:
        rows = h[active] if active is not None else h
        rows = rows - (rows @ ablate.T) @ ablate
        if active is not None:
            h[active] = rows
        else:
            h.copy_(rows)
    centered = h - center if center is not None else h
    scores = (centered @ probes.T).float() if probes is not None else None
    norms = centered.float().norm(dim=1)
    if segments is not None:
        keep = segments >= 0
        sums.index_add_(0, segments[keep], h[keep].float())
        counts.index_add_(0, segments[keep], torch.ones(keep.shape[0], device=h.device)[keep])
    return scores, norms
