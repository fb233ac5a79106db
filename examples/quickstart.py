"""Quickstart: the Python API of dsvl2 with the bundled default model.

    python examples/quickstart.py [--out boxes.png] [--model DIR]

Loads the model, asks questions about the example images (counting, reading text, a bar chart),
asks a grounding question, and draws the returned box on the picture.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsvl2.engine import Engine, Request, SamplingParams
from dsvl2.grounding import box_to_pixels, draw_boxes, parse_grounding
from dsvl2.images import load_image
from dsvl2.processor import with_image_tags

IMAGES = Path(__file__).resolve().parent / "images"


def ask(engine: Engine, image: Path, question: str) -> str:
    """One question about one image, answered greedily."""
    # The bundled model was trained with the question before the image; its processor config says so.
    content = with_image_tags(question, 1, engine.processor.config.image_tag_position)
    conversation = [{"role": "user", "content": content}]
    request = Request(conversation, [image], SamplingParams(max_new_tokens=64))
    return engine.generate(request).text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--out", type=Path, default=Path("quickstart_boxes.png"), help="image with the drawn box")
    args = parser.parse_args(argv)

    # 1. Load: weights, tokenizer and image processor come from one checkpoint directory (None: the bundled one).
    engine = Engine.from_pretrained(args.model)

    # 2. Ask: plain questions about images.
    shapes, text, chart = IMAGES / "shapes.png", IMAGES / "text.png", IMAGES / "chart.png"
    for image, question in [
        (shapes, "How many circles are there?"),
        (shapes, "How many shapes are there?"),
        (text, "Read the text in the image."),
        (chart, "What is the value of bar Q2?"),
    ]:
        print(f"{image.name}: {question}\n  -> {ask(engine, image, question)!r}")

    # 3. Ground: a referring expression between <|ref|> tags; the answer holds its box on a 0..999 grid.
    answer = ask(engine, shapes, "<|ref|>the red circle<|/ref|>.")
    grounding = parse_grounding(answer)
    print(f"shapes.png: where is the red circle?\n  -> {answer!r}")
    picture = load_image(shapes)
    for ref in grounding.refs:
        for box in ref.boxes:
            pixels = [round(v) for v in box_to_pixels(box, picture.width, picture.height)]
            print(f"  {ref.label}: grid box {list(box)} = pixels {pixels}")

    # 4. Draw: the boxes on the picture, labelled.
    if not any(ref.boxes for ref in grounding.refs):
        print("the answer holds no box to draw", file=sys.stderr)
        return 1
    draw_boxes(picture, grounding.refs).save(args.out)
    print(f"boxes drawn to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
