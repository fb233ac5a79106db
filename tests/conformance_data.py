"""What the suite needs from outside the repository: the conformance fixtures (DSVL2_CONFORMANCE_DIR or
../shared/conformance), Debian's Chromium for the web page, and the test extra's clients.

Locally a missing one makes its tests skip; with DSVL2_REQUIRE_FIXTURES=1 (set by .ci/run) the run fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
REQUIRE_ENV = "DSVL2_REQUIRE_FIXTURES"
FIXTURE_VARIANTS = ("tiny_like", "small_like", "base_like")
FIXTURE_FILES = ("processor_cases.json", "processor.safetensors", "tokenizer/tokenizer.json", "images/square.png")
TEST_PACKAGES = ("openai", "fastapi", "playwright")


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


def requirements_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def missing_requirements() -> list[str]:
    """One line per absent input whose tests would skip."""
    root = conformance_dir()
    missing = [f"conformance fixture {root / name} (set DSVL2_CONFORMANCE_DIR)" for name in FIXTURE_FILES
               if not (root / name).is_file()]
    missing += [f"conformance checkpoint {root / name}" for name in FIXTURE_VARIANTS
                if not (root / name / "outputs.safetensors").is_file()]
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    missing += [f"the Python package {name} (pip install -e '.[test]')" for name in TEST_PACKAGES
                if importlib.util.find_spec(name) is None]
    return missing
