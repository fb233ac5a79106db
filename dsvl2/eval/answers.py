"""The answers of a run, appended to a JSON Lines file as they come, so that a killed run resumes where it
stopped: its first line names the run's settings, every other line one answer (task, key, prediction)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsvl2.errors import InputError
from dsvl2.eval.items import ItemResult

Answer = tuple[str, str]  # (prediction, finish reason)


class AnswerLog:
    """Answers already given (read back on opening) and the file new ones are appended to."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = path
        self.done: dict[tuple[str, str], Answer] = {}
        if path.is_file() and path.stat().st_size:
            self._read_back(settings)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"settings": settings}, ensure_ascii=False) + "\n", encoding="utf-8")

    def _read_back(self, settings: dict[str, Any]) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("settings") != settings:
            raise InputError(f"answers file {self.path} belongs to another run (model, prompt or length limit "
                             "differ): remove it or choose another --answers file")
        for number, line in enumerate(lines[1:], start=2):
            try:
                entry = json.loads(line)
                self.done[(entry["task"], entry["key"])] = (entry["prediction"], entry["finish_reason"])
            except (json.JSONDecodeError, KeyError, TypeError):
                if number == len(lines):  # the line a killed run was writing
                    self._drop_last_line(lines)
                    return
                raise InputError(f"answers file {self.path} line {number} is not an answer line") from None

    def _drop_last_line(self, lines: list[str]) -> None:
        self.path.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")

    def append(self, result: ItemResult) -> None:
        """Keep a finished answer (generation errors are tried again on resuming)."""
        if result.finish_reason == "error":
            return
        entry = {"task": result.task, "key": result.key, "prediction": result.prediction,
                 "finish_reason": result.finish_reason}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
