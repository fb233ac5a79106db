"""`dsvl2 train RECIPE.yaml [--resume]`: one training stage of DeepSeek-VL2 from a YAML recipe.

The same command runs in one process or under `torchrun` (then DDP, or FSDP2 `fully_shard`
with `training.strategy: fsdp`; gloo on the CPU, NCCL on GPUs). Each optimiser step takes
`grad_accum` micro-batches of `micro_batch_size` samples per rank; the loss is the token-level
mean cross-entropy over the whole global batch (the sum over every rank's answer tokens divided
by their global count), so any split of the same global batch gives the same loss and gradients.

Checkpoints (`dsvl2.train.checkpoints`) hold the optimiser, scheduler, data position and RNG
states of every rank, so `--resume` continues the same loss curve. A recipe's extensions
(`dsvl2.train.extension`) add their losses to the step; a recipe's `trainer` replaces this one.
With an `adapter:` section only a LoRA adapter learns (dsvl2.train.adapters).
A record that cannot be used is skipped, counted in the log and listed in `skipped.jsonl` beside the
checkpoints (step, file and line, reason); with `--strict` (data.strict) it stops the run instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsvl2.model import DeepseekVL2
from dsvl2.processor import Batch, Processor
from dsvl2.train.adapters import GROUP, adapter_model, adapter_writer
from dsvl2.train.checkpoints import (
    CHECKPOINT_PREFIX,
    LOG_FILE,
    STATE_FILE,
    NamedTensors,
    remove_stale_staging,
    resumable_checkpoint,
    truncate_log,
    write_checkpoint,
)
from dsvl2.train.data import SKIP_REASONS, DataError, DataSource, FieldReader, TrainBatch, TrainDataset, TrainLoader
from dsvl2.train.distributed import Distributed, setup_distributed
from dsvl2.train.errors import TrainError
from dsvl2.train.extension import Extension
from dsvl2.train.recipe import RecipeError, TrainRecipe, load_recipe
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
from dsvl2.train.start import initial_model, load_processor

logger = logging.getLogger(__name__)
SKIPPED_FILE = "skipped.jsonl"  # beside the checkpoints: one line per record training could not use


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class LossOutput(NamedTuple):
    """One micro-batch's forward: the summed next-token cross-entropy, the MoE auxiliary loss, the
    routed experts of every MoE layer and, per extension, its (loss, metrics) or None."""

    ce_sum: torch.Tensor
    aux_loss: torch.Tensor | None
    expert_indices: list[torch.Tensor]
    extensions: list[tuple[torch.Tensor, dict[str, float]] | None]


class LossModule(nn.Module):
    """The training forward as one module (what DDP and FSDP2 wrap): the `LossOutput` of a batch,
    with each extension's loss computed from its targets after the model's forward.

    With `touch_all`, a micro-batch without images still runs the vision tower on one blank
    tile, times zero: every rank then has a gradient (zero) for the same parameters, which DDP
    without unused-parameter search and FSDP2's collectives need.
    """

    def __init__(self, model: DeepseekVL2, touch_all: bool = False, extensions: tuple[Extension, ...] = ()) -> None:
        super().__init__()
        self.model = model
        self.touch_all = touch_all
        self.extensions = extensions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                images: torch.Tensor, images_seq_mask: torch.Tensor, images_spatial_crop: torch.Tensor,
                targets: list[Any] | None = None) -> LossOutput:
        model = self.model
        embeds = model.embed_inputs(input_ids, images, images_seq_mask, images_spatial_crop)
        if self.touch_all and not bool(images_spatial_crop.any()):
            blank = images.new_zeros(1, *images.shape[2:])
            unused = model.encode_tiles(blank).sum() + model.image_newline.sum() + model.view_seperator.sum()
            embeds = embeds + 0.0 * unused.to(embeds.dtype)
        shifted = labels[:, 1:]
        predicts = F.pad(shifted != -100, (0, 1))  # positions whose next token is a label
        out = model(inputs_embeds=embeds, attention_mask=attention_mask, logits_mask=predicts)
        ce_sum = F.cross_entropy(out.logits.float(), shifted[shifted != -100], reduction="sum")
        targets = targets or [None] * len(self.extensions)
        scored = [None if target is None else extension.loss(target)
                  for extension, target in zip(self.extensions, targets, strict=True)]
        return LossOutput(ce_sum, out.aux_loss, out.expert_indices, scored)


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


def _extension_log(extensions: tuple[Extension, ...], totals: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """`<name>_loss` and `<name>_<metric>` of every extension with a loss: sums over ranks and micro-batches
    (the last entry counts those that had targets) divided by that count."""
    record = {}
    for extension, total in zip(extensions, totals, strict=True):
        if not extension.has_loss:
            continue
        count = max(float(total[-1]), 1.0)
        record[f"{extension.name}_loss"] = float(total[0]) / count
        for name, value in zip(extension.metrics, total[1:-1].tolist(), strict=True):
            record[f"{extension.name}_{name}"] = value / count
    return record


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
            raise TrainError("stage vision has no next-token loss: its recipe names the trainer that teaches the "
                             "vision tower (`trainer: {use: ...}`), which `dsvl2 train` runs")
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

        if recipe.adapter is not None:
            self.model, self.model_config, self.groups = adapter_model(recipe, resume_from)
            self.trainable = (GROUP,)
        else:
            self.model, self.model_config = initial_model(recipe, resume_from)
            self.groups = configure_stage(self.model, recipe.stage, recipe.training.freeze)
            self.trainable = trainable_groups(recipe.stage, recipe.training.freeze)
        self.processor = self._processor()
        if recipe.training.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.moe = moe_layers(self.model)
        cfg = self.model.cfg.language
        self.n_experts = cfg.n_routed_experts or 0
        self.noaux = cfg.is_moe and cfg.topk_method == "noaux_tc"
        self.extensions = self._extensions(resume_from is None)
        self.engine = self._wrap()
        if recipe.adapter is None:  # FSDP2 replaces the parameters by sharded ones: the optimiser must hold those.
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
        sources = [DataSource(s.name, s.paths, s.weight, s.format, s.image_root) for s in data.sources]
        return TrainDataset(
            sources, self.processor, recipe.training.micro_batch_size, seed=recipe.seed, rank=self.dist.rank,
            world_size=self.dist.world_size, num_workers=data.num_workers, shuffle_buffer=data.shuffle_buffer,
            shuffle_shards=data.shuffle_shards, max_length=data.max_length,
            max_consecutive_bad=data.max_consecutive_bad, fields=self._fields(),
        )

    def _extensions(self, fresh: bool) -> tuple[Extension, ...]:
        """The recipe's extensions, attached to the model and, on a fresh start, begun."""
        extensions = tuple(plugin.build() for plugin in self.recipe.extensions)
        for extension in extensions:
            extension.attach(self.model, self.processor)
        if fresh and extensions:
            self.model.to(self.dist.device)
            for extension in extensions:
                batches = self._first_batches()
                try:
                    extension.begin(self.model, batches, self.dist.all_reduce_sum)
                finally:
                    batches.close()
        return extensions

    def _first_batches(self) -> Iterator[TrainBatch]:
        """The stage's first micro-batches (on the device), from a loader of their own so that training
        still starts with them; the loader and its workers end when the iterator is closed."""
        loader = TrainLoader(self._dataset())
        try:
            while True:
                yield next(loader).to(self.dist.device)
        finally:
            loader.close()

    def _fields(self) -> dict[str, FieldReader]:
        """The record fields the extensions read; two readers of one key must be the same."""
        fields: dict[str, FieldReader] = {}
        for plugin in self.recipe.extensions:
            for key, read in plugin.factory.fields.items():
                if fields.setdefault(key, read) is not read:
                    raise TrainError(f"two extensions read the record field {key!r} in different ways")
        return fields

    def _wrap(self) -> nn.Module:
        distributed = self.dist.enabled
        loss_module = LossModule(self.model, touch_all=distributed, extensions=self.extensions)
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
        skipped = self.loader.take_skipped_records()
        local = torch.tensor([
            sum(int((b.labels[:, 1:] != -100).sum()) for b in batches),
            sum(int(b.attention_mask.sum()) for b in batches),
            sum(b.input_ids.shape[0] for b in batches),
            len(skipped),
        ], dtype=torch.float64)
        loss_tokens, tokens, samples, any_skipped = self.dist.all_reduce_sum(local).tolist()
        if any_skipped:  # every rank knows, so all take part in the gather
            self._record_skipped(skipped)
        scale = self.dist.world_size / max(loss_tokens, 1.0)  # DDP/FSDP average over ranks
        ce_total = torch.zeros((), dtype=torch.float64)
        aux_total = torch.zeros((), dtype=torch.float64)
        # Per extension: its loss, each of its metrics, and the micro-batches that had targets.
        extension_totals = [torch.zeros(len(e.metrics) + 2, dtype=torch.float64) for e in self.extensions]
        counts = torch.zeros(len(self.moe), self.n_experts, dtype=torch.float64)
        self.engine.train()
        for i, batch in enumerate(batches):
            inputs = _batch_inputs(batch, device)
            if self.extensions:
                inputs["targets"] = [extension.targets(batch) for extension in self.extensions]
            with self._sync_gradients(i == len(batches) - 1), self.autocast:
                out = self.engine(**inputs)
                loss = out.ce_sum * scale
                if out.aux_loss is not None and recipe.training.aux_loss:
                    loss = loss + out.aux_loss / len(batches)
                for extension, total, scored in zip(self.extensions, extension_totals, out.extensions, strict=True):
                    if scored is None:
                        continue
                    extension_loss, metrics = scored
                    loss = loss + extension.weight * extension_loss / len(batches)
                    total += torch.tensor([float(extension_loss.detach()), *(metrics[m] for m in extension.metrics),
                                           1.0], dtype=torch.float64)
            loss.backward()
            ce_total += out.ce_sum.detach().double().cpu()
            if out.aux_loss is not None:
                aux_total += out.aux_loss.detach().double().cpu() / len(batches)
            if self.moe:
                counts += expert_counts([ix.detach() for ix in out.expert_indices], self.n_experts,
                                        batch.attention_mask)
        params = self._params()
        for param in params:  # an unused parameter steps like one with a zero gradient on every path
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        grad_norm = self._clip(params)
        self.optimizer.step()
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        reduced = self.dist.all_reduce_sum(torch.cat([ce_total.view(1), aux_total.view(1), *extension_totals,
                                                      counts.reshape(-1)]))
        ce_reduced, aux_reduced = float(reduced[0]), float(reduced[1])
        extension_reduced = reduced[2:2 + sum(len(t) for t in extension_totals)].split(
            [len(t) for t in extension_totals])
        counts = reduced[2 + sum(len(t) for t in extension_totals):].view_as(counts)
        if self.noaux and "language" in self.trainable and recipe.training.bias_update_rate > 0:
            update_correction_bias(self.model, counts.float(), recipe.training.bias_update_rate)
        self.step += 1
        self.tokens_seen += int(tokens)
        seconds = time.perf_counter() - started
        load = (counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)).tolist() if self.moe else []
        return {
            "step": self.step,
            "loss": ce_reduced / max(loss_tokens, 1.0),
            "aux_loss": aux_reduced / self.dist.world_size,
            **_extension_log(self.extensions, extension_reduced),
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

    def _record_skipped(self, skipped: list[dict[str, Any]]) -> None:
        """Append this step's skipped records (of every rank) to skipped.jsonl; with data.strict, stop."""
        records = [{"step": self.step + 1, **record} for rank in self.dist.gather(skipped) for record in rank]
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / SKIPPED_FILE, "a", encoding="utf-8") as file:
                file.writelines(json.dumps(record) + "\n" for record in records)
            logger.warning("step %d: skipped %d record(s), listed in %s", self.step + 1, len(records),
                           self.output_dir / SKIPPED_FILE)
        if self.recipe.data.strict:
            first = records[0]
            raise DataError(f"{first['where']}: {first['message']} ({first['reason']}); stopped because of "
                            f"--strict (data.strict); {len(records)} record(s) of step {first['step']} unusable")

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
            weights = NamedTensors(model_state) if model_state is not None else self.model
            state = {
                "step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.dist.world_size,
                "recipe": self.recipe.raw, "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                "data": data_states, "rng": rng_states,
            }
            writer = adapter_writer(self.model, self.recipe) if self.recipe.adapter is not None else None
            write_checkpoint(self.output_dir, self.step, weights, self.model_config, self.processor_source, state,
                             self.recipe.output.keep_last, writer=writer)
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
            truncate_log(self.output_dir / SKIPPED_FILE, self.step)
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
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first record that cannot be used (default: skip it, listed in "
                             "output.dir/skipped.jsonl)")


def run(args: argparse.Namespace) -> int:
    """Train as the parsed arguments say; returns an exit code (2 for a bad recipe or data)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main_rank = True
    try:
        recipe = load_recipe(args.config)
        if getattr(args, "strict", False):
            recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, strict=True))
        if recipe.trainer is not None:  # the recipe's own trainer for this stage
            trainer = recipe.trainer.build(recipe, resume=args.resume)
        else:
            trainer = Trainer(recipe, resume=args.resume)
        history = trainer.train(stop_at=getattr(args, "stop_at", None))
    except (RecipeError, DataError, TrainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            main_rank = dist.get_rank() == 0
            dist.destroy_process_group()
    if history and main_rank:
        last = history[-1]
        print(f"trained to step {last['step']}: loss {last['loss']:.4f}; checkpoints in {recipe.output.dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsvl2 train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
