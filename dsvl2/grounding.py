"""Visual grounding: `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>` spans.

Coordinates live on a 0..999 grid spanning the image's width and height (official: x / 999 * width).
Model output is untrusted text: it is parsed with regular expressions and `int`, never evaluated,
and anything malformed is reported in `Grounding.errors` instead of raising.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from dsvl2.errors import InputError

REF_OPEN, REF_CLOSE = "<|ref|>", "<|/ref|>"
DET_OPEN, DET_CLOSE = "<|det|>", "<|/det|>"
GROUNDING_TAG = "<|grounding|>"
IMAGE_TAG = "<image>"
GRID_MAX = 999

Box = tuple[int, int, int, int]

_TAG = re.compile(r"<\|/?(?:ref|det)\|>")
_NUMBER = r"\s*(\d{1,7})\s*"  # bounded: a huge digit string is an error, not a slow int()
_BOX = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")
_BOX_LIST = re.compile(r"\s*\[\s*(?:\[[^\[\]]*\]\s*,\s*)*\[[^\[\]]*\]\s*,?\s*\]\s*")
_SPECIAL_TAGS = (REF_OPEN, REF_CLOSE, DET_OPEN, DET_CLOSE, GROUNDING_TAG, IMAGE_TAG)


@dataclass
class Ref:
    """A referred object: its label (None for a `<|det|>` with no `<|ref|>`) and grid boxes."""

    label: str | None
    boxes: list[Box] = field(default_factory=list)


@dataclass
class Grounding:
    """Parsed answer: refs in order, the text with tags removed, and what could not be parsed."""

    refs: list[Ref] = field(default_factory=list)
    text: str = ""
    errors: list[str] = field(default_factory=list)


def _parse_boxes(content: str, where: int, errors: list[str]) -> list[Box]:
    """Boxes of one `<|det|>` body: `[[x1, y1, x2, y2], ...]` (a single bare box is accepted too)."""
    single = _BOX.fullmatch(content.strip())
    if single:
        raw_boxes = [single]
    elif _BOX_LIST.fullmatch(content):
        inner = re.findall(r"\[[^\[\]]*\]", content)
        raw_boxes = [_BOX.fullmatch(item) for item in inner]
        for item, match in zip(inner, raw_boxes, strict=True):
            if match is None:
                errors.append(f"at character {where}: box {item[:40]!r} is not four integers")
    else:
        errors.append(f"at character {where}: <|det|> content {content[:60]!r} is not a list of boxes")
        return []
    boxes = []
    for match in raw_boxes:
        if match is None:
            continue
        x1, y1, x2, y2 = (int(value) for value in match.groups())
        if max(x1, y1, x2, y2) > GRID_MAX:
            errors.append(f"at character {where}: box {[x1, y1, x2, y2]} is outside the 0..{GRID_MAX} grid")
        elif x2 < x1 or y2 < y1:
            errors.append(f"at character {where}: box {[x1, y1, x2, y2]} has its corners reversed")
        else:
            boxes.append((x1, y1, x2, y2))
    return boxes


def parse_grounding(text: str) -> Grounding:
    """Find every ref/det span in `text`; never raises on malformed input."""
    result = Grounding()
    plain: list[str] = []
    position = 0
    pending: Ref | None = None  # a closed <|ref|> that a <|det|> may still follow
    tags = list(_TAG.finditer(text))
    index = 0
    while index < len(tags):
        tag = tags[index]
        between = text[position:tag.start()]
        if pending is not None and (between.strip() or tag.group() != DET_OPEN):
            result.refs.append(pending)  # a ref without boxes
            pending = None
        plain.append(between)
        opener = tag.group()
        closer = {REF_OPEN: REF_CLOSE, DET_OPEN: DET_CLOSE}.get(opener)
        if closer is None:
            result.errors.append(f"at character {tag.start()}: {opener} without a matching opening tag")
            position, index = tag.end(), index + 1
            continue
        if index + 1 >= len(tags) or tags[index + 1].group() != closer:
            result.errors.append(f"at character {tag.start()}: {opener} is not closed by {closer}")
            position, index = tag.end(), index + 1
            continue
        body = text[tag.end():tags[index + 1].start()]
        if opener == REF_OPEN:
            pending = Ref(body.strip())
            plain.append(body)
        else:
            boxes = _parse_boxes(body, tag.start(), result.errors)
            ref = pending if pending is not None else Ref(None)
            ref.boxes.extend(boxes)
            result.refs.append(ref)
            pending = None
        position, index = tags[index + 1].end(), index + 2
    if pending is not None:
        result.refs.append(pending)
    plain.append(text[position:])
    result.text = "".join(plain)
    return result


def box_to_pixels(box: Sequence[int], width: int, height: int) -> tuple[float, float, float, float]:
    """Grid box to pixel coordinates (official scale: value / 999 * side)."""
    x1, y1, x2, y2 = box
    return (x1 / GRID_MAX * width, y1 / GRID_MAX * height, x2 / GRID_MAX * width, y2 / GRID_MAX * height)


def pixels_to_box(box: Sequence[float], width: int, height: int) -> Box:
    """Pixel box to the nearest grid box, clamped to 0..999."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")

    def to_grid(value: float, side: int) -> int:
        return min(GRID_MAX, max(0, round(value / side * GRID_MAX)))

    x1, y1, x2, y2 = box
    return (to_grid(x1, width), to_grid(y1, height), to_grid(x2, width), to_grid(y2, height))


def _check_free_text(text: str, what: str) -> None:
    for tag in _SPECIAL_TAGS:
        if tag in text:
            raise InputError(f"{what} must not contain the special tag {tag}")


def format_grounding(label: str | None, boxes: Iterable[Sequence[int]]) -> str:
    """Answer text of one object: `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>`."""
    checked = []
    for box in boxes:
        values = [int(v) for v in box]
        if len(values) != 4 or not all(0 <= v <= GRID_MAX for v in values):
            raise InputError(f"box {list(box)} must be four integers in 0..{GRID_MAX}")
        checked.append("[" + ", ".join(str(v) for v in values) + "]")
    det = f"{DET_OPEN}[{', '.join(checked)}]{DET_CLOSE}"
    if label is None:
        return det
    _check_free_text(label, "a grounding label")
    return f"{REF_OPEN}{label}{REF_CLOSE}{det}"


def referring_prompt(expression: str) -> str:
    """Question asking for the boxes of a referring expression (`dsvl2.processor.with_image_tags` adds
    the image's tag where the model expects it)."""
    _check_free_text(expression, "a referring expression")
    return f"{REF_OPEN}{expression}{REF_CLOSE}."


def grounded_caption_prompt(instruction: str = "Describe the image in detail.") -> str:
    """Question asking for a description whose objects are grounded with boxes (image tag: as above)."""
    _check_free_text(instruction, "a grounded-captioning instruction")
    return f"{GROUNDING_TAG}{instruction}"


_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))


def draw_boxes(image: Image.Image, refs: Iterable[Ref], line_width: int | None = None) -> Image.Image:
    """A copy of `image` with each ref's boxes outlined and labelled, one colour per ref."""
    canvas = image.convert("RGB")  # always a new image: the caller's is left untouched
    draw = ImageDraw.Draw(canvas)
    width = line_width or max(2, min(canvas.width, canvas.height) // 200)
    font = ImageFont.load_default(size=max(10, min(canvas.width, canvas.height) // 40))
    for number, ref in enumerate(refs):
        colour = _COLOURS[number % len(_COLOURS)]
        for box in ref.boxes:
            x1, y1, x2, y2 = (round(v) for v in box_to_pixels(box, canvas.width, canvas.height))
            (x1, x2), (y1, y2) = sorted((x1, x2)), sorted((y1, y2))  # a model may swap the corners
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
            if ref.label:
                left, top, right, bottom = draw.textbbox((x1, y1), ref.label, font=font)
                text_y = max(0, y1 - (bottom - top) - 2 * width)
                draw.rectangle((x1, text_y, x1 + right - left + 2 * width, text_y + bottom - top + 2 * width),
                               fill=colour)
                text_origin = (x1 + width, text_y + width - (top - y1))
                draw.text(text_origin, ref.label, fill=(255, 255, 255), font=font)
    return canvas
