"""How fast can the default model's vision tower learn to read the synthetic OCR images on this machine?

A fresh vision tower of the default configuration (or a checkpoint's, `--tower DIR`) is trained alone, with
no projector or language model, to transcribe every text line of the synthetic OCR task: the images are
tiled as the processor tiles them, the patch features of the local view are stitched into one grid, each
line's band of patch rows is max-pooled into one feature per patch column, and a linear head gives
`--outputs-per-column` character predictions per column, trained with CTC (a 16 px patch column can hold
more than one character of the smaller fonts). Greedy CTC decoding gives each line's text; an image is
read when all its lines are, the OCR task's exact match.

This is an optimistic setting for the whole model, not a measurement of it: the line bands come from the
renderer (the model must find the lines itself), all of the tower's training goes to reading, and the
language model, which would have to learn to copy what the tokens say, is left out. What the tower reads
here after a number of minutes is a generous estimate of what the whole model could read in as many.

    python benchmarks/bench_tower_reading.py [--steps 4000] [--micro-batch 8] [--lr 1e-3]
        [--outputs-per-column 2] [--n-train 15000] [--n-test 200] [--eval-every 1000]
        [--tower DIR] [--seed 0] [--threads N] [--out F]

Prints the held-out scores at every evaluation and writes benchmarks/results/tower-reading.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dsvl2.checkpoint import load_model
from dsvl2.config import VisionConfig, load_model_config
from dsvl2.defaults import default_model_dir
from dsvl2.eval.metrics import character_error_rate
from dsvl2.processor import Processor
from dsvl2.projector import stitch_tiles
from dsvl2.train.synthetic import generate_records
from dsvl2.vision.siglip import VisionTransformer
from dsvl2.vision.tiling import pad_geometry

ALPHABET = "0123456789.abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ "  # every character the OCR task draws
BLANK = 0  # CTC's blank class; character i of ALPHABET is class i + 1


@dataclass(frozen=True)
class Line:
    first_row: int  # patch rows of the stitched local view covered by the line's ink
    last_row: int
    text: str


@dataclass(frozen=True)
class TextImage:
    tiles: torch.Tensor  # uint8 local tiles [rows * columns, 3, S, S], row-major
    columns: int
    rows: int
    lines: tuple[Line, ...]


def line_rows(char_boxes: list[list], line: int, scale: float, top: int, patch_size: int) -> tuple[int, int]:
    """First and last patch row of the padded view that a line's ink covers (`char_boxes` rows as the
    renderer writes them: [character, x1, y1, x2, y2, line], y2 exclusive, in image pixels)."""
    boxes = [box for box in char_boxes if box[5] == line]
    if not boxes:
        raise ValueError(f"line {line} has no character boxes")
    y1 = min(box[2] for box in boxes) * scale + top
    y2 = max(box[4] for box in boxes) * scale + top
    return int(y1 // patch_size), int(max(y1, y2 - 1) // patch_size)


def text_images(processor: Processor, n: int, seed: int, split: str, patch_size: int) -> list[TextImage]:
    """The OCR samples of the synthetic generator, tiled as the model sees them, with their line bands."""
    items = []
    for record, image in generate_records(n, seed, split, ["ocr"]):
        tiles = processor.tile_image(image)
        size = processor.tile_size
        geometry = pad_geometry(image.width, image.height, tiles.num_width_tiles * size,
                                tiles.num_height_tiles * size)
        scale = geometry.scaled_height / image.height
        lines = tuple(Line(*line_rows(record["chars"], i, scale, geometry.top, patch_size), text)
                      for i, text in enumerate(record["lines"]))
        items.append(TextImage(tiles.tiles[1:], tiles.num_width_tiles, tiles.num_height_tiles, lines))
    return items


def build_tower(cfg: VisionConfig, checkpoint: Path | None) -> VisionTransformer:
    """The vision tower of a checkpoint (float32), or a fresh one of configuration `cfg`."""
    if checkpoint is None:
        return VisionTransformer(cfg)
    model = load_model(checkpoint, dtype=torch.float32, device="cpu")
    if model.cfg.vision != cfg:
        raise SystemExit(f"--tower {checkpoint}: its vision tower differs from the default model's configuration")
    return model.vision


def ctc_decode(classes: list[int]) -> str:
    """Greedy CTC: merge repeats, drop blanks."""
    text, previous = [], BLANK
    for index in classes:
        if index != previous and index != BLANK:
            text.append(ALPHABET[index - 1])
        previous = index
    return "".join(text)


class LineReader(nn.Module):
    """The vision tower and a linear head giving `outputs` character distributions per patch column."""

    def __init__(self, tower: VisionTransformer, outputs: int) -> None:
        super().__init__()
        self.tower = tower
        self.outputs = outputs
        self.head = nn.Linear(tower.norm.normalized_shape[0], outputs * (len(ALPHABET) + 1))

    def patch_grid(self, pixels: torch.Tensor, columns: int, rows: int) -> torch.Tensor:
        """Tower features of row-major tiles stitched into one grid [rows * g, columns * g, width]."""
        return stitch_tiles(self.tower(pixels), columns, rows)

    def forward(self, pixels: torch.Tensor, item: TextImage) -> list[torch.Tensor]:
        """Per line, CTC log-probabilities [columns * outputs, classes]."""
        grid = self.patch_grid(pixels, item.columns, item.rows)
        logits = []
        for line in item.lines:
            band = grid[line.first_row: line.last_row + 1].amax(dim=0)
            logits.append(self.head(band).view(band.shape[0] * self.outputs, len(ALPHABET) + 1))
        return [F.log_softmax(x, dim=-1) for x in logits]


def ctc_loss(log_probs: list[torch.Tensor], lines: tuple[Line, ...]) -> torch.Tensor:
    losses = []
    for lp, line in zip(log_probs, lines, strict=True):
        target = torch.tensor([ALPHABET.index(c) + 1 for c in line.text])
        losses.append(F.ctc_loss(lp[:, None], target[None], torch.tensor([lp.shape[0]]),
                                 torch.tensor([len(target)]), blank=BLANK, zero_infinity=True))
    return torch.stack(losses).mean()


@torch.no_grad()
def evaluate(reader: LineReader, processor: Processor, items: list[TextImage]) -> dict[str, float]:
    reader.eval()
    images_read = lines_read = lines = 0
    errors = 0.0
    for item in items:
        read = [ctc_decode(lp.argmax(-1).tolist()) for lp in reader(processor.normalize(item.tiles), item)]
        truth = [line.text for line in item.lines]
        images_read += read == truth
        lines_read += sum(a == b for a, b in zip(read, truth, strict=True))
        lines += len(truth)
        errors += sum(character_error_rate(a, b) for a, b in zip(read, truth, strict=True))
    reader.train()
    return {"image_exact": images_read / len(items), "line_exact": lines_read / lines, "cer": errors / lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--micro-batch", type=int, default=8, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak of a one-cycle schedule (5%% warm-up)")
    parser.add_argument("--outputs-per-column", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=15000)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--tower", type=Path, default=None, help="start from this checkpoint's vision tower")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    folder = default_model_dir()
    cfg = load_model_config(folder).vision
    processor = Processor.from_pretrained(folder)
    tower = build_tower(cfg, args.tower)
    reader = LineReader(tower, args.outputs_per_column)

    started = time.perf_counter()
    train = text_images(processor, args.n_train, 1, "train", cfg.patch_size)
    test = text_images(processor, args.n_test, 7, "test", cfg.patch_size)
    print(f"{len(train)} train and {len(test)} test images in {time.perf_counter() - started:.0f}s", flush=True)

    optimizer = torch.optim.AdamW(reader.parameters(), lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps + 1, pct_start=0.05)
    history = []
    reader.train()
    window: list[float] = []  # training losses since the last evaluation
    first_loss = float("nan")  # the untrained tower's, for scale
    started = time.perf_counter()
    print(f"{'step':>6}{'minutes':>9}{'loss':>8}{'image exact':>13}{'line exact':>12}{'CER':>7}")
    for step in range(1, args.steps + 1):
        losses = [ctc_loss(reader(processor.normalize(item.tiles), item), item.lines)
                  for item in rng.sample(train, args.micro_batch)]
        loss = torch.stack(losses).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reader.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        if step == 1:
            first_loss = loss.item()
        if step % args.eval_every == 0 or step == args.steps:
            minutes = (time.perf_counter() - started) / 60
            scores = evaluate(reader, processor, test)
            mean_loss = sum(window) / len(window)
            window.clear()
            history.append({"step": step, "minutes": round(minutes, 2), "loss": round(mean_loss, 4), **scores})
            print(f"{step:>6}{minutes:>9.1f}{mean_loss:>8.3f}{scores['image_exact']:>13.3f}"
                  f"{scores['line_exact']:>12.3f}{scores['cer']:>7.3f}", flush=True)

    result = {
        "benchmark": "tower_reading", "steps": args.steps, "micro_batch": args.micro_batch, "lr": args.lr,
        "outputs_per_column": args.outputs_per_column, "train_images": len(train), "test_images": len(test),
        "tower": str(args.tower) if args.tower else None, "seed": args.seed, "first_loss": round(first_loss, 4),
        "history": history,
        "threads": torch.get_num_threads(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "processor": platform.processor(), "torch": torch.__version__,
    }
    out = args.out or Path(__file__).parent / "results" / "tower-reading.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
