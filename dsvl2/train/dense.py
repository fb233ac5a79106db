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

Reading (`training.text_micro_batch_size` images of text per step, besides the scenes): every patch of
every view of an OCR image or chart learns the tokenizer's token for the text under it and the tokens
read just before and after it (`TextLabels`), so that reading becomes a lookup for the language model:
the image token whose "before" is the token just written holds the next one. Measured on the default
recipe (2,000 steps, 4 text images beside 12 scenes, 0.5 s per step against 0.35 without): the token
under a text patch was right for only 4-10% of patches at the end, and a language model trained 600 steps
on OCR alone from there did not read (character error rate 0.89, as without). The tower of the default
model is too small or too briefly trained to tell 150 word and digit tokens apart in 16 px patches; the
default recipe leaves reading off.

Records are the synthetic generator's: an image and `objects` with `shape`, `color`, `box` (0-999)
and `box_px` (shape scenes), or `chars` (OCR images and charts, for reading). Other records are skipped.
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
from dsvl2.processor import ASSISTANT_ROLE
from dsvl2.tokenizer import Tokenizer
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
class TextLabels:
    """Per-patch reading targets, each [tiles, patches] (or grouped by projector token like
    `PatchLabels`): the token id of the text under the patch (`DrawnPiece.piece`), of the token read
    before it and of the one read after it, or the `none` class (vocabulary size) where no text is drawn.
    With these in its image tokens, the language model reads by lookup: the image token whose `prev` is
    the token it has just written holds the one to write next."""

    piece: torch.Tensor
    prev: torch.Tensor
    next: torch.Tensor


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


def view_points(width: int, height: int, best_width: int, best_height: int, tile_size: int, patch_size: int
                ) -> list[list[tuple[float, float]] | None]:
    """For the global view and every local tile (the processor's order), the image pixel under each
    patch centre (row-major), mapped back through the padding `Processor.tile_image` applies; None for
    a view with no image in it."""
    centres = _view_patch_centres(tile_size, patch_size)
    views = [(pad_geometry(width, height, tile_size, tile_size), 0, 0)]
    local = pad_geometry(width, height, best_width, best_height)
    columns, rows = tile_counts(best_width, best_height, tile_size)
    views += [(local, column * tile_size, row * tile_size) for row in range(rows) for column in range(columns)]
    points: list[list[tuple[float, float]] | None] = []
    for geometry, offset_x, offset_y in views:
        if geometry.scaled_width == 0 or geometry.scaled_height == 0:
            points.append(None)
            continue
        sx, sy = width / geometry.scaled_width, height / geometry.scaled_height
        points.append([((offset_x + cx - geometry.left) * sx, (offset_y + cy - geometry.top) * sy)
                       for cy in centres for cx in centres])
    return points


def patch_labels(objects: Sequence[dict[str, Any]], width: int, height: int, best_width: int, best_height: int,
                 tile_size: int, patch_size: int) -> PatchLabels:
    """Labels of every patch of the global view and the local tiles: the object whose pixel box holds
    the patch centre. Box bins only on views that show the whole image (the global view; the local tile
    of a one-tile grid)."""
    views = view_points(width, height, best_width, best_height, tile_size, patch_size)
    whole = whole_image_views(best_width, best_height, tile_size)
    n = (tile_size // patch_size) ** 2
    colour = torch.zeros(len(views), n, dtype=torch.long)
    shape = torch.zeros(len(views), n, dtype=torch.long)
    box = torch.full((len(views), n, 4), IGNORE, dtype=torch.long)
    for v, points in enumerate(views):
        for p, (x, y) in enumerate(points or ()):
            for obj in objects:
                x1, y1, x2, y2 = obj["box_px"]
                if x1 <= x <= x2 and y1 <= y <= y2:
                    colour[v, p] = 1 + COLOURS.index(obj["color"])
                    shape[v, p] = 1 + SHAPE_KINDS.index(obj["shape"])
                    if v < whole:
                        box[v, p] = torch.tensor(_box_bins(obj["box"]))
                    break
    return PatchLabels(colour, shape, box)


@dataclass(frozen=True)
class DrawnPiece:
    """One drawn character's pixel box and the tokens of its reading: `piece` is the token that covers
    it, `prev` and `next` the tokens before and after that one (START and END at the ends)."""

    box_px: tuple[int, int, int, int]
    piece: int
    prev: int
    next: int


def reading_units(record: dict[str, Any]) -> list[tuple[str, list[tuple[list, int]]]]:
    """The texts a reader of the record's image says, each with its drawn `chars` and their offsets in
    it: an OCR image is read as its answer (the lines joined by newlines); every other drawn string
    (chart labels, ticks, values) is read on its own."""
    chars = record.get("chars") or []
    if record.get("task") == "ocr" and record.get("lines"):
        starts = [sum(len(line) + 1 for line in record["lines"][:i]) for i in range(len(record["lines"]))]
        seen = [0] * len(starts)
        placed = []
        for char in chars:
            placed.append((char, starts[char[5]] + seen[char[5]]))
            seen[char[5]] += 1
        return [("\n".join(record["lines"]), placed)]
    strings: dict[int, list[list]] = {}
    for char in chars:
        strings.setdefault(char[5], []).append(char)
    return [("".join(c[0] for c in group), [(c, i) for i, c in enumerate(group)]) for group in strings.values()]


def drawn_pieces(record: dict[str, Any], tokenizer: Tokenizer, start: int, end: int) -> tuple[DrawnPiece, ...]:
    """Every drawn character of the record with its reading's tokens (see `DrawnPiece`); () when it
    draws no text."""
    pieces = []
    for text, placed in reading_units(record):
        ids, spans = tokenizer.encode_with_offsets(text)
        owner = {offset: j for j, (a, b) in enumerate(spans) for offset in range(a, b)}
        for char, offset in placed:
            j = owner.get(offset)
            if j is None or char[0] != text[offset]:
                raise TrainError(f"the drawn characters of a record do not spell its text {text!r}")
            pieces.append(DrawnPiece(tuple(char[1:5]), ids[j], ids[j - 1] if j else start,
                                     ids[j + 1] if j + 1 < len(ids) else end))
    return tuple(pieces)


def text_labels(pieces: Sequence[DrawnPiece], width: int, height: int, best_width: int, best_height: int,
                tile_size: int, patch_size: int, none: int) -> TextLabels:
    """`TextLabels` of every view: the piece whose character box holds the patch centre, `none` where
    no character is drawn. Unlike boxes, these are local facts, learnable in every tile."""
    views = view_points(width, height, best_width, best_height, tile_size, patch_size)
    n = (tile_size // patch_size) ** 2
    labels = torch.full((3, len(views), n), none, dtype=torch.long)
    for v, points in enumerate(views):
        for p, (x, y) in enumerate(points or ()):
            for piece in pieces:
                x1, y1, x2, y2 = piece.box_px
                if x1 <= x < x2 and y1 <= y < y2:
                    labels[:, v, p] = torch.tensor([piece.piece, piece.prev, piece.next])
                    break
    return TextLabels(*labels)


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
    the colour, shape and box bins of every patch it merges, the `SceneLabels` of its view and, given
    `text_classes` (vocabulary size + 1 for "no text"), the `TextLabels` of its patches. Used by this
    stage only, never saved in the model."""

    def __init__(self, hidden: int, patches_per_token: int, text_classes: int = 0) -> None:
        super().__init__()
        self.patches = patches_per_token
        self.colour = nn.Linear(hidden, patches_per_token * (len(COLOURS) + 1))
        self.shape = nn.Linear(hidden, patches_per_token * (len(SHAPE_KINDS) + 1))
        self.box = nn.Linear(hidden, patches_per_token * 4 * BOX_BINS)
        self.counts = nn.Linear(hidden, (len(COLOURS) + len(SHAPE_KINDS) + 1 + len(PAIRS)) * (MAX_COUNT + 1))
        self.pair_box = nn.Linear(hidden, len(PAIRS) * 4 * BOX_BINS)
        # Made only when used: a head without targets would still enter the gradient norm that is clipped.
        self.text = nn.Linear(hidden, patches_per_token * 3 * text_classes) if text_classes else None

    def loss(self, tokens: torch.Tensor, labels: PatchLabels, scene: SceneLabels, text: TextLabels
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Summed cross-entropies over tokens [tiles, T, hidden], patch and text labels already grouped
        by token and per-tile scene labels; the box-bin, colour and kind accuracies on object patches,
        the count accuracy and the accuracy of `piece` on text patches."""
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
        on_shape = labels.colour != 0
        metrics = {"box_bin_accuracy": _mean(hits), "count_accuracy": _mean(count_hits),
                   "colour_accuracy": _mean((colour.argmax(-1) == labels.colour)[on_shape]),
                   "kind_accuracy": _mean((shape.argmax(-1) == labels.shape)[on_shape])}
        if self.text is None:
            return sum(losses), metrics
        reading_loss, metrics["text_accuracy"] = self._reading_loss(tokens, text)
        return sum(losses) + reading_loss, metrics

    def _reading_loss(self, tokens: torch.Tensor, text: TextLabels) -> tuple[torch.Tensor, float]:
        """Cross-entropy of the `TextLabels` on the views of images of text, and the accuracy of `piece`
        on their patches that show text."""
        targets = torch.stack([text.piece, text.prev, text.next], dim=-1)
        reading = (targets != IGNORE).flatten(1).any(1)
        targets = targets[reading]
        read = self.text(tokens[reading]).unflatten(-1, (self.patches, 3, -1))
        on_text = (targets[..., 0] != IGNORE) & (targets[..., 0] != read.shape[-1] - 1)
        hits = (read[..., 0, :].argmax(-1) == targets[..., 0])[on_text]
        return _masked_cross_entropy(read.flatten(0, 3), targets.flatten()), _mean(hits)


def _mean(hits: torch.Tensor) -> float:
    return float(hits.float().mean()) if hits.numel() else 0.0


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
        tokenizer = self.processor.tokenizer
        # A reading starts where the answer does: after the prompt's last token (the assistant's colon).
        self.read_start = tokenizer.encode(f"{ASSISTANT_ROLE}:")[-1]
        reading = recipe.training.text_micro_batch_size > 0
        records = read_vision_records([p for s in recipe.data.sources for p in s.paths],
                                      tokenizer if reading else None, self.read_start, tokenizer.eos_id)
        self.scenes = [record for record in records if record.objects]
        self.texts = [record for record in records if record.pieces and not record.objects]
        if not self.scenes:
            raise TrainError("stage vision: no record in data.sources has `objects` (synthetic shape scenes)")
        if reading and not self.texts:
            raise TrainError("stage vision: training.text_micro_batch_size is set, but no record in data.sources "
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
        reads = min(self.recipe.training.text_micro_batch_size, len(self.texts))
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
