"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conformance_data import REQUIRE_ENV, conformance_dir, missing_requirements, requirements_required


def pytest_configure(config: pytest.Config) -> None:
    # In CI a missing fixture must not turn hundreds of tests into a green run of skips.
    if requirements_required() and (missing := missing_requirements()):
        raise pytest.UsageError(f"{REQUIRE_ENV} is set and the suite's inputs are missing:\n  "
                                + "\n  ".join(missing))


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


@pytest.fixture(scope="session")
def grounding_dir(tmp_path_factory) -> Path:
    """Eight synthetic grounding records (one box answer each), for training-loss tests."""
    from dsvl2.train.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("grounding")
    generate_dataset(root, 8, seed=5, tasks=["grounding"])
    return root


@pytest.fixture
def grounding_recipe(conf_dir: Path, grounding_dir: Path):
    """recipe(out, checkpoint=None, **training): a 12-step SFT recipe on `grounding_dir` from the small_like
    conformance checkpoint (or `checkpoint`), vision tower and projector frozen, `training` added."""
    from dsvl2.train.recipe import recipe_from_dict

    def recipe(out: Path, checkpoint: Path | None = None, **training):
        return recipe_from_dict({
            "stage": "sft",
            "model": {"checkpoint": str(checkpoint or conf_dir / "small_like")},
            "data": {"sources": [{"name": "g", "paths": [str(grounding_dir)]}], "shuffle_buffer": 1},
            "optimizer": {"lr": 3e-3, "weight_decay": 0.0},
            "schedule": {"kind": "constant"},
            "training": {"steps": 12, "micro_batch_size": 2, "freeze": ["vision", "projector"], **training},
            "output": {"dir": str(out), "save_every": 100, "progress": False},
        }, out.parent)

    return recipe


@pytest.fixture
def tail_view_model(conf_dir: Path, tmp_path: Path) -> Path:
    """The small_like conformance checkpoint with its global view after the local tiles."""
    import json
    import shutil

    tail = tmp_path / "tail_model"
    shutil.copytree(conf_dir / "small_like", tail)
    config = json.loads((tail / "config.json").read_text())
    (tail / "config.json").write_text(json.dumps({**config, "global_view_pos": "tail"}))
    return tail
