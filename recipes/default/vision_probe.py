"""What stage vision's tokens hold, read by the stage's own heads: the ceiling the language model reads under.

    python recipes/default/vision_probe.py --checkpoint runs/default/vision/checkpoint-0002000 \
        --data EVAL/test.jsonl [--out vision_probe.json]

The heads of stage vision are not part of the model, but its checkpoints keep them (`trainer_state.pt`).
On the global view of held-out records:
- grounding: the box the box head names from the tokens on the named shape (each coordinate's most likely
  bin, averaged over those tokens), scored like an answer (accuracy at IoU 0.5, mean IoU), by number of
  shapes in the scene. The language model must also choose the shape; this reads the named one's tokens.
- counting: the count the count head names for the question's slot (colour, kind or all shapes),
  averaged over the view's tokens, as a table of true count -> counts named.
Prints both and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from default_recipe.vision_heads import TokenHeads
from default_recipe.vision_labels import BOX_BINS, COLOURS, IGNORE, MAX_COUNT, group_by_token, patch_labels

from dsvl2.checkpoint import load_model
from dsvl2.eval.metrics import HIT_IOU, box_iou, parse_det_boxes
from dsvl2.images import load_image
from dsvl2.train.checkpoints import STATE_FILE
from dsvl2.train.start import load_processor
from dsvl2.train.synthetic import SHAPE_KINDS


def box_from_bins(probabilities: torch.Tensor) -> list[float]:
    """[4, BOX_BINS] probabilities of each coordinate's bin -> the box of the most likely bins' centres
    on the 0-999 grid."""
    return [(int(i) + 0.5) * 1000 / BOX_BINS for i in probabilities.argmax(-1)]


def count_slot(query: dict[str, str]) -> int:
    """Index, in `SceneLabels.counts`, of the count a counting record's `query` asks for."""
    if "color" in query:
        return COLOURS.index(query["color"])
    if "shape" in query:
        return len(COLOURS) + SHAPE_KINDS.index(query["shape"])
    return len(COLOURS) + len(SHAPE_KINDS)


def named_box(answer: str) -> list[int]:
    """The box of a grounding record's answer (its first `<|det|>` box)."""
    return parse_det_boxes(answer)[0]


class Probe:
    def __init__(self, checkpoint: Path) -> None:
        self.model = load_model(checkpoint).eval()
        self.processor = load_processor(checkpoint)
        cfg = self.model.cfg
        self.heads = TokenHeads(cfg.projector.n_embed, cfg.patches_per_token_side**2)
        self.heads.load_state_dict(torch.load(checkpoint / STATE_FILE, weights_only=True)["heads"])

    def global_tokens(self, image) -> tuple[torch.Tensor, Any]:
        tiled = self.processor.tile_image(image)
        with torch.no_grad():
            return self.model.encode_tiles(self.processor.normalize(tiled.tiles[:1])), tiled

    def box(self, record: dict[str, Any], truth: list[int], image_path: Path) -> list[float] | None:
        """The box the head reads from the tokens of the shape whose box is `truth` (the answer's); None if
        no patch centre falls on it."""
        target = next(o for o in record["objects"] if o["box"] == truth)
        image = load_image(image_path)
        tokens, tiled = self.global_tokens(image)
        size, cfg = self.processor.tile_size, self.model.cfg
        labels = patch_labels([target], image.width, image.height, tiled.num_width_tiles * size,
                              tiled.num_height_tiles * size, size, self.processor.config.patch_size)
        grouped = group_by_token(labels.box[:1], cfg.vision.grid, cfg.patches_per_token_side, IGNORE)
        on_shape = grouped[..., 0] != IGNORE
        if not on_shape.any():
            return None
        with torch.no_grad():
            bins = self.heads.box(tokens).unflatten(-1, (self.heads.patches, 4, BOX_BINS)).softmax(-1)
        return box_from_bins(bins[on_shape].mean(0))

    def count(self, record: dict[str, Any], image_path: Path) -> int:
        tokens, _ = self.global_tokens(load_image(image_path))
        with torch.no_grad():
            counts = self.heads.counts(tokens).unflatten(-1, (-1, MAX_COUNT + 1)).softmax(-1).mean(1)[0]
        return int(counts[count_slot(record.get("query") or {})].argmax())


def _box_scores(ious: Sequence[float]) -> dict[str, float]:
    return {"n": len(ious), "accuracy": sum(i >= HIT_IOU for i in ious) / len(ious), "iou": sum(ious) / len(ious)}


def summarise(boxes: Sequence[tuple[int, float]], counts: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """(shapes in the scene, IoU) of every grounding record and (true, named) of every counting record ->
    the report."""
    by_shapes: dict[int, list[float]] = defaultdict(list)
    for shapes, iou in boxes:
        by_shapes[shapes].append(iou)
    grounding = {str(n): _box_scores(v) for n, v in sorted(by_shapes.items())}
    if boxes:
        grounding["all"] = _box_scores([iou for _, iou in boxes])
    named: dict[int, Counter] = defaultdict(Counter)
    for truth, said in counts:
        named[truth][said] += 1
    counting = {str(t): {"n": sum(c.values()), "accuracy": c[t] / sum(c.values()),
                         "named": {str(k): v for k, v in sorted(c.items())}} for t, c in sorted(named.items())}
    return {"grounding": grounding, "counting": counting}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a stage vision checkpoint folder")
    parser.add_argument("--data", type=Path, required=True, help="held-out records (dsvl2 data synth)")
    parser.add_argument("--out", type=Path, default=Path("vision_probe.json"))
    args = parser.parse_args(argv)
    if not (args.checkpoint / STATE_FILE).is_file():
        parser.error(f"{args.checkpoint} has no {STATE_FILE}: give a checkpoint of stage vision")
    probe = Probe(args.checkpoint)
    boxes, counts = [], []
    for line in args.data.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        image_path = args.data.parent / record["images"][0] if record.get("images") else None
        if record.get("task") == "grounding":
            truth = named_box(record["answers"][0])
            box = probe.box(record, truth, image_path)
            iou = 0.0 if box is None else box_iou(box, truth)
            boxes.append((len(record["objects"]), iou))
        elif record.get("task") == "counting":
            counts.append((int(record["answers"][0]), probe.count(record, image_path)))
    report = summarise(boxes, counts)
    for shapes, row in report["grounding"].items():
        print(f"grounding, {shapes} shapes: n {row['n']}, accuracy {row['accuracy']:.2f}, mean IoU {row['iou']:.2f}")
    for truth, row in report["counting"].items():
        print(f"counting, {truth} shapes asked for: n {row['n']}, accuracy {row['accuracy']:.2f}, named {row['named']}")
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
