"""Loads the compiled core ``emovec._C`` if it is there; importing emovec never fails because of it.

Without the extension the ``torch`` and ``triton`` backends still work, and one warning says how to rebuild.
"""

from __future__ import annotations

import warnings

import torch

REBUILD_HINT = "rebuild it with `pip install -e . --no-build-isolation` (needs cmake, pybind11 and a C++ compiler)"

try:
    from emovec import _C  # type: ignore[attr-defined]

    has_cpp_library = True
    import_error: str | None = None
except ImportError as error:  # pragma: no cover - exercised by the "missing extension" test in a subprocess
    _C = None
    has_cpp_library = False
    import_error = str(error)
    warnings.warn(
        f"emovec: the compiled extension emovec._C could not be loaded ({error}); the 'cpu' and 'cuda' backends "
        f"are unavailable, 'torch' and 'triton' still work. To fix it, {REBUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )

# dtype codes shared with src/steer_project.h
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def cuda_compiled() -> bool:
    return bool(_C is not None and _C.cuda_compiled())


def cuda_architectures() -> list[str]:
    if not cuda_compiled():
        return []
    return [arch for arch in _C.cuda_architectures().split(",") if arch]
