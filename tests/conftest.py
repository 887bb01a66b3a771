"""Test setup: Triton runs under its interpreter when there is no GPU (must be set before triton is imported)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--device", default=None, help="device for op tests (default: cuda if available, else cpu)")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    name = request.config.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@pytest.fixture(scope="session")
def default_model():
    """The default model (SmolLM2-135M-Instruct), loaded once per test session from emovec's cache."""
    import emovec

    return emovec.load_model()
