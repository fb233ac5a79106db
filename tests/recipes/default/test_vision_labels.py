"""Stage vision's labels (default_recipe.vision_labels): per-patch, per-scene and reading labels of synthetic
images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from default_recipe.vision_labels import (
    COLOURS,
    IGNORE,
    MAX_COUNT,
    PAIRS,
    DrawnPiece,
    drawn_pieces,
    group_by_token,
    patch_labels,
    scene_labels,
    text_labels,
)
from PIL import Image

from dsvl2.defaults import default_model_dir
from dsvl2.processor import Processor
from dsvl2.projector import pixel_shuffle
from dsvl2.tokenizer import Tokenizer
from dsvl2.train.errors import TrainError
from dsvl2.train.synthetic import SHAPE_COLORS, SHAPE_KINDS, _font, char_boxes
from tests.conformance_data import REPO

RECIPE_MODEL = REPO / "recipes" / "default" / "model.json"


pytestmark = pytest.mark.usefixtures("one_thread")


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
