"""DSVL2_REQUIRE_FIXTURES (set by .ci/run) turns missing fixtures, browser or clients into a failed run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conformance_data import (
    FIXTURE_FILES,
    FIXTURE_VARIANTS,
    REPO,
    REQUIRE_ENV,
    missing_requirements,
    requirements_required,
)

PASSING = "def test_nothing():\n    pass\n"


def run_pytest(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """pytest on a passing one-test file with tests/'s conftest, with `env` added to this environment."""
    test_file = tmp_path / "test_probe.py"
    test_file.write_text(PASSING)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO),
               "--confcutdir", str(REPO / "tests"), "-c", str(REPO / "pyproject.toml"),
               "-p", "conftest", str(test_file)]
    environment = {**os.environ, "PYTHONPATH": str(REPO / "tests"), **env}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment, cwd=REPO)


def test_missing_fixtures_fail_the_run_when_required(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, **{REQUIRE_ENV: "1", "DSVL2_CONFORMANCE_DIR": str(tmp_path / "absent")})
    assert result.returncode != 0
    assert f"conformance fixture {tmp_path / 'absent' / 'processor_cases.json'}" in result.stdout + result.stderr


def test_a_complete_fixture_tree_is_not_reported(tmp_path: Path, monkeypatch) -> None:
    for name in (*FIXTURE_FILES, *(f"{variant}/outputs.safetensors" for variant in FIXTURE_VARIANTS)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv("DSVL2_CONFORMANCE_DIR", str(tmp_path))
    assert not [line for line in missing_requirements() if "conformance" in line]
    (tmp_path / "small_like" / "outputs.safetensors").unlink()
    assert [line for line in missing_requirements() if "conformance" in line] == [
        f"conformance checkpoint {tmp_path / 'small_like'}"]


def test_missing_inputs_only_skip_locally(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DSVL2_CONFORMANCE_DIR", str(tmp_path / "absent"))
    for unset in ("", "0"):
        monkeypatch.setenv(REQUIRE_ENV, unset)
        assert not requirements_required()
    monkeypatch.setenv(REQUIRE_ENV, "1")
    assert requirements_required() and missing_requirements()
