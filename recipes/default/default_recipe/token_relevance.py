"""Token relevance: an extension that teaches each image token whether the question is about it.

Choosing the shape a question names, counting the shapes of a named colour and reading the bar a label
names all need one step the small default model learns too slowly from its answers alone: find the image
tokens the words name. With the question before the image, every image token can attend to the words and
check itself against them; this loss asks it to, at the output of one decoder layer: each global-view
image token whose centre lies in the image is labelled 1 inside the boxes the question is about and 0
outside, and the token's relevance logit is scored by binary cross-entropy. The boxes are the record's
`regions` where it names them (a counting record names the shapes it counts, none for a count of zero),
else the box of a one-box answer. What it measured is in recipes/default/NOTES.md.

The logit needs no parameters (a module name outside the checkpoint would break strict loading and
resumption): it is the first coordinate of the RMS-normalised hidden state (at most the square root of
the hidden size in magnitude), so the layer has to write its verdict along one fixed direction of the
residual stream.

A record's `regions` is a list of `[x1, y1, x2, y2]` boxes on the 0..999 grid of its one image (`[]`:
about nothing in the image, as "how many red shapes?" of a picture without one).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from default_recipe.box_attention import BoxTarget, box_targets
from default_recipe.image_tokens import check_layout, row_image_tokens
from dsvl2.grounding import GRID_MAX
from dsvl2.language.model import LayerOutput
from dsvl2.model import DeepseekVL2
from dsvl2.processor import Processor
from dsvl2.train.data import TrainBatch
from dsvl2.train.extension import Extension


def read_regions(regions: Any, record: dict) -> list[tuple[int, int, int, int]] | None:
    """A record's `regions`, checked (ValueError naming the problem); None when it names none."""
    if regions is None:
        return None
    image_count = len(record.get("images") or [])
    if image_count != 1:
        raise ValueError(f"'regions' needs a conversation with one image, this one has {image_count}")
    if not isinstance(regions, list) or not all(_is_box(box) for box in regions):
        raise ValueError("'regions' must be a list of [x1, y1, x2, y2] boxes with "
                         f"0 <= x1 <= x2 <= {GRID_MAX} and 0 <= y1 <= y2 <= {GRID_MAX}")
    return [tuple(box) for box in regions]


def _is_box(box: Any) -> bool:
    if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, int) for v in box):
        return False
    x1, y1, x2, y2 = box
    return 0 <= x1 <= x2 <= GRID_MAX and 0 <= y1 <= y2 <= GRID_MAX


def relevance_logits(hidden: torch.Tensor) -> torch.Tensor:
    """[..., D] hidden states -> [...] relevance logits (the first coordinate of the RMS-normalised state)."""
    hidden = hidden.float()
    return hidden[..., 0] * torch.rsqrt(hidden.pow(2).mean(dim=-1) + 1e-6)


def relevance_labels(targets: list[BoxTarget]) -> list[tuple[int, list[int], torch.Tensor]]:
    """(row, global-view token positions, 0/1 labels) for every row with exactly one box target: rows
    whose answer writes several boxes (a grounded caption) are about no single object."""
    by_row: dict[int, list[BoxTarget]] = {}
    for target in targets:
        by_row.setdefault(target.row, []).append(target)
    out = []
    for row, row_targets in sorted(by_row.items()):
        if len(row_targets) != 1 or not row_targets[0].global_tokens:
            continue
        target = row_targets[0]
        inside = set(target.global_keys)
        labels = torch.tensor([float(position in inside) for position in target.global_tokens])
        out.append((row, list(target.global_tokens), labels))
    return out


def region_labels(batch: TrainBatch, tile_size: int, tokens_per_side: int) -> list[tuple[int, list[int], torch.Tensor]]:
    """(row, global-view token positions, 0/1 labels) for every one-image row whose record names the
    `regions` its question is about: 1 for a token whose centre lies in one of them."""
    global_tokens = tokens_per_side * (tokens_per_side + 1)  # the global view's rows, newlines included
    out = []
    for row, extras in enumerate(batch.extras):
        regions = extras.get("regions")
        layout = None if regions is None else row_image_tokens(batch, row, tile_size, tokens_per_side)
        if layout is None:
            continue
        positions, centres = layout
        shown = [(positions[i], centre) for i, centre in enumerate(centres[:global_tokens]) if centre is not None]
        labels = torch.tensor([float(any(x1 <= x <= x2 and y1 <= y <= y2 for x1, y1, x2, y2 in regions))
                               for _, (x, y) in shown])
        out.append((row, [position for position, _ in shown], labels))
    return out


def batch_relevance_labels(batch: TrainBatch, targets: list[BoxTarget], tile_size: int, tokens_per_side: int
                           ) -> list[tuple[int, list[int], torch.Tensor]]:
    """The labels of every row that has them: from the record's `regions` where it names them, else from
    its answer's one box."""
    from_regions = region_labels(batch, tile_size, tokens_per_side)
    named = {row for row, _, _ in from_regions}
    return sorted(from_regions + [item for item in relevance_labels(targets) if item[0] not in named],
                  key=lambda item: item[0])


def token_relevance_loss(hidden: torch.Tensor, labelled: list[tuple[int, list[int], torch.Tensor]]
                         ) -> tuple[torch.Tensor, float] | None:
    """Mean binary cross-entropy of the relevance logits of `hidden` [B, T, D] (a decoder layer's output)
    over the tokens `labelled` (as `batch_relevance_labels` gives them), and the fraction of them on the
    right side of 0; None without labels."""
    if not labelled:
        return None
    logits = torch.cat([relevance_logits(hidden[row, positions]) for row, positions, _ in labelled])
    labels = torch.cat([labels for _, _, labels in labelled]).to(logits.device)
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    accuracy = float(((logits.detach() > 0).float() == labels).float().mean())
    return loss, accuracy


class TokenRelevance(Extension):
    """The recipe's entry: `{use: "default_recipe.token_relevance:TokenRelevance", layer: 1, weight: 1.0}`.
    Logs `token_relevance_loss` and `token_relevance_accuracy` (tokens on the right side of 0)."""

    name = "token_relevance"
    metrics = ("accuracy",)
    fields = {"regions": read_regions}

    def __init__(self, layer: int, weight: float = 1.0) -> None:
        super().__init__(weight)
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"token_relevance needs layer >= 0, got {layer!r}")
        self.layer = layer
        self._pending = False  # whether the forward under way has labels
        self._hidden: torch.Tensor | None = None

    def attach(self, model: DeepseekVL2, processor: Processor) -> None:
        check_layout(model, "token_relevance", self.layer)
        self.processor = processor
        model.language.model.layers[self.layer].register_forward_hook(self._hook)

    def _hook(self, layer: nn.Module, args: tuple, output: LayerOutput) -> None:
        if self._pending:
            self._hidden = output.hidden

    def targets(self, batch: TrainBatch) -> list[tuple[int, list[int], torch.Tensor]] | None:
        processor = self.processor
        found = box_targets(batch, processor.tokenizer, processor.tile_size, processor.tokens_per_side)
        labelled = batch_relevance_labels(batch, found, processor.tile_size, processor.tokens_per_side)
        self._pending = bool(labelled)
        return labelled or None

    def loss(self, labelled: list[tuple[int, list[int], torch.Tensor]]) -> tuple[torch.Tensor, dict[str, float]] | None:
        hidden, self._hidden, self._pending = self._hidden, None, False
        scored = token_relevance_loss(hidden, labelled)
        if scored is None:
            return None
        return scored[0], {"accuracy": scored[1]}
