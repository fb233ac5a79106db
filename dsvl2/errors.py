"""Errors for bad input: each names the problem so a caller (CLI, server, trainer) can report it."""

from __future__ import annotations


class InputError(ValueError):
    """A request or record cannot be processed; the server answers 400, the trainer skips it."""


class ImageCountError(InputError):
    """The number of `<image>` tags differs from the number of images given."""


class ImageDecodeError(InputError):
    """Image bytes are empty or not an image Pillow can decode."""


class ImageTooLargeError(InputError):
    """An image has more pixels than the configured limit (decompression-bomb guard)."""


class PromptTooLongError(InputError):
    """A prompt, image tokens included, exceeds the model's context length."""
