"""DocVQA and InfoVQA as published: the `*_v1.0*.json` files ({"data": [...]}, each record with
questionId, question, answers and its image: DocVQA's `image` path relative to the file, InfoVQA's
`image_local_name` in the images folder). Scored by ANLS; a test split (no answers) is answered for the
official submission file only."""

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
from dsvl2.eval.items import UNSCORED
from dsvl2.eval.prompts import short_answer


def _image_folders(path: Path) -> list[Path]:
    # InfoVQA's images come as infographicsvqa_images/ (or a folder named after the split file).
    stem = path.name.removesuffix(".json")
    return [path.parent, path.parent / "infographicsvqa_images", path.parent / "images",
            path.parent / f"{stem}_images", path.parent.parent / "infographicsvqa_images"]


def read(path: Path, task: str = "docvqa", require_answers: bool = True) -> Iterator[Entry]:
    records = records_under(read_json(path), path, "data", "a DocVQA / InfoVQA file (*_v1.0*.json)")
    folders = _image_folders(path)
    for number, record in enumerate(records, start=1):
        key = record.get("questionId") if isinstance(record, dict) else None
        where = record_name(path, number, key)
        category = ""
        try:
            field_of(record, "questionId", (int, str), where)
            question = field_of(record, "question", str, where)
            types = record.get("question_types") or record.get("answer_type") or []
            category = ", ".join(types) if isinstance(types, list) else str(types)
            name = record.get("image") or record.get("image_local_name")
            if not isinstance(name, str):
                raise InputError(f"{where}: no 'image' (DocVQA) or 'image_local_name' (InfoVQA) field")
            image = find_image(name, folders, where)
            if record.get("answers") is None and not require_answers:
                scoring, metric = {}, UNSCORED
            else:
                if record.get("answers") is None:
                    raise InputError(f"{where}: no 'answers' (a test split? write it with --submission FILE)")
                scoring, metric = {"answers": answers_of(record["answers"], where)}, "anls"
        except InputError as exc:
            yield failed_record(task, "anls", number, key, str(exc), category)
            continue
        yield question_item(task, metric, number, key, short_answer(question), [str(image)], scoring, category)
