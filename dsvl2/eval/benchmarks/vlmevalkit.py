"""Multiple-choice benchmarks as VLMEvalKit publishes them (AI2D_TEST.tsv, MMStar.tsv, MMBench_DEV_EN.tsv,
...): tab-separated rows with `index`, `question`, optional `hint`, options in columns `A`, `B`, ... ,
`answer` (a letter), `category` and the image base64-encoded in `image` (or, in MMBench, the `index` of
the row holding the same image). The letter is read from the answer without a judge model; an answer
naming no option (or several) is wrong and counted as `no_option`. MMBench's circular evaluation (each
question asked again with the options rotated) is not done: the score is the plain single-pass accuracy."""

from __future__ import annotations

import base64
import binascii
import csv
import sys
from collections.abc import Iterator
from pathlib import Path

from dsvl2.errors import InputError
from dsvl2.eval.benchmarks.common import Entry, failed_record, question_item, record_name
from dsvl2.eval.prompts import multiple_choice

LETTERS = "ABCDEFGHIJ"
IMAGE_REFERENCE_MAX_LEN = 64  # a field this short is a row index pointing at an earlier image, not base64


def _text(row: dict, name: str) -> str:
    value = row.get(name)
    return "" if value is None or value.strip().lower() == "nan" else value.strip()


def _image(row: dict, images: dict[str, str], where: str) -> bytes:
    value = _text(row, "image")
    if not value:
        raise InputError(f"{where}: no 'image'")
    if len(value) <= IMAGE_REFERENCE_MAX_LEN:
        value = images.get(value, "")
        if len(value) <= IMAGE_REFERENCE_MAX_LEN:
            raise InputError(f"{where}: 'image' names no row holding an image")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{where}: 'image' is not base64") from None


def read(path: Path, task: str = "vlmevalkit", require_answers: bool = True) -> Iterator[Entry]:
    if not path.is_file():
        raise InputError(f"benchmark file {path} does not exist")
    csv.field_size_limit(sys.maxsize)  # base64 images are megabytes long
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = {"question", "A", "B", "image"} - set(reader.fieldnames or [])
        if missing:
            raise InputError(f"{path} is not a VLMEvalKit TSV file: no column {', '.join(sorted(missing))}")
        rows = list(reader)  # an image may be shared with a later row, as VLMEvalKit reads the whole table too
    images = {_text(row, "index"): _text(row, "image") for row in rows}
    for number, row in enumerate(rows, start=1):
        key = _text(row, "index") or str(number)
        where = record_name(path, number, key)
        category = _text(row, "category")
        try:
            if None in row:
                raise InputError(f"{where}: more fields than columns (a tab inside a field?)")
            data = _image(row, images, where)
            options = {letter: _text(row, letter) for letter in LETTERS if _text(row, letter)}
            answer = _text(row, "answer")
            if not answer:
                raise InputError(f"{where}: no 'answer'")
            if answer not in options:
                raise InputError(f"{where}: the answer {answer} is not one of the options {', '.join(options)}")
        except InputError as exc:
            yield failed_record(task, "choice", number, key, str(exc), category)
            continue
        prompt = multiple_choice(_text(row, "question"), options, _text(row, "hint"))
        yield question_item(task, "choice", number, key, prompt, [data], {"options": options, "answer": answer},
                            category)
