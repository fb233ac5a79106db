"""Training recipes: one YAML file per stage, parsed into frozen dataclasses.

Every relative path in a recipe is taken relative to the folder of the YAML file, so a recipe
and its data can move together. Unknown keys are errors (a typo must not silently fall back
to a default), and every error names the offending key.

A recipe may plug its own code into a stage: `extensions` (losses and set-up through the interface of
`dsvl2.train.extension`) and `trainer` (a class that replaces `dsvl2.train.trainer.Trainer` for the
stage: built as `Class(recipe, resume=..., **options)`, with `train(stop_at=None)` returning the step
records). `use` names the class as "module.path:ClassName"; the entry's other keys are the keyword
arguments it is built with. The module is imported with the recipe file's folder first on sys.path
(it stays there, so data-loader workers find it too), so a recipe's code can sit beside its YAML
files. A module that does not import, or an option the class does not take, is an error naming the entry.

    stage: sft                    # vision | align | pretrain | sft
    seed: 0
    model:
      checkpoint: ../ckpt/tiny    # start from these weights, or
      # config: model.json        # a config.json path or an inline dict: fresh weights
      processor: null             # tokenizer + processor_config.json folder (default: checkpoint)
    data:
      sources:
        - {name: vl, paths: [data/vl/*.jsonl], weight: 0.7}
        - {name: text, paths: [data/text], weight: 0.3}
        - {name: llava, paths: [llava_665k.json], format: llava, image_root: /data/coco}
    optimizer: {lr: 2.0e-5, module_lr: {projector: 1.0e-4}}
    schedule: {warmup_steps: 100}
    training: {steps: 1000, micro_batch_size: 2, grad_accum: 8, dtype: bfloat16}
    output: {dir: runs/sft, save_every: 500}
    # optional: extensions: [{use: "my_recipe.losses:BoxLoss", weight: 0.5, layer: 2}]
    # optional: trainer: {use: "my_recipe.stage:MyStage", steps_per_image: 2}
    # optional: adapter: {r: 16, alpha: 32, target_modules: [q_proj, o_proj]}  # LoRA; the rest frozen
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsvl2.adapters.lora import ATTENTION, AdapterError, LoraSettings
from dsvl2.train.extension import Extension
from dsvl2.train.formats import FORMATS

STAGES = ("vision", "align", "pretrain", "sft")
MODULE_GROUPS = ("vision", "projector", "language")
DTYPES = ("float32", "bfloat16")
STRATEGIES = ("ddp", "fsdp")
SCHEDULES = ("cosine", "constant")
QUANTIZE = ("none", "int8", "int4")


class RecipeError(ValueError):
    """A training recipe has a missing, unknown or invalid value; the message names the key."""


@dataclass(frozen=True)
class ModelSection:
    checkpoint: Path | None = None  # a checkpoint directory to start from
    config: Path | dict | None = None  # a config.json (path or dict) for fresh weights
    processor: Path | None = None  # tokenizer + processor_config.json; default: checkpoint
    init_std: float = 0.02  # std of the fresh weights (config only)


@dataclass(frozen=True)
class SourceSection:
    name: str
    paths: tuple[Path, ...]  # data files, glob patterns or folders (see dsvl2.train.formats)
    weight: float = 1.0
    format: str = "auto"  # dsvl2 | sharegpt | llava | parquet; auto: detected from the first file
    image_root: Path | None = None  # image paths are relative to it (default: the folder of each data file)


@dataclass(frozen=True)
class DataSection:
    sources: tuple[SourceSection, ...] = ()
    shuffle_buffer: int = 1000  # records; 1 keeps the file order
    shuffle_shards: bool = True
    num_workers: int = 0  # data-loader processes per rank
    max_length: int | None = None  # tokens; default: the model's context length
    mask_prompt: bool | None = None  # default: the stage's choice (true for every stage)
    max_consecutive_bad: int = 1000  # give up when this many records in a row are bad
    strict: bool = False  # a record that cannot be used stops the run (`dsvl2 train --strict`)


@dataclass(frozen=True)
class OptimizerSection:
    lr: float = 1e-4
    module_lr: dict = field(default_factory=dict)  # {vision|projector|language: lr}
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8


@dataclass(frozen=True)
class ScheduleSection:
    kind: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio


@dataclass(frozen=True)
class TrainingSection:
    steps: int = 1000  # optimiser steps
    micro_batch_size: int = 1  # samples per forward, per rank
    grad_accum: int = 1  # micro-batches per optimiser step
    max_grad_norm: float | None = 1.0
    dtype: str = "float32"  # bfloat16: autocast, float32 master weights
    activation_checkpointing: bool = False
    freeze: tuple[str, ...] = ()  # module groups frozen on top of the stage's choice
    aux_loss: bool = True  # add the MoE balance loss of softmax gates
    bias_update_rate: float = 1e-3  # noaux_tc: e_score_correction_bias step per optimiser step
    strategy: str = "ddp"  # under torchrun: ddp or fsdp (FSDP2 fully_shard)
    device: str = "auto"  # auto: cuda if available, else cpu


@dataclass(frozen=True)
class OutputSection:
    dir: Path  # checkpoints, log.jsonl and TensorBoard events
    save_every: int = 1000  # steps; the last step is always saved
    keep_last: int = 3  # checkpoints kept; 0 keeps all
    log_every: int = 10
    tensorboard: bool = False  # only if the tensorboard package is installed
    progress: bool = True  # tqdm bar on rank 0


@dataclass(frozen=True)
class AdapterSection:
    """A LoRA adapter run: only the adapter learns; checkpoints hold it in peft's layout (dsvl2.adapters)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = ATTENTION  # a list of names, or one regular expression (peft's rule)
    use_rslora: bool = False
    dtype: str = "float32"  # the adapter's weights
    base_dtype: str = "float32"  # the frozen base's unquantized weights; bfloat16 needs training.dtype bfloat16
    quantize: str = "none"  # the frozen base's weight-only quantization (QLoRA): none | int8 | int4
    group_size: int | None = None  # quantization group size (default: dsvl2.quant's)

    def settings(self) -> LoraSettings:
        return LoraSettings(r=self.r, alpha=self.alpha, dropout=self.dropout, target_modules=self.target_modules,
                            use_rslora=self.use_rslora)


@dataclass(frozen=True)
class TrainRecipe:
    stage: str
    model: ModelSection
    data: DataSection
    output: OutputSection
    seed: int = 0
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    extensions: tuple[Plugin, ...] = ()  # built fresh by each trainer (`Plugin.build`)
    trainer: Plugin | None = None  # None: dsvl2.train.trainer.Trainer
    adapter: AdapterSection | None = None  # a LoRA run (None: the stage's modules train)
    source: Path | None = None  # the YAML file it came from
    raw: dict = field(default_factory=dict)  # the parsed YAML, saved with checkpoints


# --------------------------------------------------------------------------------------------------
# A recipe's own code
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plugin:
    """A class a recipe names (`use`) and the keyword arguments (`options`) it is built with."""

    use: str
    options: dict
    where: str  # the recipe entry, for messages
    factory: Callable[..., Any] = field(compare=False, repr=False)

    def build(self, *args: Any, **kwargs: Any) -> Any:
        """A fresh instance; the class's refusal of a value (ValueError) is a RecipeError naming the entry."""
        try:
            return self.factory(*args, **kwargs, **self.options)
        except ValueError as exc:
            raise RecipeError(f"{self.where} ({self.use}): {exc}") from exc


def _plugin(raw: Any, where: str, base_dir: Path, positional: tuple = (), keyword: dict | None = None) -> Plugin:
    """Import the class an entry names and check that it takes the entry's options (besides
    `positional` and `keyword`, the arguments its caller passes)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("use"), str):
        raise RecipeError(f"{where} must be a mapping with `use: \"module.path:ClassName\"`, got {raw!r}")
    use = raw["use"]
    module_name, _, class_name = use.partition(":")
    if not module_name or not class_name:
        raise RecipeError(f"{where}.use must be \"module.path:ClassName\", got {use!r}")
    if sys.path[:1] != [str(base_dir)]:
        sys.path.insert(0, str(base_dir))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RecipeError(f"{where}: cannot import {module_name} (looked first in {base_dir}): {exc}") from exc
    factory = getattr(module, class_name, None)
    if not isinstance(factory, type):
        raise RecipeError(f"{where}: {module_name} has no class {class_name}")
    options = {key: value for key, value in raw.items() if key != "use"}
    try:
        inspect.signature(factory).bind(*positional, **(keyword or {}), **options)
    except TypeError as exc:
        raise RecipeError(f"{where} ({use}): {exc}") from None
    return Plugin(use, options, where, factory)


def _extensions(raw: Any, base_dir: Path) -> tuple[Plugin, ...]:
    if not isinstance(raw, list):
        raise RecipeError(f"extensions must be a list of entries, got {type(raw).__name__}")
    plugins = tuple(_plugin(entry, f"extensions[{i}]", base_dir) for i, entry in enumerate(raw))
    names: dict[str, str] = {}
    for plugin in plugins:
        if not issubclass(plugin.factory, Extension):
            raise RecipeError(f"{plugin.where}: {plugin.use} is not a dsvl2.train.extension.Extension")
        plugin.build()  # its own checks of the values, now rather than when training starts
        name = plugin.factory.name
        if name in names:
            raise RecipeError(f"{plugin.where}: {plugin.use} logs as {name!r}, like {names[name]}")
        names[name] = plugin.where
    return plugins


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


def _convert(value: Any, annotation: Any, where: str, base_dir: Path) -> Any:
    """Check and convert one YAML value to the field's annotated type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None:
            if type(None) in options:
                return None
            raise RecipeError(f"{where} must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where, base_dir)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of the allowed types")
    if value is None:
        raise RecipeError(f"{where} must not be null")
    if annotation is Path:
        if not isinstance(value, (str, Path)):
            raise RecipeError(f"{where} must be a path string, got {type(value).__name__}")
        path = Path(value).expanduser()
        # normpath folds "a/../b" without following symbolic links (a linked data folder stays linked).
        return Path(os.path.normpath(path if path.is_absolute() else base_dir / path))
    if annotation is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        # PyYAML reads `1e-4` (no dot) as a string, so numeric strings are accepted.
        if isinstance(value, bool):
            raise RecipeError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{where} must be a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where} must be a string, got {value!r}")
        return value
    if annotation is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where} must be a mapping, got {type(value).__name__}")
        return dict(value)
    if origin is tuple:
        args = typing.get_args(annotation)
        items = [value] if isinstance(value, (str, Path)) else value
        if not isinstance(items, (list, tuple)):
            raise RecipeError(f"{where} must be a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]", base_dir) for i, v in enumerate(items))
        if len(items) != len(args):
            raise RecipeError(f"{where} must be a list of {len(args)} values, got {len(items)}")
        pairs = enumerate(zip(items, args, strict=True))
        return tuple(_convert(v, a, f"{where}[{i}]", base_dir) for i, (v, a) in pairs)
    if dataclasses.is_dataclass(annotation):
        return _section(annotation, value, where, base_dir)
    raise RecipeError(f"{where}: unsupported field type {annotation!r}")  # pragma: no cover


def _section(cls: type, raw: Any, where: str, base_dir: Path, skip: tuple[str, ...] = (),
             parsed_elsewhere: tuple[str, ...] = ()) -> Any:
    if not isinstance(raw, dict):
        raise RecipeError(f"{where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise RecipeError(f"{where or 'recipe'}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(fields)}")
    kwargs = {}
    for name, spec in fields.items():
        key = f"{where}.{name}" if where else name
        if name in parsed_elsewhere:
            continue
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], key, base_dir)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{key} is required")
    return cls(**kwargs)


def _check(recipe: TrainRecipe) -> None:
    if recipe.stage not in STAGES:
        raise RecipeError(f"stage is {recipe.stage!r}; expected one of {', '.join(STAGES)}")
    model = recipe.model
    if (model.checkpoint is None) == (model.config is None):
        raise RecipeError("model: give exactly one of checkpoint (existing weights) or config (fresh weights)")
    if model.checkpoint is None and model.processor is None:
        raise RecipeError("model.processor is required with model.config (where the tokenizer files are)")
    if not recipe.data.sources:
        raise RecipeError("data.sources must list at least one source")
    names = [s.name for s in recipe.data.sources]
    if len(set(names)) != len(names):
        raise RecipeError(f"data.sources: names must be unique, got {names}")
    for i, source in enumerate(recipe.data.sources):
        if source.weight <= 0:
            raise RecipeError(f"data.sources[{i}].weight must be > 0, got {source.weight}")
        if not source.paths:
            raise RecipeError(f"data.sources[{i}].paths is empty")
        if source.format not in FORMATS:
            raise RecipeError(f"data.sources[{i}].format is {source.format!r}; expected one of {', '.join(FORMATS)}")
    positive = {
        "data.shuffle_buffer": recipe.data.shuffle_buffer, "training.steps": recipe.training.steps,
        "training.micro_batch_size": recipe.training.micro_batch_size,
        "training.grad_accum": recipe.training.grad_accum, "output.log_every": recipe.output.log_every,
        "output.save_every": recipe.output.save_every, "data.max_consecutive_bad": recipe.data.max_consecutive_bad,
    }
    for key, value in positive.items():
        if value < 1:
            raise RecipeError(f"{key} must be >= 1, got {value}")
    if recipe.data.num_workers < 0 or recipe.output.keep_last < 0 or recipe.schedule.warmup_steps < 0:
        raise RecipeError("data.num_workers, output.keep_last and schedule.warmup_steps must be >= 0")
    if recipe.data.max_length is not None and recipe.data.max_length < 2:
        raise RecipeError(f"data.max_length must be >= 2, got {recipe.data.max_length}")
    choices = {
        "training.dtype": (recipe.training.dtype, DTYPES),
        "training.strategy": (recipe.training.strategy, STRATEGIES),
        "schedule.kind": (recipe.schedule.kind, SCHEDULES),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise RecipeError(f"{key} is {value!r}; expected one of {', '.join(allowed)}")
    for group in (*recipe.optimizer.module_lr, *recipe.training.freeze):
        if group not in MODULE_GROUPS:
            raise RecipeError(f"unknown module group {group!r} in optimizer.module_lr or training.freeze; "
                              f"expected one of {', '.join(MODULE_GROUPS)}")
    if recipe.optimizer.lr <= 0 or any(float(v) <= 0 for v in recipe.optimizer.module_lr.values()):
        raise RecipeError("optimizer.lr and optimizer.module_lr values must be > 0")
    if not 0 <= recipe.schedule.min_lr_ratio <= 1:
        raise RecipeError(f"schedule.min_lr_ratio must be in [0, 1], got {recipe.schedule.min_lr_ratio}")
    if recipe.training.device not in ("auto", "cpu") and not recipe.training.device.startswith("cuda"):
        raise RecipeError(f"training.device is {recipe.training.device!r}; expected auto, cpu or cuda[:N]")
    if recipe.adapter is not None:
        _check_adapter(recipe)


def _check_adapter(recipe: TrainRecipe) -> None:
    adapter = recipe.adapter
    try:
        adapter.settings()
    except AdapterError as exc:
        raise RecipeError(f"adapter: {exc}") from None
    for key, value in (("adapter.dtype", adapter.dtype), ("adapter.base_dtype", adapter.base_dtype)):
        if value not in DTYPES:
            raise RecipeError(f"{key} is {value!r}; expected one of {', '.join(DTYPES)}")
    if adapter.quantize not in QUANTIZE:
        raise RecipeError(f"adapter.quantize is {adapter.quantize!r}; expected one of {', '.join(QUANTIZE)}")
    if adapter.base_dtype == "bfloat16" and recipe.training.dtype != "bfloat16":
        raise RecipeError("adapter.base_dtype bfloat16 needs training.dtype bfloat16 (autocast computes the frozen "
                          "16-bit base and the adapter together); a quantized base computes in either")
    if recipe.training.strategy == "fsdp":
        raise RecipeError("training.strategy fsdp does not take an adapter: use ddp (the frozen base is "
                          "replicated, only the adapter's gradients are reduced)")
    if recipe.model.checkpoint is None:
        raise RecipeError("adapter: model.checkpoint is required (an adapter adapts existing weights)")


def recipe_from_dict(raw: dict, base_dir: str | Path = ".", source: Path | None = None) -> TrainRecipe:
    """Parse a recipe mapping; relative paths are resolved against `base_dir`."""
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe is a mapping of sections, got {type(raw).__name__}")
    base_dir = Path(base_dir).resolve()
    recipe = _section(TrainRecipe, raw, "", base_dir, skip=("source", "raw"),
                      parsed_elsewhere=("extensions", "trainer"))
    extensions = _extensions(raw.get("extensions", []), base_dir)
    trainer = _plugin(raw["trainer"], "trainer", base_dir, (None,), {"resume": False}) if "trainer" in raw else None
    recipe = dataclasses.replace(recipe, extensions=extensions, trainer=trainer, source=source, raw=raw)
    module_lr = {}
    for group, value in recipe.optimizer.module_lr.items():
        try:
            if isinstance(value, bool):
                raise ValueError
            module_lr[str(group)] = float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"optimizer.module_lr.{group} must be a number, got {value!r}") from None
    recipe = dataclasses.replace(recipe, optimizer=dataclasses.replace(recipe.optimizer, module_lr=module_lr))
    _check(recipe)
    return recipe


def load_recipe(path: str | Path) -> TrainRecipe:
    """Read and validate a YAML recipe."""
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - pyyaml is in the train extra
        raise RecipeError("reading recipes needs PyYAML: pip install 'dsvl2[train]'") from exc
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from exc
    return recipe_from_dict(raw or {}, path.resolve().parent, source=path.resolve())
