"""Stage vision's targets: per-patch, per-scene and reading labels that the synthetic renderer knows.

Every label is pure geometry from a record's `objects` (shape scenes) or drawn `chars` (OCR images,
charts) and the processor's tiling, so the tower can be taught what the language model will need to
read from its tokens: which object lies under each patch and where it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dsvl2.tokenizer import Tokenizer
from dsvl2.train.errors import TrainError
from dsvl2.train.synthetic import SHAPE_COLORS, SHAPE_KINDS
from dsvl2.vision.tiling import pad_geometry, tile_counts

BOX_BINS = 20  # of the 0-999 grounding coordinates: 50 units, a tenth of the smallest shape's side at most
IGNORE = -100
COLOURS = tuple(SHAPE_COLORS)
PAIRS = tuple((colour, kind) for colour in COLOURS for kind in SHAPE_KINDS)
MAX_COUNT = 7  # the most shapes a synthetic scene holds


@dataclass(frozen=True)
class PatchLabels:
    """Per-patch targets of one image's tiles (global view first), each [tiles, patches(, 4)], or
    [tiles, tokens, patches per token(, 4)] once grouped by projector token: colour and shape ids
    (0 = no object) and box bins (IGNORE where no object)."""

    colour: torch.Tensor
    shape: torch.Tensor
    box: torch.Tensor


@dataclass(frozen=True)
class TextLabels:
    """Per-patch reading targets, each [tiles, patches] (or grouped by projector token like
    `PatchLabels`): the token id of the text under the patch (`DrawnPiece.piece`), of the token read
    before it and of the one read after it, or the `none` class (vocabulary size) where no text is drawn.
    With these in its image tokens, the language model reads by lookup: the image token whose `prev` is
    the token it has just written holds the one to write next."""

    piece: torch.Tensor
    prev: torch.Tensor
    next: torch.Tensor


@dataclass(frozen=True)
class SceneLabels:
    """Per-view targets about the whole image, taught to every token of the view: `counts` [views,
    colours + kinds + 1 + pairs] (shapes of each colour, of each kind, in all, of each (colour, kind) pair,
    capped at MAX_COUNT) and `pair_box` [views, pairs, 4] (box bins of a pair that occurs once, IGNORE
    otherwise). IGNORE on views that do not show the whole image."""

    counts: torch.Tensor
    pair_box: torch.Tensor


def _view_patch_centres(tile_size: int, patch_size: int) -> list[float]:
    grid = tile_size // patch_size
    return [(i + 0.5) * patch_size for i in range(grid)]


def view_points(width: int, height: int, best_width: int, best_height: int, tile_size: int, patch_size: int
                ) -> list[list[tuple[float, float]] | None]:
    """For the global view and every local tile (the processor's order), the image pixel under each
    patch centre (row-major), mapped back through the padding `Processor.tile_image` applies; None for
    a view with no image in it."""
    centres = _view_patch_centres(tile_size, patch_size)
    views = [(pad_geometry(width, height, tile_size, tile_size), 0, 0)]
    local = pad_geometry(width, height, best_width, best_height)
    columns, rows = tile_counts(best_width, best_height, tile_size)
    views += [(local, column * tile_size, row * tile_size) for row in range(rows) for column in range(columns)]
    points: list[list[tuple[float, float]] | None] = []
    for geometry, offset_x, offset_y in views:
        if geometry.scaled_width == 0 or geometry.scaled_height == 0:
            points.append(None)
            continue
        sx, sy = width / geometry.scaled_width, height / geometry.scaled_height
        points.append([((offset_x + cx - geometry.left) * sx, (offset_y + cy - geometry.top) * sy)
                       for cy in centres for cx in centres])
    return points


def patch_labels(objects: Sequence[dict[str, Any]], width: int, height: int, best_width: int, best_height: int,
                 tile_size: int, patch_size: int) -> PatchLabels:
    """Labels of every patch of the global view and the local tiles: the object whose pixel box holds
    the patch centre. Box bins only on views that show the whole image (the global view; the local tile
    of a one-tile grid)."""
    views = view_points(width, height, best_width, best_height, tile_size, patch_size)
    whole = whole_image_views(best_width, best_height, tile_size)
    n = (tile_size // patch_size) ** 2
    colour = torch.zeros(len(views), n, dtype=torch.long)
    shape = torch.zeros(len(views), n, dtype=torch.long)
    box = torch.full((len(views), n, 4), IGNORE, dtype=torch.long)
    for v, points in enumerate(views):
        for p, (x, y) in enumerate(points or ()):
            for obj in objects:
                x1, y1, x2, y2 = obj["box_px"]
                if x1 <= x <= x2 and y1 <= y <= y2:
                    colour[v, p] = 1 + COLOURS.index(obj["color"])
                    shape[v, p] = 1 + SHAPE_KINDS.index(obj["shape"])
                    if v < whole:
                        box[v, p] = torch.tensor(_box_bins(obj["box"]))
                    break
    return PatchLabels(colour, shape, box)


@dataclass(frozen=True)
class DrawnPiece:
    """One drawn character's pixel box and the tokens of its reading: `piece` is the token that covers
    it, `prev` and `next` the tokens before and after that one (START and END at the ends)."""

    box_px: tuple[int, int, int, int]
    piece: int
    prev: int
    next: int


def reading_units(record: dict[str, Any]) -> list[tuple[str, list[tuple[list, int]]]]:
    """The texts a reader of the record's image says, each with its drawn `chars` and their offsets in
    it: an OCR image is read as its answer (the lines joined by newlines); every other drawn string
    (chart labels, ticks, values) is read on its own."""
    chars = record.get("chars") or []
    if record.get("task") == "ocr" and record.get("lines"):
        starts = [sum(len(line) + 1 for line in record["lines"][:i]) for i in range(len(record["lines"]))]
        seen = [0] * len(starts)
        placed = []
        for char in chars:
            placed.append((char, starts[char[5]] + seen[char[5]]))
            seen[char[5]] += 1
        return [("\n".join(record["lines"]), placed)]
    strings: dict[int, list[list]] = {}
    for char in chars:
        strings.setdefault(char[5], []).append(char)
    return [("".join(c[0] for c in group), [(c, i) for i, c in enumerate(group)]) for group in strings.values()]


def drawn_pieces(record: dict[str, Any], tokenizer: Tokenizer, start: int, end: int) -> tuple[DrawnPiece, ...]:
    """Every drawn character of the record with its reading's tokens (see `DrawnPiece`); () when it
    draws no text."""
    pieces = []
    for text, placed in reading_units(record):
        ids, spans = tokenizer.encode_with_offsets(text)
        owner = {offset: j for j, (a, b) in enumerate(spans) for offset in range(a, b)}
        for char, offset in placed:
            j = owner.get(offset)
            if j is None or char[0] != text[offset]:
                raise TrainError(f"the drawn characters of a record do not spell its text {text!r}")
            pieces.append(DrawnPiece(tuple(char[1:5]), ids[j], ids[j - 1] if j else start,
                                     ids[j + 1] if j + 1 < len(ids) else end))
    return tuple(pieces)


def text_labels(pieces: Sequence[DrawnPiece], width: int, height: int, best_width: int, best_height: int,
                tile_size: int, patch_size: int, none: int) -> TextLabels:
    """`TextLabels` of every view: the piece whose character box holds the patch centre, `none` where
    no character is drawn. Unlike boxes, these are local facts, learnable in every tile."""
    views = view_points(width, height, best_width, best_height, tile_size, patch_size)
    n = (tile_size // patch_size) ** 2
    labels = torch.full((3, len(views), n), none, dtype=torch.long)
    for v, points in enumerate(views):
        for p, (x, y) in enumerate(points or ()):
            for piece in pieces:
                x1, y1, x2, y2 = piece.box_px
                if x1 <= x < x2 and y1 <= y < y2:
                    labels[:, v, p] = torch.tensor([piece.piece, piece.prev, piece.next])
                    break
    return TextLabels(*labels)


def scene_labels(objects: Sequence[dict[str, Any]], views: int, whole_views: int) -> SceneLabels:
    """`SceneLabels` of an image cut into `views` tiles of which the first `whole_views` show it all
    (the global view, and the local tile when the grid has one)."""
    colours = [sum(o["color"] == c for o in objects) for c in COLOURS]
    kinds = [sum(o["shape"] == k for o in objects) for k in SHAPE_KINDS]
    pairs = [sum((o["color"], o["shape"]) == pair for o in objects) for pair in PAIRS]
    counts = torch.full((views, len(colours) + len(kinds) + 1 + len(pairs)), IGNORE, dtype=torch.long)
    counts[:whole_views] = torch.tensor([*colours, *kinds, len(objects), *pairs]).clamp(max=MAX_COUNT)
    pair_box = torch.full((views, len(PAIRS), 4), IGNORE, dtype=torch.long)
    for obj in objects:
        index = PAIRS.index((obj["color"], obj["shape"]))
        if pairs[index] == 1:
            pair_box[:whole_views, index] = torch.tensor(_box_bins(obj["box"]))
    return SceneLabels(counts, pair_box)


def _box_bins(box: Sequence[int]) -> list[int]:
    return [min(BOX_BINS - 1, c * BOX_BINS // 1000) for c in box]


def whole_image_views(best_width: int, best_height: int, tile_size: int) -> int:
    """How many of an image's tiles show all of it: the global view, and the local tile of a one-tile
    grid. A local tile of a grid of several cannot see where it sits in the image (every tile has the same
    position embeddings), so image-wide targets (boxes, counts) are unlearnable there."""
    columns, rows = tile_counts(best_width, best_height, tile_size)
    return 2 if columns * rows == 1 else 1



def group_by_token(labels: torch.Tensor, grid: int, ratio: int, fill: int) -> torch.Tensor:
    """[tiles, grid*grid(, 4)] patch labels -> [tiles, tokens, ratio*ratio(, 4)]: the labels of the
    patches each projector token merges, with the grid padded at the bottom and right by `fill`
    exactly as `pixel_shuffle` pads it (patches within a token in row-major order)."""
    tiles, rest = labels.shape[0], labels.shape[2:]
    side = -(-grid // ratio) * ratio
    padded = labels.new_full((tiles, side, side, *rest), fill)
    padded[:, :grid, :grid] = labels.view(tiles, grid, grid, *rest)
    blocks = padded.view(tiles, side // ratio, ratio, side // ratio, ratio, *rest).transpose(2, 3)
    return blocks.reshape(tiles, (side // ratio) ** 2, ratio * ratio, *rest)


