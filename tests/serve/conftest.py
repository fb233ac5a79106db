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


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven by Playwright (the page tests skip without either)."""
    from playwright import sync_api

    from tests.conformance_data import CHROMIUM

    # No background networking: this machine's closed network refuses those connections.
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args, headless=True)
        yield browser
        browser.close()
