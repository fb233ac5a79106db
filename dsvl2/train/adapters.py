"""Adapter runs (a recipe's `adapter:` section): the frozen base with a LoRA adapter, the only thing that learns.

The base comes from `model.checkpoint` (in `adapter.base_dtype`, quantized with `adapter.quantize` for
QLoRA); the adapter starts fresh (B zero) or, when resuming, from the checkpoint's adapter. A checkpoint
of an adapter run is an adapter folder in peft's layout plus the trainer state, so it loads with
`--adapter DIR` as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dsvl2.adapters.lora import AdapterError, apply_lora, freeze_all_but_adapter, selection_of
from dsvl2.adapters.peft_format import load_adapter, peft_config, save_adapter
from dsvl2.checkpoint import CheckpointError, load_model
from dsvl2.config import ConfigError, ModelFolder
from dsvl2.model import DeepseekVL2
from dsvl2.train.errors import TrainError
from dsvl2.train.recipe import AdapterSection, TrainRecipe

ADAPTER_NAME = "default"  # the name peft gives a model's first adapter
GROUP = "adapter"  # the optimiser's parameter group (optimizer.module_lr.adapter is not a module group)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def base_model(recipe: TrainRecipe) -> tuple[DeepseekVL2, dict]:
    """The frozen base of an adapter run and its config.json dict, read from `model.checkpoint`."""
    adapter: AdapterSection = recipe.adapter
    kwargs = {}
    if adapter.quantize != "none":
        try:
            from dsvl2.quant.scheme import parse_scheme
        except ImportError as exc:
            raise TrainError(f"adapter.quantize {adapter.quantize} needs dsvl2.quant, which this installation "
                             f"lacks: {exc}") from exc
        kwargs["quantize"] = parse_scheme(adapter.quantize, adapter.group_size)
    try:
        folder = ModelFolder.read(recipe.model.checkpoint)
        model = load_model(folder, dtype=DTYPES[adapter.base_dtype], device="cpu", **kwargs)
    except (ConfigError, CheckpointError, OSError, ValueError) as exc:
        raise TrainError(f"cannot build the base model: {exc}") from exc
    return model, folder.raw_config


def adapter_model(recipe: TrainRecipe, resume_from: Path | None) -> tuple[DeepseekVL2, dict,
                                                                          dict[str, list[tuple[str, nn.Parameter]]]]:
    """The base with the recipe's adapter (fresh, or the one saved in `resume_from`) selected, everything
    but the adapter frozen; returns (model, the base's config.json dict, the optimiser's groups)."""
    adapter: AdapterSection = recipe.adapter
    model, raw = base_model(recipe)
    try:
        if resume_from is None:
            apply_lora(model, adapter.settings(), ADAPTER_NAME, dtype=DTYPES[adapter.dtype])
        else:
            saved = load_adapter(model, model.cfg, resume_from, ADAPTER_NAME, dtype=DTYPES[adapter.dtype])
            theirs, ours = peft_config(saved, None), peft_config(adapter.settings(), None)
            differ = [f"{key} {theirs[key]!r} (recipe: {ours[key]!r})" for key in ours if theirs[key] != ours[key]]
            if differ:
                raise TrainError(f"{resume_from} holds another adapter than the recipe's: {', '.join(differ)}")
    except AdapterError as exc:
        raise TrainError(f"adapter: {exc}") from exc
    selection_of(model).active = ADAPTER_NAME
    trainable = freeze_all_but_adapter(model, ADAPTER_NAME)
    return model, raw, {GROUP: trainable}


def adapter_writer(model: nn.Module, recipe: TrainRecipe):
    """A function writing the model's adapter into a checkpoint folder (see `write_checkpoint`)."""

    def write(folder: Path) -> None:
        save_adapter(model, folder, recipe.adapter.settings(), model.cfg,
                     base_model_name_or_path=str(recipe.model.checkpoint), name=ADAPTER_NAME)

    return write
