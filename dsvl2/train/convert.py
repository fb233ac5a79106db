"""`dsvl2 data convert --from llava IN --out OUT.jsonl`: LLaVA, ShareGPT or parquet records as our JSON Lines, once.

Training reads those formats directly (`format:` in the recipe); converting is for those who want one
kind of file. Each record becomes {"messages": [...], "images": [...]} plus its other keys; image paths
are rewritten relative to OUT's folder, and images stored as bytes (parquet) are written as files
into OUT's folder under `<OUT name>_images/`. Records that cannot be read are named and left out
(exit code 1).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from dsvl2.train.formats import DataError, SkipRecord, conversation, find_shards, parse_record, shard_file

_CONVERSATION_KEYS = ("messages", "conversations", "image", "images")


def convert(inputs: list[Path], format: str, out: Path, image_root: Path | None = None) -> tuple[int, list[str]]:
    """Write every readable record of `inputs` to `out`; returns the count written and the problems."""
    written, problems = 0, []
    image_dir = out.parent / f"{out.stem}_images"
    with open(out, "w", encoding="utf-8") as sink:
        for shard in find_shards(inputs, format):
            file = shard_file(shard)
            folder = image_root if image_root is not None else shard.parent
            try:
                for index, _, payload in file.records(shard, 0, 0):
                    where = file.where(shard, index)
                    try:
                        record = parse_record(payload)
                        messages, images = conversation(record, format)
                        paths = [_image_path(image, folder, image_dir, f"{written:08d}_{k}", out.parent)
                                 for k, image in enumerate(images)]
                    except SkipRecord as skip:
                        problems.append(f"{where}: {skip}")
                        continue
                    sink.write(json.dumps({"messages": messages, "images": paths, **_other_keys(record)},
                                          ensure_ascii=False) + "\n")
                    written += 1
            except DataError as exc:
                problems.append(str(exc))
    return written, problems


def _image_path(image: str | bytes, folder: Path, image_dir: Path, name: str, out_folder: Path) -> str:
    """Where the converted record finds the image, relative to the output file's folder."""
    if isinstance(image, str):
        return os.path.relpath(folder / image, out_folder)
    try:
        kind = Image.open(io.BytesIO(image)).format or "bin"
    except (UnidentifiedImageError, OSError):
        raise SkipRecord("image_decode", "its image bytes are not an image Pillow can read") from None
    image_dir.mkdir(parents=True, exist_ok=True)
    path = image_dir / f"{name}.{kind.lower()}"
    path.write_bytes(image)
    return os.path.relpath(path, out_folder)


def _other_keys(record: dict) -> dict[str, Any]:
    """The record's keys besides the conversation and images, where they are JSON values (ids, extension fields)."""
    kept = {}
    for key, value in record.items():
        if key in _CONVERSATION_KEYS:
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        kept[key] = value
    return kept


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dsvl2 data convert`."""
    parser.add_argument("--from", dest="format", required=True, choices=("llava", "sharegpt", "parquet"),
                        help="the input records' format")
    parser.add_argument("inputs", type=Path, nargs="+", metavar="IN", help="input files, globs or folders")
    parser.add_argument("--out", type=Path, required=True, help="the JSON Lines file to write")
    parser.add_argument("--image-root", type=Path, default=None, metavar="DIR",
                        help="input image paths are relative to this folder (default: each input file's folder)")


def run(args: argparse.Namespace) -> int:
    try:
        written, problems = convert(args.inputs, args.format, args.out, args.image_root)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"error: {problem} (left out)", file=sys.stderr)
    print(f"wrote {written} record(s) to {args.out}")
    return 1 if problems else 0
