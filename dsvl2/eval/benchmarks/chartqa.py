"""ChartQA as published: `test_human.json` / `test_augmented.json` (a list of {imgname, query, label}) next
to the `png/` folder of chart images. Scored by relaxed accuracy; the category is the file's split."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dsvl2.errors import InputError
from dsvl2.eval.benchmarks.common import (
    Entry,
    failed_record,
    field_of,
    find_image,
    question_item,
    read_json,
    record_name,
    records_under,
)
from dsvl2.eval.prompts import short_answer


def read(path: Path, task: str = "chartqa", require_answers: bool = True) -> Iterator[Entry]:
    records = records_under(read_json(path), path, None, "a ChartQA file (test_human.json, test_augmented.json)")
    category = path.stem.removeprefix("test_").removeprefix("val_")
    folders = [path.parent / "png", path.parent]
    for number, record in enumerate(records, start=1):
        key = record.get("imgname") if isinstance(record, dict) else None
        where = record_name(path, number, key)
        try:
            question = field_of(record, "query", str, where)
            image = find_image(field_of(record, "imgname", str, where), folders, where)
            label = field_of(record, "label", (str, int, float), where)
        except InputError as exc:
            yield failed_record(task, "chart", number, f"{number}", str(exc), category)
            continue
        yield question_item(task, "chart", number, number, short_answer(question), [str(image)],
                            {"answers": [str(label)]}, category)
