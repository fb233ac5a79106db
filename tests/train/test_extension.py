"""A recipe's own code in a stage: extensions (set-up, targets, a loss and named metrics in the log) and a
trainer, imported from beside the recipe file; bad entries are recipe errors naming the entry."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import pytest
import yaml

from dsvl2.train.recipe import RecipeError, load_recipe
from dsvl2.train.synthetic import generate_dataset
from dsvl2.train.trainer import Trainer, run

pytestmark = pytest.mark.usefixtures("one_thread")

# A recipe's module: an extension that counts rows of every second micro-batch, and a trainer that says hello.
MODULE = textwrap.dedent('''
    import torch

    from dsvl2.train.extension import Extension

    EVENTS = []


    class Rows(Extension):
        name = "rows"
        metrics = ("seen", "half")
        fields = {"tag": lambda value, record: str(value).upper()}

        def __init__(self, weight=1.0, every=2):
            super().__init__(weight)
            if every < 1:
                raise ValueError(f"every must be >= 1, got {every}")
            self.every, self.calls = every, 0

        def attach(self, model, processor):
            self.embed = model.language.model.embed_tokens
            EVENTS.append("attach")

        def begin(self, model, batches, all_reduce_sum):
            EVENTS.append(("begin", next(batches).input_ids.shape[0], float(all_reduce_sum(torch.ones(1)))))

        def targets(self, batch):
            self.calls += 1
            EVENTS.append(("tags", [extras.get("tag") for extras in batch.extras]))
            return batch.input_ids.shape[0] if self.calls % self.every == 0 else None

        def loss(self, rows):
            return self.embed.weight.sum() * 0.0 + rows, {"seen": float(rows), "half": rows / 2}


    class Hello:
        def __init__(self, recipe, resume=False, greeting="hello"):
            self.greeting = greeting

        def train(self, stop_at=None):
            EVENTS.append(self.greeting)
            return [{"step": 1, "loss": 0.5}]


    class NotAnExtension:
        pass
''')


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate_dataset(root / "text", 8, seed=3, tasks=["text"])
    lines = (root / "text" / "train.jsonl").read_text().splitlines()
    tagged = [json.dumps({**json.loads(line), "tag": "t"}) for line in lines]
    (root / "text" / "train.jsonl").write_text("".join(line + "\n" for line in tagged))
    return root


def _recipe_file(folder: Path, conf_dir: Path, data_dir: Path, **extra) -> Path:
    """A recipe YAML in `folder`, with the recipe's module `my_recipe_code.py` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "my_recipe_code.py").write_text(MODULE)
    raw = {
        "stage": "sft",
        "model": {"checkpoint": str(conf_dir / "tiny_like")},
        "data": {"sources": [{"name": "t", "paths": [str(data_dir / "text")]}], "shuffle_buffer": 1},
        "training": {"steps": 2, "micro_batch_size": 2, "grad_accum": 2},
        "output": {"dir": "out", "save_every": 1, "log_every": 1, "progress": False},
        **extra,
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_an_extension_is_attached_begun_once_and_logged_by_name(conf_dir: Path, data_dir: Path,
                                                                tmp_path: Path) -> None:
    path = _recipe_file(tmp_path / "r", conf_dir, data_dir, extensions=[{"use": "my_recipe_code:Rows", "weight": 2}])
    recipe = load_recipe(path)
    import my_recipe_code  # found beside the recipe file

    events = my_recipe_code.EVENTS
    events.clear()
    history = Trainer(recipe).train(stop_at=1)
    assert events[:2] == ["attach", ("begin", 2, 1.0)]  # the stage's first micro-batch, summed over 1 rank
    assert events[2:] == [("tags", ["T", "T"])] * 2  # each record's `tag`, through the extension's reader
    # one of the step's two micro-batches had targets: the metrics are its own, not halved
    assert history[0]["rows_loss"] == 2.0 and history[0]["rows_seen"] == 2.0 and history[0]["rows_half"] == 1.0
    logged = json.loads((tmp_path / "r" / "out" / "log.jsonl").read_text().splitlines()[0])
    assert {"rows_loss", "rows_seen", "rows_half"} <= set(logged)
    events.clear()
    resumed = Trainer(recipe, resume=True)
    assert events == ["attach"]  # set-up is not repeated on resume
    resumed.train()


def test_a_recipe_trainer_replaces_the_library_one(conf_dir: Path, data_dir: Path, tmp_path: Path, capsys) -> None:
    path = _recipe_file(tmp_path / "t", conf_dir, data_dir, trainer={"use": "my_recipe_code:Hello", "greeting": "hi"})
    assert run(argparse.Namespace(config=path, resume=False, stop_at=None)) == 0
    import my_recipe_code  # imported by the run, from beside the recipe file

    assert my_recipe_code.EVENTS[-1] == "hi"
    assert "trained to step 1: loss 0.5000" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "error"), [
    ({"extensions": [{"use": "no_such_module:Rows"}]}, r"extensions\[0\]: cannot import no_such_module"),
    ({"extensions": [{"use": "my_recipe_code:Nope"}]}, r"extensions\[0\]: my_recipe_code has no class Nope"),
    ({"extensions": [{"use": "my_recipe_code.Rows"}]}, r"extensions\[0\].use must be \"module.path:ClassName\""),
    ({"extensions": [{"weight": 1}]}, r"extensions\[0\] must be a mapping with `use"),
    ({"extensions": {"use": "my_recipe_code:Rows"}}, "extensions must be a list"),
    ({"extensions": [{"use": "my_recipe_code:Rows", "evry": 2}]},
     r"extensions\[0\] \(my_recipe_code:Rows\): got an unexpected keyword argument 'evry'"),
    ({"extensions": [{"use": "my_recipe_code:Rows", "every": 0}]},
     r"extensions\[0\] \(my_recipe_code:Rows\): every must be >= 1, got 0"),
    ({"extensions": [{"use": "my_recipe_code:Rows", "weight": -1}]}, r"extensions\[0\].*weight must be > 0"),
    ({"extensions": [{"use": "my_recipe_code:NotAnExtension"}]}, r"extensions\[0\].*is not a .*Extension"),
    ({"extensions": [{"use": "my_recipe_code:Rows"}, {"use": "my_recipe_code:Rows"}]},
     r"extensions\[1\].*logs as 'rows', like extensions\[0\]"),
    ({"trainer": {"use": "my_recipe_code:Hello", "greting": "hi"}},
     r"trainer \(my_recipe_code:Hello\): got an unexpected keyword argument 'greting'"),
])
def test_bad_entries_are_recipe_errors_naming_the_entry(conf_dir: Path, data_dir: Path, tmp_path: Path, extra,
                                                        error: str) -> None:
    with pytest.raises(RecipeError, match=error):
        load_recipe(_recipe_file(tmp_path / "bad", conf_dir, data_dir, **extra))
