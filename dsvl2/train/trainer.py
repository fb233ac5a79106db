"""`dsvl2 train RECIPE.yaml [--resume]`: one training stage of DeepSeek-VL2 from a YAML recipe.

The same command runs in one process or under `torchrun` (then DDP, or FSDP2 `fully_shard`
with `training.strategy: fsdp`; gloo on the CPU, NCCL on GPUs). Each optimiser step takes
`grad_accum` micro-batches of `micro_batch_size` samples per rank; the loss is the token-level
mean cross-entropy over the whole global batch (the sum over every rank's answer tokens divided
by their global count), so any split of the same global batch gives the same loss and gradients.

Checkpoints (`OUTPUT/checkpoint-NNNNNNN/`) have the layout `dsvl2` loads (config.json,
model.safetensors, tokenizer files, processor_config.json) plus `trainer_state.pt` (optimiser,
scheduler, data position and RNG states of every rank), so `--resume` continues the same loss
curve. A checkpoint is written to a temporary folder, synced to disk and renamed, so a crash
while saving leaves the previous one intact; the last `keep_last` are kept.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsvl2.checkpoint import load_model, save_model
from dsvl2.config import ConfigError, load_json, model_config_from_dict
from dsvl2.model import DeepseekVL2, init_weights
from dsvl2.processor import Batch, Processor
from dsvl2.train.box_attention import BoxTarget, box_attention_loss, box_targets, force_box_attention
from dsvl2.train.data import SKIP_REASONS, DataError, DataSource, TrainDataset, TrainLoader
from dsvl2.train.recipe import BoxAttentionSection, RecipeError, TokenRelevanceSection, TrainRecipe, load_recipe
from dsvl2.train.stages import (
    build_optimizer,
    build_scheduler,
    configure_stage,
    enable_activation_checkpointing,
    expert_counts,
    keep_idle_experts_in_graph,
    moe_layers,
    stage_mask_prompt,
    trainable_groups,
    update_correction_bias,
)
from dsvl2.train.token_relevance import batch_relevance_labels, token_relevance_loss
from dsvl2.train.token_scale import scale_image_tokens

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"
SCALE_BATCHES = 4  # micro-batches per rank that measure the image tokens for model.image_token_rms
LOG_FILE = "log.jsonl"
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json")
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says why."""


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Distributed:
    """This process's place: one process (no process group), or one rank under torchrun."""

    rank: int
    world_size: int
    device: torch.device
    enabled: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tensor = tensor.to(self.device)
            dist.all_reduce(tensor)
        return tensor.cpu()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def pick_device(setting: str, local_rank: int) -> torch.device:
    if setting == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"training.device is {setting} but CUDA is not available")
    if setting == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(setting)


def setup_distributed(device_setting: str = "auto") -> Distributed:
    """Join the process group that torchrun describes in the environment; alone without one."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    device = pick_device(device_setting, local_rank)
    if not launched:
        return Distributed(0, 1, device, enabled=False)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), device, enabled=True)


# --------------------------------------------------------------------------------------------------
# Checkpoint folders
# --------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a trainer state) in step order."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_checkpoint(staging: Path, final: Path) -> None:
    """Make a fully written staging folder the checkpoint `final`, durably and atomically."""
    for file in staging.rglob("*"):
        if file.is_file():
            _fsync_path(file)
    _fsync_path(staging)
    old = final.with_name(f".old-{final.name}")
    if final.exists():  # only when a step is saved twice; the rename below is the atomic switch
        os.rename(final, old)
    os.rename(staging, final)
    _fsync_path(final.parent)
    if old.exists():
        shutil.rmtree(old)


def prune_checkpoints(output_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for _, path in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(path)


def remove_stale_staging(output_dir: Path) -> None:
    """Folders of saves that crashed before their rename."""
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            if path.is_dir() and path.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(path)


def truncate_log(path: Path, step: int) -> None:
    """Drop log records of steps after the checkpoint, which the resumed run trains again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def resumable_checkpoint(output_dir: Path, resume: bool) -> Path | None:
    """The checkpoint a run in `output_dir` continues from; an error if one exists and `resume` is off."""
    found = latest_checkpoint(output_dir)
    if found is not None and not resume:
        raise TrainError(f"{output_dir} already holds checkpoints (latest {found.name}); "
                         "pass --resume to continue, or choose another output.dir")
    if resume and found is None:
        logger.info("no checkpoint in %s: starting from step 0", output_dir)
    return found


def load_processor(source: str | Path) -> Processor:
    try:
        return Processor.from_pretrained(source)
    except (OSError, ConfigError, KeyError) as exc:
        raise TrainError(f"cannot load the tokenizer and processor from {source}: {exc}") from exc


def write_checkpoint(output_dir: Path, step: int, weights: Any, model_config: dict, processor_source: Path,
                     state: dict[str, Any], keep_last: int) -> Path:
    """Write `checkpoint-<step>` atomically: the weights in the released layout (anything with
    `named_parameters`), the processor files of `processor_source`, and the training `state`."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step:07d}"
    staging = output_dir / f".tmp-{final.name}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    save_model(weights, staging, model_config)
    for name in PROCESSOR_FILES:
        if (processor_source / name).is_file():
            shutil.copyfile(processor_source / name, staging / name)
    torch.save(state, staging / STATE_FILE)
    commit_checkpoint(staging, final)
    prune_checkpoints(output_dir, keep_last)
    return final


class _NamedTensors:
    """A full state dict that `save_model` can write (it only calls `named_parameters`)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.tensors.items())


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def initial_model(recipe: TrainRecipe, checkpoint: Path | None = None) -> tuple[DeepseekVL2, dict]:
    """The float32 model to train and its config.json dict: from `checkpoint` when resuming, else
    from the recipe's checkpoint, else freshly initialised from the recipe's config."""
    source = checkpoint or recipe.model.checkpoint
    try:
        if source is not None:
            raw = load_json(Path(source) / "config.json")
            model = load_model(source, dtype=torch.float32, device="cpu")
        else:
            config = recipe.model.config
            raw = dict(config) if isinstance(config, dict) else load_json(config)
            model = DeepseekVL2(model_config_from_dict(raw))
            init_weights(model, std=recipe.model.init_std, seed=recipe.seed)
    except (ConfigError, OSError, ValueError) as exc:
        raise TrainError(f"cannot build the model: {exc}") from exc
    raw = {**raw, "torch_dtype": "float32"}  # what save_model writes
    return model, raw


class LossModule(nn.Module):
    """The training forward as one module (what DDP and FSDP2 wrap): the summed next-token
    cross-entropy of the batch, the MoE auxiliary loss, the routed experts and, with `box_attention`,
    the box-attention loss and attention mass of `dsvl2.train.box_attention` and, with `token_relevance`,
    the loss and accuracy of `dsvl2.train.token_relevance` (each None without targets).

    With `touch_all`, a micro-batch without images still runs the vision tower on one blank
    tile, times zero: every rank then has a gradient (zero) for the same parameters, which DDP
    without unused-parameter search and FSDP2's collectives need.
    """

    def __init__(self, model: DeepseekVL2, touch_all: bool = False,
                 box_attention: BoxAttentionSection | None = None,
                 token_relevance: TokenRelevanceSection | None = None) -> None:
        super().__init__()
        self.model = model
        self.touch_all = touch_all
        self.box_attention = box_attention
        self.token_relevance = token_relevance
        self._attention_inputs: tuple = ()
        self._layer_output: torch.Tensor | None = None
        self._box_targets: list[BoxTarget] = []
        if box_attention is not None:
            attention = model.language.model.layers[box_attention.layer].self_attn
            attention.register_forward_hook(self._box_attention_hook)
        if token_relevance is not None:
            layer = model.language.model.layers[token_relevance.layer]
            layer.register_forward_hook(self._token_relevance_hook)

    def _token_relevance_hook(self, layer: nn.Module, args: tuple, output: tuple) -> None:
        self._layer_output = output[0]  # the decoder layer's hidden states

    def _box_attention_hook(self, attention: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        # The layer's inputs (normed hidden states, rotary tables, mask) give its attention weights.
        self._attention_inputs = args
        if self.box_attention is not None and self.box_attention.teacher_forced and self._box_targets:
            return force_box_attention(attention, *args[:3], output, self._box_targets, self.box_attention.heads)
        return None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                images: torch.Tensor, images_seq_mask: torch.Tensor, images_spatial_crop: torch.Tensor,
                box_targets: list[BoxTarget] | None = None,
                relevance: list[tuple[int, list[int], torch.Tensor]] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor], torch.Tensor | None,
                           torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        model = self.model
        embeds = model.embed_inputs(input_ids, images, images_seq_mask, images_spatial_crop)
        if self.touch_all and not bool(images_spatial_crop.any()):
            blank = images.new_zeros(1, *images.shape[2:])
            unused = model.encode_tiles(blank).sum() + model.image_newline.sum() + model.view_seperator.sum()
            embeds = embeds + 0.0 * unused.to(embeds.dtype)
        targets = labels[:, 1:]
        predicts = F.pad(targets != -100, (0, 1))  # positions whose next token is a label
        self._box_targets = box_targets or []
        try:
            out = model(inputs_embeds=embeds, attention_mask=attention_mask, logits_mask=predicts)
        finally:
            self._box_targets = []
        ce_sum = F.cross_entropy(out.logits.float(), targets[targets != -100], reduction="sum")
        box_loss = box_mass = None
        if self.box_attention is not None and box_targets:
            attention = model.language.model.layers[self.box_attention.layer].self_attn
            x, rope, mask = self._attention_inputs[:3]
            box_loss, mass = box_attention_loss(attention, x, rope, mask, box_targets, self.box_attention.heads,
                                                self.box_attention.choice_weight)
            box_mass = torch.tensor(mass)
        relevance_loss = relevance_accuracy = None
        if self.token_relevance is not None and relevance:
            scored = token_relevance_loss(self._layer_output, relevance)
            if scored is not None:
                relevance_loss, relevance_accuracy = scored[0], torch.tensor(scored[1])
        self._attention_inputs, self._layer_output = (), None
        return ce_sum, out.aux_loss, out.expert_indices, box_loss, box_mass, relevance_loss, relevance_accuracy


def _fsdp_wrap(loss_module: LossModule, dist_info: Distributed) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
    model = loss_module.model
    for block in model.vision.blocks:
        fully_shard(block, mesh=mesh)
    for layer in model.language.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(loss_module, mesh=mesh)
    return loss_module


def _batch_inputs(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "input_ids": batch.input_ids.to(device, non_blocking=True),
        "attention_mask": batch.attention_mask.to(device, non_blocking=True),
        "labels": batch.labels.to(device, non_blocking=True),
        "images": batch.images.to(device, non_blocking=True),
        "images_seq_mask": batch.images_seq_mask.to(device, non_blocking=True),
        "images_spatial_crop": batch.images_spatial_crop.to(device, non_blocking=True),
    }


# --------------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


class Trainer:
    """Builds everything a recipe describes; `train()` runs the steps and returns their records."""

    def __init__(self, recipe: TrainRecipe, resume: bool = False) -> None:
        if recipe.stage == "vision":
            raise TrainError("stage vision trains on per-patch labels: run it with dsvl2.train.dense.VisionStage "
                             "(`dsvl2 train` does)")
        self.recipe = recipe
        self.output_dir = Path(recipe.output.dir)
        self.dist = setup_distributed(recipe.training.device)
        torch.manual_seed(recipe.seed)
        random.seed(recipe.seed)
        np.random.seed(recipe.seed)
        resume_from = self._resume_checkpoint(resume)
        self.step = 0
        self.tokens_seen = 0
        self.history: list[dict[str, Any]] = []

        self.model, self.model_config = initial_model(recipe, resume_from)
        self.processor = self._processor()
        self.groups = configure_stage(self.model, recipe.stage, recipe.training.freeze)
        self.trainable = trainable_groups(recipe.stage, recipe.training.freeze)
        if recipe.training.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.moe = moe_layers(self.model)
        cfg = self.model.cfg.language
        self.n_experts = cfg.n_routed_experts or 0
        self.noaux = cfg.is_moe and cfg.topk_method == "noaux_tc"
        self.box_attention = self._check_box_attention()
        self.token_relevance = self._check_token_relevance()
        if resume_from is None and recipe.model.image_token_rms is not None:
            self._scale_image_tokens(recipe.model.image_token_rms)
        self.engine = self._wrap()
        # FSDP2 replaces the parameters by sharded ones: the optimiser must hold those.
        self.groups = configure_stage(self.model, recipe.stage, recipe.training.freeze)
        self.optimizer = build_optimizer(self.groups, recipe.optimizer)
        self.scheduler = build_scheduler(self.optimizer, recipe.schedule, recipe.training.steps)
        self.loader = TrainLoader(self._dataset())
        self.autocast = torch.autocast(self.dist.device.type, dtype=torch.bfloat16,
                                       enabled=recipe.training.dtype == "bfloat16")
        if resume_from is not None:
            self._load_state(resume_from)
        self._log_file = None
        self._tensorboard = None

    # ----------------------------------------------------------------------------- setup

    def _resume_checkpoint(self, resume: bool) -> Path | None:
        found = resumable_checkpoint(self.output_dir, resume)
        if self.dist.is_main:
            remove_stale_staging(self.output_dir)
        return found

    def _processor(self) -> Processor:
        recipe = self.recipe
        source = recipe.model.processor or recipe.model.checkpoint
        processor = load_processor(source)
        language = self.model.cfg.language
        if processor.tokenizer.vocab_size > language.vocab_size:
            raise TrainError(f"the tokenizer in {source} has {processor.tokenizer.vocab_size} tokens, "
                             f"more than the model's vocab_size {language.vocab_size}")
        mask_prompt = stage_mask_prompt(recipe.stage, recipe.data.mask_prompt)
        processor.config = dataclasses.replace(processor.config, mask_prompt=mask_prompt)
        processor.context_length = language.max_position_embeddings
        self.processor_source = Path(source)
        return processor

    def _dataset(self) -> TrainDataset:
        recipe, data = self.recipe, self.recipe.data
        sources = [DataSource(s.name, s.paths, s.weight) for s in data.sources]
        return TrainDataset(
            sources, self.processor, recipe.training.micro_batch_size, seed=recipe.seed, rank=self.dist.rank,
            world_size=self.dist.world_size, num_workers=data.num_workers, shuffle_buffer=data.shuffle_buffer,
            shuffle_shards=data.shuffle_shards, max_length=data.max_length,
            max_consecutive_bad=data.max_consecutive_bad,
        )

    def _scale_image_tokens(self, rms: float) -> None:
        """`model.image_token_rms`: measured on the stage's first micro-batches, drawn from a loader of
        their own so that training still starts with them."""
        loader = TrainLoader(self._dataset())
        batches = [next(loader).to(self.dist.device) for _ in range(SCALE_BATCHES)]
        del loader  # its worker processes end with it
        try:
            factor = scale_image_tokens(self.model.to(self.dist.device), batches, rms, self.dist.all_reduce_sum)
        except ValueError as exc:
            raise TrainError(str(exc)) from exc
        if self.dist.is_main:
            logger.info("image tokens scaled by %.4g to RMS %g", factor, rms)

    def _check_box_attention(self) -> BoxAttentionSection | None:
        box = self.recipe.training.box_attention
        if box is None:
            return None
        self._require_layer("box_attention", box.layer)
        cfg = self.model.cfg.language
        if max(box.heads) >= cfg.num_attention_heads:
            raise TrainError(f"training.box_attention.heads {list(box.heads)} name a head >= the "
                             f"{cfg.num_attention_heads} attention heads of the language model")
        self._require_global_view_first("box_attention")
        return box

    def _require_layer(self, option: str, layer: int) -> None:
        layers = self.model.cfg.language.num_hidden_layers
        if layer >= layers:
            raise TrainError(f"training.{option}.layer is {layer} but the language model has "
                             f"{layers} layers (0..{layers - 1})")

    def _require_global_view_first(self, option: str) -> None:
        # image_token_centres and the global-view tokens follow the layout with the global view first.
        if self.model.cfg.global_view_pos != "head":
            raise TrainError(f"training.{option} needs global_view_pos 'head' (the global view's tokens "
                             f"first); the model's config has {self.model.cfg.global_view_pos!r}")

    def _check_token_relevance(self) -> TokenRelevanceSection | None:
        relevance = self.recipe.training.token_relevance
        if relevance is None:
            return None
        self._require_layer("token_relevance", relevance.layer)
        self._require_global_view_first("token_relevance")
        return relevance

    def _wrap(self) -> nn.Module:
        distributed = self.dist.enabled
        loss_module = LossModule(self.model, touch_all=distributed, box_attention=self.box_attention,
                                 token_relevance=self.token_relevance)
        if distributed:
            keep_idle_experts_in_graph(self.model)
        if not distributed:
            return loss_module.to(self.dist.device)
        if self.recipe.training.strategy == "fsdp":
            return _fsdp_wrap(loss_module, self.dist)
        from torch.nn.parallel import DistributedDataParallel

        loss_module.to(self.dist.device)
        device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return DistributedDataParallel(loss_module, device_ids=device_ids, find_unused_parameters=False)

    @property
    def is_fsdp(self) -> bool:
        return self.dist.enabled and self.recipe.training.strategy == "fsdp"

    # ----------------------------------------------------------------------------- training

    def _sync_gradients(self, sync: bool):
        """Context of one micro-batch: gradients are reduced across ranks only on the last one."""
        if not self.dist.enabled or sync:
            if self.is_fsdp:
                self.engine.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.is_fsdp:
            self.engine.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.engine.no_sync()

    def _params(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def train_step(self) -> dict[str, Any]:
        """One optimiser step over `grad_accum` micro-batches; returns its log record."""
        recipe, device = self.recipe, self.dist.device
        started = time.perf_counter()
        batches = [next(self.loader) for _ in range(recipe.training.grad_accum)]
        local = torch.tensor([
            sum(int((b.labels[:, 1:] != -100).sum()) for b in batches),
            sum(int(b.attention_mask.sum()) for b in batches),
            sum(b.input_ids.shape[0] for b in batches),
        ], dtype=torch.float64)
        loss_tokens, tokens, samples = self.dist.all_reduce_sum(local).tolist()
        scale = self.dist.world_size / max(loss_tokens, 1.0)  # DDP/FSDP average over ranks
        ce_total = torch.zeros((), dtype=torch.float64)
        aux_total = torch.zeros((), dtype=torch.float64)
        box_total = torch.zeros(3, dtype=torch.float64)  # box-attention loss, mass, micro-batches with a box
        relevance_total = torch.zeros(3, dtype=torch.float64)  # token-relevance loss, accuracy, micro-batches
        counts = torch.zeros(len(self.moe), self.n_experts, dtype=torch.float64)
        self.engine.train()
        for i, batch in enumerate(batches):
            inputs = _batch_inputs(batch, device)
            if self.box_attention is not None or self.token_relevance is not None:
                inputs["box_targets"] = box_targets(batch, self.processor.tokenizer, self.processor.tile_size,
                                                    self.processor.tokens_per_side)
            if self.token_relevance is not None:
                inputs["relevance"] = batch_relevance_labels(batch, inputs["box_targets"], self.processor.tile_size,
                                                             self.processor.tokens_per_side)
            with self._sync_gradients(i == len(batches) - 1), self.autocast:
                ce_sum, aux, indices, box_loss, box_mass, relevance_loss, relevance_accuracy = self.engine(**inputs)
                loss = ce_sum * scale
                if aux is not None and recipe.training.aux_loss:
                    loss = loss + aux / len(batches)
                if box_loss is not None:
                    loss = loss + self.box_attention.weight * box_loss / len(batches)
                    box_total += torch.stack([box_loss.detach().double().cpu(), box_mass.double(),
                                              torch.ones((), dtype=torch.float64)])
                if relevance_loss is not None:
                    loss = loss + self.token_relevance.weight * relevance_loss / len(batches)
                    relevance_total += torch.stack([relevance_loss.detach().double().cpu(),
                                                    relevance_accuracy.double(), torch.ones((), dtype=torch.float64)])
            loss.backward()
            ce_total += ce_sum.detach().double().cpu()
            if aux is not None:
                aux_total += aux.detach().double().cpu() / len(batches)
            if self.moe:
                counts += expert_counts([ix.detach() for ix in indices], self.n_experts, batch.attention_mask)
        params = self._params()
        for param in params:  # an unused parameter steps like one with a zero gradient on every path
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        grad_norm = self._clip(params)
        self.optimizer.step()
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        reduced = self.dist.all_reduce_sum(torch.cat([ce_total.view(1), aux_total.view(1), box_total,
                                                      relevance_total, counts.reshape(-1)]))
        counts = reduced[8:].view_as(counts)
        if self.noaux and "language" in self.trainable and recipe.training.bias_update_rate > 0:
            update_correction_bias(self.model, counts.float(), recipe.training.bias_update_rate)
        self.step += 1
        self.tokens_seen += int(tokens)
        seconds = time.perf_counter() - started
        load = (counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)).tolist() if self.moe else []
        return {
            "step": self.step,
            "loss": float(reduced[0]) / max(loss_tokens, 1.0),
            "aux_loss": float(reduced[1]) / self.dist.world_size,
            **({"box_attention_loss": float(reduced[2]) / max(float(reduced[4]), 1.0),
                "box_attention_mass": float(reduced[3]) / max(float(reduced[4]), 1.0)} if self.box_attention else {}),
            **({"token_relevance_loss": float(reduced[5]) / max(float(reduced[7]), 1.0),
                "token_relevance_accuracy": float(reduced[6]) / max(float(reduced[7]), 1.0)}
               if self.token_relevance else {}),
            "lr": lrs,
            "grad_norm": grad_norm,
            "loss_tokens": int(loss_tokens),
            "tokens": int(tokens),
            "samples": int(samples),
            "tokens_per_s": tokens / seconds,
            "step_seconds": seconds,
            "expert_load": load,
            "skipped": self._skipped(),
        }

    def _clip(self, params: list[nn.Parameter]) -> float:
        max_norm = self.recipe.training.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def _skipped(self) -> dict[str, int]:
        local = self.loader.skipped()
        totals = self.dist.all_reduce_sum(torch.tensor([local.get(r, 0) for r in SKIP_REASONS], dtype=torch.float64))
        return {reason: int(n) for reason, n in zip(SKIP_REASONS, totals.tolist(), strict=True) if n}

    def train(self, stop_at: int | None = None) -> list[dict[str, Any]]:
        """Run to `training.steps` (or stop, with a checkpoint, after step `stop_at`)."""
        recipe = self.recipe
        end = recipe.training.steps if stop_at is None else min(stop_at, recipe.training.steps)
        progress = self._progress(end)
        saved_at = self.step
        try:
            while self.step < end:
                record = self.train_step()
                self.history.append(record)
                self._log(record, progress)
                if self.step % recipe.output.save_every == 0 or self.step == end:
                    self.save_checkpoint()
                    saved_at = self.step
            if saved_at != self.step:
                self.save_checkpoint()
        finally:
            if progress is not None:
                progress.close()
            self.close()
        return self.history

    # ----------------------------------------------------------------------------- logging

    def _progress(self, end: int):
        """A tqdm bar on rank 0 at a terminal; elsewhere (batch jobs) log lines replace it."""
        if not (self.dist.is_main and self.recipe.output.progress and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=end, initial=self.step, desc=f"{self.recipe.stage}", unit="step", dynamic_ncols=True)

    def _log(self, record: dict[str, Any], progress) -> None:
        if progress is not None:
            progress.update(1)
            lr = max(record["lr"].values())
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
        if not self.dist.is_main:
            return
        if record["step"] % self.recipe.output.log_every and record["step"] != self.recipe.training.steps:
            return
        if progress is None and self.recipe.output.progress:
            logger.info("step %d/%d loss %.4f lr %.3g tokens/s %.0f", record["step"], self.recipe.training.steps,
                        record["loss"], max(record["lr"].values()), record["tokens_per_s"])
        if self._log_file is None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.output_dir / LOG_FILE, "a", encoding="utf-8")  # noqa: SIM115
            self._tensorboard = self._open_tensorboard()
        self._log_file.write(json.dumps(record) + "\n")
        self._log_file.flush()
        if self._tensorboard is not None:
            step = record["step"]
            for key in ("loss", "aux_loss", "grad_norm", "tokens_per_s"):
                self._tensorboard.add_scalar(f"train/{key}", record[key], step)
            for name, lr in record["lr"].items():
                self._tensorboard.add_scalar(f"lr/{name}", lr, step)
            for layer, load in enumerate(record["expert_load"]):
                self._tensorboard.add_scalar(f"expert_load_max/moe{layer}", max(load) * len(load), step)

    def _open_tensorboard(self):
        if not self.recipe.output.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("output.tensorboard is true but the tensorboard package is not installed")
            return None
        return SummaryWriter(str(self.output_dir / "tensorboard"))

    def close(self) -> None:
        self.loader.close()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    # ----------------------------------------------------------------------------- checkpoints

    def _full_model_state(self) -> dict[str, torch.Tensor] | None:
        """Full float32 weights on rank 0 (None elsewhere); a collective under FSDP2."""
        if not self.is_fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.engine, options=options)
        return {name.removeprefix("model."): tensor for name, tensor in state.items()}

    def _optimizer_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.engine, self.optimizer, options=options)

    def save_checkpoint(self) -> Path:
        """Write `checkpoint-<step>` atomically (every rank must call it)."""
        model_state = self._full_model_state()
        optimizer_state = self._optimizer_state()
        data_states = self.dist.gather(self.loader.state_dict())
        rng_states = self.dist.gather(capture_rng())
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{self.step:07d}"
        if self.dist.is_main:
            weights = _NamedTensors(model_state) if model_state is not None else self.model
            state = {
                "step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.dist.world_size,
                "recipe": self.recipe.raw, "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                "data": data_states, "rng": rng_states,
            }
            write_checkpoint(self.output_dir, self.step, weights, self.model_config, self.processor_source, state,
                             self.recipe.output.keep_last)
        self.dist.barrier()
        return final

    def _load_state(self, checkpoint: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
        if state["world_size"] != self.dist.world_size:
            raise TrainError(f"{checkpoint} was written by {state['world_size']} processes, this run has "
                             f"{self.dist.world_size}: the data position cannot continue exactly")
        set_optimizer_state_dict(self.engine, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state["scheduler"])
        try:
            self.loader.load_state_dict(state["data"][self.dist.rank])
        except DataError as exc:
            raise TrainError(f"{checkpoint}: {exc}") from exc
        restore_rng(state["rng"][self.dist.rank])
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        if self.dist.is_main:
            truncate_log(self.output_dir / LOG_FILE, self.step)
        logger.info("resumed from %s at step %d", checkpoint, self.step)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dsvl2 train`."""
    parser.add_argument("config", type=Path, help="YAML training recipe (one per stage)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in the recipe's output.dir (if any)")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="stop after this step with a checkpoint (the schedule still spans training.steps)")


def run(args: argparse.Namespace) -> int:
    """Train as the parsed arguments say; returns an exit code (2 for a bad recipe or data)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        recipe = load_recipe(args.config)
        if recipe.stage == "vision":
            from dsvl2.train.dense import VisionStage  # it builds on this module

            trainer: Trainer | VisionStage = VisionStage(recipe, resume=args.resume)
        else:
            trainer = Trainer(recipe, resume=args.resume)
        history = trainer.train(stop_at=getattr(args, "stop_at", None))
    except (RecipeError, DataError, TrainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if history and (recipe.stage == "vision" or trainer.dist.is_main):
        last = history[-1]
        print(f"trained to step {last['step']}: loss {last['loss']:.4f}; checkpoints in {recipe.output.dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsvl2 train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
