"""RefCOCO, RefCOCO+ and RefCOCOg as lmms-eval publishes them: parquet files (lmms-lab/RefCOCO...) whose
rows hold the COCO image (encoded bytes), `bbox` [x, y, w, h] in pixels and the referring expressions in
`answer`. Each expression is one question; the truth box goes on the 0..999 grid the model answers on
(a per-axis scaling keeps IoU), and a hit is IoU >= 0.5 with the first predicted box."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from dsvl2.errors import InputError
from dsvl2.eval.benchmarks.common import Entry, failed_record, question_item, record_name
from dsvl2.eval.prompts import grounding

GRID = 999  # the released models' box coordinates run 0..999 over the image's width and height
ROWS_PER_BATCH = 64


def _rows(path: Path) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("reading RefCOCO parquet files needs pyarrow: pip install pyarrow") from None
    if not path.is_file():
        raise InputError(f"benchmark file {path} does not exist")
    try:
        parquet = pq.ParquetFile(path)
        missing = {"bbox", "answer", "image"} - set(parquet.schema_arrow.names)
        if missing:
            raise InputError(f"{path} is not an lmms-eval RefCOCO parquet file: no column {', '.join(sorted(missing))}")
        for batch in parquet.iter_batches(batch_size=ROWS_PER_BATCH):
            yield from batch.to_pylist()
    except InputError:
        raise
    except Exception as exc:  # pyarrow's errors for a truncated or foreign file have no common base class
        raise InputError(f"{path} is not a readable parquet file ({exc})") from None


def _image_bytes(value: Any, where: str) -> bytes:
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, bytes) or not data:
        raise InputError(f"{where}: the 'image' column holds no encoded image")
    return data


def grid_box(bbox: Any, width: int, height: int, where: str) -> list[float]:
    """COCO [x, y, w, h] in pixels as [x1, y1, x2, y2] on the 0..999 grid."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
        raise InputError(f"{where}: 'bbox' must be four numbers [x, y, width, height]")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise InputError(f"{where}: 'bbox' has no area")
    return [x / width * GRID, y / height * GRID, (x + w) / width * GRID, (y + h) / height * GRID]


def read(path: Path, task: str = "refcoco", require_answers: bool = True) -> Iterator[Entry]:
    number = 0
    for row_number, row in enumerate(_rows(path), start=1):
        key = row.get("question_id") or row_number
        where = record_name(path, row_number, key)
        expressions = row.get("answer")
        expressions = [expressions] if isinstance(expressions, str) else expressions
        try:
            if not isinstance(expressions, list) or not expressions or not all(isinstance(e, str) for e in expressions):
                raise InputError(f"{where}: 'answer' holds no referring expression")
            data = _image_bytes(row.get("image"), where)
            try:
                with Image.open(io.BytesIO(data)) as image:
                    width, height = image.size
            except Exception:  # noqa: BLE001 - Pillow raises many kinds for undecodable data
                raise InputError(f"{where}: the image cannot be decoded") from None
            box = grid_box(row.get("bbox"), width, height, where)
        except InputError as exc:
            number += 1
            yield failed_record(task, "grounding", number, key, str(exc))
            continue
        for index, expression in enumerate(expressions):
            number += 1
            yield question_item(task, "grounding", number, f"{key}#{index}", grounding(expression), [data],
                                {"box": box, "expression": expression})
