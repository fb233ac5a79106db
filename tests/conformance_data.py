"""Where the conformance fixtures live (DSVL2_CONFORMANCE_DIR or ../shared/conformance)."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def conformance_dir() -> Path:
    env = os.environ.get("DSVL2_CONFORMANCE_DIR")
    return Path(env) if env else REPO.parent / "shared" / "conformance"


def conformance_variants() -> list[str]:
    root = conformance_dir()
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if (p / "config.json").exists() and (p / "outputs.safetensors").exists()
    )


def conformance_cases() -> dict:
    path = conformance_dir() / "processor_cases.json"
    return json.loads(path.read_text()) if path.exists() else {}
