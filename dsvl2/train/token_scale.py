"""Image-token scale: put the adaptor's output at the scale of the text embeddings when a stage starts.

A pre-norm decoder layer adds its attention and MLP outputs to the residual stream of every token, at a
scale set by its own weights. An image token far larger than a text embedding keeps its residual
stream to itself: what a layer adds about the question is lost against it after the next norm, so the
token cannot check itself against the words, which choosing the named shape and counting a named
colour need. Stage vision leaves the default model's image tokens at an RMS of about 2.3, 90 times
its text embeddings' 0.026. Measured with `benchmarks/bench_reader.py --features tower --questions
colour --token-relevance 1` (fresh language model, 3,000 steps of 4, this 2-core CPU): those tokens as
they are, 0.41-0.46 of 168 held-out questions (the most common answer: 0.41); the same tokens
multiplied by one factor to RMS 0.05 (`--tower-rms 0.05`), 0.52 / 0.67 / 0.78 after 2,000 / 2,500 /
3,000 steps, the relevance verdicts rising from 0.85 to 0.94.

`model.image_token_rms` in a recipe scales, once when the stage starts from its checkpoint (not when
it resumes), the projector's last linear layer, `image_newline` and `view_seperator` by one factor:
every image token is multiplied by it, its direction unchanged. The default recipe scales to RMS 0.5 at
its warm-up: with token relevance, held-out grounding 0.63 and counting 0.63 against 0.49 and 0.50 unscaled
(0.37 / 0.54 at RMS 0.05, whose boxes lost precision; recipes/default/NOTES.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from dsvl2.model import DeepseekVL2, batch_tiles
from dsvl2.processor import Batch


def output_layer(model: DeepseekVL2) -> nn.Linear:
    """The projector's last linear layer, whose output is the image tokens."""
    linears = [module for module in model.projector.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError("the projector has no linear layer to scale")
    return linears[-1]


@torch.no_grad()
def image_token_square_sum(model: DeepseekVL2, batches: Iterable[Batch]) -> tuple[float, int]:
    """(sum of squares, number of values) of the tile tokens the projector makes of the batches' images."""
    total, count = 0.0, 0
    for batch in batches:
        tiles, crops = batch_tiles(batch.images, batch.images_spatial_crop)
        if not crops:
            continue
        tokens = model.encode_tiles(tiles)
        total += float(tokens.double().pow(2).sum())
        count += tokens.numel()
    return total, count


@torch.no_grad()
def scale_image_tokens(model: DeepseekVL2, batches: Iterable[Batch], rms: float,
                       all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> float:
    """Multiply every image token by the factor that gives the batches' tile tokens RMS `rms`, summed
    over ranks by `all_reduce` so that every rank scales alike; returns the factor."""
    total, count = all_reduce(torch.tensor(image_token_square_sum(model, batches), dtype=torch.float64)).tolist()
    if count == 0 or total == 0:
        raise ValueError("model.image_token_rms: the stage's first batches hold no image to measure")
    factor = rms / (total / count) ** 0.5
    layer = output_layer(model)
    layer.weight.mul_(factor)
    if layer.bias is not None:
        layer.bias.mul_(factor)
    model.image_newline.mul_(factor)
    model.view_seperator.mul_(factor)
    return factor
