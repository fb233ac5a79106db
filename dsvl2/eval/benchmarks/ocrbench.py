"""OCRBench as published: `OCRBench.json` (a list of {dataset_name, id, image_path, question, answers,
type}) next to its `OCRBench_Images/` folder. Scored by OCRBench's own containment rule; the category is the
record's `type` (OCRBench's final score is the number right out of its 1000 questions)."""

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
from dsvl2.eval.prompts import open_question


def read(path: Path, task: str = "ocrbench", require_answers: bool = True) -> Iterator[Entry]:
    records = records_under(read_json(path), path, None, "an OCRBench file (OCRBench.json)")
    folders = [path.parent / "OCRBench_Images", path.parent]
    for number, record in enumerate(records, start=1):
        key = record.get("id", number) if isinstance(record, dict) else number
        where = record_name(path, number, key)
        category = record.get("type", "") if isinstance(record, dict) else ""
        try:
            question = field_of(record, "question", str, where)
            image = find_image(field_of(record, "image_path", str, where), folders, where)
            answers = answers_of(record.get("answers"), where)
        except InputError as exc:
            yield failed_record(task, "ocrbench", number, key, str(exc), str(category))
            continue
        scoring = {"answers": answers, "dataset_name": str(record.get("dataset_name", ""))}
        yield question_item(task, "ocrbench", number, key, open_question(question), [str(image)], scoring,
                            str(category))
