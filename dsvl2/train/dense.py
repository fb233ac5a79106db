"""Stage `vision`: the vision tower and the projector learn per-patch labels that the synthetic renderer knows.

DeepSeek-VL2 starts from a pretrained SigLIP. A small tower trained from scratch inside the language
model's loss never learns to say *where* things are: the language model reads image tokens through
attention, which starts as a mean over them, and a mean keeps no position. Here every projector token
is taught, for each patch it merges, the colour and shape of the object under the patch centre and that
object's box, in bins of the 0-999 grounding coordinates, and, about the whole image, how many shapes of
each colour, kind and (colour, kind) pair it holds and where each pair that occurs once sits. The tokens
the language model receives then carry their object's box in a form one linear map reads, and the
language model has only to find them and copy it.

Only the views that show the whole image are trained: the global view, and the local tile of a one-tile
grid. A tile of a grid of several cannot know where it sits in the image (every tile has the same
position embeddings), so image-wide boxes and counts are unlearnable there.

The labels sit on the projector's output, not on the tower's: measured on the default model's geometry
(192 px tiles, 16 px patches, global views, 1,200 steps of 16 scenes), a language model then trained
for 600 steps on one-object grounding, with tower and projector frozen, placed 68% of held-out boxes at
IoU >= 0.5. With the same labels on the tower's patches and a fresh projector it placed 31%; without
this stage, 2-7%. This stage on the default recipe's data, 1,200 steps of about 8 min on 2 CPU cores:
every tile of 6 records per step with patch labels, 45%; boxes on whole-image views only, 47%; scene
labels added, 47% (and counting on scenes of several shapes 0.50 against 0.41); only the whole-image
views of 12 records per step, 50%. Fresh towers start from 2D sine-cosine position
embeddings (box bins right for 34% of object patches after 300 steps, against 8% with learned ones). On
scenes of several shapes, choosing *which* object the words name still has to be learned by the
language model.

Records are the synthetic generator's: an image and `objects` with `shape`, `color`, `box` (0-999)
and `box_px`. Records without objects (text, OCR, charts) are skipped.
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
from torch import nn

from dsvl2.images import load_image
from dsvl2.train.data import find_shards
from dsvl2.train.recipe import TrainRecipe
from dsvl2.train.stages import build_optimizer, build_scheduler, configure_stage
from dsvl2.train.synthetic import SHAPE_COLORS, SHAPE_KINDS
from dsvl2.train.trainer import (
    LOG_FILE,
    STATE_FILE,
    TrainError,
    initial_model,
    load_processor,
    pick_device,
    remove_stale_staging,
    resumable_checkpoint,
    truncate_log,
    write_checkpoint,
)
from dsvl2.vision.tiling import pad_geometry, tile_counts

logger = logging.getLogger(__name__)

BOX_BINS = 20  # of the 0-999 grounding coordinates: 50 units, a tenth of the smallest shape's side at most
IGNORE = -100
COLOURS = tuple(SHAPE_COLORS)
PAIRS = tuple((colour, kind) for colour in COLOURS for kind in SHAPE_KINDS)
MAX_COUNT = 7  # the most shapes a synthetic scene holds


@dataclass(frozen=True)
class PatchLabels:
    """Per-patch targets of one image's tiles (global view first), each [tiles, patches(, 4)], or
    [tiles, tokens, patches per token(, 4)] once grouped by projector token: colour and shape ids
    (0 = no object) and box bins (IGNORE where no object)."""

    colour: torch.Tensor
    shape: torch.Tensor
    box: torch.Tensor


@dataclass(frozen=True)
class SceneLabels:
    """Per-view targets about the whole image, taught to every token of the view: `counts` [views,
    colours + kinds + 1 + pairs] (shapes of each colour, of each kind, in all, of each (colour, kind) pair,
    capped at MAX_COUNT) and `pair_box` [views, pairs, 4] (box bins of a pair that occurs once, IGNORE
    otherwise). IGNORE on views that do not show the whole image."""

    counts: torch.Tensor
    pair_box: torch.Tensor


def _view_patch_centres(tile_size: int, patch_size: int) -> list[float]:
    grid = tile_size // patch_size
    return [(i + 0.5) * patch_size for i in range(grid)]


def patch_labels(objects: Sequence[dict[str, Any]], width: int, height: int, best_width: int, best_height: int,
                 tile_size: int, patch_size: int) -> PatchLabels:
    """Labels of every patch of the global view and the local tiles: the object whose pixel box holds
    the patch centre, mapped back through the padding that `Processor.tile_image` applies. Box bins only
    on views that show the whole image (the global view; the local tile of a one-tile grid)."""
    centres = _view_patch_centres(tile_size, patch_size)
    views = [(pad_geometry(width, height, tile_size, tile_size), 0, 0)]
    local = pad_geometry(width, height, best_width, best_height)
    columns, rows = tile_counts(best_width, best_height, tile_size)
    views += [(local, column * tile_size, row * tile_size) for row in range(rows) for column in range(columns)]
    whole = whole_image_views(best_width, best_height, tile_size)
    n = len(centres) ** 2
    colour = torch.zeros(len(views), n, dtype=torch.long)
    shape = torch.zeros(len(views), n, dtype=torch.long)
    box = torch.full((len(views), n, 4), IGNORE, dtype=torch.long)
    for v, (geometry, offset_x, offset_y) in enumerate(views):
        if geometry.scaled_width == 0 or geometry.scaled_height == 0:
            continue
        sx, sy = width / geometry.scaled_width, height / geometry.scaled_height
        for p, (cy, cx) in enumerate((cy, cx) for cy in centres for cx in centres):
            x = (offset_x + cx - geometry.left) * sx
            y = (offset_y + cy - geometry.top) * sy
            for obj in objects:
                x1, y1, x2, y2 = obj["box_px"]
                if x1 <= x <= x2 and y1 <= y <= y2:
                    colour[v, p] = 1 + COLOURS.index(obj["color"])
                    shape[v, p] = 1 + SHAPE_KINDS.index(obj["shape"])
                    if v < whole:
                        box[v, p] = torch.tensor(_box_bins(obj["box"]))
                    break
    return PatchLabels(colour, shape, box)


def scene_labels(objects: Sequence[dict[str, Any]], views: int, whole_views: int) -> SceneLabels:
    """`SceneLabels` of an image cut into `views` tiles of which the first `whole_views` show it all
    (the global view, and the local tile when the grid has one)."""
    colours = [sum(o["color"] == c for o in objects) for c in COLOURS]
    kinds = [sum(o["shape"] == k for o in objects) for k in SHAPE_KINDS]
    pairs = [sum((o["color"], o["shape"]) == pair for o in objects) for pair in PAIRS]
    counts = torch.full((views, len(colours) + len(kinds) + 1 + len(pairs)), IGNORE, dtype=torch.long)
    counts[:whole_views] = torch.tensor([*colours, *kinds, len(objects), *pairs]).clamp(max=MAX_COUNT)
    pair_box = torch.full((views, len(PAIRS), 4), IGNORE, dtype=torch.long)
    for obj in objects:
        index = PAIRS.index((obj["color"], obj["shape"]))
        if pairs[index] == 1:
            pair_box[:whole_views, index] = torch.tensor(_box_bins(obj["box"]))
    return SceneLabels(counts, pair_box)


def _box_bins(box: Sequence[int]) -> list[int]:
    return [min(BOX_BINS - 1, c * BOX_BINS // 1000) for c in box]


def whole_image_views(best_width: int, best_height: int, tile_size: int) -> int:
    """How many of an image's tiles show all of it: the global view, and the local tile of a one-tile
    grid. A local tile of a grid of several cannot see where it sits in the image (every tile has the same
    position embeddings), so image-wide targets (boxes, counts) are unlearnable there."""
    columns, rows = tile_counts(best_width, best_height, tile_size)
    return 2 if columns * rows == 1 else 1


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


def group_by_token(labels: torch.Tensor, grid: int, ratio: int, fill: int) -> torch.Tensor:
    """[tiles, grid*grid(, 4)] patch labels -> [tiles, tokens, ratio*ratio(, 4)]: the labels of the
    patches each projector token merges, with the grid padded at the bottom and right by `fill`
    exactly as `pixel_shuffle` pads it (patches within a token in row-major order)."""
    tiles, rest = labels.shape[0], labels.shape[2:]
    side = -(-grid // ratio) * ratio
    padded = labels.new_full((tiles, side, side, *rest), fill)
    padded[:, :grid, :grid] = labels.view(tiles, grid, grid, *rest)
    blocks = padded.view(tiles, side // ratio, ratio, side // ratio, ratio, *rest).transpose(2, 3)
    return blocks.reshape(tiles, (side // ratio) ** 2, ratio * ratio, *rest)


class TokenHeads(nn.Module):
    """Linear read-outs of the projector's tokens (what the language model reads): each token names
    the colour, shape and box bins of every patch it merges, and the `SceneLabels` of its view. Used by
    this stage only, never saved in the model."""

    def __init__(self, hidden: int, patches_per_token: int) -> None:
        super().__init__()
        self.patches = patches_per_token
        self.colour = nn.Linear(hidden, patches_per_token * (len(COLOURS) + 1))
        self.shape = nn.Linear(hidden, patches_per_token * (len(SHAPE_KINDS) + 1))
        self.box = nn.Linear(hidden, patches_per_token * 4 * BOX_BINS)
        self.counts = nn.Linear(hidden, (len(COLOURS) + len(SHAPE_KINDS) + 1 + len(PAIRS)) * (MAX_COUNT + 1))
        self.pair_box = nn.Linear(hidden, len(PAIRS) * 4 * BOX_BINS)

    def loss(self, tokens: torch.Tensor, labels: PatchLabels, scene: SceneLabels
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Summed cross-entropies over tokens [tiles, T, hidden], patch labels already grouped by token
        and per-tile scene labels; the box-bin accuracy on object patches and the count accuracy."""
        colour = self.colour(tokens).unflatten(-1, (self.patches, -1))
        shape = self.shape(tokens).unflatten(-1, (self.patches, -1))
        box = self.box(tokens).unflatten(-1, (self.patches, 4, BOX_BINS))
        counts = self.counts(tokens).unflatten(-1, (scene.counts.shape[1], MAX_COUNT + 1))
        pair_box = self.pair_box(tokens).unflatten(-1, (len(PAIRS) * 4, BOX_BINS))
        per_token = tokens.shape[1]
        count_labels = scene.counts[:, None].expand(-1, per_token, -1)
        losses = (F.cross_entropy(colour.flatten(0, 2), labels.colour.flatten()),
                  F.cross_entropy(shape.flatten(0, 2), labels.shape.flatten()),
                  _masked_cross_entropy(box.reshape(-1, BOX_BINS), labels.box.flatten()),
                  _masked_cross_entropy(counts.flatten(0, 2), count_labels.flatten()),
                  _masked_cross_entropy(pair_box.flatten(0, 2),
                                        scene.pair_box.flatten(1)[:, None].expand(-1, per_token, -1).flatten()))
        on_object = labels.box != IGNORE
        hits = (box.argmax(-1) == labels.box)[on_object]
        counted = count_labels != IGNORE
        count_hits = (counts.argmax(-1) == count_labels)[counted]
        return sum(losses), {"box_bin_accuracy": float(hits.float().mean()) if hits.numel() else 0.0,
                             "count_accuracy": float(count_hits.float().mean()) if count_hits.numel() else 0.0}


def _masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the targets that are not IGNORE; zero (not NaN) when there are none."""
    if not (targets != IGNORE).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets, ignore_index=IGNORE)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    image: Path
    objects: tuple[dict[str, Any], ...]


def read_object_records(paths: Sequence[Path]) -> list[_Record]:
    """Every record with an image and `objects` in the sources' JSON Lines files, in file order."""
    records = []
    for shard in find_shards(paths):
        with shard.open(encoding="utf-8") as lines:
            for line in lines:
                record = json.loads(line) if line.strip() else {}
                if record.get("objects") and record.get("images"):
                    records.append(_Record(shard.parent / record["images"][0], tuple(record["objects"])))
    return records


def _check_supported(recipe: TrainRecipe) -> None:
    """This stage is small: one process, float32, one micro-batch per step. Refuse what it would ignore."""
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
    recipe's optimiser, schedule and checkpoints.

    A checkpoint is a whole model (what the next stage starts from; freezing `vision` and `projector`
    there keeps what this stage taught them) plus the heads and optimiser state; the
    micro-batch of step i depends only on the seed and i, so a resumed run sees the same data.
    """

    def __init__(self, recipe: TrainRecipe, resume: bool = False) -> None:
        _check_supported(recipe)
        self.recipe = recipe
        self.device = pick_device(recipe.training.device, 0)
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
        self.records = read_object_records([p for s in recipe.data.sources for p in s.paths])
        if not self.records:
            raise TrainError("stage vision: no record in data.sources has `objects` (synthetic shape scenes)")
        self.model.to(self.device)
        cfg = self.model.cfg
        self.merge_ratio = cfg.patches_per_token_side
        self.heads = TokenHeads(cfg.projector.n_embed, self.merge_ratio**2).to(self.device)
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

    def micro_batch(self, step: int) -> tuple[torch.Tensor, PatchLabels, SceneLabels]:
        """Normalised tiles [N, 3, S, S] of the step's records, their patch labels grouped by projector
        token, and their scene labels."""
        picks = random.Random(self.recipe.seed * 1_000_003 + step).sample(
            range(len(self.records)), min(self.recipe.training.micro_batch_size, len(self.records)))
        size, patch = self.processor.tile_size, self.processor.config.patch_size
        tiles, labels, scenes = [], [], []
        for index in picks:
            record = self.records[index]
            image = load_image(record.image)
            tiled = self.processor.tile_image(image)
            best_width, best_height = tiled.num_width_tiles * size, tiled.num_height_tiles * size
            whole = whole_image_views(best_width, best_height, size)
            tiles.append(self.processor.normalize(tiled.tiles[:whole]))
            full = patch_labels(record.objects, image.width, image.height, best_width, best_height, size, patch)
            labels.append(PatchLabels(full.colour[:whole], full.shape[:whole], full.box[:whole]))
            scenes.append(scene_labels(record.objects, whole, whole))
        grid = self.model.cfg.vision.grid
        grouped = PatchLabels(
            group_by_token(torch.cat([x.colour for x in labels]), grid, self.merge_ratio, 0),
            group_by_token(torch.cat([x.shape for x in labels]), grid, self.merge_ratio, 0),
            group_by_token(torch.cat([x.box for x in labels]), grid, self.merge_ratio, IGNORE))
        return torch.cat(tiles), grouped, SceneLabels(torch.cat([x.counts for x in scenes]),
                                                      torch.cat([x.pair_box for x in scenes]))

    def train_step(self, batch: tuple[torch.Tensor, PatchLabels, SceneLabels] | None = None) -> dict[str, Any]:
        """One optimiser step on `batch`, which must be `micro_batch(self.step)` (made here if None)."""
        start = time.perf_counter()
        self.model.train()
        tiles, labels, scene = batch if batch is not None else self.micro_batch(self.step)
        labels = PatchLabels(*(t.to(self.device) for t in (labels.colour, labels.shape, labels.box)))
        scene = SceneLabels(scene.counts.to(self.device), scene.pair_box.to(self.device))
        loss, metrics = self.heads.loss(self.model.encode_tiles(tiles.to(self.device)), labels, scene)
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
                    logger.info("step %d/%d loss %.4f box bins %.3f counts %.3f", self.step,
                                self.recipe.training.steps, record["loss"], record["box_bin_accuracy"],
                                record["count_accuracy"])
                if self.step % self.recipe.output.save_every == 0 or self.step == end:
                    self.save_checkpoint()
        return history

    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "recipe": self.recipe.raw, "heads": self.heads.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        return write_checkpoint(self.output_dir, self.step, self.model, self.model_config, self.processor_source,
                                state, self.recipe.output.keep_last)
