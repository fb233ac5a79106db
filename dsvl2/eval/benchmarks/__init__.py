"""Readers of the public benchmarks' own files, one module per published format.

Each `read(path, task, require_answers)` yields an `EvalItem` per question and an `ItemResult` carrying the
error for a record that cannot be answered (missing image, no answers), so that it is counted, never
dropped; a file in the wrong format or truncated raises an InputError naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from dsvl2.eval.benchmarks import chartqa, docvqa, ocrbench, refcoco, textvqa, vlmevalkit
from dsvl2.eval.benchmarks.common import Entry

Reader = Callable[..., Iterator[Entry]]

READERS: dict[str, Reader] = {
    "chartqa": chartqa.read,
    "docvqa": docvqa.read,
    "infovqa": docvqa.read,
    "textvqa": textvqa.read,
    "ocrbench": ocrbench.read,
    "refcoco": refcoco.read,
    "vlmevalkit": vlmevalkit.read,
}
SUBMISSION_TASKS = ("docvqa", "infovqa")  # test splits scored by the benchmark's own server


def read_benchmark(name: str, path: Path, task: str, require_answers: bool = True) -> Iterator[Entry]:
    """The entries of one benchmark file, read by `name`'s reader."""
    return READERS[name](path, task=task, require_answers=require_answers)
