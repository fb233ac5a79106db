"""Box attention: an auxiliary loss that pulls chosen attention heads onto the region a box answer names.

While an answer writes `<|det|>[[x1,y1,x2,y2]]<|/det|>`, the positions that predict the box's tokens
should look at the image tokens inside that box. The loss is -log(attention mass of the chosen heads
on those tokens), averaged over the positions and heads, for answers with one box about a conversation
with one image. Why: trained on the next-token loss alone, the small default model's attention at the
box barely touched the object (mass 0.06 for the head this loss trains) and 45% of its boxes matched no
shape. With the loss (layer 2, head 0) the head's mass on the box reached 0.86 and the boxes land on a
shape far more often (76% of held-out grounding answers against 55%); the answer still does not follow the
head to the *named* shape (`recipes/default/selection.py` measures both).

Two options aim at the choice itself. `choice_weight` counts the loss again over the positions before
the first digit (`<|det|>` and `[[`), where the box is chosen; later positions can find the shape from
digits already written. `teacher_forced` replaces, while training, the chosen heads' output at the box
positions by what they would give attending evenly to the box's global-view tokens
(`force_box_attention`): whatever reads the box downstream then learns from heads that look at the right
object, while the heads learn where to look from the loss alone.

The map from image tokens to image regions is pure geometry: `image_token_centres` follows the token
layout of `dsvl2.projector.layout_image_tokens` (global view, separator, local view; a newline token
ends every row) and the padding of `Processor.tile_image`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsvl2.grounding import GRID_MAX, parse_grounding
from dsvl2.processor import Batch
from dsvl2.tokenizer import Tokenizer
from dsvl2.vision.tiling import pad_geometry, tile_counts

GRID = GRID_MAX  # boxes are written on a 0..999 grid of the image


@dataclass(frozen=True)
class BoxTarget:
    row: int  # batch row
    queries: tuple[int, ...]  # positions whose next token belongs to the box
    keys: tuple[int, ...]  # image-token positions inside the box
    global_keys: tuple[int, ...]  # those of the global view (the view whose tokens stage vision taught boxes)
    choice: int  # leading queries written before the box's first digit: where the box is chosen
    global_tokens: tuple[int, ...] = ()  # global-view image-token positions whose centre lies in the image


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


def box_targets(batch: Batch, tokenizer: Tokenizer, tile_size: int, tokens_per_side: int) -> list[BoxTarget]:
    """A `BoxTarget` for every one-box `<|det|>` span of the answers of the batch's one-image rows."""
    det, end = tokenizer.token_to_id("<|det|>"), tokenizer.token_to_id("<|/det|>")
    digits = {tokenizer.token_to_id(str(digit)) for digit in range(10)}
    global_tokens = tokens_per_side * (tokens_per_side + 1)  # the global view's rows, newlines included
    targets = []
    for row in range(batch.input_ids.shape[0]):
        layout = row_image_tokens(batch, row, tile_size, tokens_per_side)
        if layout is None:
            continue
        image_positions, centres = layout
        in_image = tuple(image_positions[i] for i, centre in enumerate(centres[:global_tokens]) if centre is not None)
        ids, labels = batch.input_ids[row].tolist(), batch.labels[row].tolist()
        for start, token in enumerate(ids):
            if token != det or start + 1 >= len(ids) or labels[start + 1] < 0 or end not in ids[start + 1:]:
                continue
            stop = ids.index(end, start + 1)
            parsed = parse_grounding(tokenizer.decode(ids[start: stop + 1]))
            boxes = [box for ref in parsed.refs for box in ref.boxes]
            if parsed.errors or len(boxes) != 1:
                continue
            x1, y1, x2, y2 = boxes[0]
            inside = [index for index, centre in enumerate(centres)
                      if centre is not None and x1 <= centre[0] <= x2 and y1 <= centre[1] <= y2]
            if inside:
                choice = next(i for i, token in enumerate(ids[start + 1: stop + 1]) if token in digits or token == end)
                targets.append(BoxTarget(row, tuple(range(start, stop)), tuple(image_positions[i] for i in inside),
                                         tuple(image_positions[i] for i in inside if i < global_tokens), choice + 1,
                                         in_image))
    return targets


def box_attention_loss(attention: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                       mask: torch.Tensor, targets: list[BoxTarget], heads: tuple[int, ...], choice_weight: float = 0.0
                       ) -> tuple[torch.Tensor, float]:
    """Mean -log(attention mass on the box's tokens) of `heads` over every target's query positions, plus
    `choice_weight` times its mean over the positions before the first digit, and the mean mass itself (for
    the log). x, rope and mask are the batch's inputs of the layer `attention`."""
    losses, masses = [], []
    for target in targets:
        row = slice(target.row, target.row + 1)
        positions = torch.tensor(target.queries, device=x.device)
        log_probs = attention.attention_log_probs(x[row], (rope[0][row], rope[1][row]), mask[row], positions)
        mass = log_probs[list(heads)][:, :, list(target.keys)].logsumexp(dim=-1)  # [heads, queries]
        loss = -mass.mean()
        if choice_weight:
            loss = loss - choice_weight * mass[:, : target.choice].mean()
        losses.append(loss)
        masses.append(mass.detach().exp().mean())
    if not losses:
        return x.new_zeros(()), 0.0
    return torch.stack(losses).mean(), float(torch.stack(masses).mean())


def force_box_attention(attention: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                        mask: torch.Tensor, output: torch.Tensor, targets: list[BoxTarget], heads: tuple[int, ...]
                        ) -> torch.Tensor:
    """`output` [B, T, D] of the layer `attention` with `heads`, at every target's query positions, attending
    evenly to the box's global-view tokens instead of where they looked (teacher-forced attention). What
    reads the box downstream then learns from heads that look at the named object, whatever the heads'
    own weights say; those learn where to look from `box_attention_loss` alone (the forced output does
    not depend on them)."""
    output = output.clone()
    for target in targets:
        if not target.global_keys:
            continue
        row = slice(target.row, target.row + 1)
        positions = torch.tensor(target.queries, device=x.device)
        weights = attention.attention_log_probs(x[row], (rope[0][row], rope[1][row]), mask[row], positions).exp()
        values = attention.head_values(x[row])  # [H, L, dv]
        width = values.shape[-1]
        for head in heads:
            looked = weights[head].to(values.dtype) @ values[head]  # [Q, dv]
            forced = values[head, list(target.global_keys)].mean(dim=0, keepdim=True)
            o_proj = attention.o_proj.weight[:, head * width: (head + 1) * width]
            output[target.row, positions] = output[target.row, positions] + (forced - looked) @ o_proj.T
    return output
