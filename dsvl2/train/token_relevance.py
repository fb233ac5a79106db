"""Token relevance: an auxiliary loss that teaches each image token whether the question is about it.

Choosing the shape a question names, counting the shapes of a named colour and reading the bar a label
names all need one step the small default model learns too slowly from its answers alone: find the image
tokens the words name. With the question before the image, every image token can attend to the words
and check itself against them; this loss asks it to, at the output of one decoder layer: each
global-view image token whose centre lies in the image is labelled 1 inside the boxes the question is
about and 0 outside, and the token's relevance logit is scored by binary cross-entropy. The boxes are
the record's `regions` where it names them (a counting record names the shapes it counts, none for a
count of zero), else the box of a one-box answer. A later layer can
then find the named object by a question-independent key (the relevance) instead of matching words to
image features in the answer's own attention.

Measured on this 2-core CPU with a fresh language model of the default configuration, steps of 4
questions: on exact image features (`benchmarks/bench_reader.py --features object --questions colour`),
0.62, 0.67, 0.94 and 0.99 of 168 held-out questions after 500, 1,000, 1,500 and 2,000 steps with it (its
verdicts right for 0.99 of the tokens after 1,000), 0.67, 0.70, 0.66 and 0.65 without (most common
answer 0.41). On the default model's frozen tower it did not help: the tokens' verdicts stayed near the
share of tokens outside the box (0.89) through 1,500 grounding steps, and held-out grounding with and
without it was the same (0.28, 0.27). It did not with colour-only expressions either, though the tokens
tell colour (a linear probe names it under 0.86 of the tokens on a shape, the kind under 0.57). The
benchmark with the tower's own tokens (`--features tower`) stalls the same way (0.41, the most common
answer, after 2,000 steps), while exact features garbled to the tower's probe accuracy reach 0.93. What
stopped it was the tokens' scale, about 90 times the text embeddings': the same tokens multiplied down to
RMS 0.05 (`--tower-rms 0.05`) reach 0.78 after 3,000 steps, the verdicts 0.94 (`token_scale.py`).

The logit needs no parameters (a module name outside the checkpoint would break strict loading and
resumption): it is the first coordinate of the RMS-normalised hidden state (at most the square root of
the hidden size in magnitude), so the layer has to write its verdict along one fixed direction of the
residual stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsvl2.train.box_attention import BoxTarget, row_image_tokens
from dsvl2.train.data import TrainBatch


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
    for row, regions in enumerate(getattr(batch, "regions", [])):
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
