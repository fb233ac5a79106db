"""Loading untrusted images: any source and mode to an RGB picture, with a decompression-bomb guard."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dsvl2.errors import ImageDecodeError, ImageTooLargeError, InputError

DEFAULT_MAX_PIXELS = 50_000_000

ImageSource = str | Path | bytes | bytearray | memoryview | BinaryIO | Image.Image

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def describe_source(source: object) -> str:
    """A short name for an image source, for error messages (never the raw bytes)."""
    if isinstance(source, (str, Path)):
        text = str(source)
        return f"data URI ({len(text)} characters)" if text.startswith("data:") else text
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(source)} bytes)"
    if isinstance(source, Image.Image):
        return f"PIL image ({source.mode}, {source.width}x{source.height})"
    return getattr(source, "name", None) or type(source).__name__


def _bytes_from_data_uri(uri: str) -> bytes:
    header, _, payload = uri.partition(",")
    if ";base64" not in header:
        raise ImageDecodeError(f"{describe_source(uri)}: only base64 data URIs are supported")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageDecodeError(f"{describe_source(uri)}: invalid base64 payload ({exc})") from exc


def _open(source: ImageSource, name: str) -> Image.Image:
    """Open lazily: Pillow reads only the header here, so the size is known before decoding."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, str) and source.startswith("data:"):
        source = _bytes_from_data_uri(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageDecodeError(f"{name}: empty image data")
        stream: str | Path | BinaryIO = io.BytesIO(bytes(source))
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{name}: no such image file")
        if path.stat().st_size == 0:
            raise ImageDecodeError(f"{name}: empty image file")
        stream = path
    elif hasattr(source, "read"):
        stream = source
    else:
        raise InputError(f"unsupported image source type {type(source).__name__}")
    try:
        return Image.open(stream)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name}: {exc}") from exc
    except UnidentifiedImageError as exc:
        # Pillow's own message names its in-memory stream object, which means nothing to a user.
        message = "not PNG, JPEG, WebP, GIF or another format Pillow reads"
        raise ImageDecodeError(f"{name}: not a decodable image ({message})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"{name}: not a decodable image ({exc})") from exc


def _check_size(image: Image.Image, max_pixels: int, name: str) -> None:
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {image.width}x{image.height} = {pixels} pixels exceeds the limit of {max_pixels}"
        )
    if pixels == 0:
        raise ImageDecodeError(f"{name}: image has no pixels ({image.width}x{image.height})")


def _integers_to_8bit(values: np.ndarray) -> np.ndarray:
    """Scale samples to 0..255 by the range they evidently use (8-bit, 16-bit, or anything else)."""
    values = np.nan_to_num(values.astype(np.float64))
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low >= 0.0 and high <= 255.0:
        scaled = values
    elif low >= 0.0 and high <= 65535.0:
        scaled = values / 257.0  # 16-bit data: 65535 -> 255
    else:
        scaled = (values - low) / (high - low) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _floats_to_8bit(values: np.ndarray) -> np.ndarray:
    """Float pictures are usually 0..1; anything else is scaled like integer samples."""
    values = np.nan_to_num(values.astype(np.float64))
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
    return _integers_to_8bit(values)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB like the official `convert("RGB")`, after bringing wide samples down to 8 bits."""
    if image.mode in _SIXTEEN_BIT_MODES:
        samples = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.rint(samples / 257.0), 0, 255).astype(np.uint8))
    elif image.mode == "I":
        image = Image.fromarray(_integers_to_8bit(np.asarray(image)))
    elif image.mode == "F":
        image = Image.fromarray(_floats_to_8bit(np.asarray(image)))
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a path, bytes, data URI, file object or PIL image into an RGB image.

    EXIF orientation is applied. More than `max_pixels` pixels raises ImageTooLargeError
    before any pixel is decoded; undecodable data raises ImageDecodeError naming the source.
    """
    name = describe_source(source)
    image = _open(source, name)
    try:
        _check_size(image, max_pixels, name)
        return _decode(image, name, copy_needed=image is source)
    finally:
        if image is not source:
            image.close()  # release the file handle even when decoding failed


def _decode(image: Image.Image, name: str, copy_needed: bool) -> Image.Image:
    try:
        image.load()
        oriented = ImageOps.exif_transpose(image)
        rgb = _to_rgb(oriented)
        rgb.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name}: {exc}") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(f"{name}: cannot decode image ({exc})") from exc
    if rgb is image and copy_needed:  # never hand back (and later alias) the caller's own image
        rgb = rgb.copy()
    return rgb
