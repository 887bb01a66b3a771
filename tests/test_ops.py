"""The fused op on every available backend against a float64 oracle (the package's reference in float64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import emovec
from emovec.ops import backend_status, steer_project_trusted
from op_cases import Case, assert_close_by_rule, make_inputs, oracle, torch_own

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Every N, d, K and A of the issue appears; weird shapes on purpose (odd d, K=171, N=257).
CASES = [
    Case(0, 7, 5, 1),
    Case(1, 1, 1, 0),
    Case(1, 576, 171, 3),
    Case(1, 1000, 5, 1),
    Case(3, 7, 5, 0),
    Case(3, 64, 171, 1, row_pad=5),
    Case(3, 1, 1, 1, center=False),
    Case(257, 64, 5, 3),
    Case(257, 576, 171, 0, row_pad=64),
    Case(257, 7, 171, 1, steer=False),
    Case(1000, 576, 1, 3, weights_fp32=True),
    Case(1000, 64, 171, 0, capture=False),
    Case(1000, 1000, 5, 1, row_pad=3, num_segments=7),
    Case(257, 1000, 171, 3, weights_fp32=True, center=False),
    Case(3, 576, 0, 1),  # steer + capture only, no probes
    Case(1, 576, 171, 1, clamp=3),  # regulation: non-orthogonal directions, bounds per slot
    Case(257, 64, 5, 0, clamp=2, relative=True),
    Case(3, 7, 5, 0, clamp=1, steer=False),  # regulation alone
    Case(1000, 576, 171, 3, clamp=4, relative=True, weights_fp32=True),
    # decode, the CUDA kernels' range (N <= CUDA_MAX_ROWS = 64), K = 171, d = 4096 / 576: one probe per block and
    # four (N = 64), 16-byte and scalar loads, the edit kernel before the projection, pre-reduced capture
    Case(1, 4096, 171, 0, weights_fp32=True),  # the runtime's monitor: fp32 probes and center
    Case(1, 4096, 171, 1, clamp=1),
    Case(2, 4096, 171, 0, row_pad=4),  # fp16 / bf16 rows 8 bytes off 16-byte alignment: scalar loads
    Case(2, 576, 171, 1),
    Case(16, 4096, 171, 0, clamp=2, relative=True),
    Case(16, 576, 171, 3, weights_fp32=True, num_segments=1),  # runs of rows in one segment
    Case(64, 4096, 171, 1, clamp=1),
    Case(64, 576, 171, 0, row_pad=3, weights_fp32=True),
    # fp32 with d = 4 (mod 8): 16-byte loads, then a 4-column scalar tail in the last chunk (fp16 / bf16: scalar rows)
    Case(2, 580, 171, 1),
    Case(16, 12, 5, 1, clamp=1, weights_fp32=True),  # fp32 clamp: bf16 rounding of 12 columns is off unit length
    # the CPU kernel's single row tile (N <= 24) splits its probes among threads: odd rows, a leftover probe, the
    # tile's edge and the first two-tile N
    Case(23, 576, 9, 1),
    Case(24, 64, 171, 0, row_pad=2),
    Case(25, 64, 171, 1, clamp=1),
]
# The interpreter executes Triton programs in numpy: keep its shapes small but cover both kernel paths.
TRITON_CASES = [
    Case(0, 7, 5, 1),
    Case(1, 1, 1, 0),
    Case(3, 7, 5, 3),
    Case(5, 64, 171, 1, row_pad=3),
    Case(16, 33, 5, 0, weights_fp32=True),
    Case(40, 64, 5, 1),  # N > 16: the tl.dot path
    Case(37, 7, 1, 3, row_pad=2, center=False),
    Case(33, 64, 40, 0, steer=False),  # more than one probe tile without edits
    Case(20, 64, 0, 1),
    Case(5, 64, 171, 1, clamp=3),
    Case(40, 64, 5, 1, clamp=2, relative=True),
    Case(40, 64, 171, 0, steer=False, capture=False),  # projection only: the lean GEMM-tile kernel
    Case(70, 33, 5, 0, steer=False, capture=False, center=False, row_pad=3),
    Case(65, 100, 80, 0, steer=False, capture=False, weights_fp32=True),
    Case(20, 33, 0, 0, clamp=3, steer=False),
]


def backend_params():
    status = backend_status()
    for name in ("torch", "cpu", "triton", "cuda"):
        marks = [pytest.mark.skipif(status[name] is not None, reason=str(status[name]))]
        if name == "cuda":
            marks.append(pytest.mark.cuda)
        yield pytest.param(name, marks=marks)


def run_backend(inputs: dict, backend: str, case: Case) -> dict:
    h_storage = inputs["h_storage"].clone()
    h = h_storage[:, : case.d]
    n, k = case.n, case.k
    device = h.device
    scores = torch.full((n, k), math.nan, device=device) if k else None  # poisoned: unwritten elements fail
    norms = torch.full((n,), math.nan, device=device)
    sums = inputs["sums"].clone() if inputs["sums"] is not None else None
    counts = inputs["counts"].clone() if inputs["counts"] is not None else None
    corrections = torch.full((n, case.clamp), math.nan, device=device) if case.clamp else None
    result = emovec.steer_project(
        h, slots=inputs["slots"], table=inputs["table"], ablate=inputs["ablate"], probes=inputs["probes"],
        center=inputs["center"], segments=inputs["segments"], sums=sums, counts=counts, scores=scores, norms=norms,
        compute_norms=True, backend=backend, clamp=inputs["clamp"], bounds=inputs["bounds"],
        relative_bounds=case.relative, corrections=corrections,
    )
    if case.row_pad:  # the padding columns of strided rows must be untouched
        torch.testing.assert_close(h_storage[:, case.d:], inputs["h_storage"][:, case.d:], rtol=0, atol=0)
    assert result.scores is scores and result.norms is norms
    return {"h": h, "scores": scores, "norms": norms, "sums": sums, "counts": counts, "corrections": corrections}


def check(case: Case, dtype: torch.dtype, backend: str, device) -> None:
    if backend == "cuda":
        device = torch.device("cuda")
    if backend == "cpu":
        device = torch.device("cpu")
    inputs = make_inputs(case, dtype, device, seed=case.n * 7919 + case.d * 31 + case.k + case.a)
    want = oracle(inputs)
    own = torch_own(inputs)
    got = run_backend(inputs, backend, case)
    if case.clamp:  # the bounds must bite on some rows and not on others, or the case tests nothing
        corrected = (want["corrections"] != 0).sum().item()
        assert 0 < corrected < want["corrections"].numel() or case.n <= 1, corrected
    for name in ("h", "scores", "norms", "sums", "counts", "corrections"):
        if want.get(name) is None:
            assert got[name] is None, name
            continue
        assert_close_by_rule(f"{backend}/{dtype}/{case}/{name}", got[name], want[name], own[name], dtype)


@pytest.mark.parametrize("backend", list(backend_params()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backend_matches_float64_oracle(case, dtype, backend, device):
    if backend == "triton" and device.type == "cpu":
        pytest.skip("on the CPU, Triton runs under the interpreter: see test_triton_small_shapes")
    check(case, dtype, backend, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_small_shapes(case, dtype, device):
    if backend_status()["triton"] is not None:
        pytest.skip(backend_status()["triton"])
    check(case, dtype, "triton", device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_projection_every_autotune_candidate(dtype, device):
    """Every configuration the projection kernel's autotuner can pick on a GPU, launched explicitly, matches the
    oracle: a broken candidate (masks of 128-row or 128-probe tiles, say) is caught where nothing is autotuned. Under
    the interpreter every dot runs in fp32: this checks the tiling and the masks, not the tensor-core dtypes."""
    if backend_status()["triton"] is not None:
        pytest.skip(backend_status()["triton"])
    from emovec.triton.steer_project import FP32_CONFIGS, HALF_CONFIGS, project_triton, projection_configs

    # no block size divides N, K or d, and none is cut down to the problem (N, K <= 256, d <= 128)
    case = Case(200, 100, 150, 0, steer=False, capture=False, row_pad=3, weights_fp32=True)
    inputs = make_inputs(case, dtype, device, seed=14)
    want, own = oracle(inputs), torch_own(inputs)
    configs = projection_configs(case.n, case.d, case.k, dtype)
    assert len(configs) == len(FP32_CONFIGS if dtype == torch.float32 else HALF_CONFIGS)
    for config in configs:
        scores = torch.full((case.n, case.k), math.nan, device=device)  # poisoned: unwritten elements fail
        norms = torch.full((case.n,), math.nan, device=device)
        project_triton(inputs["h"], inputs["probes"], inputs["center"], scores, norms, config)
        assert_close_by_rule(f"{dtype}/{config}/scores", scores, want["scores"], own["scores"], dtype)
        assert_close_by_rule(f"{dtype}/{config}/norms", norms, want["norms"], own["norms"], dtype)


def test_triton_projection_splits_rows_past_the_grid_limit(device, monkeypatch):
    """Row tiles are the grid's second axis (at most 65535 on CUDA): more rows are launched in parts, each writing
    its own rows. A limit of one tile per launch forces four parts here."""
    if backend_status()["triton"] is not None:
        pytest.skip(backend_status()["triton"])
    import emovec.triton.steer_project as ts

    monkeypatch.setattr(ts, "MAX_GRID_Y", 1)
    case = Case(200, 100, 150, 0, steer=False, capture=False, row_pad=3, weights_fp32=True)
    inputs = make_inputs(case, torch.float32, device, seed=15)
    want, own = oracle(inputs), torch_own(inputs)
    config = ts.projection_configs(case.n, case.d, case.k, torch.float32)[0]
    scores = torch.full((case.n, case.k), math.nan, device=device)
    norms = torch.full((case.n,), math.nan, device=device)
    ts.project_triton(inputs["h"], inputs["probes"], inputs["center"], scores, norms, config)
    assert_close_by_rule("split/scores", scores, want["scores"], own["scores"], torch.float32)
    assert_close_by_rule("split/norms", norms, want["norms"], own["norms"], torch.float32)


@pytest.mark.parametrize("backend", list(backend_params()))
def test_steering_without_slots_ablates_every_row(backend, device):
    if backend == "cuda":
        device = torch.device("cuda")
    if backend == "cpu":  # the explicit cpu backend takes CPU tensors only
        device = torch.device("cpu")
    g = torch.Generator().manual_seed(3)
    h = torch.randn(9, 16, generator=g).to(device)
    u = torch.nn.functional.normalize(torch.randn(1, 16, generator=g), dim=1).to(device)
    out = h.clone()
    emovec.steer_project(out, ablate=u, backend=backend)
    torch.testing.assert_close(out, h - (h @ u.T) @ u, rtol=1e-5, atol=1e-5)
    assert (out @ u.T).abs().max() < 1e-4


@pytest.mark.parametrize("backend", list(backend_params()))
def test_slot_minus_one_rows_are_bit_identical(backend, device):
    if backend == "cuda":
        device = torch.device("cuda")
    if backend == "cpu":  # the explicit cpu backend takes CPU tensors only
        device = torch.device("cpu")
    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, 24, generator=g).to(torch.bfloat16).to(device)
    table = torch.randn(2, 24, generator=g).to(torch.bfloat16).to(device)
    u = torch.nn.functional.normalize(torch.randn(1, 24, generator=g), dim=1).to(device)
    slots = torch.tensor([-1, 0, -1, 1, -1, -1], device=device)
    out = h.clone()
    emovec.steer_project(out, slots=slots, table=table, ablate=u, probes=table, backend=backend)
    untouched = slots < 0
    assert torch.equal(out[untouched], h[untouched])
    assert not torch.equal(out[~untouched], h[~untouched])


def test_backends_agree_on_capture_with_repeated_segments(device):
    """Many rows into few segments, in sequence order: counts are exact and sums match across backends."""
    status = backend_status()
    h = torch.randn(300, 40, dtype=torch.float64).float()
    segments = torch.arange(300) % 4 - 1  # -1, 0, 1, 2 repeating
    results = {}
    for backend in ("torch", "cpu"):
        if status[backend] is not None:
            continue
        r = emovec.steer_project(h.clone(), segments=segments, num_segments=3, backend=backend)
        results[backend] = r
        assert r.counts.tolist() == [75.0, 75.0, 75.0]
        want = torch.stack([h.double()[segments == s].sum(0) for s in range(3)])
        torch.testing.assert_close(r.sums.double(), want, rtol=1e-5, atol=1e-4)
    assert results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", list(backend_params()))
def test_capture_of_runs_of_rows_in_one_segment(backend, dtype, device):
    """Extraction's pattern: each segment spans many consecutive rows (runs longer than a kernel's row tile, runs
    cut by a tile boundary, uncaptured rows between runs, a tile with no captured row). The kernels sum a tile's rows
    of one segment before adding them: counts stay exact, sums match the float64 sum of the rows as stored."""
    if backend == "cuda":
        device = torch.device("cuda")
    if backend == "cpu":
        device = torch.device("cpu")
    g = torch.Generator().manual_seed(21)
    lengths = [37, 5, 40, 3, 20, 1, 40, 60]  # segments 0, -1, 1, -1, 2, 0 (again), -1, 3
    labels = [0, -1, 1, -1, 2, 0, -1, 3]
    segments = torch.cat([torch.full((n,), s) for n, s in zip(lengths, labels)])
    # the 40 rows of -1 (rows 106-145) hold whole aligned tiles of 8 (the CUDA kernel's row group) and 16 (Triton's)
    for tile in (8, 16):
        assert any((segments[i:i + tile] == -1).all() for i in range(0, segments.shape[0] - tile + 1, tile)), tile
    h = torch.randn(segments.shape[0], 40, generator=g).to(dtype)
    table = torch.randn(2, 40, generator=g).to(dtype)
    slots = torch.arange(segments.shape[0]) % 3 - 1  # steered rows too: capture sees them as stored
    out = h.clone().to(device)
    r = emovec.steer_project(out, slots=slots.to(device), table=table.to(device), segments=segments.to(device),
                             num_segments=4, backend=backend)
    stored = out.double().cpu()
    want = torch.stack([stored[segments == s].sum(0) for s in range(4)])
    want_counts = [float(sum(n for n, s in zip(lengths, labels) if s == segment)) for segment in range(4)]
    assert want_counts == [38.0, 40.0, 20.0, 60.0]
    assert r.counts.cpu().tolist() == want_counts
    torch.testing.assert_close(r.sums.double().cpu(), want, rtol=1e-5, atol=1e-4)


class _HostReads(TorchDispatchMode):
    """Records the ops that need the host to see a tensor's values: on a GPU each is a synchronisation, and under
    CUDA-graph capture an error. Boolean-mask indexing counts (its output size depends on the mask)."""

    NAMES = {"aten::nonzero", "aten::nonzero_static", "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero",
             "aten::masked_select", "aten::unique", "aten::_unique2", "aten::bincount", "aten::repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        masked = name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_") and any(
            isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in args[1])
        if name in self.NAMES or masked:
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


def test_torch_backend_reads_nothing_back_and_skips_uncaptured_rows(device):
    """The torch backend (the reference) with every part (steering, ablation, clamp, probes, capture), -1 and
    out-of-range segments, and inf / NaN in rows that are not captured: no op needs the host (no boolean-mask
    indexing, nonzero or item: it runs under CUDA-graph capture when the dispatch rule sends many rows to it), the
    rows not captured add nothing (not even NaN from inf * 0), and the errors flag still says a segment was out of
    range. Sums and counts against a float64 loop over the rows as stored."""
    g = torch.Generator().manual_seed(31)
    n, d, num_segments = 40, 12, 3
    h = torch.randn(n, d, generator=g)
    segments = torch.tensor([[0, -1, 2, 5, 1, -3, 2, -1][i % 8] for i in range(n)])
    captured = (segments >= 0) & (segments < num_segments)
    bad_rows = [i for i in range(n) if not captured[i]]
    h[bad_rows[0], 3] = math.inf
    h[bad_rows[1], 0] = -math.inf
    h[bad_rows[2]] = math.inf
    h[bad_rows[3], 5] = math.nan
    slots = torch.tensor([[1, -1, 0, -1][i % 4] for i in range(n)])
    slots[bad_rows] = -1  # the poisoned rows stay as they are
    table = torch.randn(2, d, generator=g)
    ablate = torch.nn.functional.normalize(torch.randn(1, d, generator=g), dim=1)
    clamp = torch.nn.functional.normalize(torch.randn(1, d, generator=g), dim=1)
    bounds = torch.tensor([[[-0.5, 0.5]], [[-math.inf, 0.1]]])
    probes = torch.randn(5, d, generator=g)
    sums0 = torch.randn(num_segments, d, generator=g)
    counts0 = torch.tensor([1.0, 0.0, 2.0])
    out, sums, counts = h.clone().to(device), sums0.clone().to(device), counts0.clone().to(device)
    errors = torch.zeros(1, dtype=torch.int32, device=device)
    on = {"device": device}
    with _HostReads() as reads:
        emovec.steer_project(out, slots=slots.to(**on), table=table.to(**on), ablate=ablate.to(**on),
                             clamp=clamp.to(**on), bounds=bounds.to(**on), probes=probes.to(**on),
                             segments=segments.to(**on), sums=sums, counts=counts, errors=errors, backend="torch",
                             validate=False)
    assert reads.found == []
    stored = out.double().cpu()
    want_sums, want_counts = sums0.double().clone(), counts0.double().clone()
    for i in range(n):
        s = int(segments[i])
        if 0 <= s < num_segments:
            want_sums[s] += stored[i]
            want_counts[s] += 1
    assert torch.isfinite(want_sums).all()
    torch.testing.assert_close(sums.double().cpu(), want_sums, rtol=1e-6, atol=1e-5)
    assert counts.cpu().tolist() == want_counts.tolist()
    assert int(errors) == emovec.ops.SEGMENT_OUT_OF_RANGE


def test_default_backend_on_cpu_is_the_compiled_kernel():
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    h = torch.randn(4, 8)
    from emovec.ops import _pick_backend

    assert _pick_backend(h, None) == "cpu"


@pytest.mark.parametrize("n,d,k", [(1, 576, 171), (1, 2048, 171), (5, 1536, 171), (7, 576, 171), (24, 576, 171),
                                   (40, 576, 171), (25, 15, 5), (50, 100, 37), (200, 64, 40), (300, 64, 40)])
def test_cpu_kernel_gives_the_same_bits_on_any_number_of_threads(n, d, k):
    """A single row tile's probes are split among threads (each thread writes its own columns; from 256 K rows x
    probes x d, or 1 MiB of probes: 1 row at d = 2048, 7 and 24 rows at 576) and row tiles are split
    among threads: every score is the same sum in the same order, so 1, 2 and 3 threads agree bit for bit. With 25
    rows one thread's last tile is a single row, whose dot blocks reduce probes one at a time where the others reduce
    four at once (K = 5 and 37 leave single probes): the reductions sum in the same order. From 256 rows the probes
    are packed per call whatever the number of threads (200 rows: dots on any count, 300: packed on any count)."""
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    case = Case(n, d, k, 1, clamp=1)
    inputs = make_inputs(case, torch.float32, torch.device("cpu"), seed=n)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(run_backend(inputs, "cpu", case))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for name in ("h", "scores", "norms", "sums", "counts", "corrections"):
            assert torch.equal(other[name], results[0][name]), name
    assert_close_by_rule(f"cpu/N{n}/scores", results[1]["scores"], oracle(inputs)["scores"], torch_own(inputs)["scores"],
                         torch.float32)


@pytest.mark.parametrize("threads", [1, 2])
# one row (dots); 2, 3, 5, 7, 8 rows (the packed panels split among threads); 13, 24, 40 (tiles of rows); 300 (the
# packed path without a prepared call's panels too)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 13, 24, 40, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_cpu_call_writes_rows_of_a_larger_record(n, dtype, threads):
    """emovec._C.CpuCall (the runtime's prepared call) writes row i's scores at scores + i * stride and its norm at
    norms + i * norms_stride: the written places equal the float64 oracle and nothing else in the record changes."""
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    from emovec import _ext

    # odd n centered (fp32 rows copied, then centered); even n not (fp32 rows read where they are, with h's row
    # stride, from 9 rows; 300 bf16 rows: the vdpbf16ps path)
    case = Case(n, 576, 171, 0, steer=False, capture=False, center=n % 2 == 1, row_pad=24)  # rows 600 apart
    inputs = make_inputs(case, dtype, torch.device("cpu"), seed=n + 11)
    h, probes, center = inputs["h_storage"][:, :576], inputs["probes"], inputs["center"]
    record = torch.full((n, 3, 180), math.nan)  # scores of row i at [i, 1, :171]: row stride 540 floats
    norm_record = torch.full((n, 3), math.nan)  # norm of row i at [i, 2]: stride 3
    call = _ext._C.CpuCall(d=576, h_dtype=_ext.DTYPE_CODES[dtype], w_dtype=_ext.DTYPE_CODES[probes.dtype],
                           probes=probes.data_ptr(), num_probes=171,
                           center=center.data_ptr() if center is not None else 0)
    call.run(h.data_ptr(), n, h.stride(0), record[:, 1].data_ptr(), norm_record[:, 2].data_ptr(), threads, 540, 3)
    want, own = oracle(inputs), torch_own(inputs)
    assert_close_by_rule(f"prepared/{dtype}/N{n}/scores", record[:, 1, :171], want["scores"], own["scores"], dtype)
    assert_close_by_rule(f"prepared/{dtype}/N{n}/norms", norm_record[:, 2], want["norms"], own["norms"], dtype)
    untouched = torch.cat([record[:, 0].flatten(), record[:, 2].flatten(), record[:, 1, 171:].flatten(),
                           norm_record[:, :2].flatten()])
    assert untouched.isnan().all()


@pytest.mark.parametrize("n", [2, 3, 5, 8, 9, 13, 24, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_cpu_call_gives_the_same_bits_on_any_number_of_threads(n, dtype):
    """A prepared call's packed panels are split among the threads up to a few rows, and tiles of rows above: each
    score is summed over the columns in order by one accumulator whatever the split, so 1, 2 and 3 threads write the
    same bits (K = 171: 11 panels, the last 11 wide, so the splits and the narrow last block all occur)."""
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    from emovec import _ext

    g = torch.Generator().manual_seed(n * 13)
    d, k = 576, 171
    h = torch.randn(n, d, generator=g).to(dtype)
    probes = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1).to(dtype)
    call = _ext._C.CpuCall(d=d, h_dtype=_ext.DTYPE_CODES[dtype], w_dtype=_ext.DTYPE_CODES[dtype],
                           probes=probes.data_ptr(), num_probes=k, center=0)
    results = []
    for threads in (1, 2, 3):
        scores, norms = torch.full((n, k), math.nan), torch.full((n,), math.nan)
        call.run(h.data_ptr(), n, d, scores.data_ptr(), norms.data_ptr(), threads, 0, 0)
        results.append(scores)
    for other in results[1:]:
        assert torch.equal(other, results[0])
    want = h.double() @ probes.double().T
    error = (results[0].double() - want).abs().max().item()
    assert error <= 1e-5 * max(1.0, want.abs().max().item()), error  # fp32 sums of d exact products


@pytest.mark.parametrize("dots", [False, True], ids=["bf16 probes", "bf16 dots"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,d", [(1, 576), (5, 576), (24, 64), (40, 576), (300, 576), (3, 580), (40, 100), (7, 63),
                                 (40, 63)])
def test_prepared_call_with_bf16_probes_for_fp32_rows(n, d, threads, dots):
    """fp32 rows against bf16 probes (a prepared monitoring call keeping its probes in bf16): the scores equal the
    float64 dots of the rows with the bf16-rounded probes up to fp32 summation, on every kernel path (one row, one
    tile split among threads, several tiles, rows read where they are (even d, many rows), 300 rows (where
    unprepared fp32 probes would be packed per call), and d not a multiple of 16 or odd, where the probes are
    widened into a padded copy or the rows go through tiles), written through strided outputs; norms are the exact
    rows'; 1, 2 and 3 threads give the same bits.
    With bf16 dots (CpuCall(..., bf16_dots=True), what monitor(bf16_dots=True) prepares) each row is first rounded
    to the nearest bf16 (torch's rounding is the reference): the scores are those of the rounded rows, and the rows
    really are rounded (the unrounded rows' dots are farther off than fp32 summation, and within the rounding's
    bound of 2^-9 of the row's norm for a unit probe)."""
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    from emovec import _ext

    g = torch.Generator().manual_seed(n * 31 + d)
    h = torch.randn(n, d + 3, generator=g)[:, :d]  # strided rows
    probes = torch.nn.functional.normalize(torch.randn(171, d, generator=g), dim=1).to(torch.bfloat16)
    record = torch.full((n, 2, 180), math.nan)
    norm_record = torch.full((n, 2), math.nan)
    call = _ext._C.CpuCall(d=d, h_dtype=_ext.DTYPE_CODES[torch.float32], w_dtype=_ext.DTYPE_CODES[torch.bfloat16],
                           probes=probes.data_ptr(), num_probes=171, center=0, bf16_dots=dots)
    assert call.bf16_dots == dots
    call.run(h.data_ptr(), n, h.stride(0), record[:, 1].data_ptr(), norm_record[:, 0].data_ptr(), threads, 360, 2)
    rows = h.to(torch.bfloat16).double() if dots else h.double()
    want = rows @ probes.double().T
    got = record[:, 1, :171].double()
    error = (got - want).abs().max().item()
    assert error <= 1e-5 * max(1.0, want.abs().max().item()), error  # fp32 sums of d exact products
    torch.testing.assert_close(norm_record[:, 0].double(), h.double().norm(dim=1), rtol=1e-6, atol=0)
    assert record[:, 0].isnan().all() and record[:, 1, 171:].isnan().all() and norm_record[:, 1].isnan().all()
    again = torch.full((n, 171), math.nan)  # 3 threads (rows or panels split otherwise): the same bits
    call.run(h.data_ptr(), n, h.stride(0), again.data_ptr(), 0, 3, 0, 0)
    assert torch.equal(again, record[:, 1, :171])
    if dots:
        unrounded = h.double() @ probes.double().T
        assert (got - unrounded).abs().max().item() > 100 * max(error, 1e-7)
        assert ((got - unrounded).abs() <= 2**-9 * h.double().norm(dim=1, keepdim=True) + 1e-5).all()


def test_bf16_dots_need_fp32_rows_and_bf16_probes():
    """The core refuses bf16 dots where they do not apply, saying what they need."""
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    from emovec import _ext

    fp32 = torch.randn(4, 16)
    with pytest.raises(ValueError, match="bf16 dots .* need fp32 h and bf16 probes"):
        _ext._C.CpuCall(d=16, h_dtype=_ext.DTYPE_CODES[torch.float32], w_dtype=_ext.DTYPE_CODES[torch.float32],
                        probes=fp32.data_ptr(), num_probes=4, center=0, bf16_dots=True)
    bf16 = fp32.to(torch.bfloat16)
    with pytest.raises(ValueError, match="bf16 dots"):
        _ext._C.CpuCall(d=16, h_dtype=_ext.DTYPE_CODES[torch.bfloat16], w_dtype=_ext.DTYPE_CODES[torch.bfloat16],
                        probes=bf16.data_ptr(), num_probes=4, center=0, bf16_dots=True)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [1, 3, 8, 24])
@pytest.mark.parametrize("probe_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layers_run_together_equal_their_calls_one_by_one(probe_dtype, n, threads):
    """A decode step's layers kept until the last one and then run together (emovec._C.CpuLayers, what the monitor
    does at a few rows) write exactly the bits each layer's own prepared call writes, into a strided record: the rows
    are copied when kept (the test overwrites them before the last layer), nothing is written before the last layer
    or a flush, and a flush runs what a step that stopped early kept."""
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    from emovec import _ext

    g = torch.Generator().manual_seed(n * 7 + threads)
    layers, d, k = 5, 100, 37
    probes = [torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1).to(probe_dtype)
              for _ in range(layers)]
    hs = [torch.randn(n, d + 3, generator=g)[:, :d] for _ in range(layers)]  # strided rows

    def calls():
        return [_ext._C.CpuCall(d=d, h_dtype=_ext.DTYPE_CODES[torch.float32], w_dtype=_ext.DTYPE_CODES[probe_dtype],
                                probes=p.data_ptr(), num_probes=k, center=0) for p in probes]

    want, want_norms = torch.full((n, layers, k), math.nan), torch.full((n, layers), math.nan)
    for i, call in enumerate(calls()):
        call.run(hs[i].data_ptr(), n, hs[i].stride(0), want[:, i].data_ptr(), want_norms[:, i].data_ptr(), threads,
                 layers * k, layers)
    exact = torch.stack([h.double() @ p.double().T for h, p in zip(hs, probes)], dim=1)
    torch.testing.assert_close(want.double(), exact, rtol=1e-5, atol=1e-5)

    group = _ext._C.CpuLayers(calls())
    got, got_norms = torch.full((n, layers, k), math.nan), torch.full((n, layers), math.nan)
    originals = [h.clone() for h in hs]
    for i in range(layers):
        group.run(i, hs[i].data_ptr(), n, hs[i].stride(0), got[:, i].data_ptr(), got_norms[:, i].data_ptr(), threads,
                  layers * k, layers)
        if i + 1 < layers:
            assert got.isnan().all() and group.pending == i + 1  # kept, not yet run
            hs[i].fill_(1e6)  # the model may reuse the memory: the kept rows are a copy
    assert group.pending == 0
    assert torch.equal(got, want) and torch.equal(got_norms, want_norms)

    # a step that stops after two layers: a flush runs them, and only them
    hs = [h.clone() for h in originals]
    got.fill_(math.nan)
    got_norms.fill_(math.nan)
    for i in range(2):
        group.run(i, hs[i].data_ptr(), n, hs[i].stride(0), got[:, i].data_ptr(), got_norms[:, i].data_ptr(), threads,
                  layers * k, layers)
    group.flush()
    assert torch.equal(got[:, :2], want[:, :2]) and torch.equal(got_norms[:, :2], want_norms[:, :2])
    assert got[:, 2:].isnan().all() and group.pending == 0
    with pytest.raises(ValueError, match="position 5 outside"):
        group.run(5, hs[0].data_ptr(), n, hs[0].stride(0), got.data_ptr(), got_norms.data_ptr(), threads, 0, 0)


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("probe_dtype", [torch.float32, torch.bfloat16, "bf16 dots"], ids=str)
def test_layers_kept_across_steps_run_as_one_call_per_window(probe_dtype, n, threads, plus):
    """With a window (emovec._C.CpuLayers(calls, window=W), what the monitor does at decode steps), the rows of
    successive steps are kept, up to W per layer, and each layer's window runs as one call on the kept rows: every
    step's scores and norms land where that step said (a strided record, a column per step), with the bits of one
    prepared call on the window's rows stacked, within fp32 rounding of float64 (of the rows rounded to bf16 with
    bf16 dots); nothing is written before the step after which another would not fit, or a flush. The rows are
    copies (overwritten after each run here)."""
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    from emovec import _ext

    dots = probe_dtype == "bf16 dots"
    probe_dtype = torch.bfloat16 if dots else probe_dtype
    g = torch.Generator().manual_seed(n * 5 + threads + 2 * plus)
    layers, d, k, window, steps = 4, 96, 37, 16, 11
    probes = [torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1).to(probe_dtype)
              for _ in range(layers)]
    hs = torch.randn(steps, layers, n, d, generator=g)
    parts = torch.randn(steps, layers, n, d, generator=g) if plus else None
    rows = hs + parts if plus else hs  # what each layer's rows are: torch.add's bits, as in the copy

    def calls():
        return [_ext._C.CpuCall(d=d, h_dtype=_ext.DTYPE_CODES[torch.float32], w_dtype=_ext.DTYPE_CODES[probe_dtype],
                                probes=p.data_ptr(), num_probes=k, center=0, bf16_dots=dots) for p in probes]

    # which steps end a window: another step of n rows would pass it
    ends, kept = [], 0
    for step in range(steps):
        kept += n
        if kept + n > window:
            ends.append(step)
            kept = 0
    want = torch.full((n, steps, layers, k), math.nan)
    want_norms = torch.full((n, steps, layers), math.nan)
    reference = calls()
    start = 0
    for end in ends + ([steps - 1] if not ends or ends[-1] != steps - 1 else []):
        for i in range(layers):
            stacked = rows[start:end + 1, i].reshape(-1, d).contiguous()
            s, nrm = torch.empty(stacked.shape[0], k), torch.empty(stacked.shape[0])
            reference[i].run(stacked.data_ptr(), stacked.shape[0], d, s.data_ptr(), nrm.data_ptr(), threads, 0, 0)
            want[:, start:end + 1, i] = s.view(end + 1 - start, n, k).transpose(0, 1)
            want_norms[:, start:end + 1, i] = nrm.view(end + 1 - start, n).T
        start = end + 1
    dotted = rows.to(torch.bfloat16) if dots else rows
    exact = torch.einsum("snld,lkd->nslk", dotted.transpose(1, 2).double(), torch.stack(probes).double())
    torch.testing.assert_close(want.double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(want_norms.double(), rows.double().norm(dim=-1).permute(2, 0, 1), rtol=1e-6, atol=1e-6)

    group = _ext._C.CpuLayers(calls(), window=window)
    assert group.window == window
    got = torch.full((n, steps, layers, k), math.nan)
    got_norms = torch.full((n, steps, layers), math.nan)
    row_stride, norm_stride = steps * layers * k, steps * layers
    flushed = -1
    for step in range(steps):
        for i in range(layers):
            h = hs[step, i].clone()
            extra = parts[step, i].clone() if plus else None
            group.run(i, h.data_ptr(), n, d, got[:, step, i].data_ptr(), got_norms[:, step, i].data_ptr(), threads,
                      row_stride, norm_stride, extra.data_ptr() if plus else 0, d)
            h.fill_(1e6)  # the model may reuse the memory: the kept rows are a copy
            if plus:
                extra.fill_(1e6)
        if step in ends:
            flushed = step
            assert group.pending == 0 and group.kept_rows == 0
        else:
            assert group.pending == layers and group.kept_rows == (step - flushed) * n
        assert not got[:, : flushed + 1].isnan().any() and got[:, flushed + 1:].isnan().all()
    group.flush()
    assert group.pending == 0
    assert torch.equal(got, want) and torch.equal(got_norms, want_norms)
    with pytest.raises(ValueError, match="window must be >= 0"):
        _ext._C.CpuLayers(calls(), window=-1)


def test_a_group_read_on_another_thread_while_rows_are_kept_loses_nothing():
    """A record read on one thread (`mon.scores` flushes the group) while another thread's forward passes keep rows
    in the same group: every step's scores equal float64 torch, none is lost or written from a half-kept window."""
    import threading

    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    from emovec import _ext

    g = torch.Generator().manual_seed(0)
    layers, d, k, steps = 12, 256, 64, 300
    probes = [torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1) for _ in range(layers)]
    calls = [_ext._C.CpuCall(d=d, h_dtype=_ext.DTYPE_CODES[torch.float32], w_dtype=_ext.DTYPE_CODES[torch.float32],
                             probes=p.data_ptr(), num_probes=k, center=0) for p in probes]
    group = _ext._C.CpuLayers(calls, window=64)
    hs = torch.randn(steps, layers, d, generator=g)
    record, norms = torch.full((steps, layers, k), math.nan), torch.full((steps, layers), math.nan)
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            group.flush(1)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for step in range(steps):
            for i in range(layers):
                h = hs[step, i].clone()
                group.run(i, h.data_ptr(), 1, d, record[step, i].data_ptr(), norms[step, i].data_ptr(), 1, 0, 0)
                h.fill_(1e6)  # the model reuses the memory
    finally:
        stop.set()
        thread.join()
    group.flush(1)
    want = torch.einsum("sld,lkd->slk", hs.double(), torch.stack(probes).double())
    torch.testing.assert_close(record.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norms.double(), hs.double().norm(dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("n", [1, 8, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prepared_steering_call_writes_what_the_fused_op_writes(dtype, n, threads):
    """emovec._C.CpuSteer (a steering table fixed once, rows and slots per call: what the runtime and the vLLM plugin
    steer with on the CPU) writes the bits of steer_project_trusted with the same slots and table, on strided rows;
    rows with slot -1 are not written; an out-of-range slot leaves its row alone and sets the error flag."""
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    from emovec import _ext
    from emovec.ops import SLOT_OUT_OF_RANGE

    g = torch.Generator().manual_seed(n + threads)
    d = 40
    table = torch.randn(3, d, generator=g).to(dtype)
    rows = torch.randn(n, d + 6, generator=g).to(dtype)[:, :d]
    slots = torch.randint(-1, 3, (n,), generator=g)
    want = rows.clone()
    steer_project_trusted(want, slots=slots, table=table, backend="cpu")
    call = _ext._C.CpuSteer(d=d, h_dtype=_ext.DTYPE_CODES[dtype], w_dtype=_ext.DTYPE_CODES[dtype],
                            table=table.data_ptr(), table_rows=3)
    got, errors = rows.clone(), torch.zeros(1, dtype=torch.int32)
    call.run(got.data_ptr(), n, got.stride(0), slots.data_ptr(), threads, errors.data_ptr())
    assert torch.equal(got, want) and errors.item() == 0
    reference = rows.double() + torch.where((slots >= 0)[:, None], table.double()[slots.clamp(min=0)], 0.0)
    torch.testing.assert_close(got.double(), reference, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    assert torch.equal(got[slots < 0], rows[slots < 0])
    bad = slots.clone()
    bad[0] = 3
    again = rows.clone()
    call.run(again.data_ptr(), n, again.stride(0), bad.data_ptr(), threads, errors.data_ptr())
    assert errors.item() & SLOT_OUT_OF_RANGE and torch.equal(again[0], rows[0])
    assert torch.equal(again[1:], want[1:])
    with pytest.raises(ValueError, match="table is null"):
        _ext._C.CpuSteer(d=d, h_dtype=0, w_dtype=0, table=0, table_rows=3)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("probe_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layers_run_together_add_a_second_operand_as_torch_does(probe_dtype, n, threads):
    """vLLM's layers return the residual stream in two parts: CpuLayers.run(plus=...) projects hidden + residual,
    summed in its copy of the rows, and writes the bits the same group writes for torch.add(hidden, residual); the
    parts are read when given (the test overwrites them before the last layer), the last layer's too."""
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    from emovec import _ext

    g = torch.Generator().manual_seed(n + 10 * threads)
    layers, d, k = 4, 96, 29
    probes = [torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1).to(probe_dtype)
              for _ in range(layers)]
    hidden = [torch.randn(n, d + 5, generator=g)[:, :d] for _ in range(layers)]  # strided, unlike the residual
    residual = [torch.randn(n, d, generator=g) * 30 for _ in range(layers)]
    calls = [_ext._C.CpuCall(d=d, h_dtype=_ext.DTYPE_CODES[torch.float32], w_dtype=_ext.DTYPE_CODES[probe_dtype],
                             probes=p.data_ptr(), num_probes=k, center=0) for p in probes]
    want, want_norms = torch.full((n, layers, k), math.nan), torch.full((n, layers), math.nan)
    group = _ext._C.CpuLayers(calls)
    sums = [torch.add(h, r) for h, r in zip(hidden, residual)]
    for i in range(layers):
        group.run(i, sums[i].data_ptr(), n, sums[i].stride(0), want[:, i].data_ptr(), want_norms[:, i].data_ptr(),
                  threads, layers * k, layers)
    exact = torch.stack([(h.double() + r.double()) @ p.double().T for h, r, p in zip(hidden, residual, probes)], 1)
    torch.testing.assert_close(want.double(), exact, rtol=1e-4, atol=1e-3 * float(exact.abs().max()))

    got, got_norms = torch.full((n, layers, k), math.nan), torch.full((n, layers), math.nan)
    for i in range(layers):
        group.run(i, hidden[i].data_ptr(), n, hidden[i].stride(0), got[:, i].data_ptr(), got_norms[:, i].data_ptr(),
                  threads, layers * k, layers, plus=residual[i].data_ptr(), plus_stride=residual[i].stride(0))
        hidden[i].fill_(1e6)  # read when given, the last layer's parts too
        residual[i].fill_(-1e6)
    assert torch.equal(got, want) and torch.equal(got_norms, want_norms)
    bf16_probes = probes[0].to(torch.bfloat16)
    bf16 = _ext._C.CpuLayers([_ext._C.CpuCall(d=d, h_dtype=_ext.DTYPE_CODES[torch.bfloat16],
                                              w_dtype=_ext.DTYPE_CODES[torch.bfloat16], probes=bf16_probes.data_ptr(),
                                              num_probes=k, center=0)])
    rows = torch.zeros(n, d, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="needs fp32 rows"):
        bf16.run(0, rows.data_ptr(), n, d, got.data_ptr(), got_norms.data_ptr(), threads, 0, 0,
                 plus=rows.data_ptr(), plus_stride=d)
    two = torch.zeros(2, d)
    for bad, message in ((dict(plus=two.data_ptr()), "plus_stride must be >= d"), (dict(stride=-d), "row stride"),
                         (dict(h=0), "rows are null")):
        args = dict(position=0, h=two.data_ptr(), n=2, stride=d, scores=got.data_ptr(), norms=got_norms.data_ptr(),
                    threads=threads) | bad
        with pytest.raises(ValueError, match=message):
            group.run(**args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [4, 9, 24, 40, 300])
def test_repeated_cpu_projection_packs_its_probes_once_and_follows_their_changes(n, dtype):
    """Projection-only calls on the CPU with the same probes tensor: from the second call a prepared call packs the
    probes once (fp32: the outer-product kernel; bf16 rows and probes: vdpbf16ps on the rows as stored; from 4 rows).
    Every call equals float64 dots of the values given, with strided rows (and a center in fp32); changing the probes
    in place is seen by the next call (no stale packing), and so is a new center."""
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    import emovec.ops as ops

    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, 580, generator=g).to(dtype)[:, :576]  # strided rows
    probes = torch.randn(171, 576, generator=g).to(dtype)
    center = torch.randn(576, generator=g) if dtype == torch.float32 else None
    for step in range(6):
        if step == 2:
            probes.mul_(-0.5)  # in place: the packed copy must be refreshed
        if step == 4 and center is not None:
            center = torch.randn(576, generator=g)
        scores, norms = torch.full((n, 171), math.nan), torch.full((n,), math.nan)
        emovec.steer_project(h, probes=probes, center=center, scores=scores, norms=norms, backend="cpu",
                             validate=False)
        x = h.double() - (center.double() if center is not None else 0.0)
        torch.testing.assert_close(scores.double(), x @ probes.double().T, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(norms.double(), x.norm(dim=1), rtol=1e-6, atol=1e-5)
        entry = ops._PREPARED.get(probes)
        # prepared from the second call with unchanged inputs (bf16 has no center to change at step 4)
        assert (entry[1] is not None) == (step % 2 == 1 or (center is None and step >= 3))


def test_bf16_probes_for_fp32_rows_are_refused_with_other_weights():
    """The pairing is for monitoring alone: with a steering table the core refuses it clearly."""
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    from emovec import _ext

    h = torch.randn(2, 16)
    table = torch.randn(1, 16).to(torch.bfloat16)
    slots = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="bf16 probes alone for fp32 h"):
        _ext._C.steer_project_cpu(h.data_ptr(), 2, 16, 16, _ext.DTYPE_CODES[torch.float32],
                                  _ext.DTYPE_CODES[torch.bfloat16], slots.data_ptr(), table.data_ptr(), 1, 0, 0, 0, 0,
                                  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, False, 0, 1)


@pytest.mark.parametrize("n", [6, 40])  # 40 rows: Triton's tl.dot path, the CPU's packed path
@pytest.mark.parametrize("backend", list(backend_params()))
def test_out_of_range_indices_are_memory_safe_and_reported(backend, n, device):
    """validate=False with wild slots and segments: those rows are left untouched and uncaptured, nothing is
    written out of bounds (guard rows around the buffers stay NaN-free and zero), and the errors flag says which."""
    if backend == "cuda":
        device = torch.device("cuda")
    if backend == "cpu":
        device = torch.device("cpu")
    g = torch.Generator().manual_seed(11)
    d = 24
    h = torch.randn(n, d, generator=g)
    table = torch.randn(2, d, generator=g)
    probes = torch.randn(5, d, generator=g)
    wild = [0, 1, 10**9, -5, 2, -1]  # 2 == table rows: just past the end
    slots = torch.tensor([wild[i % len(wild)] for i in range(n)])
    segs = torch.tensor([[1, 3, -7, 0, 10**9, -1][i % 6] for i in range(n)])
    good_slot = (slots >= 0) & (slots < 2)
    good_seg = (segs >= 0) & (segs < 3)
    # independent expectation, float64
    want = h.double().clone()
    want[good_slot] += table.double()[slots[good_slot]]
    want_sums = torch.zeros(3, d, dtype=torch.float64).index_add_(0, segs[good_seg], want[good_seg])
    want_counts = torch.bincount(segs[good_seg], minlength=3).double()
    # buffers with guard rows on both sides: a write out of bounds lands there
    sums_storage = torch.zeros(5, d, device=device)
    counts_storage = torch.zeros(5, device=device)
    out = h.to(device)
    for check_flag in (True, False):
        errors = torch.zeros(1, dtype=torch.int32, device=device) if check_flag else None
        out = h.clone().to(device)
        sums_storage.zero_()
        counts_storage.zero_()
        emovec.steer_project(out, slots=slots.to(device), table=table.to(device), probes=probes.to(device),
                             segments=segs.to(device), sums=sums_storage[1:4], counts=counts_storage[1:4],
                             backend=backend, validate=False, errors=errors)
        torch.testing.assert_close(out.double().cpu(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sums_storage[1:4].double().cpu(), want_sums, rtol=1e-5, atol=1e-4)
        assert counts_storage[1:4].cpu().tolist() == want_counts.tolist()
        assert not sums_storage[[0, 4]].any() and not counts_storage[[0, 4]].any()
        if check_flag:
            assert int(errors) == 3
            assert "slot" in emovec.ops.index_error_message(int(errors))
    # in-range indices leave the flag clear
    errors = torch.zeros(1, dtype=torch.int32, device=device)
    emovec.steer_project(h.clone().to(device), slots=torch.where(good_slot, slots, -1).to(device),
                         table=table.to(device), segments=torch.where(good_seg, segs, -1).to(device), num_segments=3,
                         backend=backend, validate=False, errors=errors)
    assert int(errors) == 0


def test_cpu_bf16_rows_error_against_float64():
    """bf16 rows with no center: on CPUs with AVX-512 bf16 the kernel dots them against bf16-rounded probes
    (vdpbf16ps, fp32 accumulation). The stated error: at most 0.5% of the largest |score| (measured ~0.2%); the
    fp32 path (with a center, or without those instructions) stays within 1e-5 of it."""
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    from emovec import _ext

    g = torch.Generator().manual_seed(12)
    for n, d, k in ((40, 576, 171), (64, 33, 5), (257, 1001, 171)):
        h = torch.randn(n, d, generator=g).bfloat16()
        probes = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
        want = h.double() @ probes.double().T
        got = emovec.steer_project(h.clone(), probes=probes, backend="cpu")
        error = (got.scores.double() - want).abs().max().item() / want.abs().max().item()
        assert error < (5e-3 if _ext._C.cpu_bf16_dot() else 1e-5), (n, d, k, error)
        torch.testing.assert_close(got.norms.double(), h.double().norm(dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("probe_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_decode_error_against_float64(probe_dtype):
    """The CUDA decode kernels on bf16 rows, with probes and center in h's dtype (bf16, half the probe bytes) or fp32
    (the runtime's monitor). Products and sums are fp32 and the center is subtracted in fp32, so against the float64
    reference on the same (already rounded) inputs the stated error is at most 1e-5 of the largest |score|; rounding
    the probes to bf16 is the caller's choice, not the kernel's error."""
    if backend_status()["cuda"] is not None:
        pytest.skip(backend_status()["cuda"])
    g = torch.Generator().manual_seed(13)
    for n, d in ((1, 4096), (2, 576), (16, 4096), (64, 4096)):
        h = torch.randn(n, d, generator=g).bfloat16().cuda()
        probes = torch.nn.functional.normalize(torch.randn(171, d, generator=g), dim=1).to(probe_dtype).cuda()
        center = (0.1 * torch.randn(d, generator=g)).to(probe_dtype).cuda()
        centered = h.double() - center.double()
        want = centered @ probes.double().T
        got = emovec.steer_project(h.clone(), probes=probes, center=center, backend="cuda")
        error = (got.scores.double() - want).abs().max().item() / want.abs().max().item()
        assert error < 1e-5, (n, d, error)
        torch.testing.assert_close(got.norms.double(), centered.norm(dim=1), rtol=1e-5, atol=1e-5)


def test_cpu_read_seconds_times_a_read_and_refuses_bad_arguments():
    """emovec._C.cpu_read_seconds (the benchmarks' bound: one read of a kernel's operands) returns a time in seconds
    (positive and finite; how long is for benchmarks/ to say), and a null address, fewer than 8 bytes or no repeat is
    a ValueError."""
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    from emovec import _ext

    buffer = torch.ones(16 * 1024)  # 64 KB
    seconds = _ext._C.cpu_read_seconds(buffer.data_ptr(), buffer.numel() * 4, 50)
    assert isinstance(seconds, float) and 0 < seconds < math.inf
    for args in ((0, 64, 1), (buffer.data_ptr(), 4, 1), (buffer.data_ptr(), 64, 0)):
        with pytest.raises(ValueError, match="cpu_read_seconds"):
            _ext._C.cpu_read_seconds(*args)
