"""Fixtures of the default recipe's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsvl2.train.synthetic import generate_dataset


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """Ten synthetic records: shape scenes to ground and count, and OCR images."""
    root = tmp_path_factory.mktemp("scenes")
    generate_dataset(root, 10, seed=11, tasks=["grounding", "counting", "ocr"])
    return root
