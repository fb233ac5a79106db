"""Tests of the scripts in benchmarks/, which are files rather than a package: `load_bench` imports one."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.conformance_data import REPO


def load_bench(name: str) -> ModuleType:
    """benchmarks/`name`.py as a fresh module (registered under `name`: dataclasses look their module up while
    they are made)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
