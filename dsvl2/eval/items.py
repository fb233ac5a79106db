"""What the eval loop works on: a question to answer (`EvalItem`) and its scored answer (`ItemResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field

UNSCORED = "unscored"  # the metric of a test-split record: answered for a submission file, never scored


@dataclass
class EvalItem:
    """One record to answer: where it comes from, how it is scored and the prompt turns."""

    line: int  # 1-based position in the data file (line of a JSON Lines file, record of the others)
    task: str
    metric: str
    record: dict  # the fields its metric reads (answers, box, options, ...)
    conversation: list[dict] = field(default_factory=list)
    images: list = field(default_factory=list)  # paths, or encoded bytes for files that embed images
    key: str = ""  # the benchmark's own id of the record (question id), unique within the task
    category: str = ""  # the benchmark's breakdown (question type, source), "" when it has none


@dataclass
class ItemResult:
    line: int
    task: str
    metric: str
    prediction: str = ""
    scores: dict = field(default_factory=dict)
    error: str | None = None
    finish_reason: str = ""
    key: str = ""
    category: str = ""
    reference: object = None  # what the answer was scored against, shown among the worst answers

    @classmethod
    def failed(cls, item: EvalItem, error: str) -> ItemResult:
        return cls(item.line, item.task, item.metric, error=error, key=item.key, category=item.category)
