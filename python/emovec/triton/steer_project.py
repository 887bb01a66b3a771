"""Triton kernels of the fused steer / project / capture op, and their launcher.

Contract: see :func:`emovec.ops.steer_project` (reference: :mod:`emovec.reference`).

``_project_kernel`` (many rows with probes: monitoring, and the projection half of any call with more than
``SMALL_N`` rows): GEMM tiles of rows x probes, d in chunks, ``tl.dot`` in h's dtype on tensor cores (wgmma on
sm_90; tf32x3 for fp32 h) with fp32 accumulation; the center enters as ``center · probe`` after the product, so
``h - center`` is never rounded; norms from the first probe tile. On a GPU the tile sizes, warps and pipeline stages
are autotuned: the first call of each (rows rounded up to a power of two, d, K, dtypes) times every candidate of
:func:`projection_configs` on the call's own tensors and keeps the fastest. ``EMOVEC_TRITON_AUTOTUNE=0`` turns that
off (the default configuration, 64 x 64 tiles, always); under the interpreter, and while a CUDA graph is being
captured, nothing is timed either. Every candidate compiles without spills on sm_80 / sm_90
(benchmarks/kernel_report.py).

``_steer_project_kernel`` (edits, capture, and small N): one program owns ``BLOCK_N`` rows and walks the hidden
dimension in ``BLOCK_D`` chunks:

  pass 1 (ablation only):  coef[r, a] = (h[r] + table[slot[r]]) · u_a
  pass 1b (regulation only): dots[r, c] = (x0[r] - center) · w_c and ‖x0[r] - center‖² on the steered, ablated
           rows x0; then, direction after direction, p_c = dots[r, c] - Σ_{c' < c} δ[r, c'] (w_c'·w_c) (the
           projection after the earlier corrections, with the Gram matrix of the directions), δ[r, c] =
           p_c - clamp(p_c, lo, hi); pass 2 subtracts Σ_c δ[r, c] w_c
  pass 2:  x = h + table[slot] - coef @ u;  h = round(x);  norms, capture (the tile's rows summed before one
           relaxed atomic per column when they all share one segment, as in extraction) and, for small N, the first
           probe tile of scores[r, k] = (h[r] - center) · probes[k]
  pass 3:  the remaining probe tiles re-read the freshly written rows (L2-resident).

With more than SMALL_N rows and probes, the edits and capture run first (no dots) and the projection kernel reads
the rows as stored. N of 1 to 16: the edits run first (one small launch) and the projection runs on a (row tile x
probe tile) grid without tl.dot.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
import triton.testing
from triton.runtime.errors import OutOfResources

from emovec.triton import interpreting

SMALL_N = 16


@triton.jit
def _probe_tile_dot(x, probes_ptr, k_offsets, cols, K, D, col_mask):
    """x (BLOCK_N, BLOCK_D) fp32 times the probe tile (BLOCK_K, BLOCK_D) transposed, as a broadcast sum in fp32 (the
    few rows this kernel projects; many rows go to _project_kernel's tl.dot)."""
    p = tl.load(probes_ptr + k_offsets[:, None] * D + cols[None, :], mask=(k_offsets[:, None] < K) & col_mask[None, :], other=0.0)
    return tl.sum(x[:, None, :] * p.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _combine(coef, directions_ptr, offsets, cols, count, D, col_mask):
    """coef (BLOCK_N, B) times the directions' columns ``cols`` (B directions of length D): sum_b coef[:, b] u_b, in
    fp32. The directions are loaded transposed, (BLOCK_D, B), so the sum runs over the last axis: Triton rewrites a
    broadcast product summed over its middle axis into ``tt.dot``, which on a GPU runs fp32 operands in TF32 (13
    mantissa bits dropped, ~1e-3 relative error; the interpreter computes it exactly, so only a GPU showed it).
    benchmarks/kernel_report.py checks that this kernel compiles without any ``tt.dot``."""
    ut = tl.load(directions_ptr + offsets[None, :] * D + cols[:, None], mask=(offsets[None, :] < count) & col_mask[:, None],
                 other=0.0).to(tl.float32)
    return tl.sum(coef[:, None, :] * ut[None, :, :], axis=2)


@triton.jit
def _cosine_bound(b, r2):
    """A cosine bound as a projection for rows whose orthogonal part has squared norm r2 (±inf for |b| >= 1)."""
    inside = tl.abs(b) < 1.0
    safe = tl.where(inside, b, 0.0)
    value = safe * tl.sqrt(tl.maximum(r2, 0.0)) / tl.sqrt(1.0 - safe * safe)
    return tl.where(inside, value, tl.where(b > 0, float("inf"), float("-inf")))


@triton.jit
def _steer_project_kernel(
    h_ptr, h_row_stride, slots_ptr, table_ptr, ablate_ptr, probes_ptr, center_ptr,
    scores_ptr, norms_ptr, segments_ptr, sums_ptr, counts_ptr, errors_ptr,
    clamp_ptr, gram_ptr, bounds_ptr, corrections_ptr,
    N, D, K, A, R, S, C,
    HAS_ERRORS: tl.constexpr, HAS_CLAMP: tl.constexpr, RELATIVE_BOUNDS: tl.constexpr, HAS_CORRECTIONS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_SLOTS: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_ABLATE: tl.constexpr, HAS_CENTER: tl.constexpr,
    HAS_SCORES: tl.constexpr, HAS_NORMS: tl.constexpr, HAS_CAPTURE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_A: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_step = BLOCK_K * tl.num_programs(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    if HAS_SLOTS:
        slot = tl.load(slots_ptr + rows, mask=row_mask, other=-1)
        bad_slot = (slot < -1) & row_mask  # out of range: row untouched, reported
        if HAS_TABLE or HAS_CLAMP:
            bad_slot = bad_slot | ((slot >= R) & row_mask)
        active = (slot >= 0) & row_mask & (bad_slot == 0)
        slot = tl.where(active, slot, 0)
        if HAS_ERRORS:
            tl.atomic_or(errors_ptr + tl.zeros([BLOCK_N], dtype=tl.int32), tl.full([BLOCK_N], 1, tl.int32), mask=bad_slot)
    else:
        slot = tl.zeros([BLOCK_N], dtype=tl.int64)
        active = row_mask
    EDITS: tl.constexpr = HAS_TABLE or HAS_ABLATE or HAS_CLAMP
    h_rows = h_ptr + rows[:, None] * h_row_stride
    a_offsets = tl.arange(0, BLOCK_A)

    # pass 1: ablation coefficients on the steered rows
    coef = tl.zeros([BLOCK_N, BLOCK_A], dtype=tl.float32)
    if HAS_ABLATE:
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            m = row_mask[:, None] & col_mask[None, :]
            x = tl.load(h_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
            if HAS_TABLE:
                x += tl.load(table_ptr + slot[:, None] * D + cols[None, :], mask=active[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
            u = tl.load(ablate_ptr + a_offsets[:, None] * D + cols[None, :], mask=(a_offsets[:, None] < A) & col_mask[None, :], other=0.0).to(tl.float32)
            coef += tl.sum(x[:, None, :] * u[None, :, :], axis=2)
        coef = tl.where(active[:, None], coef, 0.0)

    # pass 1b: regulation, the corrections δ of every direction, in order
    c_offsets = tl.arange(0, BLOCK_C)
    delta = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    if HAS_CLAMP:
        dots = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        n2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            x = tl.load(h_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
            if HAS_TABLE:
                x += tl.load(table_ptr + slot[:, None] * D + cols[None, :], mask=active[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
            if HAS_ABLATE:
                x -= _combine(coef, ablate_ptr, a_offsets, cols, A, D, col_mask)
            if HAS_CENTER:
                x -= tl.load(center_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            w = tl.load(clamp_ptr + c_offsets[:, None] * D + cols[None, :], mask=(c_offsets[:, None] < C) & col_mask[None, :], other=0.0).to(tl.float32)
            dots += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
            n2 += tl.sum(x * x, axis=1)
        bound_rows = bounds_ptr + slot * C * 2
        for c in range(0, C):
            chosen = c_offsets == c
            gram_col = tl.load(gram_ptr + c_offsets * C + c, mask=c_offsets < C, other=0.0)  # w_c'·w_c
            uu = tl.sum(tl.where(chosen, gram_col, 0.0), axis=0)
            p = tl.sum(tl.where(chosen[None, :], dots, 0.0), axis=1) - tl.sum(delta * gram_col[None, :], axis=1)
            lo = tl.load(bound_rows + c * 2, mask=active, other=float("-inf"))
            hi = tl.load(bound_rows + c * 2 + 1, mask=active, other=float("inf"))
            if RELATIVE_BOUNDS:
                lo = _cosine_bound(lo, n2 - p * p)
                hi = _cosine_bound(hi, n2 - p * p)
            step = p - tl.minimum(tl.maximum(p, lo), hi)
            step = tl.where(active, step, 0.0)
            delta = tl.where(chosen[None, :], step[:, None], delta)
            n2 += step * step * uu - 2.0 * step * p
        if HAS_CORRECTIONS:
            tl.store(corrections_ptr + rows[:, None] * C + c_offsets[None, :], delta,
                     mask=row_mask[:, None] & (c_offsets[None, :] < C))
    changed = tl.sum((delta != 0.0).to(tl.int32), axis=1) > 0

    # pass 2: edit, store, norms, capture and the first probe tile of scores
    if HAS_CAPTURE:
        segment = tl.load(segments_ptr + rows, mask=row_mask, other=-1)
        bad_segment = ((segment < -1) | (segment >= S)) & row_mask
        captured = (segment >= 0) & row_mask & (bad_segment == 0)
        segment = tl.where(captured, segment, 0)
        if HAS_ERRORS:
            tl.atomic_or(errors_ptr + tl.zeros([BLOCK_N], dtype=tl.int32), tl.full([BLOCK_N], 2, tl.int32), mask=bad_segment)
        # extraction: one segment spans many consecutive rows. When every captured row of this tile is in the same
        # segment, the tile's rows are summed first and added with one atomic per column (BLOCK_N times fewer);
        # otherwise one per row and column. Relaxed: only the final sums matter, not the order of the additions.
        first_segment = tl.min(tl.where(captured, segment, S), axis=0)
        one_segment = first_segment == tl.max(tl.where(captured, segment, -1), axis=0)  # False when none is captured
    k_offsets = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    squares = tl.zeros([BLOCK_N], dtype=tl.float32)
    if EDITS or HAS_NORMS or HAS_CAPTURE or HAS_SCORES:
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            m = row_mask[:, None] & col_mask[None, :]
            x = tl.load(h_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
            if EDITS:
                if HAS_TABLE:
                    x += tl.load(table_ptr + slot[:, None] * D + cols[None, :], mask=active[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
                if HAS_ABLATE:
                    x -= _combine(coef, ablate_ptr, a_offsets, cols, A, D, col_mask)
                if HAS_CLAMP:  # rows within every bound are left bit-identical
                    x = tl.where(changed[:, None], x - _combine(delta, clamp_ptr, c_offsets, cols, C, D, col_mask), x)
                stored = x.to(h_ptr.dtype.element_ty)
                tl.store(h_rows + cols[None, :], stored, mask=active[:, None] & col_mask[None, :])
                x = tl.where(active[:, None], stored.to(tl.float32), x)
            if HAS_CAPTURE:
                if one_segment:
                    tl.atomic_add(sums_ptr + first_segment * D + cols, tl.sum(tl.where(captured[:, None], x, 0.0), axis=0),
                                  mask=col_mask, sem="relaxed")
                else:
                    tl.atomic_add(sums_ptr + segment[:, None] * D + cols[None, :], x,
                                  mask=captured[:, None] & col_mask[None, :], sem="relaxed")
            if HAS_CENTER:
                x -= tl.load(center_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_NORMS:
                squares += tl.sum(x * x, axis=1)
            if HAS_SCORES:
                acc += _probe_tile_dot(x, probes_ptr, k_offsets, cols, K, D, col_mask)
    if HAS_NORMS:
        tl.store(norms_ptr + rows, tl.sqrt(squares), mask=row_mask)
    if HAS_CAPTURE:
        if one_segment:
            tl.atomic_add(counts_ptr + first_segment, tl.sum(captured.to(tl.float32), axis=0), sem="relaxed")
        else:
            tl.atomic_add(counts_ptr + segment, tl.full([BLOCK_N], 1.0, tl.float32), mask=captured, sem="relaxed")
    if HAS_SCORES:
        tl.store(scores_ptr + rows[:, None] * K + k_offsets[None, :], acc, mask=row_mask[:, None] & (k_offsets[None, :] < K))

        # pass 3: remaining probe tiles, on the rows as stored
        if EDITS:
            tl.debug_barrier()  # this program's stores to h must be visible to all its threads
        for k0 in range((pid_k * BLOCK_K) + k_step, K, k_step):
            k_offsets = k0 + tl.arange(0, BLOCK_K)
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                col_mask = cols < D
                x = tl.load(h_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
                if HAS_CENTER:
                    x -= tl.load(center_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
                acc += _probe_tile_dot(x, probes_ptr, k_offsets, cols, K, D, col_mask)
            tl.store(scores_ptr + rows[:, None] * K + k_offsets[None, :], acc, mask=row_mask[:, None] & (k_offsets[None, :] < K))


@triton.jit
def _project_kernel(
    h_ptr, h_row_stride, probes_ptr, center_ptr, center_dots_ptr, scores_ptr, norms_ptr, N, D, K,
    HAS_CENTER: tl.constexpr, HAS_NORMS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Projection only (what monitoring does): scores = h · probes - center · probes, norms = ‖h - center‖.

    A GEMM tile per program, (BLOCK_N rows x BLOCK_K probes), walking d in BLOCK_D chunks: ``h`` and the probes
    enter ``tl.dot`` in h's dtype (tensor cores; the probes are kept in h's dtype by the launcher), the products
    accumulate in fp32, and the center is subtracted after the product as ``center · probe_k`` computed once in fp32,
    so ``h - center`` is never rounded (nor overflows in fp16). The norms come from the first probe tile's programs.

    Probe tiles on the grid's first axis, which the GPU schedules fastest: the programs that share a row tile run
    next to each other, so the tile of ``h`` comes from DRAM once and from L2 for the other probe tiles (row tiles
    first would read it once per probe tile). Two axes rather than one flat index: a division and a remainder
    per program cost the registers that tipped configurations at 255 into spilling on sm_80.
    """
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    probes_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < N
    k_mask = probes_k < K
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    squares = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        x = tl.load(h_ptr + rows[:, None] * h_row_stride + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0)
        p = tl.load(probes_ptr + probes_k[:, None] * D + cols[None, :], mask=k_mask[:, None] & col_mask[None, :],
                    other=0.0)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(p.to(tl.float32)), input_precision=PRECISION)
        else:
            acc += tl.dot(x, tl.trans(p.to(x.dtype)))
        if HAS_NORMS:
            if pid_k == 0:
                y = x.to(tl.float32)
                if HAS_CENTER:
                    y -= tl.load(center_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
                squares += tl.sum(y * y, axis=1)
    if HAS_CENTER:
        acc -= tl.load(center_dots_ptr + probes_k, mask=k_mask, other=0.0)[None, :]
    tl.store(scores_ptr + rows[:, None] * K + probes_k[None, :], acc, mask=row_mask[:, None] & k_mask[None, :])
    if HAS_NORMS:
        if pid_k == 0:
            tl.store(norms_ptr + rows, tl.sqrt(squares), mask=row_mask)


# Candidate configurations of _project_kernel, (BLOCK_N, BLOCK_K, BLOCK_D, num_warps, num_stages), the default first.
# All compile without spills on sm_90 and sm_80 at d = 4096, K = 171, with the alignment Triton's JIT gives a launch
# on a device (benchmarks/kernel_report.py compiles them all): the loads of h and the probes are pipelined through
# shared memory (cp.async) in every one. The larger tiles read less per output: one 64 x 256 tile covers K = 171, so
# h is read once, and 128 x 128 tiles read the probes half as often per row; 128 x 256 tiles spill.
HALF_CONFIGS = (
    (64, 64, 64, 8, 3),
    (64, 64, 32, 8, 3),
    (64, 64, 32, 4, 3),
    (64, 32, 64, 8, 3),
    (64, 128, 32, 8, 3),  # K = 171 in two probe tiles: h is read twice, not three times
    (64, 128, 64, 8, 3),
    (64, 256, 32, 8, 4),  # K = 171 in one probe tile
    (128, 64, 32, 8, 3),
    (128, 64, 64, 8, 4),
    (128, 32, 32, 8, 3),
    (128, 128, 32, 8, 4),
    (128, 128, 64, 8, 3),
)
# fp32 h (tf32x3, three dots per product): d in chunks of 32 only (64 spills on sm_80 in every tile shape), and the
# pipeline depth matters (the loads are pipelined through shared memory); 64-row x 128-probe tiles spill on sm_80
FP32_CONFIGS = (
    (64, 64, 32, 8, 3),
    (64, 64, 32, 8, 4),
    (64, 32, 32, 8, 3),
    (64, 32, 32, 8, 4),
    (64, 32, 32, 4, 3),
    (128, 64, 32, 8, 3),
    (128, 32, 32, 8, 2),
    (128, 32, 32, 8, 3),
)
# calls with more rows than this share their tuned configuration: the grid is many waves deep by then
TUNE_MAX_ROWS = 16384
# the fastest configuration per (rows bucket, d, K, dtypes, center, norms, device), measured on first use
_tuned_configs: dict[tuple, dict] = {}


def _dot_in_fp32(h_dtype: torch.dtype) -> bool:
    """fp32 h: tf32x3 keeps fp32 accuracy on tensor cores; under the interpreter every dot runs in fp32 ("ieee")."""
    return h_dtype == torch.float32 or interpreting


def projection_configs(n: int, d: int, k: int, h_dtype: torch.dtype) -> list[dict]:
    """The candidate configurations of the projection-only kernel for a call, the default first: h's dtype's list with
    each block size cut down to the problem (the power of two, at least 16, that covers n, K or d), repeats removed.
    Each is a dict of ``BLOCK_N``, ``BLOCK_K``, ``BLOCK_D``, ``num_warps`` and ``num_stages``."""
    fit = [max(16, triton.next_power_of_2(size)) for size in (n, k, d)]
    configs = []
    for block_n, block_k, block_d, num_warps, num_stages in FP32_CONFIGS if h_dtype == torch.float32 else HALF_CONFIGS:
        config = dict(BLOCK_N=min(block_n, fit[0]), BLOCK_K=min(block_k, fit[1]), BLOCK_D=min(block_d, fit[2]),
                      num_warps=num_warps, num_stages=num_stages)
        if config not in configs:
            configs.append(config)
    return configs


def plan_projection(n: int, d: int, k: int, h_dtype: torch.dtype, config: dict | None = None) -> dict:
    """How the projection-only kernel is launched with ``config`` (one of :func:`projection_configs`; by default the
    first: 64 x 64 output tiles, BLOCK_N = 64 lets sm_90 use wgmma, K = 171 pads to 192, not 256; d in chunks of 64,
    32 for fp32 h; 8 warps): constexpr ``flags``, ``num_warps``, ``num_stages`` and ``grid``. Shared by
    :func:`project_triton` and benchmarks/kernel_report.py."""
    config = config or projection_configs(n, d, k, h_dtype)[0]
    block_n, block_k, block_d = config["BLOCK_N"], config["BLOCK_K"], config["BLOCK_D"]
    dot_fp32 = _dot_in_fp32(h_dtype)
    return {"flags": dict(BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, DOT_FP32=dot_fp32,
                          PRECISION="ieee" if interpreting else "tf32x3"),
            "num_warps": config["num_warps"], "num_stages": config["num_stages"],
            "grid": (triton.cdiv(k, block_k), triton.cdiv(n, block_n)),
            "describe": f"project tl.dot N{block_n} K{block_k} D{block_d} w{config['num_warps']} "
                        f"s{config['num_stages']}" + (" tf32x3" if dot_fp32 and not interpreting else "")}


def _chosen_config(key: tuple, candidates: list[dict], launch) -> dict:
    """The fastest of ``candidates`` for ``key``, timed with ``launch(config)`` the first time the key is seen (the
    kernel only stores scores and norms, so the repeated launches leave the call's result as one launch would). The
    default when tuning is off (interpreter, EMOVEC_TRITON_AUTOTUNE=0) or impossible (a CUDA graph being captured
    cannot be timed: a configuration tuned before the capture is still used)."""
    if interpreting or os.environ.get("EMOVEC_TRITON_AUTOTUNE", "1") == "0":
        return candidates[0]
    if key not in _tuned_configs:
        if len(candidates) == 1 or torch.cuda.is_current_stream_capturing():
            return candidates[0]
        times = []
        for config in candidates:
            try:
                times.append(triton.testing.do_bench(functools.partial(launch, config), return_mode="median"))
            except OutOfResources:  # a GPU with less shared memory than sm_80 / sm_90
                times.append(float("inf"))
        _tuned_configs[key] = candidates[times.index(min(times))]
    return _tuned_configs[key]


MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis


def project_triton(h, probes, center, scores, norms, config: dict | None = None) -> None:
    """Projection only, on validated arguments (the monitoring case: no steering, ablation, clamp or capture), with
    ``config`` (one of :func:`projection_configs`) or, by default, the autotuned one."""
    n, d = h.shape
    k = probes.shape[0]
    if probes.dtype != h.dtype and not _dot_in_fp32(h.dtype):
        probes = probes.to(h.dtype)  # tensor cores take both operands in h's dtype; products accumulate in fp32
    center_dots = (probes.float() @ center.float()).contiguous() if center is not None else None
    arguments = (h, h.stride(0), probes, center if center is not None else h,
                 center_dots if center_dots is not None else h, scores, norms if norms is not None else h, n, d, k)

    def launch(chosen_config: dict) -> None:
        chosen = plan_projection(n, d, k, h.dtype, chosen_config)
        rows_per_launch = MAX_GRID_Y * chosen["flags"]["BLOCK_N"]  # row tiles are the grid's second axis
        for start in range(0, n, rows_per_launch):
            end = min(n, start + rows_per_launch)
            part = (h[start:end], h.stride(0), *arguments[2:5], scores[start:end],
                    norms[start:end] if norms is not None else h, end - start, d, k)
            grid = (chosen["grid"][0], triton.cdiv(end - start, chosen["flags"]["BLOCK_N"]))
            _project_kernel[grid](*part, HAS_CENTER=center is not None, HAS_NORMS=norms is not None,
                                  num_warps=chosen["num_warps"], num_stages=chosen["num_stages"], **chosen["flags"])

    if config is None:
        key = (min(triton.next_power_of_2(n), TUNE_MAX_ROWS), d, k, h.dtype, probes.dtype, center is not None,
               norms is not None, h.device)
        config = _chosen_config(key, projection_configs(n, d, k, h.dtype), launch)
    launch(config)


def plan(n: int, d: int, k: int, a: int, c: int, h_dtype: torch.dtype, *, scores: bool, norms: bool, capture: bool,
         edits: bool) -> dict:
    """The block sizes and paths the launcher picks for a call, without launching: ``flags`` (the constexpr block
    sizes), ``grid`` of the first launch, whether that launch computes ``scores`` / ``norms``,
    and ``second_projection`` (a projection-only launch after the edits, on the small-N path). Shared by
    :func:`steer_project_triton` and benchmarks/kernel_report.py."""
    block_a = max(1, triton.next_power_of_2(a))
    block_c = max(1, triton.next_power_of_2(c))
    # many rows with probes go to the projection kernel (see steer_project_triton): here, no tl.dot; the broadcast-
    # sum products are BLOCK_N x BLOCK_K x BLOCK_D in registers, so BLOCK_D stays small
    block_d = min(32, triton.next_power_of_2(d))
    flags = dict(BLOCK_D=block_d, BLOCK_A=block_a, BLOCK_C=block_c)
    block_n = max(1, min(SMALL_N, triton.next_power_of_2(n)))
    block_k = max(1, min(32, triton.next_power_of_2(max(k, 1))))
    if a or c:
        flags["BLOCK_D"] = max(1, min(block_d, 16384 // (block_n * max(block_a, block_c))))
    flags.update(BLOCK_N=block_n, BLOCK_K=block_k)
    project_now = scores and not edits
    # a probe-tile grid only when no program would capture twice
    probe_tiles = triton.cdiv(k, block_k) if project_now and not capture else 1
    return {"flags": flags, "grid": (triton.cdiv(n, block_n), probe_tiles), "scores": project_now, "norms": norms,
            "second_projection": scores and not project_now,
            "launch": edits or norms or capture or project_now,
            "describe": f"broadcast-sum N{block_n} K{block_k} D{flags['BLOCK_D']}"}


def steer_project_triton(h, slots, table, ablate, probes, center, scores, norms, segments, sums, counts,
                         errors=None, clamp=None, bounds=None, relative_bounds=False, corrections=None) -> None:
    """Launch the Triton kernel on validated arguments (see :func:`emovec.ops.steer_project`)."""
    n, d = h.shape
    if n == 0:
        return
    k = probes.shape[0] if probes is not None else 0
    a = ablate.shape[0] if ablate is not None else 0
    c = clamp.shape[0] if clamp is not None else 0
    edits = table is not None or ablate is not None or clamp is not None
    if scores is not None and k > 0 and n > SMALL_N:
        # many rows: edits and capture first (no dots), then the lean GEMM-tile projection on the rows as stored;
        # one kernel doing both needed more registers than there are (benchmarks/kernel_report.py)
        if edits or sums is not None:
            steer_project_triton(h, slots, table, ablate, None, center, None, None, segments, sums, counts, errors,
                                 clamp, bounds, relative_bounds, corrections)
        project_triton(h, probes, center, scores, norms)
        return
    chosen = plan(n, d, k, a, c, h.dtype, scores=scores is not None, norms=norms is not None,
                  capture=sums is not None, edits=edits)
    gram = (clamp.float() @ clamp.float().T).contiguous() if clamp is not None else None
    flags = dict(
        HAS_SLOTS=slots is not None, HAS_TABLE=table is not None, HAS_ABLATE=ablate is not None,
        HAS_CENTER=center is not None, HAS_ERRORS=errors is not None, HAS_CLAMP=clamp is not None,
        RELATIVE_BOUNDS=bool(relative_bounds), HAS_CORRECTIONS=corrections is not None, **chosen["flags"],
    )
    # absent tensors are passed as h: never dereferenced, the matching HAS_* flag is False
    pointers = [
        h, h.stride(0), slots if slots is not None else h, table if table is not None else h,
        ablate if ablate is not None else h, probes if probes is not None else h, center if center is not None else h,
    ]
    outputs = [
        scores if scores is not None else h, norms if norms is not None else h,
        segments if segments is not None else h, sums if sums is not None else h, counts if counts is not None else h,
        errors if errors is not None else h,
        clamp if clamp is not None else h, gram if gram is not None else h, bounds if bounds is not None else h,
        corrections if corrections is not None else h,
    ]
    slot_rows = table.shape[0] if table is not None else (bounds.shape[0] if bounds is not None else 0)
    sizes = (slot_rows, sums.shape[0] if sums is not None else 0)
    if chosen["launch"]:
        _steer_project_kernel[chosen["grid"]](
            *pointers, *outputs, n, d, k, a, *sizes, c,
            HAS_SCORES=chosen["scores"], HAS_NORMS=chosen["norms"], HAS_CAPTURE=sums is not None, **flags,
        )
    if chosen["second_projection"]:
        # edits are done and stored: project the rows on a (row tile x probe tile) grid, nothing else
        flags.update(HAS_SLOTS=False, HAS_TABLE=False, HAS_ABLATE=False, HAS_CLAMP=False, HAS_CORRECTIONS=False)
        block_n, block_k = flags["BLOCK_N"], flags["BLOCK_K"]
        _steer_project_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
            *pointers, *outputs, n, d, k, a, *sizes, c,
            HAS_SCORES=True, HAS_NORMS=False, HAS_CAPTURE=False, **flags,
        )
