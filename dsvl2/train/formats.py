"""Training data as people keep it: how records are stored (files) and shaped (keys), read as conversations.

Four shapes, chosen per source by `format` (or detected from the first file when unambiguous):

    dsvl2     JSON Lines {"messages": [{"role", "content"}], "images": ["a.png"]} or {"text": "..."}
    sharegpt  JSON Lines {"messages": [{"role", "content"}] or "conversations": [{"from", "value"}],
              "images": ["a.png" | {"path": ...} | {"bytes": ...}]}   (ms-swift, LLaMA-Factory)
    llava     a JSON array (or JSON Lines) of {"image": "a.png" | [...], "conversations": [{"from", "value"}]}
    parquet   Hugging Face dataset files: rows with either of the two key sets above, images as
              {"bytes", "path"} structs (the `Image` feature), bytes or paths

`<image>` tags place the images; answers are kept as written, so grounding answers train the model's
own `<|ref|>`/`<|det|>` text. Image paths are relative to the source's `image_root` (default: the
folder of the file that names them). Files are streamed: JSON Lines by line, a JSON array element by
element, parquet by row group, so no large file is ever read whole.
"""

from __future__ import annotations

import codecs
import glob
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

FORMATS = ("auto", "dsvl2", "sharegpt", "llava", "parquet")
_FOLDER_PATTERNS = {"dsvl2": ("*.jsonl",), "sharegpt": ("*.jsonl",), "llava": ("*.json", "*.jsonl"),
                    "parquet": ("**/*.parquet",), "auto": ("*.jsonl", "*.json", "**/*.parquet")}
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
_CHUNK = 1 << 20  # bytes read at a time from a JSON array
_SPACE = re.compile(r"[ \t\r\n]*")
_MAX_ELEMENT = 64 << 20  # a JSON array element larger than this is taken as malformed, not buffered on

Payload = bytes | dict  # a record's JSON text, or a parquet row already read
ImageRef = str | bytes  # a path (relative to the image root) or encoded image bytes


class DataError(ValueError):
    """The data cannot be trained on at all (no shards, nothing usable, an incompatible resume state)."""


class SkipRecord(Exception):
    """A record that cannot become a sample; `reason` is one of data.SKIP_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


class JsonLinesFile:
    """One record per line; a position is (line number, byte offset of that line)."""

    keeps_payload = True  # the shuffle buffer's saved state holds the record text itself

    @staticmethod
    def records(path: Path, index: int, offset: int) -> Iterator[tuple[int, int, Payload]]:
        """(index, offset after it, payload) of each record from the position on."""
        with open(path, "rb") as file:
            file.seek(offset)
            for raw in file:
                offset += len(raw)
                index += 1
                if raw.strip():  # blank lines are no records
                    yield index - 1, offset, raw

    @staticmethod
    def where(path: Path, index: int) -> str:
        return f"{path}:{index + 1}"


class JsonArrayFile:
    """A JSON array read element by element; a position is (element number, byte offset after the previous one)."""

    keeps_payload = True

    @staticmethod
    def records(path: Path, index: int, offset: int) -> Iterator[tuple[int, int, Payload]]:
        decoder = json.JSONDecoder()
        with open(path, "rb") as file:
            file.seek(offset)
            window = _Window(file, offset, path)
            if offset == 0:
                if window.skip_space() != "[":
                    raise DataError(f"{path} is not a JSON array (a LLaVA file is a list of records)")
                window.take(1)
                if window.skip_space() == "]":
                    return
            else:
                separator = window.skip_space()
                if separator == "]":
                    return
                if separator != ",":
                    raise DataError(f"{path} record {index}: expected ',' or ']' after the previous record")
                window.take(1)
            while True:
                window.skip_space()
                element = window.element(decoder, index)
                index += 1
                yield index - 1, window.offset, element
                separator = window.skip_space()
                if separator == "]":
                    return
                if separator != ",":
                    raise DataError(f"{path} record {index}: expected ',' or ']' after the previous record")
                window.take(1)

    @staticmethod
    def where(path: Path, index: int) -> str:
        return f"{path} record {index}"


class _Window:
    """Decoded text of a binary file read in chunks, with the byte offset of what has been taken."""

    def __init__(self, file: Any, offset: int, path: Path) -> None:
        self.file = file
        self.offset = offset  # byte offset of text[pos]
        self.path = path
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.pos = 0
        self.eof = False

    def fill(self) -> bool:
        if self.eof:
            return False
        chunk = self.file.read(_CHUNK)
        try:
            text = self.decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError:
            raise DataError(f"{self.path} is not UTF-8 text (after byte {self.offset})") from None
        self.eof = not chunk
        if self.pos > len(self.text) // 2:  # drop what was taken, rarely, so taking stays linear
            self.text, self.pos = self.text[self.pos:], 0
        self.text += text
        return True

    def take(self, chars: int) -> str:
        taken = self.text[self.pos:self.pos + chars]
        self.pos += chars
        self.offset += len(taken.encode("utf-8"))
        return taken

    def skip_space(self) -> str:
        """The next character that is not white space ("" at the end of the file)."""
        while True:
            self.take(_SPACE.match(self.text, self.pos).end() - self.pos)
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.fill():
                return ""

    def element(self, decoder: json.JSONDecoder, index: int) -> bytes:
        while True:
            try:
                _, end = decoder.raw_decode(self.text, self.pos)
                return self.take(end - self.pos).encode("utf-8")
            except json.JSONDecodeError as exc:
                if len(self.text) - self.pos > _MAX_ELEMENT or not self.fill():
                    raise DataError(f"{self.path} record {index} is not valid JSON ({exc.msg}); the records "
                                    "after it cannot be found") from None


class ParquetFile:
    """Rows of a parquet file read one row group at a time; a position is (row, row)."""

    keeps_payload = False  # rows hold image bytes: saved states name the row, which is read again

    @staticmethod
    def records(path: Path, index: int, offset: int) -> Iterator[tuple[int, int, Payload]]:
        parquet = _open_parquet(path)
        first = 0
        for group in range(parquet.metadata.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if first + rows > index:
                for row, values in enumerate(parquet.read_row_group(group).to_pylist()[index - first:], index):
                    yield row, row + 1, values
                index = first + rows
            first += rows

    @staticmethod
    def fetch(path: Path, index: int) -> Payload:
        """Row `index` alone (reads its row group)."""
        return next(ParquetFile.records(path, index, index))[2]

    @staticmethod
    def where(path: Path, index: int) -> str:
        return f"{path} row {index}"


def _open_parquet(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path} is not a readable parquet file: {exc}") from None


ShardFile = type[JsonLinesFile] | type[JsonArrayFile] | type[ParquetFile]


def shard_file(path: Path) -> ShardFile:
    """How a file is stored, by its name: .parquet, .json (an array), anything else JSON Lines."""
    if path.suffix == ".parquet":
        return ParquetFile
    if path.suffix == ".json":
        return JsonArrayFile
    return JsonLinesFile


def find_shards(paths: Sequence[str | Path], format: str = "dsvl2") -> list[Path]:
    """Files of a source: files as given, globs expanded sorted, folders as their sorted files of the format
    (auto: *.jsonl, else *.json, else parquet files anywhere below)."""
    shards: list[Path] = []
    patterns = _FOLDER_PATTERNS[format]
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found = []
            for pattern in patterns:
                found = found or sorted(p for p in path.glob(pattern) if p.is_file())
        elif glob.has_magic(str(path)):
            found = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
        elif path.is_file():
            found = [path]
        else:
            raise DataError(f"{path} does not exist")
        if not found:
            kinds = ", ".join(p.rsplit("/", 1)[-1] for p in patterns)
            raise DataError(f"{path} matches no data file ({kinds})")
        shards.extend(found)
    return list(dict.fromkeys(shards))


def detect_format(shards: Sequence[Path]) -> str:
    """The format of a source from its first file: by suffix, and for JSON Lines by the first record's keys
    (LLaVA's "conversations" and "image", ShareGPT's "conversations" or image objects, else our own, which
    reads ShareGPT's plain "messages" and path lists the same way)."""
    first = shards[0]
    if first.suffix == ".parquet":
        return "parquet"
    if first.suffix == ".json":
        return "llava"
    try:
        record = next((json.loads(raw) for _, _, raw in JsonLinesFile.records(first, 0, 0)), None)
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None  # a bad first record is skipped like any other
    if isinstance(record, dict) and ("conversations" in record or "image" in record):
        return "sharegpt" if "images" in record else "llava"
    if isinstance(record, dict) and not all(isinstance(image, str) for image in record.get("images") or []):
        return "sharegpt"  # images as {"path"} or {"bytes"} objects
    return "dsvl2"


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


def parse_record(payload: Payload) -> dict:
    """A record as a dict: its JSON text parsed (a parquet row is one already)."""
    if isinstance(payload, dict):
        return payload
    try:
        record = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SkipRecord("bad_json", f"not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise SkipRecord("invalid_record", f"a record is a JSON object, got {type(record).__name__}")
    return record


def conversation(record: dict, format: str) -> tuple[list[dict], list[ImageRef]]:
    """The messages ({"role", "content"}) and images of a sharegpt, llava or parquet record."""
    if format == "llava":
        messages, images = record.get("conversations"), record.get("image")
        if messages is None:
            raise SkipRecord("invalid_record", "a LLaVA record needs 'conversations'")
    else:
        messages = record.get("messages", record.get("conversations"))
        images = record.get("images", record.get("image"))
        if messages is None:
            raise SkipRecord("invalid_record", "a record needs 'messages' or 'conversations'")
    return _messages(messages), _images(images)


def _messages(raw: Any) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise SkipRecord("invalid_record", "the conversation must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise SkipRecord("invalid_record", f"message {i} is not an object")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if not isinstance(role, str) or role.lower() not in _ROLES:
            raise SkipRecord("invalid_record", f"message {i} has role {role!r}; expected one of "
                             f"{', '.join(_ROLES)}")
        if not isinstance(content, str):
            raise SkipRecord("invalid_record", f"message {i} has no text ('content' or 'value')")
        messages.append({"role": _ROLES[role.lower()], "content": content})
    return messages


def _images(raw: Any) -> list[ImageRef]:
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else [raw]
    images: list[ImageRef] = []
    for i, item in enumerate(items):
        if isinstance(item, dict):  # the Hugging Face Image feature: bytes, or a path when the bytes are absent
            item = item.get("bytes") or item.get("path")
        if not isinstance(item, (str, bytes)) or not item:
            raise SkipRecord("invalid_record", f"image {i} is neither a path nor image bytes")
        images.append(item)
    return images
