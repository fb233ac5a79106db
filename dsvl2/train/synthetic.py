"""Synthetic visual tasks with exact answers, written in the dsvl2 training data format.

Output layout (one call = one split):

    OUT/<split>.jsonl             one JSON record per line, in sample order
    OUT/images/<split>-NNNNNN.png one image per visual record (NNNNNN = sample index, zero-padded)

Image paths in a record are relative to OUT. A visual record looks like

    {"messages": [{"role": "user", "content": "...\\n<image>"}, {"role": "assistant", "content": "..."}],
     "images": ["images/train-000123.png"], "task": "grounding", "answers": ["..."], ...metadata}

and carries `answers` (for the eval metrics in dsvl2.eval.metrics, whose registry keys equal the task
names), `image_size` [width, height], and task metadata (`objects`, `box`, `boxes`, `query`, `bars`,
`lines`) from which every answer can be re-derived. OCR and chart records also place every drawn
character (`chars`: [character, x1, y1, x2, y2, string index] in pixels, see `char_boxes`), and each bar
gives its slot `column_px` [x1, x2), for labels that need positions. Counting records name the boxes of the
shapes they count in `regions` (the training data format's field for what a question is about).

Boxes are [x1, y1, x2, y2] on the 0..999 grid, x = round(px / width * 999), where (x1, y1) is the top-left
pixel of the shape and (x2, y2) the pixel just past its bottom-right corner; `box_px` gives the same box in
pixels.

Tasks: grounding, grounded_caption, counting, ocr, chart, caption (all with one image) and text (no
image; in the train split some are plain `{"text": ..., "task": "text"}` records).

Determinism: sample i of (seed, split) is drawn from its own generator seeded by (seed, split, i), so the
same arguments give byte-identical JSONL and identical PNGs, the first k samples do not depend on n, and
the val/test splits never share a random stream with train. The task of each sample comes from a
shuffled weighted cycle of TASK_WEIGHTS, so every task appears in every run of sum(weights) samples.

Conversations (`turns` above 1): every record about a shape scene (grounding, grounded_caption, counting,
caption) gets follow-up questions about the same image, answered from its metadata, until it has the drawn number
of turns; the first turn and the image are the one-turn record's, the follow-ups come from a random stream of their
own, so a seed's one-turn records and images do not change. Such a record's `task`, `answers` and metric fields
(`box`, `expression`, `query`, `boxes`, ...) are those of its last turn, what an evaluation scores;
`turn_tasks` names the task of every turn, and `regions` names what the first question (the one before the image,
which the image tokens can see) is about. The writer then also writes OUT/<split>_asked_first.jsonl: the last
question of every conversation asked alone, as a one-turn record of the same image.

Command line (wired as `dsvl2 data synth`): --out DIR --n N --seed S [--split train|val|test]
[--tasks grounding,ocr,...] [--turns N or MIN-MAX] [--follow-ups grounding,counting,...].
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dsvl2.errors import InputError
from dsvl2.grounding import IMAGE_TAG, format_grounding, pixels_to_box

SPLITS = ("train", "val", "test")
TASK_WEIGHTS: dict[str, int] = {
    "grounding": 3,
    "grounded_caption": 1,
    "counting": 2,
    "ocr": 2,
    "chart": 2,
    "caption": 1,
    "text": 1,
}
TASKS = tuple(TASK_WEIGHTS)
SCENE_TASKS = ("grounding", "grounded_caption", "counting", "caption")  # records about a scene of shapes
FOLLOW_UP_TASKS = SCENE_TASKS  # what a follow-up question may ask
MAX_TURNS = 8

SHAPE_KINDS = ("circle", "square", "triangle", "star", "diamond", "hexagon")
# Saturated colours (some channel <= 60) never collide with the light backgrounds (every channel >= 180),
# so a shape's pixels can be found by exact colour.
SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
    "black": (25, 25, 25),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "light gray": (215, 215, 215),
    "beige": (240, 230, 205),
    "light blue": (210, 225, 245),
    "light green": (215, 240, 215),
    "light pink": (245, 220, 228),
}
BACKGROUNDS_NAMES = tuple(BACKGROUNDS)
TEXTURE_AMPLITUDE = 12  # keeps every background channel within [180, 255]

MIN_SIDE, MAX_SIDE, MAX_ASPECT = 64, 896, 4.0
MIN_SHAPE_PX = 16
# Shape scenes are at most 2:1 (enough for every tile grid of the default model) and their shapes are
# large: 30-50% of the short side and at least 15% of the long one. A vision tower trained from scratch
# is read through attention, which starts as a mean over its tokens, so small shapes are averaged away
# (measured: recipes/default/NOTES.md, "Shape sizes").
SCENE_MAX_ASPECT = 2.0
SHAPE_MIN_SHORT, SHAPE_MAX_SHORT, SHAPE_MIN_LONG = 0.3, 0.5, 0.15
SHAPE_GAP_PX = 8  # free space around every shape, so shapes never touch and boxes never overlap
# Text stays legible after the image is fitted into a tiling resolution (the default model's tiles
# are 192 px with 16 px patches, its largest resolution 384 px): text images are at most 384 px, so
# tiling never shrinks them, with one or two short lines of 24-48 px letters; charts are at most
# 384 px with labels and values of at least 14 px. (Images of up to 896 px were shrunk up to 2.3x, to
# letters narrower than half a patch.)
TEXT_MAX_SIDE = 384  # the longest side of text images and charts
OCR_MAX_LINES, OCR_MAX_TOKENS, OCR_FONT_PX = 2, 2, (24, 48)
OCR_MAX_LINE_PX = 0.85 * TEXT_MAX_SIDE
CHART_FONT_PX, CHART_MAX_BARS = (14, 28), 5

_WORDS = (
    "apple", "river", "stone", "light", "green", "house", "paper", "cloud", "table", "music", "north",
    "south", "water", "bread", "metal", "glass", "tiger", "zebra", "piano", "ocean", "train", "plant",
    "chair", "sugar", "delta", "omega", "alpha", "vision", "model", "token", "image", "robot", "pixel",
    "open", "exit", "stop", "sale", "cafe", "hotel", "bank", "park", "road", "gate", "room", "data",
)
_CHART_LABEL_WORDS = ("cats", "dogs", "fish", "cars", "bikes", "rain", "snow", "sun", "tea", "milk", "Mon",
                      "Tue", "Wed", "Thu", "Fri", "Sat", "Q1", "Q2", "Q3", "Q4", "North", "South", "East",
                      "West")
_BAR_COLORS = ((70, 110, 190), (200, 90, 60), (80, 160, 90), (150, 90, 170), (60, 60, 60))
_CAPITALS = (("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
             ("Germany", "Berlin"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
             ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
             ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Austria", "Vienna"))
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_SIDES = (("triangle", 3), ("square", 4), ("pentagon", 5), ("hexagon", 6), ("octagon", 8))
_MIXES = (("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple"),
          ("red", "white", "pink"), ("black", "white", "gray"))
_NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    box_px: tuple[int, int, int, int]  # tight pixel box, x2/y2 exclusive


# --------------------------------------------------------------------------------------------------
# Random geometry
# --------------------------------------------------------------------------------------------------


def _sample_aspect(rng: np.random.Generator, low: float, high: float) -> float:
    """Width / height, log-uniform so that 1:4 and 4:1 are equally likely."""
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _canvas_size(rng: np.random.Generator, aspect: float, min_long: int = 128, max_long: int = MAX_SIDE
                 ) -> tuple[int, int]:
    """(width, height) with the given width/height ratio, long side <= max_long, short side >= MIN_SIDE."""
    stretch = max(aspect, 1.0 / aspect)
    long_low = min(max_long, max(min_long, math.ceil(MIN_SIDE * stretch)))
    long_side = int(rng.integers(long_low, max_long + 1))
    short_side = max(MIN_SIDE, round(long_side / stretch))
    return (long_side, short_side) if aspect >= 1.0 else (short_side, long_side)


def to_grid(box_px: Sequence[int], width: int, height: int) -> list[int]:
    """Pixel box -> 0..999 grid: x = round(px / width * 999), y = round(py / height * 999)."""
    return list(pixels_to_box(box_px, width, height))


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, str]:
    name = BACKGROUNDS_NAMES[int(rng.integers(len(BACKGROUNDS_NAMES)))]
    base = np.array(BACKGROUNDS[name], dtype=np.float32)
    style = int(rng.integers(4))
    if style == 0:  # plain
        offset = np.zeros((height, width), dtype=np.float32)
    elif style == 1:  # linear gradient along x or y
        ramp_x = bool(rng.integers(2))
        length = width if ramp_x else height
        ramp = np.linspace(-TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE, length, dtype=np.float32)
        offset = np.broadcast_to(ramp[None, :] if ramp_x else ramp[:, None], (height, width))
    elif style == 2:  # faint stripes
        period = int(rng.integers(6, 33))
        vertical = bool(rng.integers(2))
        phase = (np.arange(width if vertical else height) // period) % 2
        stripes = (phase * TEXTURE_AMPLITUDE - TEXTURE_AMPLITUDE / 2).astype(np.float32)
        offset = np.broadcast_to(stripes[None, :] if vertical else stripes[:, None], (height, width))
    else:  # blocky low-frequency noise (compresses well, unlike per-pixel noise)
        block = int(rng.integers(8, 33))
        coarse = rng.uniform(-TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE, (height // block + 1, width // block + 1))
        offset = np.kron(coarse, np.ones((block, block)))[:height, :width].astype(np.float32)
    pixels = np.clip(base[None, None, :] + offset[:, :, None], 180, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB"), name



def _shape_outline(kind: str, size: int) -> list[tuple[float, float]] | None:
    """Polygon vertices inside a size x size square, or None for shapes drawn as primitives."""
    last = size - 1
    centre, radius = last / 2, last / 2
    if kind == "triangle":
        return [(centre, 0), (last, last), (0, last)]
    if kind == "diamond":
        return [(centre, 0), (last, centre), (centre, last), (0, centre)]
    if kind == "hexagon":
        angles = [math.radians(60 * k) for k in range(6)]
        return [(centre + radius * math.cos(a), centre + radius * math.sin(a)) for a in angles]
    if kind == "star":
        points = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * 0.45
            angle = math.radians(-90 + 36 * k)
            points.append((centre + r * math.cos(angle), centre + r * math.sin(angle)))
        return points
    return None


def _shape_mask(kind: str, size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "circle":
        draw.ellipse([0, 0, size - 1, size - 1], fill=255)
    elif kind == "square":
        draw.rectangle([0, 0, size - 1, size - 1], fill=255)
    else:
        outline = _shape_outline(kind, size)
        if outline is None:
            raise InputError(f"unknown shape kind {kind!r}")
        draw.polygon([(round(x), round(y)) for x, y in outline], fill=255)
    return mask


def _draw_shape(image: Image.Image, kind: str, color: str, left: int, top: int, size: int) -> Shape:
    """Paint the shape and return it with its exact pixel box (taken from the drawn mask itself)."""
    mask = _shape_mask(kind, size)
    image.paste(SHAPE_COLORS[color], (left, top), mask)
    x1, y1, x2, y2 = mask.getbbox()
    return Shape(kind, color, (left + x1, top + y1, left + x2, top + y2))


def _place_regions(
    rng: np.random.Generator, width: int, height: int, count: int
) -> list[tuple[int, int, int]]:
    """Up to `count` non-overlapping square regions (left, top, size), SHAPE_GAP_PX apart."""
    short, long = min(width, height), max(width, height)
    size_low = max(MIN_SHAPE_PX, math.ceil(SHAPE_MIN_LONG * long), round(SHAPE_MIN_SHORT * short))
    size_high = max(size_low, round(SHAPE_MAX_SHORT * short))
    regions: list[tuple[int, int, int]] = []
    for _ in range(count * 60):
        if len(regions) == count:
            break
        size = int(rng.integers(size_low, size_high + 1))
        left = int(rng.integers(0, width - size + 1))
        top = int(rng.integers(0, height - size + 1))
        if all(_apart(left, top, size, other) for other in regions):
            regions.append((left, top, size))
    return regions


def _apart(left: int, top: int, size: int, other: tuple[int, int, int]) -> bool:
    o_left, o_top, o_size = other
    gap = SHAPE_GAP_PX
    return (left + size + gap <= o_left or o_left + o_size + gap <= left
            or top + size + gap <= o_top or o_top + o_size + gap <= top)


def _scene(rng: np.random.Generator, max_objects: int, unique_pairs: bool
           ) -> tuple[Image.Image, str, list[Shape]]:
    """A shapes image. With unique_pairs every (colour, kind) occurs once, so 'the red circle' is unique."""
    width, height = _canvas_size(rng, _sample_aspect(rng, 1 / SCENE_MAX_ASPECT, SCENE_MAX_ASPECT))
    image, background = _background(rng, width, height)
    regions = _place_regions(rng, width, height, int(rng.integers(1, max_objects + 1)))
    colors, kinds = tuple(SHAPE_COLORS), SHAPE_KINDS
    if unique_pairs:
        pair_ids = rng.choice(len(colors) * len(kinds), size=len(regions), replace=False)
        pairs = [(colors[int(p) // len(kinds)], kinds[int(p) % len(kinds)]) for p in pair_ids]
    else:
        # Few colours and kinds, so counts above one are common.
        palette = rng.choice(len(colors), size=int(rng.integers(2, 4)), replace=False)
        shape_set = rng.choice(len(kinds), size=int(rng.integers(2, 4)), replace=False)
        pairs = [(colors[int(rng.choice(palette))], kinds[int(rng.choice(shape_set))]) for _ in regions]
    shapes = [_draw_shape(image, kind, color, left, top, size)
              for (left, top, size), (color, kind) in zip(regions, pairs, strict=True)]
    return image, background, shapes


def _left_to_right(shapes: Sequence[Shape]) -> list[Shape]:
    return sorted(shapes, key=lambda s: (s.box_px[0], s.box_px[1]))


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(kind: str) -> str:
    return kind + "s"


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError as error:  # Pillow < 10.1 has no size argument
        raise RuntimeError("dsvl2 data synth needs Pillow >= 10.1 with FreeType for scalable text") from error


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


def _visual_record(task: str, question: str, answer: str, image: Image.Image, **metadata: Any
                   ) -> tuple[dict, Image.Image]:
    # The question comes before the image: the image tokens then attend to the words, so each can tell
    # whether it belongs to what is asked about (a lookup that the default model's language model learns;
    # asked after the image, it boxed one shape whatever the words named).
    record = {
        "messages": [{"role": "user", "content": f"{question}\n{IMAGE_TAG}"},
                     {"role": "assistant", "content": answer}],
        "images": [],  # filled in by the writer, which knows the file name
        "task": task,
        "answers": [answer],
        "image_size": [image.width, image.height],
        **metadata,
    }
    return record, image


def _objects_metadata(shapes: Sequence[Shape], width: int, height: int) -> list[dict]:
    return [
        {"shape": s.kind, "color": s.color, "box": to_grid(s.box_px, width, height), "box_px": list(s.box_px)}
        for s in shapes
    ]


def _referring_expressions(target: Shape, shapes: Sequence[Shape]) -> list[str]:
    expressions = [f"the {target.color} {target.kind}"]
    if sum(s.kind == target.kind for s in shapes) == 1:
        expressions.append(f"the {target.kind}")
    if sum(s.color == target.color for s in shapes) == 1:
        expressions.append(f"the {target.color} shape")
    return expressions


def _make_grounding(rng: np.random.Generator, split: str) -> tuple[dict, Image.Image]:
    image, _, shapes = _scene(rng, max_objects=5, unique_pairs=True)
    target_index = int(rng.integers(len(shapes)))
    target = shapes[target_index]
    expressions = _referring_expressions(target, shapes)
    expression = expressions[int(rng.integers(len(expressions)))]
    box = to_grid(target.box_px, image.width, image.height)
    answer = format_grounding(expression, [box])
    return _visual_record("grounding", f"<|ref|>{expression}<|/ref|>.", answer, image, expression=expression,
                          box=box, target=target_index, objects=_objects_metadata(shapes, *image.size))


def _make_grounded_caption(rng: np.random.Generator, split: str) -> tuple[dict, Image.Image]:
    image, background, shapes = _scene(rng, max_objects=4, unique_pairs=True)
    ordered = _left_to_right(shapes)
    boxes = [to_grid(s.box_px, image.width, image.height) for s in ordered]
    parts = [format_grounding(_with_article(f"{shape.color} {shape.kind}"), [box])
             for shape, box in zip(ordered, boxes, strict=True)]
    answer = f"The image shows {_join_phrases(parts)} on {_with_article(background)} background."
    return _visual_record("grounded_caption", "<|grounding|>Describe the image.", answer, image, boxes=boxes,
                          background=background, objects=_objects_metadata(ordered, *image.size))


def _join_phrases(parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _make_counting(rng: np.random.Generator, split: str) -> tuple[dict, Image.Image]:
    image, _, shapes = _scene(rng, max_objects=7, unique_pairs=False)
    mode = int(rng.integers(5))
    if mode == 0:
        query: dict[str, str] = {}
        question = "How many shapes are there?"
    elif mode <= 2:
        # Mostly colours present in the image; sometimes any colour, so "0" is a possible answer.
        pool = [s.color for s in shapes] if rng.random() < 0.85 else list(SHAPE_COLORS)
        query = {"color": pool[int(rng.integers(len(pool)))]}
        question = f"How many {query['color']} shapes are there?"
    else:
        pool = [s.kind for s in shapes] if rng.random() < 0.85 else list(SHAPE_KINDS)
        query = {"shape": pool[int(rng.integers(len(pool)))]}
        question = f"How many {_plural(query['shape'])} are there?"
    objects = _objects_metadata(shapes, *image.size)
    regions = [o["box"] for shape, o in zip(shapes, objects, strict=True) if _matches(shape, query)]
    return _visual_record("counting", question, str(len(regions)), image, query=query, objects=objects,
                          regions=regions)


def _matches(shape: Shape, query: dict[str, str]) -> bool:
    return shape.color == query.get("color", shape.color) and shape.kind == query.get("shape", shape.kind)


def _make_caption(rng: np.random.Generator, split: str) -> tuple[dict, Image.Image]:
    image, background, shapes = _scene(rng, max_objects=4, unique_pairs=False)
    ordered = _left_to_right(shapes)
    count_word = _NUMBER_WORDS[len(ordered)].capitalize()
    noun = "shape" if len(ordered) == 1 else "shapes"
    items = _join_phrases([_with_article(f"{s.color} {s.kind}") for s in ordered])
    caption = f"{count_word} {noun} on {_with_article(background)} background, from left to right: {items}."
    question = "Describe the image in one sentence."
    return _visual_record("caption", question, caption, image, background=background,
                          objects=_objects_metadata(ordered, *image.size))


# ---------------------------------------------------------------- OCR


def _ocr_token(rng: np.random.Generator) -> str:
    kind = int(rng.integers(5))
    if kind == 0:
        return str(int(rng.integers(0, 10000)))
    if kind == 1:
        return f"{rng.integers(0, 100)}.{rng.integers(0, 100):02d}"
    word = _WORDS[int(rng.integers(len(_WORDS)))]
    return (word, word.capitalize(), word.upper())[kind - 2]


def _ocr_lines(rng: np.random.Generator, font: ImageFont.FreeTypeFont) -> list[str]:
    lines = []
    for _ in range(int(rng.integers(1, OCR_MAX_LINES + 1))):
        tokens = [_ocr_token(rng) for _ in range(int(rng.integers(1, OCR_MAX_TOKENS + 1)))]
        while len(tokens) > 1 and font.getlength(" ".join(tokens)) > OCR_MAX_LINE_PX:
            tokens.pop()
        lines.append(" ".join(tokens))
    return lines


def _make_ocr(rng: np.random.Generator, split: str) -> tuple[dict, Image.Image]:
    font_size = int(rng.integers(OCR_FONT_PX[0], OCR_FONT_PX[1] + 1))
    font = _font(font_size)
    lines = _ocr_lines(rng, font)
    while font_size > OCR_FONT_PX[0] and max(font.getlength(line) for line in lines) > OCR_MAX_LINE_PX:
        font_size = max(OCR_FONT_PX[0], font_size * 3 // 4)
        font = _font(font_size)
    line_height = round(font_size * 1.3)
    text_w = math.ceil(max(font.getlength(line) for line in lines))
    text_h = line_height * len(lines)
    pad = max(4, font_size // 3)
    width = text_w + 2 * pad + int(rng.integers(0, text_w // 2 + 1))
    height = text_h + 2 * pad + int(rng.integers(0, text_h // 2 + 1))
    # Pad the short side so the aspect ratio stays within 1:4 .. 4:1 and both sides >= MIN_SIDE.
    width, height = (max(width, MIN_SIDE, math.ceil(height / MAX_ASPECT)),
                     max(height, MIN_SIDE, math.ceil(width / MAX_ASPECT)))
    width, height = min(width, TEXT_MAX_SIDE), min(height, TEXT_MAX_SIDE)
    image, _ = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    left = int(rng.integers(pad, max(pad, width - text_w - pad) + 1))
    top = int(rng.integers(pad, max(pad, height - text_h - pad) + 1))
    ink = tuple(int(v) for v in rng.integers(0, 70, size=3))
    chars = []
    for i, line in enumerate(lines):
        draw.text((left, top + i * line_height), line, font=font, fill=ink)
        chars += char_boxes(font, line, left, top + i * line_height, "la", i)
    answer = "\n".join(lines)
    return _visual_record("ocr", "Read the text in the image.", answer, image, lines=lines,
                          font_size=font_size, chars=chars)


def char_boxes(font: ImageFont.FreeTypeFont, text: str, x: float, y: float, anchor: str, line: int
               ) -> list[list]:
    """[character, x1, y1, x2, y2, line] of every character of `text` drawn at (x, y) with `anchor`: its
    advance span horizontally and the text's ink box vertically, in whole pixels. `line` numbers the
    drawn strings so that a reader can order characters (by line, then x)."""
    length = font.getlength(text)
    origin = x - {"l": 0.0, "m": length / 2, "r": length}[anchor[0]]
    _, top, _, bottom = font.getbbox(text, anchor=anchor)
    edges = [origin + font.getlength(text[:i]) for i in range(len(text) + 1)]
    return [[character, math.floor(x1), math.floor(y + top), math.ceil(x2), math.ceil(y + bottom), line]
            for character, x1, x2 in zip(text, edges, edges[1:], strict=False)]


# ---------------------------------------------------------------- charts


def _chart_labels(rng: np.random.Generator, count: int) -> list[str]:
    if rng.random() < 0.5:
        start = int(rng.integers(0, 26 - count + 1))
        return [chr(ord("A") + start + i) for i in range(count)]
    picks = rng.choice(len(_CHART_LABEL_WORDS), size=count, replace=False)
    return [_CHART_LABEL_WORDS[int(i)] for i in picks]


def _nice_axis_max(value: int) -> tuple[int, int]:
    """(axis top, tick step): the smallest 1/2/5 x 10^k step with at most 5 ticks covering value."""
    magnitude = 1
    while True:
        for factor in (1, 2, 5):
            step = factor * magnitude
            if step * 5 >= value:
                return step * math.ceil(value / step), step
        magnitude *= 10


def _make_chart(rng: np.random.Generator, split: str) -> tuple[dict, Image.Image]:
    count = int(rng.integers(3, CHART_MAX_BARS + 1))
    labels = _chart_labels(rng, count)
    top_value = int(rng.choice([10, 20, 50, 100, 200]))
    values = [int(v) for v in rng.integers(1, top_value + 1, size=count)]
    width, height = _canvas_size(rng, _sample_aspect(rng, 1.0, 3.0), min_long=256, max_long=TEXT_MAX_SIDE)
    image = Image.new("RGB", (width, height), BACKGROUNDS["white"])
    chars, columns = _draw_bar_chart(image, labels, values, _BAR_COLORS[int(rng.integers(len(_BAR_COLORS)))])
    bars = [{"label": label, "value": value, "column_px": column}
            for label, value, column in zip(labels, values, columns, strict=True)]
    question, answer = _chart_question(rng, labels, values)
    return _visual_record("chart", question, answer, image, bars=bars, chars=chars)


def _chart_question(rng: np.random.Generator, labels: list[str], values: list[int]) -> tuple[str, str]:
    kind = int(rng.integers(5))
    if kind == 3 and values.count(max(values)) == 1:
        return "Which bar has the highest value?", labels[values.index(max(values))]
    if kind == 4 and values.count(min(values)) == 1:
        return "Which bar has the lowest value?", labels[values.index(min(values))]
    index = int(rng.integers(len(labels)))
    return f"What is the value of bar {labels[index]}?", str(values[index])


def _chart_font(width: int, height: int, labels: list[str], axis_top: int) -> ImageFont.FreeTypeFont:
    """The largest font up to 10 % of the short side whose widest label fits in 90 % of a bar slot."""
    size = max(CHART_FONT_PX[0], min(CHART_FONT_PX[1], round(min(width, height) * 0.1)))
    widest = [*labels, str(axis_top)]
    while size > CHART_FONT_PX[0]:
        font = _font(size)
        slot = (width - 20 - font.getlength(str(axis_top))) / len(labels)
        if max(font.getlength(text) for text in widest) <= 0.9 * slot:
            return font
        size -= 1
    return _font(size)


def _draw_bar_chart(image: Image.Image, labels: list[str], values: list[int], bar_color: tuple[int, int, int]
                    ) -> tuple[list[list], list[list[int]]]:
    """Draw the chart; return the `char_boxes` of all its text and each bar's slot [x1, x2) in pixels."""
    width, height = image.size
    axis_top, step = _nice_axis_max(max(values))
    font = _chart_font(width, height, labels, axis_top)
    text_h = font.size + 4
    left = math.ceil(font.getlength(str(axis_top))) + 12
    plot_top, plot_bottom, plot_right = text_h + 6, height - text_h - 8, width - 8
    draw = ImageDraw.Draw(image)
    ink = (40, 40, 40)
    draw.line([(left, plot_top), (left, plot_bottom), (plot_right, plot_bottom)], fill=ink, width=2)
    scale = (plot_bottom - plot_top) / axis_top
    chars: list[list] = []
    strings: list[str] = []

    def text(x: float, y: float, string: str, anchor: str) -> None:
        draw.text((x, y), string, font=font, fill=ink, anchor=anchor)
        chars.extend(char_boxes(font, string, x, y, anchor, len(strings)))
        strings.append(string)

    for tick in range(0, axis_top + 1, step):
        y = plot_bottom - tick * scale
        draw.line([(left - 5, y), (left, y)], fill=ink, width=1)
        text(left - 7, y, str(tick), "rm")
    slot = (plot_right - left) / len(values)
    columns = []
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        centre = left + slot * (i + 0.5)
        half = slot * 0.3
        bar_top = min(plot_bottom - value * scale, plot_bottom - 1)  # a tiny value still gets a 1 px bar
        draw.rectangle([centre - half, bar_top, centre + half, plot_bottom - 1], fill=bar_color)
        text(centre, bar_top - 3, str(value), "mb")
        text(centre, plot_bottom + 5, label, "mt")
        columns.append([round(left + slot * i), round(left + slot * (i + 1))])
    return chars, columns


# ---------------------------------------------------------------- text only


def _text_fact(rng: np.random.Generator) -> tuple[str, str, str]:
    """(question, answer, statement) for a small arithmetic or general-knowledge fact."""
    kind = int(rng.integers(6))
    if kind <= 1:
        a, b = (int(v) for v in rng.integers(0, 100, size=2))
        op = ("plus", "minus", "times")[int(rng.integers(3))]
        result = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        return f"What is {a} {op} {b}?", str(result), f"{a} {op} {b} equals {result}."
    if kind == 2:
        country, capital = _CAPITALS[int(rng.integers(len(_CAPITALS)))]
        return f"What is the capital of {country}?", capital, f"The capital of {country} is {capital}."
    if kind == 3:
        day = int(rng.integers(len(_DAYS)))
        following = _DAYS[(day + 1) % len(_DAYS)]
        return f"Which day comes after {_DAYS[day]}?", following, f"{following} comes after {_DAYS[day]}."
    if kind == 4:
        name, sides = _SIDES[int(rng.integers(len(_SIDES)))]
        return f"How many sides does a {name} have?", str(sides), f"A {name} has {sides} sides."
    first, second, mixed = _MIXES[int(rng.integers(len(_MIXES)))]
    return (f"What colour do you get by mixing {first} and {second}?", mixed,
            f"Mixing {first} and {second} gives {mixed}.")


def _make_text(rng: np.random.Generator, split: str) -> tuple[dict, None]:
    question, answer, statement = _text_fact(rng)
    if split == "train" and rng.random() < 0.3:
        return {"text": statement, "task": "text"}, None
    record = {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        "images": [],
        "task": "text",
        "answers": [answer],
    }
    return record, None


_MAKERS = {
    "grounding": _make_grounding,
    "grounded_caption": _make_grounded_caption,
    "counting": _make_counting,
    "ocr": _make_ocr,
    "chart": _make_chart,
    "caption": _make_caption,
    "text": _make_text,
}


# --------------------------------------------------------------------------------------------------
# Conversations: follow-up questions about the same scene
# --------------------------------------------------------------------------------------------------

# Each follow-up is (task, question, answer, metric fields of a one-turn record of that task).
FollowUp = tuple[str, str, str, dict[str, Any]]


def _unique_objects(objects: Sequence[dict]) -> list[tuple[int, list[str]]]:
    """(index, referring expressions) of every object whose (colour, shape) pair occurs once in the scene."""
    out = []
    for index, obj in enumerate(objects):
        if sum(o["color"] == obj["color"] and o["shape"] == obj["shape"] for o in objects) != 1:
            continue
        expressions = [f"the {obj['color']} {obj['shape']}"]
        if sum(o["shape"] == obj["shape"] for o in objects) == 1:
            expressions.append(f"the {obj['shape']}")
        if sum(o["color"] == obj["color"] for o in objects) == 1:
            expressions.append(f"the {obj['color']} shape")
        out.append((index, expressions))
    return out


def _grounding_follow_ups(record: dict, rng: np.random.Generator) -> list[FollowUp]:
    objects = record["objects"]
    follow_ups = []
    for index, expressions in _unique_objects(objects):
        expression = expressions[int(rng.integers(len(expressions)))]
        box = objects[index]["box"]
        follow_ups.append(("grounding", f"<|ref|>{expression}<|/ref|>.", format_grounding(expression, [box]),
                           {"expression": expression, "box": box, "target": index}))
    return follow_ups


def _counting_follow_ups(record: dict, rng: np.random.Generator) -> list[FollowUp]:
    objects = record["objects"]
    queries: list[tuple[str, dict[str, str]]] = [("How many shapes are there?", {})]
    queries += [(f"How many {color} shapes are there?", {"color": color})
                for color in sorted({o["color"] for o in objects})]
    queries += [(f"How many {_plural(kind)} are there?", {"shape": kind})
                for kind in sorted({o["shape"] for o in objects})]
    absent = [color for color in SHAPE_COLORS if all(o["color"] != color for o in objects)]
    if absent and rng.random() < 0.15:  # as in one-turn counting, "0" is sometimes the answer
        color = absent[int(rng.integers(len(absent)))]
        queries.append((f"How many {color} shapes are there?", {"color": color}))
    follow_ups = []
    for question, query in queries:
        regions = [o["box"] for o in objects
                   if o["color"] == query.get("color", o["color"]) and o["shape"] == query.get("shape", o["shape"])]
        follow_ups.append(("counting", question, str(len(regions)), {"query": query, "regions": regions}))
    return follow_ups


def _caption_follow_ups(record: dict, rng: np.random.Generator) -> list[FollowUp]:
    """A scene's caption: only for records that name their background (captions and grounded captions)."""
    if "background" not in record:
        return []
    ordered = sorted(record["objects"], key=lambda o: (o["box_px"][0], o["box_px"][1]))
    count_word = _NUMBER_WORDS[len(ordered)].capitalize()
    noun = "shape" if len(ordered) == 1 else "shapes"
    items = _join_phrases([_with_article(f"{o['color']} {o['shape']}") for o in ordered])
    background = record["background"]
    caption = f"{count_word} {noun} on {_with_article(background)} background, from left to right: {items}."
    return [("caption", "Describe the image in one sentence.", caption, {"background": background})]


def _grounded_caption_follow_ups(record: dict, rng: np.random.Generator) -> list[FollowUp]:
    """A grounded caption: only for records that name their background."""
    if "background" not in record:
        return []
    ordered = sorted(record["objects"], key=lambda o: (o["box_px"][0], o["box_px"][1]))
    parts = [format_grounding(_with_article(f"{o['color']} {o['shape']}"), [o["box"]]) for o in ordered]
    answer = f"The image shows {_join_phrases(parts)} on {_with_article(record['background'])} background."
    return [("grounded_caption", "<|grounding|>Describe the image.", answer,
             {"boxes": [o["box"] for o in ordered], "background": record["background"]})]


_FOLLOW_UPS = {
    "grounding": _grounding_follow_ups,
    "counting": _counting_follow_ups,
    "caption": _caption_follow_ups,
    "grounded_caption": _grounded_caption_follow_ups,
}
# The metric fields of each scene task: replaced by the last turn's in a conversation.
_TURN_FIELDS = ("expression", "box", "target", "query", "regions", "boxes")


def _first_question_regions(record: dict) -> list[list[int]]:
    """The boxes the record's own question is about: the box asked for, the shapes counted, every shape of a
    description (what the token-relevance reader of the default recipe labels)."""
    if record["task"] == "grounding":
        return [record["box"]]
    if record["task"] == "counting":
        return record["regions"]
    return [o["box"] for o in record["objects"]]


def add_follow_ups(record: dict, turns: int, follow_up_tasks: Sequence[str], rng: np.random.Generator) -> dict:
    """A scene record as a conversation of up to `turns` turns: each follow-up picks one of `follow_up_tasks`
    that still has an unasked question about the scene, then one of its questions, at random. Records that are
    not about a scene come back unchanged."""
    if record.get("task") not in SCENE_TASKS or turns <= 1:
        return record
    asked = {record["messages"][0]["content"].removesuffix(f"\n{IMAGE_TAG}")}
    boxed = {record["target"]} if "target" in record else set()  # a shape is asked for once, whatever the words
    messages = list(record["messages"])
    turn_tasks = [record["task"]]
    last: FollowUp | None = None
    for _ in range(turns - 1):
        choices = {task: [f for f in _FOLLOW_UPS[task](record, rng) if f[1] not in asked
                          and f[3].get("target") not in boxed] for task in follow_up_tasks}
        choices = {task: follow_ups for task, follow_ups in choices.items() if follow_ups}
        if not choices:
            break
        tasks = sorted(choices)
        options = choices[tasks[int(rng.integers(len(tasks)))]]
        last = options[int(rng.integers(len(options)))]
        task, question, answer, _ = last
        asked.add(question)
        boxed.add(last[3].get("target"))
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        turn_tasks.append(task)
    if last is None:
        return record
    task, _, answer, fields = last
    out = {key: value for key, value in record.items() if key not in _TURN_FIELDS}
    out.update(messages=messages, task=task, answers=[answer])
    out.update({key: value for key, value in fields.items() if key != "regions"})
    out.update(turn_tasks=turn_tasks, regions=_first_question_regions(record))
    return out


def asked_first(conversation: dict) -> dict:
    """The last question of a conversation asked alone: the one-turn record of that question about the image."""
    if "turn_tasks" not in conversation:
        raise InputError("asked_first needs a conversation record (one with 'turn_tasks')")
    question, answer = conversation["messages"][-2]["content"], conversation["messages"][-1]["content"]
    out = {key: value for key, value in conversation.items() if key not in ("turn_tasks", "regions")}
    out["messages"] = [{"role": "user", "content": f"{question}\n{IMAGE_TAG}"},
                       {"role": "assistant", "content": answer}]
    if out["task"] == "counting":
        query = out["query"]
        out["regions"] = [o["box"] for o in out["objects"] if o["color"] == query.get("color", o["color"])
                          and o["shape"] == query.get("shape", o["shape"])]
    return out


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------


def _split_key(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


def _sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _split_key(split), index]))


def _task_schedule(seed: int, split: str, tasks: Sequence[str], n: int) -> list[str]:
    """Tasks for samples 0..n-1: each cycle holds every task `weight` times, in a shuffled order."""
    cycle = [task for task in tasks for _ in range(TASK_WEIGHTS[task])]
    schedule: list[str] = []
    cycle_index = 0
    while len(schedule) < n:
        # A seed stream apart from the samples' own: 2**32 is not a sample index for any sane n.
        order = np.random.default_rng(np.random.SeedSequence([seed, _split_key(split), 2**32, cycle_index]))
        schedule.extend(cycle[int(i)] for i in order.permutation(len(cycle)))
        cycle_index += 1
    return schedule[:n]


def _check_arguments(n: int, seed: int, split: str, tasks: Sequence[str] | None) -> tuple[str, ...]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    chosen = TASKS if tasks is None else tuple(tasks)
    unknown = [t for t in chosen if t not in TASK_WEIGHTS]
    if unknown or not chosen:
        raise InputError(f"unknown or empty task list {list(chosen)!r}; known tasks: {', '.join(TASKS)}")
    return tuple(dict.fromkeys(chosen))


def _check_turns(turns: int | tuple[int, int], follow_ups: Sequence[str] | None
                 ) -> tuple[tuple[int, int], tuple[str, ...]]:
    low, high = (turns, turns) if isinstance(turns, int) else tuple(turns)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (low, high)) or not 1 <= low <= high <= MAX_TURNS:
        raise InputError(f"turns must be a number of turns from 1 to {MAX_TURNS}, or a range MIN-MAX within it; "
                         f"got {turns!r}")
    chosen = FOLLOW_UP_TASKS if follow_ups is None else tuple(follow_ups)
    unknown = [t for t in chosen if t not in FOLLOW_UP_TASKS]
    if unknown or not chosen:
        raise InputError(f"unknown or empty follow-up task list {list(chosen)!r}; follow-ups can ask: "
                         f"{', '.join(FOLLOW_UP_TASKS)}")
    return (low, high), tuple(dict.fromkeys(chosen))


def _follow_up_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # A stream apart from the sample's own (one more entry), so follow-ups leave the first turn and image as they are.
    return np.random.default_rng(np.random.SeedSequence([seed, _split_key(split), index, 1]))


def generate_records(n: int, seed: int, split: str = "train", tasks: Sequence[str] | None = None,
                     turns: int | tuple[int, int] = 1, follow_ups: Sequence[str] | None = None
                     ) -> Iterator[tuple[dict[str, Any], Image.Image | None]]:
    """The n samples of (seed, split, tasks) in memory, each (record, image or None): the records
    `generate_dataset` writes, before their image paths are set. With `turns` above 1 (a number, or a
    (min, max) range drawn per record), scene records become conversations whose follow-ups ask `follow_ups`."""
    chosen = _check_arguments(n, seed, split, tasks)
    (low, high), follow_up_tasks = _check_turns(turns, follow_ups)
    for index, task in enumerate(_task_schedule(seed, split, chosen, n)):
        record, image = _MAKERS[task](_sample_rng(seed, split, index), split)
        if high > 1:
            rng = _follow_up_rng(seed, split, index)
            record = add_follow_ups(record, int(rng.integers(low, high + 1)), follow_up_tasks, rng)
        yield record, image


def generate_dataset(out_dir: str | Path, n: int, seed: int, split: str = "train",
                     tasks: Sequence[str] | None = None, turns: int | tuple[int, int] = 1,
                     follow_ups: Sequence[str] | None = None) -> dict[str, int]:
    """Write n samples to out_dir/<split>.jsonl (+ out_dir/images/) and return the count per task (of the
    last turn). With conversations, out_dir/<split>_asked_first.jsonl gets each one's last question alone."""
    chosen = _check_arguments(n, seed, split, tasks)
    _check_turns(turns, follow_ups)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(chosen, 0)
    first_path = out / f"{split}_asked_first.jsonl"
    conversations = 0
    with open(out / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as jsonl, \
            open(first_path, "w", encoding="utf-8", newline="\n") as first:
        for index, (record, image) in enumerate(generate_records(n, seed, split, chosen, turns, follow_ups)):
            task = record["task"]
            if image is not None:
                relative = f"images/{split}-{index:06d}.png"
                image.save(out / relative, format="PNG", compress_level=6)
                record["images"] = [relative]
            jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
            if "turn_tasks" in record:
                first.write(json.dumps(asked_first(record), ensure_ascii=False) + "\n")
                conversations += 1
            counts[task] = counts.get(task, 0) + 1
    if not conversations:
        first_path.unlink()
    return counts


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dsvl2 data synth`."""
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder (gets <split>.jsonl and images/)")
    parser.add_argument("--n", type=int, default=1000, help="number of samples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--split", choices=SPLITS, default="train",
                        help="split name; each split has its own random streams")
    parser.add_argument("--tasks", default=None,
                        help=f"comma-separated subset of: {','.join(TASKS)} (default: all)")
    parser.add_argument("--turns", default="1",
                        help="turns per conversation about a shape scene: N, or MIN-MAX drawn per record (default 1)")
    parser.add_argument("--follow-ups", default=None,
                        help=f"what follow-up questions ask, comma-separated subset of: {','.join(FOLLOW_UP_TASKS)} "
                             "(default: all)")


def parse_turns(value: str) -> int | tuple[int, int]:
    """`--turns`: "N" or "MIN-MAX"."""
    parts = value.split("-")
    if len(parts) not in (1, 2) or not all(part.strip().isdigit() for part in parts):
        raise InputError(f"--turns takes a number of turns or a range MIN-MAX, got {value!r}")
    numbers = [int(part) for part in parts]
    return numbers[0] if len(numbers) == 1 else (numbers[0], numbers[1])


def run(args: argparse.Namespace) -> int:
    """Generate the dataset described by parsed arguments; print a summary; return an exit code."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    follow_ups = [t.strip() for t in args.follow_ups.split(",") if t.strip()] if args.follow_ups else None
    started = time.perf_counter()
    try:
        counts = generate_dataset(args.out, args.n, args.seed, args.split, tasks, parse_turns(args.turns), follow_ups)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    summary = ", ".join(f"{task}={count}" for task, count in counts.items())
    print(f"wrote {sum(counts.values())} records to {Path(args.out) / (args.split + '.jsonl')} "
          f"in {elapsed:.1f}s ({summary})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsvl2 data synth", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
