"""Bad arguments to the fused op give clear ValueError/TypeError messages naming the argument."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import emovec
from emovec.ops import BackendUnavailable, backend_status


def h_(n=4, d=8, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(h=torch.randn(2, 3, 4)), ValueError, r"h must be 2-D .* h.view\(-1, d\)"),
        (dict(h=torch.randn(4, 8).to(torch.int32)), TypeError, "h must be float32, float16 or bfloat16"),
        (dict(h=torch.randn(8, 4).T), ValueError, "last dimension must be contiguous"),
        (dict(h=[1.0, 2.0]), TypeError, "h must be a torch.Tensor"),
        (dict(table=torch.randn(2, 8)), ValueError, "table needs slots"),
        (dict(slots=torch.zeros(4, dtype=torch.long), table=torch.randn(2, 7)), ValueError, r"table must have shape \(\*, 8\)"),
        (dict(slots=torch.zeros(3, dtype=torch.long), table=torch.randn(2, 8)), ValueError, r"slots must have shape \(4,\)"),
        (dict(slots=torch.zeros(4), table=torch.randn(2, 8)), TypeError, "slots must have dtype int32, int64"),
        (dict(slots=torch.tensor([0, 1, 2, -1]), table=torch.randn(2, 8)), ValueError, r"slots values must lie in \[-1, 1\]"),
        (dict(slots=torch.tensor([0, -2, 0, 0]), table=torch.randn(2, 8)), ValueError, r"got values in \[-2, 0\]"),
        (dict(slots=torch.zeros(4, dtype=torch.long)), ValueError, "nothing would use them"),
        (dict(slots=torch.zeros(4, dtype=torch.long), table=torch.full((2, 8), float("nan"))), ValueError, "table contains NaN"),
        (dict(probes=torch.randn(3, 8).to(torch.float16)), TypeError, "probes must have dtype float32"),
        (dict(probes=torch.randn(3, 8), center=torch.randn(7)), ValueError, r"center must have shape \(8,\)"),
        (dict(probes=torch.tensor([[float("inf")] * 8])), ValueError, "probes contains NaN or infinite"),
        (dict(probes=torch.randn(3, 8), scores=torch.empty(4, 2)), ValueError, r"scores must have shape \(4, 3\)"),
        (dict(scores=torch.empty(4, 2)), ValueError, "scores was given without probes"),
        (dict(probes=torch.randn(3, 8), norms=torch.empty(4, dtype=torch.float64)), TypeError, "norms must have dtype float32"),
        (dict(segments=torch.zeros(4, dtype=torch.long)), ValueError, "num_segments"),
        (dict(segments=torch.tensor([0, 0, 5, -1]), num_segments=2), ValueError, r"segments values must lie in \[-1, 1\]"),
        (dict(sums=torch.zeros(2, 8), counts=torch.zeros(2)), ValueError, "without segments"),
        (dict(segments=torch.zeros(4, dtype=torch.long), sums=torch.zeros(2, 8), counts=torch.zeros(3)), ValueError, r"counts must have shape \(2,\)"),
        (dict(probes=torch.randn(3, 8), backend="gpu"), ValueError, "backend must be one of"),
        (dict(h=torch.randn(1, 16)[:, ::2], probes=torch.randn(3, 8)), ValueError, "last dimension must be contiguous"),
        (dict(h=torch.zeros(1, 1).expand(1, 8), probes=torch.randn(3, 8)), ValueError, "last dimension must be contiguous"),
        (dict(ablate=torch.randn(65, 8)), ValueError, "at most 64"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, error, pattern):
    h = kwargs.pop("h", h_())
    with pytest.raises(error, match=pattern):
        emovec.steer_project(h, **kwargs)


def test_weights_on_another_device_are_refused():
    h = h_()
    probes = torch.randn(3, 8, device="meta")
    with pytest.raises(ValueError, match=r"probes is on meta but h is on cpu; move it with .to\(h.device\)"):
        emovec.steer_project(h, probes=probes)


def test_unavailable_explicit_backend_says_what_is_missing():
    status = backend_status()
    missing = [name for name, why in status.items() if why is not None]
    if not missing:
        pytest.skip("every backend is available here")
    with pytest.raises(BackendUnavailable, match=f"backend '{missing[0]}' is unavailable: .+"):
        emovec.steer_project(h_(), probes=torch.randn(2, 8), backend=missing[0])


def test_cuda_backend_on_cpu_tensors_is_refused_clearly():
    if backend_status()["cuda"] is not None:
        with pytest.raises(BackendUnavailable, match="cuda"):
            emovec.steer_project(h_(), probes=torch.randn(2, 8), backend="cuda")
    else:
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            emovec.steer_project(h_(), probes=torch.randn(2, 8), backend="cuda")


def test_compiled_library_checks_arguments_too():
    """The C++ core is the last line of defence: inconsistent raw arguments raise, never crash."""
    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")
    from emovec._ext import _C

    with pytest.raises(ValueError, match="a steering table needs slots"):
        _C.steer_project_cpu(1, 1, 4, 4, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, False, 0, 1)
    with pytest.raises(ValueError, match="h dtype code"):
        _C.steer_project_cpu(1, 1, 4, 4, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, False, 0, 1)
    with pytest.raises(ValueError, match="clamp needs bounds"):  # clamp directions without bounds
        _C.steer_project_cpu(1, 1, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, False, 0, 1)


def test_import_without_the_extension_warns_once_and_torch_backend_works():
    code = (
        "import sys, warnings; sys.modules['emovec._C'] = None\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import emovec, torch\n"
        "msgs = [str(w.message) for w in caught if 'emovec._C' in str(w.message)]\n"
        "assert len(msgs) == 1 and 'pip install -e .' in msgs[0], msgs\n"
        "h = torch.randn(3, 4); p = torch.randn(2, 4)\n"
        "r = emovec.steer_project(h, probes=p)\n"
        "assert torch.allclose(r.scores, h @ p.T, atol=1e-5)\n"
        "s = emovec.backend_status(); assert s['cpu'] and 'not built' in s['cpu'], s\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_torch_compile_traces_the_custom_op():
    """A compiled function that steers and projects gives the same result as eager, without graph breaks."""
    table = torch.randn(2, 16)
    probes = torch.randn(5, 16)

    def step(h, slots):
        h = h * 2.0
        result = emovec.steer_project(h, slots=slots, table=table, probes=probes, validate=False)
        return h + 1.0, result.scores, result.norms

    h = torch.randn(6, 16)
    slots = torch.tensor([0, -1, 1, 0, -1, 1])
    eager = step(h.clone(), slots)
    compiled = torch.compile(step, fullgraph=True)(h.clone(), slots)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_custom_op_registration_passes_opcheck():
    h = torch.randn(5, 8)
    probes = torch.randn(3, 8)
    args = (h, torch.tensor([0, -1, 0, 1, -1]), torch.randn(2, 8), None, probes, None,
            torch.empty(5, 3), torch.empty(5), None, None, None, torch.zeros(1, dtype=torch.int32), None, None, False,
            None, "torch")
    torch.library.opcheck(torch.ops.emovec.steer_project.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    clamp = torch.nn.functional.normalize(torch.randn(2, 8), dim=1)
    bounds = torch.tensor([[[-0.1, 0.1], [-torch.inf, 0.0]]] * 2)
    args = (h, torch.tensor([0, -1, 0, 1, -1]), torch.randn(2, 8), None, probes, None, torch.empty(5, 3),
            torch.empty(5), None, None, None, None, clamp, bounds, True, torch.empty(5, 2), "torch")
    torch.library.opcheck(torch.ops.emovec.steer_project.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_cuda_status_asks_the_extension_whether_it_sees_a_device(monkeypatch):
    """torch sees a GPU but emovec's static CUDA runtime does not (an older driver): the cuda backend is reported
    unavailable, with the reason, so the dispatcher falls back to Triton instead of raising at every small call."""
    import emovec.ops as ops

    if not emovec.has_cpp_library:
        pytest.skip("emovec._C not built")

    class FakeC:
        openmp = False

        @staticmethod
        def cuda_device_count():
            return 0

    monkeypatch.setattr(ops.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ops._ext, "cuda_compiled", lambda: True)
    monkeypatch.setattr(ops._ext, "_C", FakeC)
    status = ops._compute_backend_status()
    assert status["cuda"] is not None and "driver" in status["cuda"]


class _FakeCudaRows:
    """Stands in for a CUDA tensor of n rows: all the dispatcher looks at (no GPU needed)."""

    is_cuda = True
    device = torch.device("cuda", 0)

    def __init__(self, n: int):
        self.shape = (n, 4096)


@pytest.mark.parametrize("cuda_ok, triton_ok, n, want", [
    (True, True, 1, "cuda"),
    (True, True, 64, "cuda"),  # CUDA_MAX_ROWS
    (True, True, 65, "triton"),
    (True, False, 64, "cuda"),
    (True, False, 65, "torch"),  # no Triton: cuBLAS through torch, never the CUDA-core kernel
    (True, False, 32768, "torch"),
    (False, True, 1, "triton"),
    (False, False, 1, "torch"),
])
def test_dispatch_never_sends_many_rows_to_the_cuda_kernel(monkeypatch, cuda_ok, triton_ok, n, want):
    import emovec.ops as ops

    assert ops.CUDA_MAX_ROWS == 64
    status = {"torch": None, "cpu": None, "cuda": None if cuda_ok else "not built",
              "triton": None if triton_ok else "not installed"}
    monkeypatch.setattr(ops, "_STATUS", status)
    assert ops._pick_backend(_FakeCudaRows(n), None) == want


def test_explicit_cuda_backend_is_honoured_for_many_rows(monkeypatch):
    """The rule binds the dispatcher only: a caller who asks for backend="cuda" gets it, whatever N."""
    import emovec.ops as ops

    monkeypatch.setattr(ops, "_STATUS", {"torch": None, "cpu": None, "cuda": None, "triton": "not installed"})
    assert ops._pick_backend(_FakeCudaRows(32768), "cuda") == "cuda"
