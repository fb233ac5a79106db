"""Where each image token of a one-image row looks: its centre on the 0..999 grid of the image.

Pure geometry, shared by the recipe's losses that relate image tokens to boxes: `image_token_centres`
follows the token layout of `dsvl2.projector.layout_image_tokens` (global view, separator, local view; a
newline token ends every row) and the padding of `Processor.tile_image`.
"""

from __future__ import annotations

from dsvl2.grounding import GRID_MAX
from dsvl2.model import DeepseekVL2
from dsvl2.processor import Batch
from dsvl2.train.errors import TrainError
from dsvl2.vision.tiling import pad_geometry, tile_counts

GRID = GRID_MAX  # boxes are written on a 0..999 grid of the image


def image_token_centres(width: int, height: int, best_width: int, best_height: int, tile_size: int,
                        tokens_per_side: int) -> list[tuple[float, float] | None]:
    """Centre of every image token of one image on the 0..999 grid, in sequence order; None for the
    newline and separator tokens and for tokens whose centre lies in the padding."""
    step = tile_size / tokens_per_side
    centres: list[tuple[float, float] | None] = []

    def view(target_width: int, target_height: int, rows: int, columns: int) -> None:
        geometry = pad_geometry(width, height, target_width, target_height)
        for row in range(rows):
            for column in range(columns):
                x = ((column + 0.5) * step - geometry.left) / max(geometry.scaled_width, 1) * GRID
                y = ((row + 0.5) * step - geometry.top) / max(geometry.scaled_height, 1) * GRID
                centres.append((x, y) if 0 <= x <= GRID and 0 <= y <= GRID else None)
            centres.append(None)  # the row's newline

    view(tile_size, tile_size, tokens_per_side, tokens_per_side)
    centres.append(None)  # the view separator
    columns, rows = tile_counts(best_width, best_height, tile_size)
    view(best_width, best_height, tokens_per_side * rows, tokens_per_side * columns)
    return centres


def row_image_tokens(batch: Batch, row: int, tile_size: int, tokens_per_side: int
                     ) -> tuple[list[int], list[tuple[float, float] | None]] | None:
    """Sequence positions of a one-image row's image tokens and their `image_token_centres`, in the same
    order; None for a row without exactly one image."""
    sizes = batch.image_sizes[row] if row < len(batch.image_sizes) else []
    if len(sizes) != 1:
        return None
    positions = batch.images_seq_mask[row].nonzero().flatten().tolist()
    columns, rows = (int(v) for v in batch.images_spatial_crop[row, 0])
    centres = image_token_centres(*sizes[0], columns * tile_size, rows * tile_size, tile_size, tokens_per_side)
    if len(centres) != len(positions):
        raise ValueError(f"row {row}: {len(positions)} image tokens in the sequence but the layout of a "
                         f"{columns}x{rows} grid has {len(centres)}")
    return positions, centres


def check_layout(model: DeepseekVL2, option: str, layer: int) -> None:
    """An extension's decoder `layer` must exist, and the layout must put the global view first (as
    `image_token_centres` and the global-view targets assume)."""
    layers = model.cfg.language.num_hidden_layers
    if layer >= layers:
        raise TrainError(f"{option}.layer is {layer} but the language model has {layers} layers (0..{layers - 1})")
    if model.cfg.global_view_pos != "head":
        raise TrainError(f"{option} needs global_view_pos 'head' (the global view's tokens first); the model's "
                         f"config has {model.cfg.global_view_pos!r}")
