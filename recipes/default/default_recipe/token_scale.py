"""Image-token scale: an extension that puts the adaptor's output at the scale of the text embeddings when a
stage starts.

A pre-norm decoder layer adds its attention and MLP outputs to the residual stream of every token, at a
scale set by its own weights. An image token far larger than a text embedding keeps its residual stream to
itself: what a layer adds about the question is lost against it after the next norm, so the token cannot
check itself against the words, which choosing the named shape and counting a named colour need. Stage
vision leaves the default model's image tokens far above its text embeddings (recipes/default/NOTES.md).

Once, when the stage starts from its checkpoint (not when it resumes), the projector's last linear layer,
`image_newline` and `view_seperator` are multiplied by one factor: every image token is multiplied by it,
its direction unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from dsvl2.model import DeepseekVL2, batch_tiles
from dsvl2.processor import Batch
from dsvl2.train.errors import TrainError
from dsvl2.train.extension import Extension

logger = logging.getLogger(__name__)


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
        raise ValueError("token_scale: the stage's first batches hold no image to measure")
    factor = rms / (total / count) ** 0.5
    layer = output_layer(model)
    layer.weight.mul_(factor)
    if layer.bias is not None:
        layer.bias.mul_(factor)
    model.image_newline.mul_(factor)
    model.view_seperator.mul_(factor)
    return factor


class TokenScale(Extension):
    """The recipe's entry: `{use: "default_recipe.token_scale:TokenScale", rms: 0.5}`: scale the image tokens
    to RMS `rms`, measured on the stage's first `batches` micro-batches of every rank."""

    name = "token_scale"

    def __init__(self, rms: float, batches: int = 4) -> None:
        super().__init__()
        if isinstance(rms, bool) or not isinstance(rms, (int, float)) or not rms > 0:
            raise ValueError(f"token_scale.rms must be > 0, got {rms!r}")
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise ValueError(f"token_scale.batches must be >= 1, got {batches!r}")
        self.rms, self.batches = float(rms), batches

    def begin(self, model: DeepseekVL2, batches: Iterator[Batch],
              all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        measured = [next(batches) for _ in range(self.batches)]
        try:
            factor = scale_image_tokens(model, measured, self.rms, all_reduce_sum)
        except ValueError as exc:
            raise TrainError(str(exc)) from exc
        if not dist.is_initialized() or dist.get_rank() == 0:
            logger.info("image tokens scaled by %.4g to RMS %g", factor, self.rms)
