"""Stage `vision`: per-patch labels of synthetic scenes, and the stage's training, checkpoints and resume."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dsvl2.checkpoint import load_model
from dsvl2.defaults import default_model_dir
from dsvl2.processor import Processor
from dsvl2.projector import pixel_shuffle
from dsvl2.tokenizer import Tokenizer
from dsvl2.train.dense import (
    COLOURS,
    IGNORE,
    MAX_COUNT,
    PAIRS,
    DrawnPiece,
    PatchLabels,
    SceneLabels,
    TextLabels,
    TokenHeads,
    VisionStage,
    drawn_pieces,
    group_by_token,
    patch_labels,
    scene_labels,
    sincos_position_table,
    text_labels,
    whole_image_views,
)
from dsvl2.train.recipe import RecipeError, load_recipe
from dsvl2.train.synthetic import SHAPE_COLORS, SHAPE_KINDS, _font, char_boxes, generate_dataset
from dsvl2.train.trainer import Trainer, TrainError, list_checkpoints, run

RECIPE_MODEL = Path(__file__).resolve().parent.parent / "recipes" / "default" / "model.json"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    generate_dataset(root, 10, seed=11, tasks=["grounding", "counting", "ocr"])
    return root


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]


def test_labels_match_the_pixels_of_every_tile(scenes: Path) -> None:
    """A patch whose centre pixel has a shape's colour is labelled with that colour, in the global view and
    in every local tile: the label geometry follows the processor's padding and cutting. Box bins are given
    only where the view shows the whole image: the global view, or the local tile of a one-tile grid."""
    processor = Processor.from_pretrained(default_model_dir())
    size, patch = processor.tile_size, processor.config.patch_size
    checked = {"global": 0, "local": 0, "local, one-tile grid": 0}
    for record in _records(scenes):
        if not record.get("objects"):
            continue
        image = Image.open(scenes / record["images"][0]).convert("RGB")
        tiles = processor.tile_image(image).tiles.numpy()
        best_width, best_height = processor.tile_grid(image.width, image.height)
        views_with_boxes = 1 if (best_width, best_height) != (size, size) else 2
        labels = patch_labels(record["objects"], image.width, image.height, best_width, best_height, size, patch)
        assert labels.colour.shape == (tiles.shape[0], (size // patch) ** 2)
        centres = [int((i + 0.5) * patch) for i in range(size // patch)]
        for view in range(tiles.shape[0]):
            for index, (y, x) in enumerate((y, x) for y in centres for x in centres):
                pixel = tiles[view, :, y, x].astype(int)
                for colour, rgb in SHAPE_COLORS.items():
                    if np.abs(pixel - np.array(rgb)).max() <= 2:
                        assert COLOURS[labels.colour[view, index] - 1] == colour, (record["images"], view, index)
                        assert (labels.box[view, index] != IGNORE).all() == (view < views_with_boxes)
                        checked["global" if view == 0 else "local"] += 1
                        checked["local, one-tile grid"] += view == 1 and views_with_boxes == 2
        no_object = labels.colour == 0
        assert (labels.shape[no_object] == 0).all() and (labels.box[no_object] == IGNORE).all()
    assert checked["global"] > 20 and checked["local"] > 20 and checked["local, one-tile grid"] > 0


def test_box_bins_are_the_objects_grounding_coordinates() -> None:
    objects = [{"shape": "circle", "color": "red", "box": [0, 500, 999, 949], "box_px": [0, 100, 192, 190]}]
    labels = patch_labels(objects, 192, 192, 192, 192, 192, 16)
    on_object = labels.colour[0] > 0
    assert on_object.any() and not on_object.all()
    assert labels.box[0, on_object].unique(dim=0).tolist() == [[0, 10, 19, 18]]
    assert (labels.shape[0, on_object] == 1).all()


def test_scene_labels_count_every_colour_kind_and_pair_and_box_the_unique_pairs() -> None:
    def shape(colour: str, kind: str, box: list[int]) -> dict:
        return {"color": colour, "shape": kind, "box": box, "box_px": box}

    objects = [shape("red", "circle", [0, 0, 99, 99]), shape("red", "circle", [500, 500, 599, 599]),
               shape("blue", "square", [100, 600, 349, 999])]
    labels = scene_labels(objects, views=3, whole_views=1)
    counts = dict(zip([*COLOURS, *SHAPE_KINDS, "all", *PAIRS], labels.counts[0].tolist(), strict=True))
    assert (counts["red"], counts["blue"], counts["green"]) == (2, 1, 0)
    assert (counts["circle"], counts["square"], counts["star"], counts["all"]) == (2, 1, 0, 3)
    assert (counts[("red", "circle")], counts[("blue", "square")], counts[("red", "square")]) == (2, 1, 0)
    pair_box = dict(zip(PAIRS, labels.pair_box[0].tolist(), strict=True))
    assert pair_box[("blue", "square")] == [2, 12, 6, 19]
    assert pair_box[("red", "circle")] == [IGNORE] * 4  # two of them: no single box to name
    assert (labels.counts[1:] == IGNORE).all() and (labels.pair_box[1:] == IGNORE).all()
    many = scene_labels([shape("red", "circle", [0, 0, 9, 9])] * 9, views=2, whole_views=2)
    assert many.counts[1, COLOURS.index("red")] == MAX_COUNT


START, END = 7, 1  # stand-ins for the prompt's last token and end of sentence


def _drawn(lines: list[str]) -> list[list]:
    font = _font(30)
    return [c for i, line in enumerate(lines) for c in char_boxes(font, line, 10, 10 + 40 * i, "la", i)]


def test_an_ocr_image_is_read_as_its_answer_token_by_token() -> None:
    tokenizer = Tokenizer.from_dir(default_model_dir())
    lines = ["apple 4821", "RIVER 3.05"]
    record = {"task": "ocr", "lines": lines, "chars": _drawn(lines)}
    pieces = drawn_pieces(record, tokenizer, START, END)
    name = {START: "START", END: "END"}

    def names(field: str) -> list[str]:
        return [name.get(getattr(p, field)) or tokenizer.id_to_token(getattr(p, field)) for p in pieces]

    assert len(pieces) == len(record["chars"])
    assert [p.box_px for p in pieces] == [tuple(c[1:5]) for c in record["chars"]]
    assert names("piece") == ["apple"] * 5 + ["Ġ", "4", "8", "2", "1"] + ["RIVER"] * 5 + ["Ġ", "3", ".", "0", "5"]
    assert names("prev") == ["START"] * 5 + ["apple", "Ġ", "4", "8", "2"] + ["Ċ"] * 5 + ["RIVER", "Ġ", "3", ".", "0"]
    assert names("next") == ["Ġ"] * 5 + ["4", "8", "2", "1", "Ċ"] + ["Ġ"] * 5 + ["3", ".", "0", "5", "END"]


def test_chart_strings_are_read_one_by_one_and_a_mismatch_is_refused() -> None:
    tokenizer = Tokenizer.from_dir(default_model_dir())
    record = {"task": "chart", "chars": _drawn(["Tue", "37"])}
    pieces = drawn_pieces(record, tokenizer, START, END)
    digits = [(tokenizer.id_to_token(p.piece), p.prev, p.next) for p in pieces[3:]]
    assert digits == [("3", START, tokenizer.token_to_id("7")), ("7", tokenizer.token_to_id("3"), END)]
    assert {(p.prev, p.next) for p in pieces[:3]} == {(START, END)}
    assert drawn_pieces({"task": "caption"}, tokenizer, START, END) == ()
    with pytest.raises(TrainError, match="do not spell"):
        drawn_pieces({"task": "ocr", "lines": ["Tux"], "chars": _drawn(["Tue"])}, tokenizer, START, END)


def test_text_labels_mark_the_patches_whose_centre_lies_on_a_character() -> None:
    piece = DrawnPiece((30, 30, 66, 50), piece=5, prev=6, next=9)
    labels = text_labels([piece], 192, 192, 192, 192, 192, 16, none=100)
    assert labels.piece.shape == (2, 144)  # global view and the one local tile
    for view in range(2):
        marked = (labels.piece[view] == 5).nonzero().flatten().tolist()
        assert marked == [2 * 12 + 2, 2 * 12 + 3]  # centres (40, 40) and (56, 40)
        assert labels.prev[view, marked].tolist() == [6, 6] and labels.next[view, marked].tolist() == [9, 9]
        assert int((labels.piece[view] == 100).sum()) == 142
    # a 384 x 192 image: the global view halves it, the local tiles keep full resolution
    wide = text_labels([DrawnPiece((200, 30, 236, 50), 5, 6, 9)], 384, 192, 384, 192, 192, 16, none=100)
    assert wide.piece.shape == (3, 144)
    assert (wide.piece[1] == 5).sum() == 0 and (wide.piece[2] == 5).sum() == 3  # centres x 8, 24, 40
    assert (wide.piece[0] == 5).sum() == 1  # x 200..236 -> 100..118 in the global view: one centre (104, 40)


@pytest.mark.parametrize("grid", [12, 27])
def test_token_groups_hold_the_patches_the_projector_merges(grid: int) -> None:
    # Feed each patch's index through the projector's own pixel shuffle: the indices that land in a
    # token are the patches whose labels that token must predict (27 pads the grid, as SigLIP's does).
    index = torch.arange(grid * grid)
    merged = pixel_shuffle((index + 1).float().view(1, grid * grid, 1), 2)[0].long() - 1  # -1 marks padding
    grouped = group_by_token(index[None], grid, 2, -1)[0]
    assert grouped.shape == merged.shape
    for token_patches, shuffled in zip(grouped.tolist(), merged.tolist(), strict=True):
        assert sorted(token_patches) == sorted(shuffled)
    boxes = group_by_token(torch.zeros(1, grid * grid, 4, dtype=torch.long), grid, 2, IGNORE)
    assert boxes.shape == (1, merged.shape[0], 4, 4)
    assert int((boxes == IGNORE).any(-1).sum()) == merged.eq(-1).sum()


def test_sincos_table_gives_every_position_its_own_code() -> None:
    table = sincos_position_table(12, 130)
    assert table.shape == (144, 130)
    assert torch.cdist(table, table).add(torch.eye(144) * 1e9).min() > 0.1
    assert torch.equal(table, sincos_position_table(12, 130))


def test_heads_score_colour_and_kind_on_the_patches_that_show_a_shape() -> None:
    heads = TokenHeads(hidden=8, patches_per_token=4)
    with torch.no_grad():  # every patch read as colour 2 and kind 1, whatever the token
        for head, cls in ((heads.colour, 2), (heads.shape, 1)):
            head.weight.zero_()
            head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(cls), head.out_features // 4).float().repeat(4))
    colour = torch.tensor([[[2, 2, 3, 0], [0, 0, 0, 0]]])  # three patches on shapes, two of them colour 2
    kind = torch.tensor([[[1, 3, 3, 0], [0, 0, 0, 0]]])  # of those three, one of kind 1
    labels = PatchLabels(colour, kind, torch.full((1, 2, 4, 4), IGNORE))
    counts = torch.full((1, len(COLOURS) + len(SHAPE_KINDS) + 1 + len(PAIRS)), IGNORE)
    scene = SceneLabels(counts, torch.full((1, len(PAIRS), 4), IGNORE))
    none = torch.full((1, 2, 4), IGNORE)
    _, metrics = heads.loss(torch.randn(1, 2, 8), labels, scene, TextLabels(none, none, none))
    assert metrics["colour_accuracy"] == pytest.approx(2 / 3) and metrics["kind_accuracy"] == pytest.approx(1 / 3)


def _raw(scenes: Path, out: str, steps: int = 4) -> dict:
    return {
        "stage": "vision", "seed": 3,
        "model": {"config": str(RECIPE_MODEL), "processor": str(default_model_dir())},
        "data": {"sources": [{"name": "scenes", "paths": [str(scenes)]}]},
        "optimizer": {"lr": 2e-3, "weight_decay": 0.0},
        "schedule": {"warmup_steps": 1},
        "training": {"steps": steps, "micro_batch_size": 2, "text_micro_batch_size": 1},
        "output": {"dir": out, "save_every": 100, "log_every": 1, "progress": False},
    }


def _yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_stage_trains_only_the_vision_tower_and_projector_and_resumes_exactly(scenes: Path, tmp_path: Path) -> None:
    straight = VisionStage(load_recipe(_yaml(tmp_path / "straight.yaml", _raw(scenes, "straight"))))
    fresh = {n: p.detach().clone() for n, p in straight.model.named_parameters()}
    grid = straight.model.cfg.vision.grid
    assert torch.equal(fresh["vision.pos_embed"][0], sincos_position_table(grid, straight.model.cfg.vision.width))
    history = straight.train()
    trained = load_model(tmp_path / "straight" / "checkpoint-0000004")
    changed = {n for n, p in trained.named_parameters() if not torch.equal(p, fresh[n])}
    learns = ("vision.", "projector.")  # image_newline and view_seperator are not in a tile's tokens
    assert changed == {n for n in fresh if n.startswith(learns) and not n.startswith("vision.attn_pool.")}

    path = _yaml(tmp_path / "interrupted.yaml", _raw(scenes, "interrupted"))
    first = VisionStage(load_recipe(path)).train(stop_at=2)
    assert [c.name for _, c in list_checkpoints(tmp_path / "interrupted")] == ["checkpoint-0000002"]
    with pytest.raises(TrainError, match="pass --resume"):
        VisionStage(load_recipe(path))
    second = VisionStage(load_recipe(path), resume=True).train()
    assert [r["loss"] for r in first + second] == pytest.approx([r["loss"] for r in history], abs=1e-6, rel=0)
    resumed = load_model(tmp_path / "interrupted" / "checkpoint-0000004")
    for (name, a), (_, b) in zip(trained.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    logged = [json.loads(line)["step"] for line in (tmp_path / "interrupted" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]


def test_micro_batches_hold_the_whole_views_of_scenes_and_every_view_of_text(scenes: Path, tmp_path: Path) -> None:
    raw = _raw(scenes, "out")
    generate_dataset(tmp_path / "charts", 2, seed=5, tasks=["chart"])  # wide enough to be cut into tiles
    raw["data"]["sources"].append({"name": "charts", "paths": [str(tmp_path / "charts")]})
    stage = VisionStage(load_recipe(_yaml(tmp_path / "s.yaml", raw)))
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
    raw["training"]["text_micro_batch_size"] = 0
    stage = VisionStage(load_recipe(_yaml(tmp_path / "s.yaml", raw)))
    assert stage.texts == [] and stage.heads.text is None and stage.scenes
    tiles, labels, scene, text = stage.micro_batch(0)
    assert (scene.counts != IGNORE).all() and (text.piece == IGNORE).all()
    assert "text_accuracy" not in stage.train_step()


def test_command_line_runs_the_stage_and_the_language_trainer_refuses_it(scenes: Path, tmp_path: Path) -> None:
    path = _yaml(tmp_path / "vision.yaml", _raw(scenes, "out", steps=1))
    assert run(argparse.Namespace(config=path, resume=False, stop_at=None)) == 0
    assert (tmp_path / "out" / "checkpoint-0000001" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoint-0000001" / "tokenizer.json").is_file()
    with pytest.raises(TrainError, match="stage vision"):
        Trainer(load_recipe(path))


def test_sources_without_scenes_and_ignored_settings_are_refused(scenes: Path, tmp_path: Path) -> None:
    generate_dataset(tmp_path / "text", 4, seed=1, tasks=["ocr", "text"])
    with pytest.raises(TrainError, match="objects"):
        VisionStage(load_recipe(_yaml(tmp_path / "v.yaml", _raw(tmp_path / "text", "out"))))
    raw = _raw(scenes, "out")
    raw["data"]["sources"][0]["paths"] = [str(scenes / "scenes_only.jsonl")]
    lines = (scenes / "train.jsonl").read_text().splitlines()
    (scenes / "scenes_only.jsonl").write_text("".join(line + "\n" for line in lines if '"objects"' in line))
    with pytest.raises(TrainError, match="text_micro_batch_size is set, but no record"):
        VisionStage(load_recipe(_yaml(tmp_path / "no-text.yaml", raw)))
    raw = _raw(scenes, "out")
    raw["stage"] = "sft"
    with pytest.raises(RecipeError, match="text_micro_batch_size is a setting of stage vision"):
        load_recipe(_yaml(tmp_path / "sft.yaml", raw))
    raw = _raw(scenes, "out")
    raw["training"]["grad_accum"] = 2
    with pytest.raises(TrainError, match="training.grad_accum"):
        VisionStage(load_recipe(_yaml(tmp_path / "accum.yaml", raw)))
    raw = _raw(scenes, "out")
    raw["model"]["processor"] = str(tmp_path / "no-processor-here")
    with pytest.raises(TrainError, match="cannot load the tokenizer and processor from .*no-processor-here"):
        VisionStage(load_recipe(_yaml(tmp_path / "noproc.yaml", raw)))
