"""Image tokens mapped to the pixels they show (default_recipe.image_tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest
from default_recipe.image_tokens import image_token_centres
from PIL import Image, ImageDraw

from dsvl2.processor import Processor
from dsvl2.vision.tiling import num_image_tokens, tile_counts

RED = (230, 20, 20)


def _picture(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    image = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(image).rectangle(box, fill=RED)
    return image


def _layout(side: int, columns: int, rows: int) -> list[tuple[int, int, int] | None]:
    """(tile, row, column) of each image token in sequence order, None for newlines and the separator."""
    layout: list[tuple[int, int, int] | None] = []
    for row in range(side):
        layout += [(0, row, column) for column in range(side)] + [None]
    layout.append(None)
    for row in range(side * rows):
        layout += [(1 + (row // side) * columns + column // side, row % side, column % side)
                   for column in range(side * columns)] + [None]
    return layout


@pytest.mark.parametrize("size", [(384, 384), (900, 300), (300, 900), (700, 500)])
def test_token_centres_land_on_the_pixels_the_tokens_see(conf_dir: Path, size: tuple[int, int]) -> None:
    processor = Processor.from_pretrained(conf_dir / "small_like")
    width, height = size
    box = (width // 5, height // 3, width // 2, (4 * height) // 5)
    tiles = processor.tile_image(_picture(width, height, box))
    side, tile = processor.tokens_per_side, processor.tile_size
    best = processor.tile_grid(width, height)
    centres = image_token_centres(width, height, *best, tile, side)
    layout = _layout(side, tiles.num_width_tiles, tiles.num_height_tiles)
    assert len(centres) == len(layout) == num_image_tokens(*tile_counts(*best, tile), side)
    grid = [v * 999 / s for v, s in zip(box, (width, height, width, height), strict=True)]
    margin = 25  # grid units: a token whose centre is this close to an edge may show either side
    counts = {"inside": 0, "outside": 0, "padding": 0}
    for centre, place in zip(centres, layout, strict=True):
        if place is None:
            assert centre is None
            continue
        step = tile / side
        tile_index, row, column = place
        pixel = tuple(int(v) for v in tiles.tiles[tile_index, :, int((row + 0.5) * step), int((column + 0.5) * step)])
        if centre is None:
            assert pixel not in (RED, (255, 255, 255)), place  # the padding's fill colour
            counts["padding"] += 1
            continue
        x, y = centre
        if grid[0] + margin < x < grid[2] - margin and grid[1] + margin < y < grid[3] - margin:
            assert pixel == RED, (centre, pixel)
            counts["inside"] += 1
        elif not (grid[0] - margin < x < grid[2] + margin and grid[1] - margin < y < grid[3] + margin):
            assert pixel == (255, 255, 255), (centre, pixel)
            counts["outside"] += 1
    assert counts["inside"] > 10 and counts["outside"] > 10
    assert (counts["padding"] > 0) == (width != height)


def test_padding_newline_and_separator_tokens_have_no_centre() -> None:
    # A 2:1 picture in a square global view: the top and bottom quarter of its rows are padding.
    centres = image_token_centres(200, 100, 200, 100, 100, 4)
    global_rows = [centres[r * 5: r * 5 + 5] for r in range(4)]
    assert all(row[4] is None for row in global_rows)  # newlines
    assert all(c is None for c in global_rows[0]) and all(c is None for c in global_rows[3])
    assert [round(c[0]) for c in global_rows[1][:4]] == [125, 375, 624, 874]
    assert centres[20] is None  # the separator
    local = centres[21:]
    assert len(local) == 4 * 9 and all(c is not None for i, c in enumerate(local) if i % 9 != 8)
