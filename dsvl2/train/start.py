"""What a stage starts from: the model to train (a checkpoint, or fresh weights) and its processor."""

from __future__ import annotations

from pathlib import Path

import torch

from dsvl2.checkpoint import load_model
from dsvl2.config import ConfigError, ModelFolder, load_json, model_config_from_dict
from dsvl2.model import DeepseekVL2, init_weights
from dsvl2.processor import Processor
from dsvl2.train.errors import TrainError
from dsvl2.train.recipe import TrainRecipe


def initial_model(recipe: TrainRecipe, checkpoint: Path | None = None) -> tuple[DeepseekVL2, dict]:
    """The float32 model to train and its config.json dict: from `checkpoint` when resuming, else
    from the recipe's checkpoint, else freshly initialised from the recipe's config."""
    source = checkpoint or recipe.model.checkpoint
    try:
        if source is not None:
            folder = ModelFolder.read(source)
            raw = folder.raw_config
            model = load_model(folder, dtype=torch.float32, device="cpu")
        else:
            config = recipe.model.config
            raw = dict(config) if isinstance(config, dict) else load_json(config)
            model = DeepseekVL2(model_config_from_dict(raw))
            init_weights(model, std=recipe.model.init_std, seed=recipe.seed)
    except (ConfigError, OSError, ValueError) as exc:
        raise TrainError(f"cannot build the model: {exc}") from exc
    raw = {**raw, "torch_dtype": "float32"}  # what save_model writes
    return model, raw


def load_processor(source: str | Path) -> Processor:
    try:
        return Processor.from_pretrained(source)
    except (OSError, ConfigError, KeyError) as exc:
        raise TrainError(f"cannot load the tokenizer and processor from {source}: {exc}") from exc
