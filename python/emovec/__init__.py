"""emovec: find, watch and steer emotion vectors (and any concept vectors) inside language models."""

from emovec._ext import has_cpp_library
from emovec.ops import BackendUnavailable, SteerProjectResult, backend_status, steer_project

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "SteerProjectResult",
    "__version__",
    "backend_status",
    "has_cpp_library",
    "steer_project",
]
