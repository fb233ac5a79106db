"""OpenAI messages to a conversation and images, and answers' boxes back to pixels (no server)."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is needed (pip install -e '.[serve]')")

from dsvl2.serve.messages import grounding_entries, load_images, to_conversation  # noqa: E402
from dsvl2.serve.schemas import APIError, ChatMessage  # noqa: E402


def png_data_url(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_image_parts_become_tags_at_their_place() -> None:
    messages = [ChatMessage.model_validate(m) for m in [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "First:"}, {"type": "image_url", "image_url": {"url": png_data_url(4, 4)}},
            {"type": "image_url", "image_url": {"url": png_data_url(5, 5)}}, {"type": "text", "text": "Compare."},
        ]},
    ]]
    conversation, images = to_conversation(messages, allow_local_files=False, max_images=4)
    assert conversation == [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "First:\n<image>\n<image>\nCompare."}]
    assert [Image.open(io.BytesIO(data)).size for data in images] == [(4, 4), (5, 5)]


def test_a_bad_image_is_named_by_its_number_from_one() -> None:
    # The page numbers a message's images #1, #2, ...: the error must name the same one.
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with pytest.raises(APIError) as raised:
        load_images([png.getvalue(), b"not an image"], max_pixels=1 << 20)
    assert raised.value.message.startswith("image 2: "), raised.value.message
    assert "0x" not in raised.value.message


def test_grounding_boxes_are_pixels_of_the_last_image() -> None:
    text = "<|ref|>cat<|/ref|><|det|>[[0, 0, 999, 499], [333, 111, 666, 222]]<|/det|> and <|det|>[[9, 9, 9, 9]]<|/det|>"
    entries = grounding_entries(text, [(50, 50), (300, 200)])
    # grid value / 999 * side, the official scale
    assert entries[0] == {"label": "cat", "boxes": [[0.0, 0.0, 300.0, 99.9], [100.0, 22.22, 200.0, 44.44]],
                          "grid_boxes": [[0, 0, 999, 499], [333, 111, 666, 222]], "image_index": 1}
    assert entries[1]["label"] is None and entries[1]["grid_boxes"] == [[9, 9, 9, 9]]
    assert grounding_entries(text, [])[0]["boxes"] == []  # no image: nothing to scale to


# ----------------------------------------------------------------------------- basic endpoints
