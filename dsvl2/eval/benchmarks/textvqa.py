"""TextVQA as published: `TextVQA_0.5.1_val.json` ({"data": [...]}, each with question_id, question,
image_id and 10 answers) with its images as `train_images/<image_id>.jpg` (validation images ship in the
train_val_images archive). Scored by VQA accuracy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dsvl2.errors import InputError
from dsvl2.eval.benchmarks.common import (
    Entry,
    answers_of,
    failed_record,
    field_of,
    find_image,
    question_item,
    read_json,
    record_name,
    records_under,
)
from dsvl2.eval.prompts import short_answer


def read(path: Path, task: str = "textvqa", require_answers: bool = True) -> Iterator[Entry]:
    records = records_under(read_json(path), path, "data", "a TextVQA file (TextVQA_0.5.1_val.json)")
    folders = [path.parent / "train_images", path.parent / "train_val_images" / "train_images",
               path.parent / "images", path.parent]
    for number, record in enumerate(records, start=1):
        key = record.get("question_id") if isinstance(record, dict) else None
        where = record_name(path, number, key)
        try:
            question = field_of(record, "question", str, where)
            image = find_image(f"{field_of(record, 'image_id', str, where)}.jpg", folders, where)
            answers = answers_of(record.get("answers"), where)
        except InputError as exc:
            yield failed_record(task, "vqa", number, key, str(exc))
            continue
        yield question_item(task, "vqa", number, key if key is not None else number, short_answer(question),
                            [str(image)], {"answers": answers})
