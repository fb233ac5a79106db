"""Tiling geometry: property tests of the pure functions and of what the processor emits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from dsvl2.config import ProcessorConfig
from dsvl2.processor import Processor
from dsvl2.tokenizer import Tokenizer
from dsvl2.vision.tiling import (
    effective_pixels,
    num_image_tokens,
    pad_geometry,
    select_tile_grid,
    tile_boxes,
    tile_counts,
    tokens_per_tile_side,
)
from tests.conformance_data import conformance_dir

CONFORMANCE = conformance_dir()
# The released models' candidate list (also in every conformance processor_config.json).
RELEASED_CANDIDATES = (
    (384, 384), (384, 768), (768, 384), (384, 1152), (1152, 384), (384, 1536), (1536, 384), (768, 768),
    (384, 1920), (1920, 384), (384, 2304), (2304, 384), (768, 1152), (1152, 768), (384, 2688), (2688, 384),
    (384, 3072), (3072, 384), (768, 1536), (1536, 768), (384, 3456), (3456, 384), (1152, 1152),
)
SMALL_CANDIDATES = ((224, 224), (224, 448), (448, 224), (448, 448), (224, 672), (672, 224))

sides = st.integers(min_value=1, max_value=8000)


@st.composite
def image_sizes(draw: st.DrawFn) -> tuple[int, int]:
    """Sizes from 1x1 to 8000x8000, with extreme aspect ratios drawn on purpose."""
    width = draw(sides)
    aspect = draw(st.sampled_from([1, 2, 3, 5, 8, 40, 1000]))
    height = draw(st.one_of(sides, st.just(max(1, width // aspect)), st.just(min(8000, width * aspect))))
    return width, height


def exact_effective(width: int, height: int, cw: int, ch: int) -> float:
    """Effective pixels by the definition, in exact-enough arithmetic for an upper bound."""
    scale = min(cw / width, ch / height)
    return min(width * scale * height * scale, width * height)


@given(image_sizes())
@settings(max_examples=400, deadline=None)
def test_grid_is_a_candidate_and_maximises_effective_pixels(size: tuple[int, int]) -> None:
    width, height = size
    best = select_tile_grid(width, height, RELEASED_CANDIDATES)
    assert best in RELEASED_CANDIDATES
    scores = [effective_pixels(width, height, cw, ch) for cw, ch in RELEASED_CANDIDATES]
    best_score = effective_pixels(width, height, *best)
    assert best_score == max(scores)
    # Ties: least waste, then the earliest candidate in config order.
    tied = [c for c, s in zip(RELEASED_CANDIDATES, scores, strict=True) if s == best_score]
    least_waste = min(cw * ch - best_score for cw, ch in tied)
    assert best == next(c for c in tied if c[0] * c[1] - best_score == least_waste)


@given(image_sizes(), st.sampled_from(RELEASED_CANDIDATES))
@settings(max_examples=300, deadline=None)
def test_effective_pixels_is_the_truncated_scaled_area(size: tuple[int, int], candidate: tuple[int, int]
                                                        ) -> None:
    width, height = size
    value = effective_pixels(width, height, *candidate)
    assert value <= width * height
    # The scaled image fits the candidate, and truncation loses less than one row and one column.
    bound = exact_effective(width, height, *candidate)
    assert value <= bound + 1e-6
    scale = min(candidate[0] / width, candidate[1] / height)
    if value < width * height:
        assert value >= bound - (width * scale + height * scale + 1) - 1e-6


def test_known_grids_from_the_official_cases() -> None:
    # Sizes of the conformance images and the grids the official processor chose for them.
    assert select_tile_grid(384, 384, RELEASED_CANDIDATES) == (384, 384)
    assert select_tile_grid(1000, 300, RELEASED_CANDIDATES) == (1152, 384)
    assert select_tile_grid(300, 1000, RELEASED_CANDIDATES) == (384, 1152)
    assert select_tile_grid(2100, 2100, RELEASED_CANDIDATES) == (1152, 1152)
    assert select_tile_grid(640, 480, RELEASED_CANDIDATES) == (768, 768)
    assert select_tile_grid(50, 50, RELEASED_CANDIDATES) == (384, 384)


def test_first_candidate_wins_a_full_tie() -> None:
    assert select_tile_grid(10, 10, ((384, 768), (768, 384))) == (384, 768)
    assert select_tile_grid(10, 10, ((768, 384), (384, 768))) == (768, 384)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        select_tile_grid(0, 10, RELEASED_CANDIDATES)
    with pytest.raises(ValueError):
        select_tile_grid(10, 10, ())
    with pytest.raises(ValueError, match="multiple of the tile size"):
        tile_counts(500, 384, 384)


def test_token_formula_by_hand() -> None:
    # 14 rows of (14 + newline) global tokens, a separator, then 14 rows of (columns * 14 + newline) per
    # tile row.
    assert num_image_tokens(1, 1) == 14 * 15 + 1 + 14 * 15 == 421
    assert num_image_tokens(2, 2) == 210 + 1 + 28 * 29 == 1023
    assert num_image_tokens(3, 1, tokens_per_side=8) == 72 + 1 + 8 * 25
    assert tokens_per_tile_side(384, 14, 2) == 14  # 27 patches, padded to 28, shuffled 2x2
    assert tokens_per_tile_side(224, 14, 2) == 8
    assert tokens_per_tile_side(384, 16, 2) == 12


@settings(deadline=None)  # as its siblings: a CPU stall under CI once took its first example past 200 ms
@given(st.integers(1, 9), st.integers(1, 9), st.sampled_from([224, 384]))
def test_tile_boxes_cover_the_grid_exactly(columns: int, rows: int, tile: int) -> None:
    boxes = tile_boxes(columns * tile, rows * tile, tile)
    assert len(boxes) == columns * rows
    covered = np.zeros((rows * tile, columns * tile), dtype=np.int32)
    for left, top, right, bottom in boxes:
        covered[top:bottom, left:right] += 1
    assert (covered == 1).all()
    if len(boxes) > 1:
        assert boxes[1][1] == (0 if columns > 1 else tile)  # row-major order


@given(st.integers(1, 300), st.integers(1, 300), st.integers(1, 120), st.integers(1, 120))
@settings(max_examples=200, deadline=None)
def test_pad_geometry_matches_pillow(width: int, height: int, target_width: int, target_height: int) -> None:
    padded = np.asarray(ImageOps.pad(Image.new("L", (width, height), 255), (target_width, target_height),
                                     color=0, method=Image.Resampling.NEAREST))
    geometry = pad_geometry(width, height, target_width, target_height)
    rows, columns = np.nonzero(padded)
    if geometry.scaled_width == 0 or geometry.scaled_height == 0:
        assert rows.size == 0
        return
    assert (columns.min(), rows.min()) == (geometry.left, geometry.top)
    assert columns.max() - columns.min() + 1 == geometry.scaled_width
    assert rows.max() - rows.min() + 1 == geometry.scaled_height


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    if not (CONFORMANCE / "tokenizer").is_dir():
        pytest.skip(f"conformance tokenizer {CONFORMANCE / 'tokenizer'} is absent")
    return Tokenizer.from_dir(CONFORMANCE / "tokenizer")


def check_processor_emission(processor: Processor, width: int, height: int) -> None:
    size = processor.tile_size
    picture = Image.new("RGB", (width, height), "white")
    sample = processor.encode([{"role": "user", "content": "<image>"}], [picture])
    best_width, best_height = select_tile_grid(width, height, processor.config.candidate_resolutions)
    columns, rows = tile_counts(best_width, best_height, size)
    assert sample.images_spatial_crop.tolist() == [[columns, rows]]
    assert int(sample.images_seq_mask.sum()) == num_image_tokens(columns, rows, processor.tokens_per_side)
    assert sample.num_image_tokens == [int(sample.images_seq_mask.sum())]
    # The tiles cover the padded local view exactly, plus the one global tile.
    n_tiles = sample.pixel_values.shape[0]
    assert n_tiles * size * size == best_width * best_height + size * size


# Real pixels make the processor checks slow, so they draw smaller pictures than the pure-function tests.
small_image_sizes = st.tuples(st.integers(1, 1600), st.integers(1, 1600)) | st.tuples(
    st.integers(1, 4000), st.integers(1, 40)) | st.tuples(st.integers(1, 40), st.integers(1, 4000))


@given(small_image_sizes)
@settings(max_examples=25, deadline=None)
def test_processor_emits_formula_token_count_384(tokenizer: Tokenizer, size: tuple[int, int]) -> None:
    processor = Processor(ProcessorConfig(candidate_resolutions=RELEASED_CANDIDATES), tokenizer)
    check_processor_emission(processor, *size)


@given(small_image_sizes)
@settings(max_examples=25, deadline=None)
def test_processor_emits_formula_token_count_224(tokenizer: Tokenizer, size: tuple[int, int]) -> None:
    config = ProcessorConfig(candidate_resolutions=SMALL_CANDIDATES, image_size=224, patch_size=14)
    check_processor_emission(Processor(config, tokenizer), *size)


def test_extreme_aspect_images_do_not_crash(tokenizer: Tokenizer) -> None:
    processor = Processor(ProcessorConfig(candidate_resolutions=RELEASED_CANDIDATES), tokenizer)
    for size in ((1, 1), (8000, 1), (1, 8000), (8000, 200)):
        check_processor_emission(processor, *size)
