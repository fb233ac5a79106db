"""Stage vision (default_recipe.vision_stage): the stage's micro-batches, training, checkpoints and resume, run
as a recipe's trainer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml
from default_recipe.vision_labels import (
    IGNORE,
    whole_image_views,
)
from default_recipe.vision_stage import VisionStage, sincos_position_table
from PIL import Image

from dsvl2.checkpoint import load_model
from dsvl2.defaults import default_model_dir
from dsvl2.train.checkpoints import list_checkpoints
from dsvl2.train.errors import TrainError
from dsvl2.train.recipe import RecipeError, load_recipe
from dsvl2.train.synthetic import generate_dataset
from dsvl2.train.trainer import Trainer, run
from tests.conformance_data import REPO

RECIPE_MODEL = REPO / "recipes" / "default" / "model.json"


pytestmark = pytest.mark.usefixtures("one_thread")


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]


def test_sincos_table_gives_every_position_its_own_code() -> None:
    table = sincos_position_table(12, 130)
    assert table.shape == (144, 130)
    assert torch.cdist(table, table).add(torch.eye(144) * 1e9).min() > 0.1
    assert torch.equal(table, sincos_position_table(12, 130))


def _raw(scenes: Path, out: str, steps: int = 4) -> dict:
    return {
        "stage": "vision", "seed": 3,
        "model": {"config": str(RECIPE_MODEL), "processor": str(default_model_dir())},
        "data": {"sources": [{"name": "scenes", "paths": [str(scenes)]}]},
        "optimizer": {"lr": 2e-3, "weight_decay": 0.0},
        "schedule": {"warmup_steps": 1},
        "training": {"steps": steps, "micro_batch_size": 2},
        "output": {"dir": out, "save_every": 100, "log_every": 1, "progress": False},
        "trainer": {"use": "default_recipe.vision_stage:VisionStage", "text_micro_batch_size": 1},
    }


def _yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def _stage(path: Path, resume: bool = False) -> VisionStage:
    """The stage as `dsvl2 train` builds it: the recipe's trainer with its options."""
    recipe = load_recipe(path)
    return recipe.trainer.build(recipe, resume=resume)


def test_stage_trains_only_the_vision_tower_and_projector_and_resumes_exactly(scenes: Path, tmp_path: Path) -> None:
    straight = _stage(_yaml(tmp_path / "straight.yaml", _raw(scenes, "straight")))
    fresh = {n: p.detach().clone() for n, p in straight.model.named_parameters()}
    grid = straight.model.cfg.vision.grid
    assert torch.equal(fresh["vision.pos_embed"][0], sincos_position_table(grid, straight.model.cfg.vision.width))
    history = straight.train()
    trained = load_model(tmp_path / "straight" / "checkpoint-0000004")
    changed = {n for n, p in trained.named_parameters() if not torch.equal(p, fresh[n])}
    learns = ("vision.", "projector.")  # image_newline and view_seperator are not in a tile's tokens
    assert changed == {n for n in fresh if n.startswith(learns) and not n.startswith("vision.attn_pool.")}

    raw = _raw(scenes, "interrupted")
    raw["output"]["save_every"] = 2
    path = _yaml(tmp_path / "interrupted.yaml", raw)
    first = _stage(path)
    real_step = first.train_step

    def dies_in_step_4(batch):  # the crash comes between the checkpoints of steps 2 and 4, after step 3's log line
        if first.step == 3:
            raise KeyboardInterrupt("killed during step 4")
        return real_step(batch)

    first.train_step = dies_in_step_4
    with pytest.raises(KeyboardInterrupt):
        first.train()
    log = tmp_path / "interrupted" / "log.jsonl"
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert [c.name for _, c in list_checkpoints(tmp_path / "interrupted")] == ["checkpoint-0000002"]
    with pytest.raises(TrainError, match="pass --resume"):
        _stage(path)
    second = _stage(path, resume=True).train()
    assert [r["step"] for r in second] == [3, 4]
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]  # step 3 trimmed and trained again
    assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in history], abs=1e-6, rel=0)
    resumed = load_model(tmp_path / "interrupted" / "checkpoint-0000004")
    for (name, a), (_, b) in zip(trained.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_micro_batches_hold_the_whole_views_of_scenes_and_every_view_of_text(scenes: Path, tmp_path: Path) -> None:
    raw = _raw(scenes, "out")
    generate_dataset(tmp_path / "charts", 2, seed=5, tasks=["chart"])  # wide enough to be cut into tiles
    raw["data"]["sources"].append({"name": "charts", "paths": [str(tmp_path / "charts")]})
    stage = _stage(_yaml(tmp_path / "s.yaml", raw))
    processor, size = stage.processor, stage.processor.tile_size
    whole, cut = [], []
    for record in stage.scenes:
        image = Image.open(record.image).convert("RGB")
        views = processor.normalize(processor.tile_image(image).tiles)
        count = whole_image_views(*processor.tile_grid(image.width, image.height), size)
        whole += list(views[:count])
        cut += list(views[count:])
    assert cut, "the scenes should include images cut into several tiles"
    texts = {}
    for record in stage.texts:
        image = Image.open(record.image).convert("RGB")
        texts[record.image] = processor.normalize(processor.tile_image(image).tiles)
    multi_tile_reads = 0
    for step in range(8):
        tiles, labels, scene, text = stage.micro_batch(step)
        assert tiles.shape[0] == labels.colour.shape[0] == labels.box.shape[0] == scene.counts.shape[0]
        assert tiles.shape[0] == text.piece.shape[0]
        # the scenes' views first, then every view of the one image of text
        read = next(v for image, v in texts.items() if any(torch.equal(tiles[-1], t) for t in v))
        multi_tile_reads += read.shape[0] > 2
        scenes = tiles.shape[0] - read.shape[0]
        assert torch.equal(tiles[scenes:], read)
        assert (scene.counts[:scenes] != IGNORE).all() and (scene.counts[scenes:] == IGNORE).all()
        assert (text.piece[:scenes] == IGNORE).all()
        assert ((text.piece[scenes:] >= 0) & (text.piece[scenes:] < stage.no_text)).any()
        assert (labels.colour[scenes:] == 0).all() and (labels.box[scenes:] == IGNORE).all()
        for tile in tiles[:scenes]:
            assert any(torch.equal(tile, view) for view in whole)
    assert multi_tile_reads, "some step should read an image of text cut into several tiles"


def test_without_reading_the_stage_reads_no_text_and_has_no_reading_head(scenes: Path, tmp_path: Path) -> None:
    raw = _raw(scenes, "out")
    del raw["trainer"]["text_micro_batch_size"]
    stage = _stage(_yaml(tmp_path / "s.yaml", raw))
    assert stage.texts == [] and stage.heads.text is None and stage.scenes
    tiles, labels, scene, text = stage.micro_batch(0)
    assert (scene.counts != IGNORE).all() and (text.piece == IGNORE).all()
    assert "text_accuracy" not in stage.train_step()


def test_command_line_runs_the_stage_and_the_language_trainer_refuses_it(scenes: Path, tmp_path: Path) -> None:
    path = _yaml(tmp_path / "vision.yaml", _raw(scenes, "out", steps=1))
    assert run(argparse.Namespace(config=path, resume=False, stop_at=None)) == 0
    assert (tmp_path / "out" / "checkpoint-0000001" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoint-0000001" / "tokenizer.json").is_file()
    with pytest.raises(TrainError, match="stage vision has no next-token loss.*trainer: "):
        Trainer(load_recipe(path))


def test_sources_without_scenes_and_ignored_settings_are_refused(scenes: Path, tmp_path: Path) -> None:
    generate_dataset(tmp_path / "text", 4, seed=1, tasks=["ocr", "text"])
    with pytest.raises(TrainError, match="objects"):
        _stage(_yaml(tmp_path / "v.yaml", _raw(tmp_path / "text", "out")))
    raw = _raw(scenes, "out")
    raw["data"]["sources"][0]["paths"] = [str(scenes / "scenes_only.jsonl")]
    lines = (scenes / "train.jsonl").read_text().splitlines()
    (scenes / "scenes_only.jsonl").write_text("".join(line + "\n" for line in lines if '"objects"' in line))
    with pytest.raises(TrainError, match="text_micro_batch_size is set, but no record"):
        _stage(_yaml(tmp_path / "no-text.yaml", raw))
    raw = _raw(scenes, "out")
    raw["stage"] = "sft"
    with pytest.raises(TrainError, match="VisionStage trains stage vision; the recipe's stage is sft"):
        _stage(_yaml(tmp_path / "sft.yaml", raw))
    raw = _raw(scenes, "out")
    raw["extensions"] = [{"use": "default_recipe.token_relevance:TokenRelevance", "layer": 0}]
    with pytest.raises(TrainError, match="stage vision takes no extensions"):
        _stage(_yaml(tmp_path / "ext.yaml", raw))
    raw = _raw(scenes, "out")
    raw["trainer"]["text_micro_batch_size"] = -1
    with pytest.raises(TrainError, match="trainer.text_micro_batch_size must be >= 0, got -1"):
        _stage(_yaml(tmp_path / "neg.yaml", raw))
    raw = _raw(scenes, "out")
    raw["trainer"]["text_batch"] = 2
    with pytest.raises(RecipeError, match=r"trainer \(default_recipe.vision_stage:VisionStage\).*'text_batch'"):
        load_recipe(_yaml(tmp_path / "typo.yaml", raw))
    raw = _raw(scenes, "out")
    raw["training"]["grad_accum"] = 2
    with pytest.raises(TrainError, match="training.grad_accum"):
        _stage(_yaml(tmp_path / "accum.yaml", raw))
    raw = _raw(scenes, "out")
    raw["model"]["processor"] = str(tmp_path / "no-processor-here")
    with pytest.raises(TrainError, match="cannot load the tokenizer and processor from .*no-processor-here"):
        _stage(_yaml(tmp_path / "noproc.yaml", raw))
