"""Stage vision's read-outs (default_recipe.vision_heads): what the heads score, and on which patches."""

from __future__ import annotations

import pytest
import torch
from default_recipe.vision_heads import TokenHeads
from default_recipe.vision_labels import (
    COLOURS,
    IGNORE,
    PAIRS,
    PatchLabels,
    SceneLabels,
    TextLabels,
)

from dsvl2.train.synthetic import SHAPE_KINDS


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
