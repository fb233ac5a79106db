"""Pieces every benchmark reader shares: reading the published JSON, naming a record in errors, finding
images, and building the items and per-record errors the eval loop counts."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dsvl2.errors import InputError
from dsvl2.eval.items import EvalItem, ItemResult

Entry = EvalItem | ItemResult  # a reader yields a question to answer, or a record that cannot be answered


def read_json(path: Path) -> Any:
    """The parsed JSON file; a missing, truncated or malformed file is an InputError naming it."""
    if not path.is_file():
        raise InputError(f"benchmark file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text (byte {exc.start}): is it the benchmark's JSON file?") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                         "a truncated download?") from None


def records_under(document: Any, path: Path, key: str | None, expected: str) -> list:
    """The list of records of a published file: the document itself (key None) or its `key` field."""
    records = document if key is None else document.get(key) if isinstance(document, dict) else None
    if not isinstance(records, list):
        where = "a JSON list" if key is None else f"a JSON object with a '{key}' list"
        raise InputError(f"{path} is not {expected}: expected {where} of records")
    return records


def record_name(path: Path, number: int, key: Any = None) -> str:
    """"FILE record N (id K)": how an error points at a record."""
    return f"{path} record {number}" + (f" (id {key})" if key not in (None, "") else "")


def field_of(record: Any, name: str, kinds: type | tuple[type, ...], where: str) -> Any:
    """A required field of the right JSON type, else an InputError saying which."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: a record is a JSON object, found {type(record).__name__}")
    value = record.get(name)
    if value is None or not isinstance(value, kinds) or isinstance(value, bool):
        raise InputError(f"{where}: no '{name}' field" if value is None else f"{where}: '{name}' has the wrong type")
    return value


def answers_of(value: Any, where: str) -> list[str]:
    """A non-empty list of answer strings (a single string counts as one answer)."""
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise InputError(f"{where}: 'answers' must be a non-empty list of strings")
    return answers


def find_image(name: str, folders: Iterable[Path], where: str) -> Path:
    """The first folder's file of that name; a missing image is an InputError naming every place looked."""
    tried = [folder / name for folder in folders]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise InputError(f"{where}: image {name} not found (looked in {', '.join(str(p.parent) for p in tried)})")


def question_item(task: str, metric: str, number: int, key: Any, prompt: str, images: list, record: dict,
                  category: str = "") -> EvalItem:
    """The item asking `prompt` about `images` in one user turn."""
    return EvalItem(number, task, metric, record, [{"role": "user", "content": prompt}], images,
                    key=str(key), category=category)


def failed_record(task: str, metric: str, number: int, key: Any, error: str, category: str = "") -> ItemResult:
    return ItemResult(number, task, metric, error=error, key=str(key if key is not None else number),
                      category=category)
