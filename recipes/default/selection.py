"""Where a model's grounding of synthetic shape scenes fails: reading a box, or choosing the named shape.

    python recipes/default/selection.py --data EVAL/test.jsonl [--model DIR] [--scenes 40] [--out selection.json]

Over the grounding records of a `dsvl2 data synth` file, asked as the evaluation asks them:
- by number of shapes in the scene: accuracy (IoU >= 0.5 with the named shape), reading (IoU >= 0.5
  with *some* shape of the scene) and selection (of the boxes read, the share on the named shape),
  with the selection a model that picks one of the scene's shapes at random would have;
- whether the answer depends on the referring expression at all: in scenes of several shapes every
  shape is asked for by colour and kind, and the share of scenes whose answers all land on the same
  shape is reported (1.0 = the words are ignored).
Prints a table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dsvl2.defaults import default_model_dir
from dsvl2.engine import Engine, Request, SamplingParams
from dsvl2.eval.metrics import HIT_IOU, box_iou, parse_det_boxes

Ask = Callable[[Path, str], str]  # (image, question) -> answer text


def answer_box(answer: str) -> list[float] | None:
    """The first box of an answer, or None when it names none."""
    boxes = parse_det_boxes(answer)
    return boxes[0] if boxes else None


def landing(box: Sequence[float] | None, objects: Sequence[dict[str, Any]]) -> int | None:
    """Index of the shape the box covers at IoU >= 0.5 (the best one), None if it covers none."""
    if box is None:
        return None
    ious = [box_iou(box, o["box"]) for o in objects]
    best = max(range(len(objects)), key=ious.__getitem__)
    return best if ious[best] >= HIT_IOU else None


def breakdown(outcomes: Sequence[tuple[int, int, int | None]]) -> dict[str, dict[str, float]]:
    """(shapes in the scene, named shape, shape the box landed on or None) -> figures per number of
    shapes and over all of them (key "all")."""
    groups = {str(shapes): [o for o in outcomes if o[0] == shapes] for shapes in sorted({o[0] for o in outcomes})}
    groups["all"] = list(outcomes)
    table = {}
    for key, group in groups.items():
        read = sum(landed is not None for _, _, landed in group)
        hits = sum(landed == target for _, target, landed in group)
        table[key] = {"n": len(group), "accuracy": hits / len(group), "reading": read / len(group),
                      "selection": hits / read if read else 0.0,
                      "chance_selection": sum(1 / shapes for shapes, _, _ in group) / len(group)}
    return table


def grounding_records(path: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    found = [r for r in records if r.get("task") == "grounding" and r.get("objects") and "target" in r]
    if not found:
        raise SystemExit(f"{path}: no grounding records with `objects` and `target` (dsvl2 data synth writes them)")
    return found


def measure(ask: Ask, records: Sequence[dict[str, Any]], folder: Path, scenes: int) -> dict[str, Any]:
    """The breakdown of the records' own questions and the query dependence on up to `scenes` scenes."""
    outcomes = []
    for record in records:
        question = record["messages"][0]["content"]
        landed = landing(answer_box(ask(folder / record["images"][0], question)), record["objects"])
        outcomes.append((len(record["objects"]), record["target"], landed))
    same = asked = hits = 0
    several = [r for r in records if len(r["objects"]) > 1][:scenes]
    for record in several:
        image, objects = folder / record["images"][0], record["objects"]
        picks = []
        for index, obj in enumerate(objects):
            question = f"<|ref|>the {obj['color']} {obj['shape']}<|/ref|>.\n<image>"
            picks.append(landing(answer_box(ask(image, question)), objects))
            hits += picks[-1] == index
        asked += len(objects)
        same += len(set(picks)) == 1
    return {"by_shapes": breakdown(outcomes),
            "query_dependence": {"scenes": len(several), "questions": asked,
                                 "accuracy": hits / asked if asked else 0.0,
                                 "same_shape_for_every_query": same / len(several) if several else 0.0}}


def engine_asker(model: Path) -> Ask:
    engine = Engine.from_pretrained(model)

    def ask(image: Path, question: str) -> str:
        request = Request([{"role": "user", "content": question}], [image], SamplingParams(max_new_tokens=48))
        return engine.generate(request).text

    return ask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="synthetic JSONL with grounding records")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--scenes", type=int, default=40, help="scenes of several shapes to ask every shape of")
    parser.add_argument("--out", type=Path, default=Path("selection.json"))
    args = parser.parse_args(argv)
    records = grounding_records(args.data)
    model = args.model or default_model_dir()
    result = measure(engine_asker(model), records, args.data.parent, args.scenes)
    print(f"{'shapes':>6} {'n':>5} {'accuracy':>9} {'reading':>8} {'selection':>10} {'chance':>7}")
    for key, row in result["by_shapes"].items():
        print(f"{key:>6} {row['n']:>5} {row['accuracy']:>9.3f} {row['reading']:>8.3f} {row['selection']:>10.3f} "
              f"{row['chance_selection']:>7.3f}")
    dependence = result["query_dependence"]
    print(f"every shape asked in {dependence['scenes']} scenes: accuracy {dependence['accuracy']:.3f}, "
          f"all answers on one shape in {dependence['same_shape_for_every_query']:.0%} of the scenes")
    args.out.write_text(json.dumps({"model": str(model), "data": str(args.data),
                                    **result}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
