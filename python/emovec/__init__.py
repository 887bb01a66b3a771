"""emovec: find, watch and steer emotion vectors (and any concept vectors) inside language models."""

from emovec._ext import has_cpp_library
from emovec.ops import BackendUnavailable, SteerProjectResult, backend_status, steer_project
from emovec.runtime import MonitorResult, measure_mean_norms, monitor, steer
from emovec.vectors import VectorFileError, VectorSet

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
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
    "steer",
    "load_model",
]


def __getattr__(name: str):
    if name == "load_model":  # transformers is imported only when a model is loaded
        from emovec.models import load_model

        return load_model
    raise AttributeError(f"module 'emovec' has no attribute {name!r}")
