"""Conversations and images to model inputs, exactly as the official DeepSeek-VL2 processor.

Token layout of a conversation (the official `format_messages_v2`): begin-of-sentence, then per
turn a user prompt `<|User|>: {text}\\n\\n<|Assistant|>:` (with each `<image>` expanded to its
image tokens), or an answer `{text}<end-of-sentence>` tokenised on its own (so no space follows
the colon), or a leading system text with no separator. For generation the final
end-of-sentence is dropped, leaving the prompt open after `<|Assistant|>:`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from dsvl2.config import IMAGE_TAG_POSITIONS, ModelFolder, ProcessorConfig, load_processor_config
from dsvl2.errors import ImageCountError, InputError, PromptTooLongError
from dsvl2.grounding import IMAGE_TAG
from dsvl2.images import DEFAULT_MAX_PIXELS, ImageSource, load_image
from dsvl2.tokenizer import ROLE_TOKENS, Tokenizer
from dsvl2.vision.tiling import num_image_tokens, select_tile_grid, tile_counts, tokens_per_tile_side

USER_ROLE, ASSISTANT_ROLE = ROLE_TOKENS
SYSTEM_ROLE = "system"
_ROLE_ALIASES = {
    "user": USER_ROLE, USER_ROLE: USER_ROLE,
    "assistant": ASSISTANT_ROLE, ASSISTANT_ROLE: ASSISTANT_ROLE,
    "system": SYSTEM_ROLE,
}
_TURN_SEPARATOR = "\n\n"
# Above this many images in one conversation the official processor skips local tiling.
_MAX_IMAGES_WITH_LOCAL_TILES = 2


@dataclass
class ImageTiles:
    """One image as the vision encoder sees it: the global view, then local tiles row-major."""

    tiles: torch.Tensor  # uint8 [1 + num_width_tiles * num_height_tiles, 3, S, S]
    num_width_tiles: int
    num_height_tiles: int
    digest: str  # sha256 of the tile bytes: equal digests mean equal encoder input


@dataclass
class Sample:
    """Model inputs of one conversation."""

    input_ids: torch.Tensor  # int64 [T]
    labels: torch.Tensor  # int64 [T], ignore_id where no loss is taken
    images_seq_mask: torch.Tensor  # bool [T], True at image-token positions
    # int64 [n_images, 2] = (num_width_tiles, num_height_tiles); the official [[0, 0]] when there is no image
    images_spatial_crop: torch.Tensor
    pixel_values: torch.Tensor  # float32 [n_tiles, 3, S, S], normalised; [0, 3, S, S] if no image
    num_image_tokens: list[int] = field(default_factory=list)
    image_digests: list[str] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of each image as read

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class Batch:
    """Samples padded to one length (on the left for generation) and stacked."""

    input_ids: torch.Tensor  # int64 [B, T], pad id on padding
    attention_mask: torch.Tensor  # int64 [B, T], 0 on padding
    labels: torch.Tensor  # int64 [B, T], ignore_id on padding
    images_seq_mask: torch.Tensor  # bool [B, T]
    images: torch.Tensor  # float32 [B, max_tiles, 3, S, S], zero tiles as padding
    images_spatial_crop: torch.Tensor  # int64 [B, max_images, 2], zero rows as padding
    num_image_tokens: list[list[int]] = field(default_factory=list)
    image_digests: list[list[str]] = field(default_factory=list)
    image_sizes: list[list[tuple[int, int]]] = field(default_factory=list)

    def to(self, device: torch.device | str) -> Batch:
        moved = {
            name: value.to(device) if isinstance(value, torch.Tensor) else value
            for name, value in self.__dict__.items()
        }
        return type(self)(**moved)


@dataclass(frozen=True)
class _Turn:
    role: str  # USER_ROLE, ASSISTANT_ROLE or SYSTEM_ROLE
    text: str  # stripped content


def _parse_conversation(conversation: Sequence[Mapping[str, Any]]) -> list[_Turn]:
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence):
        raise InputError("a conversation is a list of {'role': ..., 'content': str} messages")
    if not conversation:
        raise InputError("the conversation has no messages")
    turns = []
    for index, message in enumerate(conversation):
        if not isinstance(message, Mapping):
            raise InputError(
                f"message {index} is a {type(message).__name__}, not a dict with role and content"
            )
        role = _ROLE_ALIASES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise InputError(
                f"message {index} has role {message.get('role')!r}; expected one of {sorted(_ROLE_ALIASES)}"
            )
        content = message.get("content", "")
        if not isinstance(content, str):
            raise InputError(f"message {index} content must be a string, got {type(content).__name__}")
        if role == SYSTEM_ROLE and index != 0:
            raise InputError(f"message {index}: a system message may only be the first message")
        turns.append(_Turn(role, content.strip()))
    return turns


def with_image_tags(text: str, num_images: int, position: str = "before") -> str:
    """The text with one `<image>` line per image before it (position "before") or after it ("after"),
    unless the text places its own tags; a model's processor config says which position it was trained on."""
    if IMAGE_TAG in text or num_images == 0:
        return text
    if position not in IMAGE_TAG_POSITIONS:
        raise InputError(f"image tag position {position!r}; expected one of {IMAGE_TAG_POSITIONS}")
    tags = "\n".join([IMAGE_TAG] * num_images)
    return f"{tags}\n{text}" if position == "before" else f"{text}\n{tags}"


def _user_prompt(text: str) -> str:
    """The official template of one user turn followed by an empty assistant turn."""
    user = f"{USER_ROLE}: {text}{_TURN_SEPARATOR}" if text else f"{USER_ROLE}:"
    return f"{user}{ASSISTANT_ROLE}:"


class Processor:
    """Builds `Sample`s from conversations and images and pads them into a `Batch`."""

    def __init__(self, config: ProcessorConfig, tokenizer: Tokenizer, context_length: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_pixels = max_pixels
        self.tile_size = config.image_size
        for width, height in config.candidate_resolutions:
            tile_counts(width, height, self.tile_size)  # raises for a candidate that is not a tile multiple
        self.tokens_per_side = tokens_per_tile_side(
            self.tile_size, config.patch_size, config.downsample_ratio
        )
        self.fill_color = tuple(int(mean * 255) for mean in config.image_mean)
        self.image_token_id = tokenizer.token_to_id(config.image_token)
        self.pad_id = tokenizer.token_to_id(config.pad_token)
        # Normalising is a per-channel function of a byte: a 256-entry table per channel, built with
        # the official float32 operations, gives identical values at a fraction of the cost.
        mean = torch.tensor(config.image_mean, dtype=torch.float32).view(3, 1)
        std = torch.tensor(config.image_std, dtype=torch.float32).view(3, 1)
        levels = torch.arange(256, dtype=torch.float32).div(255).view(1, 256)
        self._normalize_table = levels.sub(mean).div(std).numpy()
        self._same_table_for_all_channels = bool((self._normalize_table == self._normalize_table[0]).all())

    @classmethod
    def from_pretrained(cls, source: str | Path | ModelFolder, max_pixels: int = DEFAULT_MAX_PIXELS) -> Processor:
        """A checkpoint folder's processor (or its parsed `ModelFolder`'s); a folder of tokenizer files and
        processor_config.json alone gives one without a context length."""
        if not isinstance(source, ModelFolder) and (Path(source) / "config.json").is_file():
            source = ModelFolder.read(source)
        if isinstance(source, ModelFolder):
            path, config = source.path, source.processor_config
            context_length = source.config.language.max_position_embeddings
        else:
            path, config, context_length = Path(source), load_processor_config(source), None
        tokenizer = Tokenizer.from_dir(path, pad_token=config.pad_token)
        return cls(config, tokenizer, context_length=context_length, max_pixels=max_pixels)

    # ----------------------------------------------------------------------------- text

    def format_prompt(self, conversation: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
                      ) -> str:
        """The official "deepseek" `sft_format` string of a conversation (for display and logs).

        Separators alternate by message index as in the official template, which is why a
        system message is followed by a blank line and the user turn after it by end-of-sentence.
        With `add_generation_prompt`, a conversation ending in a user turn gets `<|Assistant|>:`.
        """
        turns = _parse_conversation(conversation)
        if add_generation_prompt and turns[-1].role == USER_ROLE:
            turns.append(_Turn(ASSISTANT_ROLE, ""))
        separators = (_TURN_SEPARATOR, self.tokenizer.eos_token)
        text = ""
        for index, turn in enumerate(turns):
            if turn.text:
                text += f"{turn.role}: {turn.text}{separators[index % 2]}"
            else:
                text += f"{turn.role}:"
        return text.strip()

    # ----------------------------------------------------------------------------- images

    def tile_grid(self, width: int, height: int, cropping: bool = True) -> tuple[int, int]:
        """(best_width, best_height) of the local view; one tile when cropping is off."""
        if not cropping:
            return self.tile_size, self.tile_size
        return select_tile_grid(width, height, self.config.candidate_resolutions)

    def tile_image(self, image: Image.Image, cropping: bool = True) -> ImageTiles:
        """Global view padded to one tile, then the local view padded to the best grid, cut row-major."""
        size = self.tile_size
        best_width, best_height = self.tile_grid(image.width, image.height, cropping)
        num_width_tiles, num_height_tiles = tile_counts(best_width, best_height, size)
        global_view = np.asarray(ImageOps.pad(image, (size, size), color=self.fill_color))
        if (best_width, best_height) == (size, size):
            local_view = global_view  # the same Pillow call: identical pixels, half the work
        else:
            local_view = np.asarray(ImageOps.pad(image, (best_width, best_height), color=self.fill_color))
        local_tiles = (
            local_view.reshape(num_height_tiles, size, num_width_tiles, size, 3)
            .transpose(0, 2, 4, 1, 3)
            .reshape(num_height_tiles * num_width_tiles, 3, size, size)
        )
        tiles = np.concatenate([global_view.transpose(2, 0, 1)[None], local_tiles])
        tiles = np.ascontiguousarray(tiles)
        digest = hashlib.sha256(tiles.data).hexdigest()
        return ImageTiles(torch.from_numpy(tiles), num_width_tiles, num_height_tiles, digest)

    def normalize(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 tiles [N, 3, S, S] to the encoder's float input: (x / 255 - mean) / std per channel."""
        array = tiles.numpy()
        table = self._normalize_table
        if self._same_table_for_all_channels:
            return torch.from_numpy(table[0][array])
        out = np.empty(array.shape, dtype=np.float32)
        for channel in range(3):
            out[:, channel] = table[channel][array[:, channel]]
        return torch.from_numpy(out)

    # ----------------------------------------------------------------------------- samples

    def encode(
        self,
        conversation: Sequence[Mapping[str, Any]],
        images: Iterable[ImageSource] | None = None,
        *,
        inference: bool = True,
        max_pixels: int | None = None,
        max_length: int | None = None,
    ) -> Sample:
        """Tokens, labels, image-token mask and pixel tiles of a conversation.

        `images` are matched to the `<image>` tags in order; when None, each message's
        optional "images" list is used. `max_length` overrides the model's context length.
        With `inference`, the final end-of-sentence is dropped as in the official processor: the
        prompt ends with `<|Assistant|>:`, or inside a non-empty last answer (a prefill to continue).
        Without it, every token is kept and `labels` carry the training targets.
        """
        turns = _parse_conversation(conversation)
        if images is None:
            images = [source for message in conversation for source in message.get("images", None) or []]
        sources = list(images)
        self._check_image_tags(turns, len(sources))
        limit = max_pixels if max_pixels is not None else self.max_pixels
        pictures = [load_image(source, max_pixels=limit) for source in sources]
        cropping = len(pictures) <= _MAX_IMAGES_WITH_LOCAL_TILES
        grids = [self.tile_grid(p.width, p.height, cropping) for p in pictures]
        token_ids, label_ids, image_mask = self._tokenize(turns, grids)
        if inference and token_ids[-1] == self.tokenizer.eos_id:
            del token_ids[-1], label_ids[-1], image_mask[-1]
        self._check_length(len(token_ids), max_length)
        return self._assemble(token_ids, label_ids, image_mask, pictures, cropping)

    def _check_image_tags(self, turns: list[_Turn], num_images: int) -> None:
        tag = self.config.image_token
        for turn in turns:
            if turn.role != USER_ROLE and tag in turn.text:
                raise InputError(f"{tag} may only appear in user messages, not in a {turn.role} message")
        num_tags = sum(turn.text.count(tag) for turn in turns)
        if num_tags != num_images:
            raise ImageCountError(
                f"the conversation has {num_tags} {tag} tag(s) but {num_images} image(s) were given"
            )

    def _check_length(self, length: int, max_length: int | None) -> None:
        limit = max_length if max_length is not None else self.context_length
        if limit is not None and length > limit:
            raise PromptTooLongError(
                f"the prompt is {length} tokens long (image tokens included), over the limit of {limit}"
            )

    def _tokenize(self, turns: list[_Turn], grids: list[tuple[int, int]]
                  ) -> tuple[list[int], list[int], list[bool]]:
        """Token ids, labels and image mask, turn by turn as the official `format_messages_v2`."""
        ignore = self.config.ignore_id
        token_ids, label_ids, image_mask = [self.tokenizer.bos_id], [self.tokenizer.bos_id], [False]
        remaining_grids = iter(grids)
        for turn in turns:
            if turn.role == ASSISTANT_ROLE:
                ids = [*self.tokenizer.encode(turn.text), self.tokenizer.eos_id]
                token_ids += ids
                label_ids += ids
                image_mask += [False] * len(ids)
                continue
            if turn.role == SYSTEM_ROLE:
                ids = self.tokenizer.encode(turn.text)
                mask = [False] * len(ids)
            else:
                ids, mask = self._tokenize_with_images(_user_prompt(turn.text), remaining_grids)
            token_ids += ids
            image_mask += mask
            if self.config.mask_prompt:
                label_ids += [ignore] * len(ids)
            else:
                label_ids += [ignore if image else token for token, image in zip(ids, mask, strict=True)]
        return token_ids, label_ids, image_mask

    def _tokenize_with_images(self, text: str, grids: Iterator[tuple[int, int]]
                              ) -> tuple[list[int], list[bool]]:
        pieces = text.split(self.config.image_token)
        ids: list[int] = []
        mask: list[bool] = []
        for index, piece in enumerate(pieces):
            if index > 0:
                best_width, best_height = next(grids)
                columns, rows = tile_counts(best_width, best_height, self.tile_size)
                count = num_image_tokens(columns, rows, self.tokens_per_side)
                ids += [self.image_token_id] * count
                mask += [True] * count
            piece_ids = self.tokenizer.encode(piece)
            ids += piece_ids
            mask += [False] * len(piece_ids)
        return ids, mask

    def _assemble(self, token_ids: list[int], label_ids: list[int], image_mask: list[bool],
                  pictures: list[Image.Image], cropping: bool) -> Sample:
        size = self.tile_size
        tiled = [self.tile_image(picture, cropping) for picture in pictures]
        if tiled:
            pixel_values = self.normalize(torch.cat([t.tiles for t in tiled]))
            grid_sizes = [[t.num_width_tiles, t.num_height_tiles] for t in tiled]
            spatial_crop = torch.tensor(grid_sizes, dtype=torch.long)
        else:
            pixel_values = torch.zeros((0, 3, size, size), dtype=torch.float32)
            spatial_crop = torch.zeros((1, 2), dtype=torch.long)  # the official "no image" row
        return Sample(
            input_ids=torch.tensor(token_ids, dtype=torch.long),
            labels=torch.tensor(label_ids, dtype=torch.long),
            images_seq_mask=torch.tensor(image_mask, dtype=torch.bool),
            images_spatial_crop=spatial_crop,
            pixel_values=pixel_values,
            num_image_tokens=[
                num_image_tokens(t.num_width_tiles, t.num_height_tiles, self.tokens_per_side) for t in tiled
            ],
            image_digests=[t.digest for t in tiled],
            image_sizes=[(p.width, p.height) for p in pictures],
        )

    # ----------------------------------------------------------------------------- batches

    def batch(self, samples: Sequence[Sample], padding: str = "left") -> Batch:
        """Pad samples to the longest (left for generation, right for training) and stack them.

        Every row has at least one (zero) tile and one spatial-crop row, as the official collator
        gives a text-only sample a zero placeholder image.
        """
        if not samples:
            raise InputError("cannot batch zero samples")
        if padding not in ("left", "right"):
            raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
        length = max(len(s) for s in samples)
        shape = (len(samples), length)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, self.config.ignore_id, dtype=torch.long)
        images_seq_mask = torch.zeros(shape, dtype=torch.bool)
        for row, sample in enumerate(samples):
            span = slice(length - len(sample), length) if padding == "left" else slice(0, len(sample))
            input_ids[row, span] = sample.input_ids
            attention_mask[row, span] = 1
            labels[row, span] = sample.labels
            images_seq_mask[row, span] = sample.images_seq_mask
        max_tiles = max(1, *(s.pixel_values.shape[0] for s in samples))
        max_images = max(1, *(s.images_spatial_crop.shape[0] for s in samples))
        size = self.tile_size
        images = torch.zeros((len(samples), max_tiles, 3, size, size), dtype=torch.float32)
        spatial_crop = torch.zeros((len(samples), max_images, 2), dtype=torch.long)
        for row, sample in enumerate(samples):
            images[row, : sample.pixel_values.shape[0]] = sample.pixel_values
            spatial_crop[row, : sample.images_spatial_crop.shape[0]] = sample.images_spatial_crop
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            images_seq_mask=images_seq_mask,
            images=images,
            images_spatial_crop=spatial_crop,
            num_image_tokens=[list(s.num_image_tokens) for s in samples],
            image_digests=[list(s.image_digests) for s in samples],
            image_sizes=[list(s.image_sizes) for s in samples],
        )
