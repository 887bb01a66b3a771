"""Triton kernels of emovec (GPU; on the CPU under ``TRITON_INTERPRET=1``, set before import)."""

from __future__ import annotations

import os

try:
    import triton  # noqa: F401

    triton_available = True
    triton_import_error: str | None = None
except ImportError as error:  # pragma: no cover - depends on the environment
    triton_available = False
    triton_import_error = str(error)

interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
