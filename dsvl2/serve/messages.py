"""OpenAI chat messages to the engine's conversation format, image URLs to pictures, answers to boxes.

Image parts become `<image>` tags at their place in the text; an image part is followed by a
newline when anything comes after it (the official prompts read `<image>\\n{question}`), and two
adjacent text parts are joined by a newline. The server never fetches a URL: images arrive as
`data:image/...;base64,` URLs, or as local paths when the operator allowed local files.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from dsvl2.errors import ImageDecodeError, ImageTooLargeError, InputError
from dsvl2.grounding import IMAGE_TAG, box_to_pixels, parse_grounding
from dsvl2.images import load_image
from dsvl2.serve.schemas import APIError, ChatMessage, ImagePart, TextPart

ImageSource = bytes | Path


def _bad_image(message: str, code: str = "invalid_image") -> APIError:
    return APIError(400, message, code, param="messages")


def decode_data_url(url: str, where: str) -> bytes:
    """The bytes of a `data:image/<subtype>;base64,<payload>` URL."""
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().startswith("data:image/") or ";base64" not in header.lower():
        raise _bad_image(f"{where}: a data URL must look like data:image/<type>;base64,<payload>")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad_image(f"{where}: the data URL's base64 payload is invalid ({exc})", "invalid_base64") from None
    if not data:
        raise _bad_image(f"{where}: the data URL holds no image data")
    return data


def image_source(url: str, where: str, allow_local_files: bool) -> ImageSource:
    """Bytes of a data URL or, when allowed, the path of a local file; anything else is refused."""
    lowered = url[:16].lower()
    if lowered.startswith("data:"):
        return decode_data_url(url, where)
    if lowered.startswith(("http://", "https://")):
        raise _bad_image(f"{where}: remote image URLs are not fetched by this server; "
                         "send the image as a data:image/...;base64 URL", "remote_url_refused")
    path_text = url[len("file://"):] if lowered.startswith("file://") else url
    if "://" in path_text or not path_text:
        raise _bad_image(f"{where}: unsupported image URL scheme in {url[:40]!r}", "unsupported_url")
    if not allow_local_files:
        raise _bad_image(f"{where}: local image paths are disabled (start the server with --allow-local-files)",
                         "local_files_disabled")
    path = Path(path_text)
    if not path.is_absolute():
        raise _bad_image(f"{where}: a local image path must be absolute, got {path_text[:80]!r}")
    if not path.is_file():
        raise _bad_image(f"{where}: no such image file {path_text[:200]!r}")
    return path


def _message_text(message: ChatMessage, index: int, images: list[ImageSource], allow_local_files: bool) -> str:
    content = message.content
    if content is None:
        return ""
    parts: Sequence[TextPart | ImagePart] = [TextPart(type="text", text=content)] if isinstance(content, str) \
        else content
    text = ""
    for number, part in enumerate(parts):
        where = f"messages[{index}].content[{number}]"
        if number:  # each part on its own line: "<image>\nQuestion" or "Question\n<image>", as in training
            text += "\n"
        if isinstance(part, ImagePart):
            if message.role != "user":
                raise APIError(400, f"{where}: images are only allowed in user messages", "invalid_request",
                               param="messages")
            images.append(image_source(part.url, where, allow_local_files))
            text += IMAGE_TAG
        else:
            if IMAGE_TAG in part.text:
                raise APIError(400, f"{where}: the text must not contain {IMAGE_TAG}; send images as image_url "
                               "parts", "invalid_request", param="messages")
            text += part.text
    return text


def to_conversation(messages: Sequence[ChatMessage], allow_local_files: bool, max_images: int
                    ) -> tuple[list[dict[str, str]], list[ImageSource]]:
    """The engine's conversation (`<image>` tags in the text) and the image sources in tag order."""
    conversation: list[dict[str, str]] = []
    images: list[ImageSource] = []
    for index, message in enumerate(messages):
        conversation.append({"role": message.role, "content": _message_text(message, index, images,
                                                                             allow_local_files)})
        if len(images) > max_images:
            raise APIError(400, f"too many images: at most {max_images} per request", "too_many_images",
                           param="messages")
    if conversation[-1]["role"] == "system":
        raise APIError(400, "the conversation needs a user message after the system message", "invalid_request",
                       param="messages")
    return conversation, images


def load_images(sources: Sequence[ImageSource], max_pixels: int) -> list[Image.Image]:
    """Decode every image (RGB, EXIF orientation applied); problems become 400 errors naming the image."""
    pictures = []
    for number, source in enumerate(sources, start=1):  # numbered as the page numbers its images
        try:
            pictures.append(load_image(source, max_pixels=max_pixels))
        except ImageTooLargeError as exc:
            raise _bad_image(f"image {number}: {exc}", "image_too_large") from None
        except ImageDecodeError as exc:
            raise _bad_image(f"image {number}: {exc}") from None
        except InputError as exc:
            raise _bad_image(f"image {number}: {exc}") from None
    return pictures


def grounding_entries(text: str, image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
    """One entry per referred object of an answer, boxes in pixels of the request's LAST image.

    That is the official convention: the released inference script draws the boxes of an answer
    on `pil_images[-1]` (multi-image grounding asks about the last image given).
    """
    refs = parse_grounding(text).refs
    index = len(image_sizes) - 1 if image_sizes else None
    entries = []
    for ref in refs:
        pixel_boxes = []
        if index is not None:
            width, height = image_sizes[index]
            pixel_boxes = [[round(value, 2) for value in box_to_pixels(box, width, height)] for box in ref.boxes]
        entries.append({"label": ref.label, "boxes": pixel_boxes, "grid_boxes": [list(box) for box in ref.boxes],
                        "image_index": index})
    return entries
