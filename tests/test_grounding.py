"""Grounding spans: parsing untrusted answers, coordinate conversion, formatting and drawing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from dsvl2.errors import InputError
from dsvl2.grounding import (
    Ref,
    box_to_pixels,
    draw_boxes,
    format_grounding,
    grounded_caption_prompt,
    parse_grounding,
    pixels_to_box,
    referring_prompt,
)


def test_official_answer_form_parses() -> None:
    # The answer of the conformance `_loss` training case.
    result = parse_grounding("<|ref|>the red circle<|/ref|><|det|>[[120, 300, 410, 615]]<|/det|>")
    assert result.errors == []
    assert result.refs == [Ref("the red circle", [(120, 300, 410, 615)])]
    assert result.text == "the red circle"


def test_several_labels_and_boxes_in_a_caption() -> None:
    answer = ("Two <|ref|>cats<|/ref|><|det|>[[1, 2, 30, 40], [50,60,70,80]]<|/det|> sit by a "
              "<|ref|>window<|/ref|> <|det|>[[0,0,999,500]]<|/det|>.")
    result = parse_grounding(answer)
    assert result.errors == []
    assert result.refs == [Ref("cats", [(1, 2, 30, 40), (50, 60, 70, 80)]), Ref("window", [(0, 0, 999, 500)])]
    assert result.text == "Two cats sit by a window ."


def test_det_without_ref_and_ref_without_det() -> None:
    result = parse_grounding("<|det|>[[5, 6, 7, 8]]<|/det|> and <|ref|>a dog<|/ref|> with no box")
    assert result.errors == []
    assert result.refs == [Ref(None, [(5, 6, 7, 8)]), Ref("a dog", [])]


@pytest.mark.parametrize(
    "answer",
    [
        "<|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4]]",  # unclosed det (generation cut off)
        "<|ref|>cat<|det|>[[1, 2, 3, 4]]<|/det|>",  # unclosed ref
        "<|ref|>cat<|/ref|><|det|>[[1, two, 3, 4]]<|/det|>",  # non-numeric
        "<|ref|>cat<|/ref|><|det|>[[1, 2, 3]]<|/det|>",  # three coordinates
        "<|ref|>cat<|/ref|><|det|>[[[1, 2, 3, 4]]]<|/det|>",  # nested brackets
        "<|ref|>cat<|/ref|><|det|>[[1, 2, 3, " + "9" * 5000 + "]]<|/det|>",  # huge number
        "<|ref|>cat<|/ref|><|det|>[[1, 2, 3, 1000]]<|/det|>",  # off the 0..999 grid
        "<|ref|>cat<|/ref|><|det|>[[1, 2, -3, 4]]<|/det|>",  # negative
        "<|ref|>cat<|/ref|><|det|>[[9, 9, 1, 1]]<|/det|>",  # reversed corners
        "<|ref|>cat<|/ref|><|det|>__import__('os').system('echo pwned')<|/det|>",
        "<|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4]] + [__import__('os')]<|/det|>",
        "stray <|/det|> and <|/ref|> closers",
        "<|det|><|det|>[[1, 2, 3, 4]]<|/det|>",
    ],
)
def test_malformed_spans_are_errors_not_exceptions(answer: str) -> None:
    result = parse_grounding(answer)
    assert result.errors, f"no error reported for {answer[:60]!r}"
    assert all(0 <= v <= 999 for ref in result.refs for box in ref.boxes for v in box)


def test_good_boxes_survive_next_to_bad_ones() -> None:
    result = parse_grounding("<|ref|>a<|/ref|><|det|>[[1, 2, 3, 4], [1, 2, 3]]<|/det|>"
                             "<|ref|>b<|/ref|><|det|>[[5, 6, 7, 8]]<|/det|>")
    assert len(result.errors) == 1
    assert result.refs == [Ref("a", [(1, 2, 3, 4)]), Ref("b", [(5, 6, 7, 8)])]


@given(
    st.integers(1, 1998), st.integers(1, 1998),
    st.tuples(*[st.floats(0, 1, allow_nan=False)] * 4),
    st.text(alphabet=st.characters(blacklist_characters="<>|", blacklist_categories=("Cs",)), min_size=1,
            max_size=20),
)
@example(1998, 1, (0.5, 0.0, 0.0, 0.0), "0")  # an exact half step: 999 px -> grid 500 -> 1000.0000000000001 px
@settings(max_examples=300, deadline=None)
def test_pixels_grid_text_round_trip_within_one_pixel(width: int, height: int, fractions, label: str) -> None:
    fx1, fy1, fx2, fy2 = fractions
    pixel_box = (min(fx1, fx2) * width, min(fy1, fy2) * height, max(fx1, fx2) * width, max(fy1, fy2) * height)
    grid_box = pixels_to_box(pixel_box, width, height)
    result = parse_grounding("Here: " + format_grounding(label, [grid_box]) + " done")
    assert result.errors == []
    assert [ref.label for ref in result.refs] == [label.strip()]
    (parsed,) = result.refs[0].boxes
    back = box_to_pixels(parsed, width, height)
    # The grid step is side / 999 pixels, so rounding to it moves a coordinate by at most half a step
    # (1 px up to side 1998), plus float rounding when a coordinate sits exactly on a half step.
    assert all(abs(a - b) <= 1.0 + 1e-9 for a, b in zip(back, pixel_box, strict=True))


def test_box_to_pixels_uses_the_official_999_scale() -> None:
    assert box_to_pixels((0, 0, 999, 999), 640, 480) == (0.0, 0.0, 640.0, 480.0)
    assert box_to_pixels((333, 333, 666, 666), 999, 1998) == (333.0, 666.0, 666.0, 1332.0)
    assert pixels_to_box((-5, -5, 700, 500), 640, 480) == (0, 0, 999, 999)  # clamped to the grid


def test_format_grounding_matches_the_training_form() -> None:
    assert format_grounding("the red circle", [(120, 300, 410, 615)]) == (
        "<|ref|>the red circle<|/ref|><|det|>[[120, 300, 410, 615]]<|/det|>"
    )
    two_boxes = format_grounding(None, [(1, 2, 3, 4), (5, 6, 7, 8)])
    assert two_boxes == "<|det|>[[1, 2, 3, 4], [5, 6, 7, 8]]<|/det|>"
    with pytest.raises(InputError):
        format_grounding("x", [(1, 2, 3, 1000)])
    with pytest.raises(InputError):
        format_grounding("<|det|>", [(1, 2, 3, 4)])


def test_prompt_builders() -> None:
    assert referring_prompt("The giraffe at the back") == "<|ref|>The giraffe at the back<|/ref|>."
    assert grounded_caption_prompt() == "<|grounding|>Describe the image in detail."
    with pytest.raises(InputError, match="<image>"):
        referring_prompt("two <image> tags")


def test_draw_boxes_marks_the_box_edge_and_leaves_the_input_alone() -> None:
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    ref = Ref("thing", [pixels_to_box((50, 40, 150, 90), 200, 100)])
    drawn = draw_boxes(image, [ref])
    pixels = np.asarray(drawn)
    left, _, right, bottom = (round(v) for v in box_to_pixels(ref.boxes[0], 200, 100))
    assert pixels[65, left].tolist() != [255, 255, 255]  # left edge, mid-height
    assert pixels[65, right].tolist() != [255, 255, 255]
    assert pixels[bottom, 100].tolist() != [255, 255, 255]
    assert pixels[65, 100].tolist() == [255, 255, 255]  # inside stays untouched
    assert (np.asarray(image) == 255).all()
    assert drawn.size == image.size


def test_draw_boxes_accepts_swapped_corners_from_a_model() -> None:
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    swapped = Ref("thing", [(749, 899, 250, 400)])  # x2 < x1 and y2 < y1, as a weak model may write
    ordered = Ref("thing", [(250, 400, 749, 899)])
    assert draw_boxes(image, [swapped]).tobytes() == draw_boxes(image, [ordered]).tobytes()
    assert draw_boxes(image, [swapped]).tobytes() != image.tobytes()
