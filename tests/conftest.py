"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
from conformance_data import conformance_dir


@pytest.fixture(scope="session")
def conf_dir() -> Path:
    root = conformance_dir()
    if not root.is_dir():
        pytest.skip(f"conformance fixtures not found at {root} (set DSVL2_CONFORMANCE_DIR)")
    return root
