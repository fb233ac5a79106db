"""Stage vision's read-outs: linear heads on the projector's tokens, scored against the stage's labels.

The heads live only in this stage (never saved in the model): they make each token say what lies under
the patches it merges, so the tokens the language model receives carry it in a linearly readable form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from default_recipe.vision_labels import (
    BOX_BINS,
    COLOURS,
    IGNORE,
    MAX_COUNT,
    PAIRS,
    PatchLabels,
    SceneLabels,
    TextLabels,
)
from dsvl2.train.synthetic import SHAPE_KINDS


class TokenHeads(nn.Module):
    """Linear read-outs of the projector's tokens (what the language model reads): each token names
    the colour, shape and box bins of every patch it merges, the `SceneLabels` of its view and, given
    `text_classes` (vocabulary size + 1 for "no text"), the `TextLabels` of its patches. Used by this
    stage only, never saved in the model."""

    def __init__(self, hidden: int, patches_per_token: int, text_classes: int = 0) -> None:
        super().__init__()
        self.patches = patches_per_token
        self.colour = nn.Linear(hidden, patches_per_token * (len(COLOURS) + 1))
        self.shape = nn.Linear(hidden, patches_per_token * (len(SHAPE_KINDS) + 1))
        self.box = nn.Linear(hidden, patches_per_token * 4 * BOX_BINS)
        self.counts = nn.Linear(hidden, (len(COLOURS) + len(SHAPE_KINDS) + 1 + len(PAIRS)) * (MAX_COUNT + 1))
        self.pair_box = nn.Linear(hidden, len(PAIRS) * 4 * BOX_BINS)
        # Made only when used: a head without targets would still enter the gradient norm that is clipped.
        self.text = nn.Linear(hidden, patches_per_token * 3 * text_classes) if text_classes else None

    def loss(self, tokens: torch.Tensor, labels: PatchLabels, scene: SceneLabels, text: TextLabels
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Summed cross-entropies over tokens [tiles, T, hidden], patch and text labels already grouped
        by token and per-tile scene labels; the box-bin, colour and kind accuracies on object patches,
        the count accuracy and the accuracy of `piece` on text patches."""
        colour = self.colour(tokens).unflatten(-1, (self.patches, -1))
        shape = self.shape(tokens).unflatten(-1, (self.patches, -1))
        box = self.box(tokens).unflatten(-1, (self.patches, 4, BOX_BINS))
        counts = self.counts(tokens).unflatten(-1, (scene.counts.shape[1], MAX_COUNT + 1))
        pair_box = self.pair_box(tokens).unflatten(-1, (len(PAIRS) * 4, BOX_BINS))
        per_token = tokens.shape[1]
        count_labels = scene.counts[:, None].expand(-1, per_token, -1)
        losses = (F.cross_entropy(colour.flatten(0, 2), labels.colour.flatten()),
                  F.cross_entropy(shape.flatten(0, 2), labels.shape.flatten()),
                  _masked_cross_entropy(box.reshape(-1, BOX_BINS), labels.box.flatten()),
                  _masked_cross_entropy(counts.flatten(0, 2), count_labels.flatten()),
                  _masked_cross_entropy(pair_box.flatten(0, 2),
                                        scene.pair_box.flatten(1)[:, None].expand(-1, per_token, -1).flatten()))
        on_object = labels.box != IGNORE
        hits = (box.argmax(-1) == labels.box)[on_object]
        counted = count_labels != IGNORE
        count_hits = (counts.argmax(-1) == count_labels)[counted]
        on_shape = labels.colour != 0
        metrics = {"box_bin_accuracy": _mean(hits), "count_accuracy": _mean(count_hits),
                   "colour_accuracy": _mean((colour.argmax(-1) == labels.colour)[on_shape]),
                   "kind_accuracy": _mean((shape.argmax(-1) == labels.shape)[on_shape])}
        if self.text is None:
            return sum(losses), metrics
        reading_loss, metrics["text_accuracy"] = self._reading_loss(tokens, text)
        return sum(losses) + reading_loss, metrics

    def _reading_loss(self, tokens: torch.Tensor, text: TextLabels) -> tuple[torch.Tensor, float]:
        """Cross-entropy of the `TextLabels` on the views of images of text, and the accuracy of `piece`
        on their patches that show text."""
        targets = torch.stack([text.piece, text.prev, text.next], dim=-1)
        reading = (targets != IGNORE).flatten(1).any(1)
        targets = targets[reading]
        read = self.text(tokens[reading]).unflatten(-1, (self.patches, 3, -1))
        on_text = (targets[..., 0] != IGNORE) & (targets[..., 0] != read.shape[-1] - 1)
        hits = (read[..., 0, :].argmax(-1) == targets[..., 0])[on_text]
        return _masked_cross_entropy(read.flatten(0, 3), targets.flatten()), _mean(hits)


def _mean(hits: torch.Tensor) -> float:
    return float(hits.float().mean()) if hits.numel() else 0.0


def _masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the targets that are not IGNORE; zero (not NaN) when there are none."""
    if not (targets != IGNORE).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets, ignore_index=IGNORE)

