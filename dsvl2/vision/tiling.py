"""Dynamic tiling geometry of DeepSeek-VL2, as pure functions of integers.

An image is shown to the vision encoder as one global view (the whole picture padded to a
single tile) plus a grid of local tiles cut from the picture padded to the best-fitting
candidate resolution. The language model sees, per image, the global view's token rows
(each ended by a newline token), one view separator, then the local grid's token rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def effective_pixels(width: int, height: int, candidate_width: int, candidate_height: int) -> int:
    """Pixels of the image kept when it is scaled to fit the candidate (never more than it has).

    The float arithmetic and truncation are the official ones, so ties break identically.
    """
    scale = min(candidate_width / width, candidate_height / height)
    scaled_width, scaled_height = int(width * scale), int(height * scale)
    return min(scaled_width * scaled_height, width * height)


def select_tile_grid(width: int, height: int, candidates: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The candidate (width, height) that keeps the most image pixels.

    Ties go to the one wasting the fewest pixels; a remaining tie keeps the earliest candidate.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not candidates:
        raise ValueError("no candidate resolutions")
    best: tuple[int, int] | None = None
    best_effective, best_waste = -1, None
    for candidate_width, candidate_height in candidates:
        effective = effective_pixels(width, height, candidate_width, candidate_height)
        waste = candidate_width * candidate_height - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (candidate_width, candidate_height), effective, waste
    assert best is not None
    return best


def tile_counts(best_width: int, best_height: int, tile_size: int) -> tuple[int, int]:
    """(num_width_tiles, num_height_tiles) of a grid resolution."""
    if best_width % tile_size or best_height % tile_size:
        raise ValueError(
            f"resolution {best_width}x{best_height} is not a multiple of the tile size {tile_size}"
        )
    return best_width // tile_size, best_height // tile_size


def tokens_per_tile_side(tile_size: int, patch_size: int, downsample_ratio: int) -> int:
    """Tokens along a tile side after the projector's pixel shuffle (the patch grid is padded up)."""
    return -(-(tile_size // patch_size) // downsample_ratio)


def num_image_tokens(num_width_tiles: int, num_height_tiles: int, tokens_per_side: int = 14) -> int:
    """Image tokens in the sequence: global rows + newlines, one separator, local rows + newlines."""
    side = tokens_per_side
    global_view = side * (side + 1)
    local_view = (side * num_height_tiles) * (side * num_width_tiles + 1)
    return global_view + 1 + local_view


def tile_boxes(best_width: int, best_height: int, tile_size: int) -> list[tuple[int, int, int, int]]:
    """Crop boxes (left, top, right, bottom) of the local tiles, row-major."""
    return [
        (left, top, left + tile_size, top + tile_size)
        for top in range(0, best_height, tile_size)
        for left in range(0, best_width, tile_size)
    ]


@dataclass(frozen=True)
class PadGeometry:
    """Where `ImageOps.pad` puts a scaled image inside its target box."""

    scaled_width: int
    scaled_height: int
    left: int
    top: int


def pad_geometry(width: int, height: int, target_width: int, target_height: int) -> PadGeometry:
    """Scaled size and offset of an image centred in a target box, by Pillow's `ImageOps.pad` rule.

    Used to map between image pixels and a padded view (e.g. for boxes); the pixels themselves
    are produced by Pillow. A side may scale to 0 pixels for extreme aspect ratios.
    """
    image_ratio = width / height
    target_ratio = target_width / target_height
    scaled_width, scaled_height = target_width, target_height
    if image_ratio > target_ratio:
        scaled_height = round(height / width * target_width)
    elif image_ratio < target_ratio:
        scaled_width = round(width / height * target_height)
    return PadGeometry(
        scaled_width,
        scaled_height,
        round((target_width - scaled_width) * 0.5),
        round((target_height - scaled_height) * 0.5),
    )
