"""The fused steer / project / capture op: validation, backend dispatch and torch.library registration.

Public entry point: :func:`steer_project`. Every backend (``torch``, ``cpu``, ``triton``, ``cuda``) follows
the same contract, checked in tests against :mod:`emovec.reference`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from emovec import _ext
from emovec.reference import SEGMENT_OUT_OF_RANGE, SLOT_OUT_OF_RANGE, steer_project_reference
from emovec.triton import interpreting, triton_available, triton_import_error

BACKENDS = ("torch", "cpu", "triton", "cuda")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
# up to this many rows the CUDA kernels (CUDA-core fp32 dots, probes read once per call) beat Triton's launches;
# above, Triton's tl.dot tiles (tensor cores) win. Without Triton, more rows go to the torch backend (the reference,
# which promotes to fp32: an fp32 cuBLAS GEMM, on CUDA cores while TF32 is off, torch's default, so no tensor cores
# either, but a tiled GEMM); only an explicit backend="cuda" sends them to the CUDA kernels
CUDA_MAX_ROWS = 64
# from this many rows (kCpuPackedMinRows in src/steer_project.h) a prepared CPU projection packs its probes once for
# the outer-product kernel; one row dots the probes as they are, split among the threads
CPU_PACKED_MIN_ROWS = 2
# ablation directions per call: the kernels keep one coefficient per direction and row in registers/shared memory
MAX_ABLATE = 64
# clamp (regulation) directions per call, for the same reason
MAX_CLAMP = 64


class SteerProjectResult(NamedTuple):
    scores: torch.Tensor | None  # [N, K] fp32
    norms: torch.Tensor | None  # [N] fp32, ‖h[i] - center‖
    sums: torch.Tensor | None  # [S, d] fp32
    counts: torch.Tensor | None  # [S] fp32


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says what is missing."""


class KernelError(RuntimeError):
    """A kernel failed while running (a launch error or a fault on the device): not a missing backend. The message
    carries the CUDA error text."""


def backend_status() -> dict[str, str | None]:
    """For each backend, None when it can run in this process, else why not."""
    return dict(_backend_status())


_STATUS: dict[str, str | None] | None = None


def _backend_status() -> dict[str, str | None]:
    """Fixed for the life of the process and asked at every op call: computed once, then a plain module global,
    which torch.compile reads as a constant (it cannot trace the extension's calls that compute it)."""
    global _STATUS
    if _STATUS is None:
        _STATUS = _compute_backend_status()
    return _STATUS


def _compute_backend_status() -> dict[str, str | None]:
    cuda_device = torch.cuda.is_available()
    status: dict[str, str | None] = {"torch": None}
    status["cpu"] = None if _ext.has_cpp_library else f"emovec._C is not built ({_ext.import_error}); {_ext.REBUILD_HINT}"
    if not triton_available:
        status["triton"] = f"triton is not installed ({triton_import_error}): pip install triton"
    elif not cuda_device and not interpreting:
        status["triton"] = "no CUDA device (set TRITON_INTERPRET=1 before importing emovec to run it on the CPU)"
    else:
        status["triton"] = None
    if not _ext.has_cpp_library:
        status["cuda"] = status["cpu"]
    elif not _ext.cuda_compiled():
        status["cuda"] = "emovec._C was built without CUDA (nvcc missing or EMOVEC_CUDA=0)"
    elif not cuda_device:
        status["cuda"] = "CUDA kernels are compiled, but torch sees no CUDA device"
    elif _ext._C.cuda_device_count() == 0:  # torch's CUDA works, emovec's static CUDA runtime does not
        status["cuda"] = ("torch sees a CUDA device but emovec's CUDA kernels do not (usually a driver older than the "
                          "CUDA runtime emovec._C was built with); the Triton and torch backends still work")
    else:
        status["cuda"] = None
    return status


def _pick_backend(h: torch.Tensor, backend: str | None) -> str:
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        why = _backend_status()[backend]
        if why is not None:
            raise BackendUnavailable(f"backend {backend!r} is unavailable: {why}")
        on_gpu = backend in ("cuda",) or (backend == "triton" and not interpreting)
        if on_gpu and not h.is_cuda:
            raise ValueError(f"backend {backend!r} needs CUDA tensors, but h is on {h.device}")
        if backend == "cpu" and h.device.type != "cpu":
            raise ValueError(f"backend 'cpu' needs CPU tensors, but h is on {h.device}")
        return backend
    if h.is_cuda:
        status = _backend_status()
        if status["cuda"] is None and h.shape[0] <= CUDA_MAX_ROWS:
            return "cuda"
        if status["triton"] is None:
            return "triton"
        # many rows without Triton: the torch backend (an fp32 cuBLAS GEMM, no tensor cores unless TF32 is enabled),
        # never the CUDA kernels, which have no tiled GEMM path for them
        return "torch"
    if h.device.type == "cpu" and _ext.has_cpp_library:
        return "cpu"
    return "torch"


# ---------------------------------------------------------------- validation


def _check_tensor(name: str, t, *, ndim: int, device: torch.device, dtypes, shape=None,
                  contiguous: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None:
        for axis, (got, want) in enumerate(zip(t.shape, shape)):
            if want is not None and got != want:
                raise ValueError(f"{name} must have shape {_fmt(shape)}, got {tuple(t.shape)} (axis {axis} differs)")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but h is on {device}; move it with .to(h.device)")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _fmt(shape) -> str:
    return str(tuple("*" if s is None else s for s in shape)).replace("'", "")


def _check_finite(name: str, t: torch.Tensor | None) -> None:
    if t is not None and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values; check how it was computed or loaded")


def _check_clamp(clamp: torch.Tensor, bounds: torch.Tensor, relative: bool) -> None:
    _check_finite("clamp", clamp)
    lengths = clamp.float().norm(dim=1)
    if bool(((lengths - 1).abs() > 1e-3).any()):
        raise ValueError(f"clamp directions must be unit vectors (norms {lengths.min().item():.4g} to "
                         f"{lengths.max().item():.4g}); normalise them with torch.nn.functional.normalize(clamp, dim=1)")
    if bool(bounds.isnan().any()):
        raise ValueError("bounds contain NaN; use -inf / +inf for a side without a bound")
    lo, hi = bounds[..., 0], bounds[..., 1]
    if bool((lo > hi).any()):
        raise ValueError("a lower bound is above its upper bound; give bounds as (lower, upper)")
    if relative and bool(((lo >= 1) | (hi <= -1)).any()):
        raise ValueError("relative bounds are cosines: a lower bound must be below 1 and an upper bound above -1")


def _check_range(name: str, index: torch.Tensor, upper: int, what: str) -> None:
    if index.numel() == 0:
        return
    low, high = int(index.min()), int(index.max())
    if low < -1 or high >= upper:
        raise ValueError(f"{name} values must lie in [-1, {upper - 1}] ({what}), got values in [{low}, {high}]")


def steer_project(
    h: torch.Tensor,
    *,
    slots: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
    ablate: torch.Tensor | None = None,
    probes: torch.Tensor | None = None,
    center: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    sums: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    num_segments: int | None = None,
    scores: torch.Tensor | None = None,
    norms: torch.Tensor | None = None,
    compute_norms: bool | None = None,
    backend: str | None = None,
    validate: bool = True,
    errors: torch.Tensor | None = None,
    clamp: torch.Tensor | None = None,
    bounds: torch.Tensor | None = None,
    relative_bounds: bool = False,
    corrections: torch.Tensor | None = None,
) -> SteerProjectResult:
    """Steer ``h`` in place, project it onto probes and capture per-segment sums, in one pass over ``h``.

    For each row ``i`` of ``h``::

        if slots[i] >= 0:   h[i] += table[slots[i]];   h[i] -= Σ_a (h[i]·u_a) u_a     (u_a = ablate[a])
                            for c in order:  p = (h[i] - center)·w_c                 (w_c = clamp[c])
                                             h[i] -= (p - min(max(p, lo), hi)) w_c   (lo, hi = bounds[slots[i], c])
        scores[i, k] = (h[i] - center) · probes[k]          norms[i] = ‖h[i] - center‖
        if segments[i] >= 0:  sums[segments[i]] += h[i];    counts[segments[i]] += 1

    Projection, norms and capture see ``h[i]`` as stored (after rounding to h's dtype). All accumulation
    is fp32. Every part is optional; the ablation directions should be orthonormal (then it is a projection).

    Parameters
    ----------
    h : (N, d) fp32 / fp16 / bf16
        Residual stream rows; any row stride, last dimension contiguous (a flattened ``(B, T, d)`` view works).
    slots : (N,) int32/int64, optional
        Row of ``table`` to add to each row, -1 = row untouched. Without slots, ablation applies to all rows.
    table : (R, d), h's dtype or fp32, optional
        Steering vectors with strength folded in. Needs ``slots``.
    ablate : (A, d), optional
        Unit directions projected out of the steered rows.
    probes : (K, d), optional
        Directions to score against. ``center`` : (d,) is subtracted first.
    segments : (N,) int, optional
        Segment of each row for capture, -1 = not captured. ``sums`` (S, d) fp32 and ``counts`` (S,) fp32 are
        accumulated into (allocated as zeros with ``num_segments`` rows when not given).
    scores, norms : optional preallocated outputs, (N, K) and (N,) fp32, contiguous.
    compute_norms : compute norms (default: when probes are given or ``norms`` is passed).
    backend : "torch", "cpu", "triton", "cuda", or None to pick by device.
    validate : check value ranges and finiteness (synchronises on GPU). Shapes, dtypes and devices are
        always checked. Without it every backend is still memory-safe: a row whose slot is out of range
        (< -1, or >= the table's rows) is left untouched, a row whose segment is out of range is not captured.
    errors : optional (1,) int32 flag on h's device, ORed with ``SLOT_OUT_OF_RANGE`` (1) and
        ``SEGMENT_OUT_OF_RANGE`` (2) when such rows occur, without a host synchronisation: pass one flag
        to many calls and check it once (see :func:`index_error_message`).
    clamp : (C, d) unit directions, optional
        Regulation: after steering and ablation, each steered row's projection on each direction is held
        within its bounds, one direction after the other in the order given (a later direction sees the row
        as the earlier ones left it, so non-orthogonal directions are well defined). Rows already within
        bounds are left bit-identical. Needs ``bounds``.
    bounds : (R, C, 2) fp32
        ``[..., 0]`` the lower and ``[..., 1]`` the upper bound of each direction, per slot (R = the table's
        rows; without ``slots``, R = 1 and every row uses row 0); ±inf = unbounded on that side.
    relative_bounds : bounds are cosines of ``h - center`` with the direction (in (-1, 1); |b| >= 1 is
        unbounded), met exactly: the projection is set to ``b·r/sqrt(1 - b²)`` where r is the norm of the
        row's part orthogonal to the direction. Default: bounds are projections.
    corrections : optional (N, C) fp32 output: ``p - clamped p`` per row and direction (0 within bounds and
        on rows that are not steered).

    Returns
    -------
    SteerProjectResult(scores, norms, sums, counts)
    """
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"h must be a torch.Tensor of shape (N, d), got {type(h).__name__}")
    if h.ndim != 2:
        raise ValueError(f"h must be 2-D (N, d); got shape {tuple(h.shape)}. Flatten (B, T, d) with h.view(-1, d)")
    n, d = h.shape
    if d == 0:
        raise ValueError("h must have at least one column (d >= 1)")
    if h.dtype not in FLOAT_DTYPES:
        raise TypeError(f"h must be float32, float16 or bfloat16, got {str(h.dtype).replace('torch.', '')}")
    if d > 1 and h.stride(1) != 1:
        raise ValueError(f"h's last dimension must be contiguous (stride 1), got strides {h.stride()}; use h.contiguous()")
    if n > 1 and h.stride(0) < d:
        raise ValueError(f"h's row stride must be >= d={d}, got {h.stride(0)}")
    device = h.device
    weight_dtypes = (h.dtype, torch.float32)
    checking = validate and not torch.compiler.is_compiling()

    if table is not None:
        if slots is None:
            raise ValueError("table needs slots: pass slots (N,) with the table row of each row of h, -1 for none")
        _check_tensor("table", table, ndim=2, device=device, dtypes=weight_dtypes, shape=(None, d))
        if table.shape[0] == 0:
            raise ValueError("table must have at least one row")
    if isinstance(clamp, torch.Tensor) and clamp.ndim == 2 and clamp.shape[0] == 0:  # no directions: nothing to do
        if isinstance(bounds, torch.Tensor) and bounds.numel() == 0:
            bounds = None
        if isinstance(corrections, torch.Tensor) and corrections.numel() == 0:
            corrections = None
        clamp = None
    if clamp is not None:
        _check_tensor("clamp", clamp, ndim=2, device=device, dtypes=weight_dtypes, shape=(None, d))
        if clamp.shape[0] > MAX_CLAMP:
            raise ValueError(f"clamp has {clamp.shape[0]} directions; the fused op regulates at most {MAX_CLAMP}")
        if bounds is None:
            raise ValueError("clamp needs bounds: an (R, C, 2) fp32 tensor of lower and upper bounds per slot")
        rows = table.shape[0] if table is not None else (None if slots is not None else 1)
        _check_tensor("bounds", bounds, ndim=3, device=device, dtypes=(torch.float32,),
                      shape=(rows, clamp.shape[0], 2))
        if bounds.shape[0] == 0:
            raise ValueError("bounds must have at least one row")
    elif bounds is not None:
        raise ValueError("bounds were given without clamp directions; pass clamp (C, d) unit vectors")
    num_clamp = clamp.shape[0] if clamp is not None else 0
    if corrections is not None:
        if clamp is None:
            raise ValueError("corrections was given without clamp directions; pass clamp and bounds")
        _check_tensor("corrections", corrections, ndim=2, device=device, dtypes=(torch.float32,), shape=(n, num_clamp), contiguous=True)
    if slots is not None:
        _check_tensor("slots", slots, ndim=1, device=device, dtypes=INDEX_DTYPES, shape=(n,))
        if table is None and ablate is None and clamp is None:
            raise ValueError("slots were given without a table, ablate or clamp directions; nothing would use them")
    if ablate is not None:
        _check_tensor("ablate", ablate, ndim=2, device=device, dtypes=weight_dtypes, shape=(None, d))
        if ablate.shape[0] == 0:
            ablate = None
        elif ablate.shape[0] > MAX_ABLATE:
            raise ValueError(f"ablate has {ablate.shape[0]} directions; the fused op projects out at most {MAX_ABLATE} "
                             "(for more, project them out of your vectors instead)")
    if probes is not None:
        _check_tensor("probes", probes, ndim=2, device=device, dtypes=weight_dtypes, shape=(None, d))
    if center is not None:
        _check_tensor("center", center, ndim=1, device=device, dtypes=weight_dtypes, shape=(d,))
    k = probes.shape[0] if probes is not None else 0
    if scores is not None:
        if probes is None:
            raise ValueError("scores was given without probes; pass probes (K, d)")
        _check_tensor("scores", scores, ndim=2, device=device, dtypes=(torch.float32,), shape=(n, k), contiguous=True)
    elif probes is not None and k > 0:
        scores = torch.empty(n, k, device=device, dtype=torch.float32)
    if compute_norms is None:
        compute_norms = probes is not None or norms is not None
    if norms is not None:
        _check_tensor("norms", norms, ndim=1, device=device, dtypes=(torch.float32,), shape=(n,), contiguous=True)
    elif compute_norms:
        norms = torch.empty(n, device=device, dtype=torch.float32)

    if segments is not None:
        _check_tensor("segments", segments, ndim=1, device=device, dtypes=INDEX_DTYPES, shape=(n,))
        if sums is None:
            if num_segments is None:
                raise ValueError("segments need sums/counts buffers or num_segments to allocate them")
            sums = torch.zeros(num_segments, d, device=device, dtype=torch.float32)
            counts = torch.zeros(num_segments, device=device, dtype=torch.float32)
        if counts is None:
            raise ValueError("sums was given without counts; pass both (S, d) and (S,) fp32 buffers")
        _check_tensor("sums", sums, ndim=2, device=device, dtypes=(torch.float32,), shape=(None, d))
        _check_tensor("counts", counts, ndim=1, device=device, dtypes=(torch.float32,), shape=(sums.shape[0],))
        if not (sums.is_contiguous() and counts.is_contiguous()):
            raise ValueError("sums and counts must be contiguous")
        if sums.shape[0] == 0:
            raise ValueError("sums must have at least one segment row")
    elif sums is not None or counts is not None:
        raise ValueError("sums/counts were given without segments; pass segments (N,) with -1 for rows not captured")
    if errors is not None:
        _check_tensor("errors", errors, ndim=1, device=device, dtypes=(torch.int32,), shape=(1,))

    if checking:
        if slots is not None and table is not None:
            _check_range("slots", slots, table.shape[0], "row of table, -1 = untouched")
        elif slots is not None and bounds is not None:
            _check_range("slots", slots, bounds.shape[0], "row of bounds, -1 = untouched")
        if clamp is not None:
            _check_clamp(clamp, bounds, relative_bounds)
        if segments is not None:
            _check_range("segments", segments, sums.shape[0], "row of sums, -1 = not captured")
        for name, t in (("table", table), ("ablate", ablate), ("probes", probes), ("center", center)):
            _check_finite(name, t)

    chosen = _pick_backend(h, backend)
    if slots is not None:
        slots = slots.to(torch.int64)
    if segments is not None:
        segments = segments.to(torch.int64)
    table, ablate, probes, center, clamp, bounds = (t.contiguous() if t is not None else None
                                                    for t in (table, ablate, probes, center, clamp, bounds))
    if chosen in ("cpu", "cuda"):  # the C++ core takes all weights in one dtype
        weights = [t for t in (table, ablate, probes, center, clamp) if t is not None]
        if any(t.dtype != weights[0].dtype for t in weights):
            table, ablate, probes, center, clamp = (t.float() if t is not None else None
                                                    for t in (table, ablate, probes, center, clamp))
    args = (h, slots, table, ablate, probes, center, scores, norms, segments, sums, counts, errors, clamp, bounds,
            bool(relative_bounds), corrections, chosen)
    if torch.compiler.is_compiling():
        torch.ops.emovec.steer_project(*args)  # traced through the registered op and its fake implementation
    else:
        _run_backend(*args)  # eager: skip the custom-op dispatcher, which costs more than a decode-sized call
    return SteerProjectResult(scores, norms, sums, counts)


def steer_project_trusted(h, *, slots=None, table=None, ablate=None, probes=None, center=None, scores=None, norms=None,
                          segments=None, sums=None, counts=None, errors=None, clamp=None, bounds=None,
                          relative_bounds: bool = False, corrections=None, backend: str | None = None) -> None:
    """:func:`steer_project` without any argument checks, for emovec's own runtime, whose tensors are built right
    once (contiguous weights of one dtype, int64 slots and segments, preallocated outputs): it saves the checks'
    few microseconds on every call, which at decode is most of the cost. Everything else (backend choice, the
    custom op under torch.compile) is the same; the kernels stay memory-safe whatever the indices."""
    chosen = _pick_backend(h, backend)
    args = (h, slots, table, ablate, probes, center, scores, norms, segments, sums, counts, errors, clamp, bounds,
            bool(relative_bounds), corrections, chosen)
    if torch.compiler.is_compiling():
        torch.ops.emovec.steer_project(*args)
    else:
        _run_backend(*args)


# ---------------------------------------------------------------- backends behind the custom op


def cpu_steering_call(cache: dict, key, table: torch.Tensor, h: torch.Tensor):
    """The prepared CPU steering call (``emovec._C.CpuSteer``) adding rows of ``table`` to rows like ``h``, kept in
    ``cache[key]`` together with the table it reads: a new table (one that grew) gets a new call, and a call never
    outlives its table's memory. Run it with ``call.run(h, n, row_stride, slots, threads[, errors])`` (addresses)."""
    entry = cache.get(key)
    if entry is None or entry[0] is not table:
        entry = cache[key] = (table, _ext._C.CpuSteer(d=h.shape[1], h_dtype=_ext.DTYPE_CODES[h.dtype],
                                                       w_dtype=_ext.DTYPE_CODES[table.dtype], table=table.data_ptr(),
                                                       table_rows=table.shape[0]))
    return entry[1]


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def index_error_message(code: int) -> str | None:
    """What an ``errors`` flag value means, or None when it is 0."""
    problems = []
    if code & SLOT_OUT_OF_RANGE:
        problems.append("a steering slot outside [-1, table rows)")
    if code & SEGMENT_OUT_OF_RANGE:
        problems.append("a capture segment outside [-1, segments)")
    if not problems:
        return None
    return ("the fused op met rows with " + " and ".join(problems) + "; those rows were left unsteered / uncaptured. "
            "This is a bug in the caller's index bookkeeping: please report it")


# Projection-only CPU calls of CPU_PACKED_MIN_ROWS rows or more (the dtypes below): a call prepared per probes tensor
# (emovec._C.CpuCall), which packs the probes once instead of once per call. Weak keys: an entry lives as long as its
# probes tensor; a tensor is prepared at its second sighting with the same version, center and h dtype, so probes made
# afresh for every call never pay for packing.
_PREPARED = WeakIdKeyDictionary()
# (h, probes) dtypes with probes packed once: fp32 (the outer-product kernel) and bf16 without a center (vdpbf16ps on
# the rows as stored, where the CPU has AVX-512 bf16; elsewhere the probes are read as they are)
_PREPARED_DTYPES = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16))


def _version(t: torch.Tensor | None):
    if t is None:
        return None
    try:
        return t._version
    except RuntimeError:  # inference tensors track no version
        return None


def _prepared_projection(h, probes, center):
    key = (_version(probes), probes.data_ptr(), tuple(probes.shape), h.dtype, id(center), _version(center))
    entry = _PREPARED.get(probes)
    if entry is None or entry[0] != key:
        _PREPARED[probes] = (key, None, center)  # seen once: prepared if it comes again unchanged
        return None
    if entry[1] is None:
        call = _ext._C.CpuCall(d=h.shape[1], h_dtype=_ext.DTYPE_CODES[h.dtype],
                               w_dtype=_ext.DTYPE_CODES[probes.dtype], probes=probes.data_ptr(),
                               num_probes=probes.shape[0], center=_address(center))
        entry = _PREPARED[probes] = (key, call, center)  # the entry keeps the center alive with the call
    return entry[1]


def _run_compiled(h, slots, table, ablate, probes, center, scores, norms, segments, sums, counts, errors, clamp,
                  bounds, relative_bounds, corrections, on_gpu: bool) -> None:
    if h.shape[0] == 0:  # nothing to do, and empty tensors have null data pointers
        return
    if (not on_gpu and h.shape[0] >= CPU_PACKED_MIN_ROWS and scores is not None and table is None and ablate is None
            and clamp is None and sums is None and h.stride(1) == 1 and not torch.compiler.is_compiling()
            and (h.dtype, probes.dtype) in _PREPARED_DTYPES and (h.dtype == torch.float32 or center is None)):
        call = _prepared_projection(h, probes, center)
        if call is not None:
            call.run(h.data_ptr(), h.shape[0], h.stride(0), scores.data_ptr(), _address(norms),
                     torch.get_num_threads(), 0, 0)
            return
    weights = [t for t in (table, ablate, probes, center, clamp) if t is not None]
    w_dtype = weights[0].dtype if weights else torch.float32
    slot_rows = table.shape[0] if table is not None else (bounds.shape[0] if bounds is not None else 0)
    args = (
        _address(h), h.shape[0], h.shape[1], h.stride(0) if h.shape[0] > 1 else h.shape[1], _ext.DTYPE_CODES[h.dtype],
        _ext.DTYPE_CODES[w_dtype], _address(slots), _address(table), slot_rows,
        _address(ablate), ablate.shape[0] if ablate is not None else 0, _address(probes),
        probes.shape[0] if probes is not None else 0, _address(center), _address(scores), _address(norms),
        _address(segments), _address(sums), _address(counts), sums.shape[0] if sums is not None else 0,
        _address(errors), _address(clamp), clamp.shape[0] if clamp is not None else 0, _address(bounds),
        bool(relative_bounds), _address(corrections),
    )
    if on_gpu:
        with torch.cuda.device(h.device):
            try:
                _ext._C.steer_project_cuda(*args, torch.cuda.current_stream(h.device).cuda_stream)
            except RuntimeError as error:
                raise KernelError(f"emovec's CUDA kernel failed on {h.device}: {error}") from None
    else:
        _ext._C.steer_project_cpu(*args, torch.get_num_threads())


def _run_backend(h, slots, table, ablate, probes, center, scores, norms, segments, sums, counts, errors, clamp,
                 bounds, relative_bounds, corrections, backend: str) -> None:
    args = (h, slots, table, ablate, probes, center, scores, norms, segments, sums, counts, errors, clamp, bounds,
            relative_bounds, corrections)
    if backend == "torch":
        steer_project_reference(*args)
    elif backend == "cpu":
        _run_compiled(*args, on_gpu=False)
    elif backend == "cuda":
        _run_compiled(*args, on_gpu=True)
    elif backend == "triton":
        from emovec.triton.steer_project import steer_project_triton

        steer_project_triton(*args)
    else:  # pragma: no cover - steer_project validates the name
        raise ValueError(f"unknown backend {backend!r}")


_backend_status()  # now, at import: under torch.compile the answer must already be a plain global


# The op is defined with the low-level library API rather than torch.library.custom_op: custom_op's in-place
# bookkeeping (filling the schema's defaults for its 17 arguments on every call) cost ~90 us a call, ten times the
# kernel at decode, once per layer per step in compiled generation. The schema marks every mutated argument, so
# torch.compile functionalizes it the same way; the implementation runs for every backend key; no autograd formula
# (emovec's runtime runs without gradients). tests/test_ops_validation.py checks it with torch.library.opcheck.
_LIBRARY = torch.library.Library("emovec", "FRAGMENT")
_LIBRARY.define(
    "steer_project(Tensor(a!) h, Tensor? slots, Tensor? table, Tensor? ablate, Tensor? probes, Tensor? center, "
    "Tensor(b!)? scores, Tensor(c!)? norms, Tensor? segments, Tensor(d!)? sums, Tensor(e!)? counts, "
    "Tensor(f!)? errors, Tensor? clamp, Tensor? bounds, bool relative_bounds, Tensor(g!)? corrections, "
    "str backend) -> ()")


def _steer_project_op(h, slots, table, ablate, probes, center, scores, norms, segments, sums, counts, errors, clamp,
                      bounds, relative_bounds, corrections, backend) -> None:
    _run_backend(h, slots, table, ablate, probes, center, scores, norms, segments, sums, counts, errors, clamp, bounds,
                 relative_bounds, corrections, backend)


_LIBRARY.impl("steer_project", _steer_project_op, "CompositeExplicitAutograd")


@torch.library.register_fake("emovec::steer_project", lib=_LIBRARY)
def _(h, slots, table, ablate, probes, center, scores, norms, segments, sums, counts, errors, clamp, bounds,
      relative_bounds, corrections, backend) -> None:
    return None
