"""Fixtures of the server's tests: the tiny_like conformance checkpoint and an engine on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsvl2.engine.generate import Engine


@pytest.fixture(scope="module")
def model_dir(conf_dir: Path) -> Path:
    path = conf_dir / "tiny_like"
    if not (path / "config.json").exists():
        pytest.skip(f"no tiny_like checkpoint in {conf_dir}")
    return path


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Engine:
    return Engine.from_pretrained(model_dir, dtype=torch.float32, device="cpu")
