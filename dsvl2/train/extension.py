"""The one interface through which a recipe adds a loss, or set-up, to a training stage.

A recipe lists its extensions (`extensions: [{use: "module:Class", ...}]`, see `dsvl2.train.recipe`);
the trainer builds each with the entry's other keys and calls, in this order:

- `attach(model, processor)` once: check the settings against the model, register forward hooks;
- `begin(model, batches, all_reduce_sum)` once, when the stage starts fresh (not when it resumes);
  `batches` draws the stage's first micro-batches from a loader of its own, so training still starts
  with them;
- per micro-batch, `targets(batch)` on the CPU right before the forward, then, after it, `loss(targets)`
  when the targets are not None. The loss is added to the mean next-token loss times `weight`, divided
  by the number of micro-batches of the step, and logged as `<name>_loss` with every metric as
  `<name>_<metric>`, averaged over the micro-batches that had targets.

`fields` names the record keys the extension reads, each with a function that checks and converts the
value (given the whole record); a ValueError skips the record as invalid, with the error's message.
The values reach `targets` in the batch's `extras`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import torch

from dsvl2.model import DeepseekVL2
from dsvl2.processor import Processor
from dsvl2.train.data import FieldReader, TrainBatch


class Extension:
    """No-op defaults; a recipe subclasses it and overrides what it needs."""

    name: ClassVar[str] = "extension"  # prefix of its metrics in the log
    metrics: ClassVar[tuple[str, ...]] = ()  # names of the metrics `loss` returns (one all-reduce for every rank)
    fields: ClassVar[Mapping[str, FieldReader]] = {}  # record keys it reads, with their readers

    def __init__(self, weight: float = 1.0) -> None:
        if not weight > 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        self.weight = float(weight)

    def attach(self, model: DeepseekVL2, processor: Processor) -> None:
        """Check the settings against the model and register forward hooks."""

    def begin(self, model: DeepseekVL2, batches: Iterator[TrainBatch],
              all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Once, before the first step of a stage that starts fresh."""

    def targets(self, batch: TrainBatch) -> Any | None:
        """What `loss` needs of this micro-batch, or None when it has nothing to learn from."""
        return None

    def loss(self, targets: Any) -> tuple[torch.Tensor, dict[str, float]] | None:
        """After the forward: the loss and its `metrics` by name, or None."""
        return None

    @property
    def has_loss(self) -> bool:
        """Whether the subclass defines a loss: only then does the log carry its keys."""
        return type(self).loss is not Extension.loss
