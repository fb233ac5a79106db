"""Training recipes: errors name the key, and the shipped recipes parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsvl2.train.recipe import RecipeError, load_recipe, recipe_from_dict
from tests.conformance_data import REPO


def test_recipe_errors_name_the_key(tmp_path: Path) -> None:
    base = {"stage": "sft", "model": {"checkpoint": "ckpt"}, "data": {"sources": [{"name": "a", "paths": ["d"]}]},
            "output": {"dir": "out"}}
    cases = [
        ({**base, "stage": "finetune"}, "stage is 'finetune'"),
        ({**base, "optimiser": {}}, "unknown key"),
        ({**base, "training": {"stepz": 3}}, "training: unknown key.*stepz"),
        ({**base, "training": {"steps": "ten"}}, "training.steps must be an integer"),
        ({**base, "model": {}}, "exactly one of checkpoint"),
        ({**base, "optimizer": {"module_lr": {"eyes": 1e-4}}}, "unknown module group 'eyes'"),
        ({k: v for k, v in base.items() if k != "output"}, "output is required"),
    ]
    for raw, message in cases:
        with pytest.raises(RecipeError, match=message):
            recipe_from_dict(raw, tmp_path)


def test_example_recipes_are_valid() -> None:
    folder = REPO / "recipes" / "train"
    recipes = {path.stem: load_recipe(path) for path in sorted(folder.glob("*.yaml"))}
    assert {"align", "pretrain", "sft"} <= set(recipes)
    for name in ("align", "pretrain", "sft"):
        assert recipes[name].stage == name
