"""emovec: find, watch and steer emotion vectors (and any concept vectors) inside language models."""

from emovec._ext import has_cpp_library
from emovec.ops import BackendUnavailable, KernelError, SteerProjectResult, backend_status, steer_project
from emovec.runtime import MonitorResult, RegulationResult, measure_mean_norms, monitor, regulate, steer
from emovec.vectors import VectorFileError, VectorSet

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "KernelError",
    "SteerProjectResult",
    "__version__",
    "backend_status",
    "has_cpp_library",
    "steer_project",
    "MonitorResult",
    "VectorFileError",
    "VectorSet",
    "measure_mean_norms",
    "monitor",
    "regulate",
    "RegulationResult",
    "steer",
    "load_model",
    "extract",
    "SweepResult",
    "generate",
]

# imported on first use: transformers loads only when a model does, extraction only when it runs
_LAZY = {"load_model": "emovec.models", "extract": "emovec.extraction", "SweepResult": "emovec.sweep",
         "generate": "emovec.generation"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'emovec' has no attribute {name!r}")
