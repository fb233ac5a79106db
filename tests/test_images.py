"""Image loading: every mode to RGB, EXIF orientation, decode errors and the pixel-count guard."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsvl2.errors import ImageDecodeError, ImageTooLargeError, InputError
from dsvl2.images import load_image


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size in its IHDR chunk but holds no pixel data at all."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


ALL_MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "LA", "PA", "YCbCr"]


@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_mode_becomes_rgb(mode: str) -> None:
    image = Image.new("RGB", (7, 5), (200, 100, 50)).convert(mode)
    loaded = load_image(image)
    assert loaded.mode == "RGB" and loaded.size == (7, 5)


def test_sixteen_bit_samples_are_scaled_not_clipped() -> None:
    samples = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    image = Image.fromarray(samples)
    assert image.mode.startswith("I;16")
    pixels = np.asarray(load_image(encoded(image)))  # through a 16-bit PNG file as well
    assert pixels[0, :, 0].tolist() == [0, 64, 128, 255]
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_32_bit_integer_and_float_images_are_scaled() -> None:
    wide = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I")
    assert np.asarray(load_image(wide))[0, :, 0].tolist() == [0, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(load_image(unit))[0, :, 0].tolist() == [0, 128, 255]


def test_alpha_is_dropped_like_the_official_convert() -> None:
    rgba = Image.new("RGBA", (3, 3), (10, 20, 30, 0))
    assert np.asarray(load_image(encoded(rgba)))[1, 1].tolist() == [10, 20, 30]


def test_palette_colours_survive() -> None:
    image = Image.new("RGB", (4, 4), (0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert np.asarray(load_image(encoded(image)))[0, 0].tolist() == [0, 0, 255]


def test_exif_orientation_is_applied() -> None:
    picture = Image.new("RGB", (40, 20), (255, 0, 0))
    picture.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    loaded = load_image(encoded(picture, "JPEG", exif=exif.tobytes(), quality=95))
    assert loaded.size == (20, 40)
    top, bottom = np.asarray(loaded)[5, 10], np.asarray(loaded)[35, 10]
    assert top[0] > 200 and top[2] < 60  # red came to the top
    assert bottom[2] > 200 and bottom[0] < 60


def test_sources_path_bytes_and_pil_agree(tmp_path: Path) -> None:
    picture = Image.new("RGB", (6, 4), (1, 2, 3))
    path = tmp_path / "p.png"
    picture.save(path)
    for source in (path, str(path), path.read_bytes(), bytearray(path.read_bytes()), picture):
        assert np.array_equal(np.asarray(load_image(source)), np.asarray(picture))


def test_pil_source_is_not_aliased() -> None:
    picture = Image.new("RGB", (2, 2))
    assert load_image(picture) is not picture


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_empty_or_garbage_bytes_raise_decode_error(data: bytes) -> None:
    with pytest.raises(ImageDecodeError, match="bytes") as raised:
        load_image(data)
    assert "0x" not in str(raised.value) and "<_io" not in str(raised.value), "a Python repr reached the message"


def test_truncated_image_raises_decode_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    path.write_bytes(encoded(Image.effect_noise((64, 64), 50).convert("RGB"))[:200])
    with pytest.raises(ImageDecodeError, match="cut.png"):
        load_image(path)


def test_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_too_many_pixels_rejected_from_the_header_alone() -> None:
    # 8000 x 8000 = 64 M pixels: over the default 50 M limit, under Pillow's own bomb limit.
    # The file has no pixel data, so any attempt to decode would fail with a decode error instead.
    with pytest.raises(ImageTooLargeError, match="64000000"):
        load_image(png_header_only(8000, 8000))


def test_pillow_decompression_bomb_maps_to_too_large() -> None:
    with pytest.raises(ImageTooLargeError):
        load_image(png_header_only(100_000, 100_000), max_pixels=10**12)


def test_max_pixels_is_configurable() -> None:
    data = encoded(Image.new("RGB", (10, 10)))
    assert load_image(data, max_pixels=100).size == (10, 10)
    with pytest.raises(ImageTooLargeError, match="100 pixels exceeds the limit of 99"):
        load_image(data, max_pixels=99)


def test_base64_data_uri_source() -> None:
    data = encoded(Image.new("RGB", (3, 2), (9, 8, 7)))
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    assert np.asarray(load_image(uri))[0, 0].tolist() == [9, 8, 7]
    with pytest.raises(ImageDecodeError, match="base64"):
        load_image("data:image/png;base64,@@@")
