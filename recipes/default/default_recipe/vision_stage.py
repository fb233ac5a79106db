"""Stage vision: the vision tower and the projector learn per-patch labels that the synthetic renderer knows.

A small tower trained from scratch inside the language model's loss never learns where things are (the
language model's attention starts as a mean over the image tokens, and a mean keeps no position), so this
stage teaches every projector token what lies under its patches and where, before the language model
exists. The recipe names `VisionStage` as its `trainer:`; what it measured is in recipes/default/NOTES.md.

Only the views that show the whole image are trained on scenes: the global view, and the local tile of
a one-tile grid (a tile of a grid of several cannot know where it sits, every tile having the same
position embeddings). Records are the synthetic generator's: an image and `objects` with `shape`,
`color`, `box` (0-999) and `box_px` (shape scenes), or `chars` (OCR images and charts, for reading,
with `text_micro_batch_size` of them per step). Other records are skipped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from default_recipe.vision_heads import TokenHeads
from default_recipe.vision_labels import (
    IGNORE,
    DrawnPiece,
    PatchLabels,
    SceneLabels,
    TextLabels,
    drawn_pieces,
    group_by_token,
    patch_labels,
    scene_labels,
    text_labels,
    whole_image_views,
)
from dsvl2.images import load_image
from dsvl2.loading import DeviceError, choose_device
from dsvl2.processor import ASSISTANT_ROLE
from dsvl2.tokenizer import Tokenizer
from dsvl2.train.checkpoints import (
    LOG_FILE,
    STATE_FILE,
    remove_stale_staging,
    resumable_checkpoint,
    truncate_log,
    write_checkpoint,
)
from dsvl2.train.data import find_shards
from dsvl2.train.errors import TrainError
from dsvl2.train.recipe import TrainRecipe
from dsvl2.train.stages import build_optimizer, build_scheduler, configure_stage
from dsvl2.train.start import initial_model, load_processor

logger = logging.getLogger(__name__)


def sincos_position_table(grid: int, width: int) -> torch.Tensor:
    """[grid*grid, width] fixed 2D sine-cosine codes (x in the first half, y in the second)."""
    quarter = width // 4
    frequencies = 1.0 / (100 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")

    def encode(values: torch.Tensor) -> torch.Tensor:
        angles = values.flatten()[:, None] * frequencies[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    table = torch.cat([encode(xs), encode(ys)], dim=-1)
    return F.pad(table, (0, width - table.shape[1]))



@dataclass(frozen=True)
class _Record:
    image: Path
    objects: tuple[dict[str, Any], ...]
    pieces: tuple[DrawnPiece, ...]


def read_vision_records(paths: Sequence[Path], tokenizer: Tokenizer | None, start: int, end: int) -> list[_Record]:
    """Every record with an image and `objects` (shape scenes) or, given a tokenizer, `chars` (drawn text,
    read into `DrawnPiece`s; `start` and `end` as in `drawn_pieces`) in the sources' JSON Lines files, in
    file order."""
    records = []
    for shard in find_shards(paths):
        with shard.open(encoding="utf-8") as lines:
            for line in lines:
                record = json.loads(line) if line.strip() else {}
                reads = tokenizer is not None and bool(record.get("chars"))
                if (record.get("objects") or reads) and record.get("images"):
                    pieces = drawn_pieces(record, tokenizer, start, end) if reads else ()
                    records.append(_Record(shard.parent / record["images"][0], tuple(record.get("objects") or ()),
                                           pieces))
    return records


def _check_supported(recipe: TrainRecipe, text_micro_batch_size: int) -> None:
    """This stage is small: one process, float32, one micro-batch per step. Refuse what it would ignore."""
    if recipe.stage != "vision":
        raise TrainError(f"VisionStage trains stage vision; the recipe's stage is {recipe.stage}")
    if recipe.extensions:
        raise TrainError("stage vision takes no extensions: it has no language model loss to add them to")
    if text_micro_batch_size < 0:
        raise TrainError(f"trainer.text_micro_batch_size must be >= 0, got {text_micro_batch_size}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainError("stage vision runs in one process; start it without torchrun")
    unsupported = {"training.grad_accum": (recipe.training.grad_accum, 1),
                   "training.dtype": (recipe.training.dtype, "float32"),
                   "training.activation_checkpointing": (recipe.training.activation_checkpointing, False)}
    for key, (value, supported) in unsupported.items():
        if value != supported:
            raise TrainError(f"stage vision supports only {key}: {supported!r}, the recipe has {value!r}")


class VisionStage:
    """Trains the vision tower and the projector on `PatchLabels` (grouped by projector token) with the
    recipe's optimiser, schedule and checkpoints; `text_micro_batch_size` images of text per step join the
    `training.micro_batch_size` scenes (0: no reading labels, no reading head).

    A checkpoint is a whole model (what the next stage starts from; freezing `vision` and `projector`
    there keeps what this stage taught them) plus the heads and optimiser state; the
    micro-batch of step i depends only on the seed and i, so a resumed run sees the same data.
    """

    def __init__(self, recipe: TrainRecipe, resume: bool = False, text_micro_batch_size: int = 0) -> None:
        _check_supported(recipe, text_micro_batch_size)
        self.recipe = recipe
        self.text_micro_batch_size = text_micro_batch_size
        try:
            self.device = choose_device(recipe.training.device, 0)
        except DeviceError as exc:
            raise TrainError(f"training.device: {exc}") from exc
        self.output_dir = Path(recipe.output.dir)
        found = resumable_checkpoint(self.output_dir, resume)
        remove_stale_staging(self.output_dir)
        torch.manual_seed(recipe.seed)
        self.model, self.model_config = initial_model(recipe, found)
        if found is None and recipe.model.checkpoint is None:
            cfg = self.model.cfg.vision
            with torch.no_grad():
                self.model.vision.pos_embed.copy_(sincos_position_table(cfg.grid, cfg.width)[None])
        self.processor_source = Path(recipe.model.processor or recipe.model.checkpoint)
        self.processor = load_processor(self.processor_source)
        tokenizer = self.processor.tokenizer
        # A reading starts where the answer does: after the prompt's last token (the assistant's colon).
        self.read_start = tokenizer.encode(f"{ASSISTANT_ROLE}:")[-1]
        reading = text_micro_batch_size > 0
        records = read_vision_records([p for s in recipe.data.sources for p in s.paths],
                                      tokenizer if reading else None, self.read_start, tokenizer.eos_id)
        self.scenes = [record for record in records if record.objects]
        self.texts = [record for record in records if record.pieces and not record.objects]
        if not self.scenes:
            raise TrainError("stage vision: no record in data.sources has `objects` (synthetic shape scenes)")
        if reading and not self.texts:
            raise TrainError("stage vision: trainer.text_micro_batch_size is set, but no record in data.sources "
                             "draws text (`chars`: OCR images, charts)")
        self.no_text = self.model.cfg.language.vocab_size
        self.model.to(self.device)
        cfg = self.model.cfg
        self.merge_ratio = cfg.patches_per_token_side
        text_classes = self.no_text + 1 if reading else 0
        self.heads = TokenHeads(cfg.projector.n_embed, self.merge_ratio**2, text_classes).to(self.device)
        groups = configure_stage(self.model, "vision", recipe.training.freeze)
        groups["heads"] = list(self.heads.named_parameters())
        self.optimizer = build_optimizer(groups, recipe.optimizer)
        self.scheduler = build_scheduler(self.optimizer, recipe.schedule, recipe.training.steps)
        self.step = 0
        if found is not None:
            state = torch.load(found / STATE_FILE, map_location=self.device, weights_only=True)
            self.heads.load_state_dict(state["heads"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = state["step"]
            truncate_log(self.output_dir / LOG_FILE, self.step)
            logger.info("resumed from %s at step %d", found, self.step)

    def micro_batch(self, step: int) -> tuple[torch.Tensor, PatchLabels, SceneLabels, TextLabels]:
        """Normalised tiles [N, 3, S, S] of the step's records, their patch and text labels grouped by
        projector token, and their scene labels. A shape scene gives the views that show all of it
        (`whole_image_views`); an image of text gives every view, as reading is local."""
        picks = [self.scenes[i] for i in random.Random(self.recipe.seed * 1_000_003 + step).sample(
            range(len(self.scenes)), min(self.recipe.training.micro_batch_size, len(self.scenes)))]
        reads = min(self.text_micro_batch_size, len(self.texts))
        picks += [self.texts[i] for i in random.Random((self.recipe.seed * 1_000_003 + step) * 7 + 1).sample(
            range(len(self.texts)), reads)]
        size, patch = self.processor.tile_size, self.processor.config.patch_size
        tiles, labels, scenes, texts = [], [], [], []
        for record in picks:
            image = load_image(record.image)
            tiled = self.processor.tile_image(image)
            best_width, best_height = tiled.num_width_tiles * size, tiled.num_height_tiles * size
            whole = whole_image_views(best_width, best_height, size)
            views = whole if record.objects else tiled.tiles.shape[0]
            tiles.append(self.processor.normalize(tiled.tiles[:views]))
            full = patch_labels(record.objects, image.width, image.height, best_width, best_height, size, patch)
            labels.append(PatchLabels(full.colour[:views], full.shape[:views], full.box[:views]))
            scenes.append(scene_labels(record.objects, views, whole if record.objects else 0))
            if record.objects:  # no reading targets on scenes: their tokens need not say "no text"
                texts.append(TextLabels(*torch.full((3, views, full.colour.shape[1]), IGNORE, dtype=torch.long)))
            else:
                texts.append(text_labels(record.pieces, image.width, image.height, best_width, best_height, size,
                                         patch, self.no_text))
        grid = self.model.cfg.vision.grid

        def grouped(parts: list[torch.Tensor], fill: int) -> torch.Tensor:
            return group_by_token(torch.cat(parts), grid, self.merge_ratio, fill)

        return (torch.cat(tiles),
                PatchLabels(grouped([x.colour for x in labels], 0), grouped([x.shape for x in labels], 0),
                            grouped([x.box for x in labels], IGNORE)),
                SceneLabels(torch.cat([x.counts for x in scenes]), torch.cat([x.pair_box for x in scenes])),
                TextLabels(*(grouped([getattr(x, name) for x in texts], IGNORE) for name in ("piece", "prev", "next"))))

    def train_step(self, batch: tuple[torch.Tensor, PatchLabels, SceneLabels, TextLabels] | None = None
                   ) -> dict[str, Any]:
        """One optimiser step on `batch`, which must be `micro_batch(self.step)` (made here if None)."""
        start = time.perf_counter()
        self.model.train()
        tiles, labels, scene, text = batch if batch is not None else self.micro_batch(self.step)
        labels = PatchLabels(*(t.to(self.device) for t in (labels.colour, labels.shape, labels.box)))
        scene = SceneLabels(scene.counts.to(self.device), scene.pair_box.to(self.device))
        text = TextLabels(*(t.to(self.device) for t in (text.piece, text.prev, text.next)))
        loss, metrics = self.heads.loss(self.model.encode_tiles(tiles.to(self.device)), labels, scene, text)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        limit = self.recipe.training.max_grad_norm
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit if limit else math.inf))
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {"step": self.step, "loss": float(loss.detach()), "grad_norm": grad_norm,
                "lr": {g["name"]: g["lr"] for g in self.optimizer.param_groups},
                "tiles": int(tiles.shape[0]), "seconds": time.perf_counter() - start, **metrics}

    def train(self, stop_at: int | None = None) -> list[dict[str, Any]]:
        end = self.recipe.training.steps if stop_at is None else min(stop_at, self.recipe.training.steps)
        history = []
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / LOG_FILE, "a", encoding="utf-8") as log, ThreadPoolExecutor(1) as worker:
            # The next micro-batch is decoded, tiled and labelled while this step computes: that work is
            # 40% of a step, and PIL and torch both release the GIL (0.42 -> 0.36 s per step on 2 cores).
            upcoming = worker.submit(self.micro_batch, self.step)
            while self.step < end:
                batch = upcoming.result()
                if self.step + 1 < end:
                    upcoming = worker.submit(self.micro_batch, self.step + 1)
                record = self.train_step(batch)
                history.append(record)
                if self.step % self.recipe.output.log_every == 0 or self.step == end:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    reading = f" text {record['text_accuracy']:.3f}" if "text_accuracy" in record else ""
                    logger.info("step %d/%d loss %.4f box bins %.3f colour %.3f kind %.3f counts %.3f%s",
                                self.step, self.recipe.training.steps, record["loss"], record["box_bin_accuracy"],
                                record["colour_accuracy"], record["kind_accuracy"], record["count_accuracy"],
                                reading)
                if self.step % self.recipe.output.save_every == 0 or self.step == end:
                    self.save_checkpoint()
        return history

    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "recipe": self.recipe.raw, "heads": self.heads.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        return write_checkpoint(self.output_dir, self.step, self.model, self.model_config, self.processor_source,
                                state, self.recipe.output.keep_last)
