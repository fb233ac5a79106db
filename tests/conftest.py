"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conformance_data import conformance_dir


@pytest.fixture(scope="session")
def conf_dir() -> Path:
    root = conformance_dir()
    if not root.is_dir():
        pytest.skip(f"conformance fixtures not found at {root} (set DSVL2_CONFORMANCE_DIR)")
    return root


@pytest.fixture
def one_thread():
    """Test models are tiny: a second OpenMP thread only adds synchronisation, and on a busy 2-core
    machine, waiting for a core. Modules take it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
