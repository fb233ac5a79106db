"""`dsvl2 eval`: answer the questions of an eval JSON Lines file with a model and score the answers.

    dsvl2 eval [--model DIR] --data FILE.jsonl [--task all|grounding,ocr,...] [--batch-size N]
               [--limit N] [--max-new-tokens N] [--out report.json]

A record is a conversation in the training format (`dsvl2 data synth` writes them): `messages`
ending with the reference answer, `images` (paths relative to the file's folder), `task`, and the
fields its metric needs (`answers`; `box` / `boxes` on the 0..999 grid for grounding). The model
answers the conversation up to its last user turn, greedily; `dsvl2.eval.metrics.score_sample`
scores the answer by the record's `metric` field, else by its `task`. Records that cannot be
answered or scored (missing image, no answers, ...) are counted as errors, never silently dropped.
Without `--model` the bundled default model answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsvl2.cli_common import add_model_arguments, guarded_run, load_engine
from dsvl2.errors import InputError
from dsvl2.eval.metrics import METRICS, score_sample

DEFAULT_MAX_NEW_TOKENS = 192
# Per metric: the label of the main score, then (result key, label) of the other numbers shown.
METRIC_LABELS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "grounding": ("acc@IoU0.5", (("iou", "mean IoU"), ("parsed", "parsed"))),
    "grounded_caption": ("acc@IoU0.5", (("box_count_match", "box count match"),)),
    "counting": ("accuracy", ()),
    "text": ("accuracy", ()),
    "ocr": ("exact match", (("cer", "CER"),)),
    "chart": ("relaxed accuracy", ()),
    "caption": ("token F1", (("exact_match", "exact match"),)),
    "vqa": ("VQA accuracy", (("exact_match", "exact match"),)),
    "anls": ("ANLS", ()),
}


@dataclass
class EvalItem:
    """One record to answer: its line, metric and the prompt turns."""

    line: int  # 1-based line number in the data file
    task: str
    metric: str
    record: dict
    conversation: list[dict] = field(default_factory=list)
    images: list[str] = field(default_factory=list)


@dataclass
class ItemResult:
    line: int
    task: str
    metric: str
    prediction: str = ""
    scores: dict = field(default_factory=dict)
    error: str | None = None
    finish_reason: str = ""


# --------------------------------------------------------------------------------------------------
# Reading the data
# --------------------------------------------------------------------------------------------------


def parse_task_filter(value: str | None) -> set[str] | None:
    """`all` (or nothing) keeps every record; otherwise a comma-separated set of task names."""
    if value is None or value.strip().lower() == "all":
        return None
    tasks = {t.strip() for t in value.split(",") if t.strip()}
    if not tasks:
        raise InputError(f"--task {value!r} names no task")
    return tasks


def prompt_turns(record: dict) -> list[dict]:
    """The conversation up to (and with) its last user turn: what the model is asked."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InputError("record has no 'messages' list to ask")
    last_user = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"),
                    default=None)
    if last_user is None:
        raise InputError("record has no user message to answer")
    return [dict(m) for m in messages[: last_user + 1]]


def make_item(record: Any, line: int, base_dir: Path) -> EvalItem:
    """An EvalItem from one parsed record; raises InputError naming what is missing."""
    if not isinstance(record, dict):
        raise InputError(f"a record is a JSON object, got {type(record).__name__}")
    task = record.get("task")
    if not isinstance(task, str) or not task:
        raise InputError("record has no 'task' name")
    metric = record.get("metric", task)
    if metric not in METRICS:
        raise InputError(f"no metric for task {metric!r}; known: {', '.join(sorted(METRICS))} "
                         "(set the record's 'metric' field)")
    images = record.get("images") or []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise InputError("'images' must be a list of path strings")
    resolved = [str(p if Path(p).is_absolute() else base_dir / p) for p in images]
    return EvalItem(line, task, metric, record, prompt_turns(record), resolved)


def load_items(path: Path, tasks: set[str] | None = None, limit: int | None = None
               ) -> tuple[list[EvalItem], list[ItemResult]]:
    """Records of `path` kept by the task filter (first `limit` of them), and the unusable ones as errors.

    Plain-text training records (`{"text": ...}`) have no question and are passed over.
    """
    if not path.is_file():
        raise InputError(f"eval data file {path} does not exist")
    items: list[EvalItem] = []
    errors: list[ItemResult] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if limit is not None and len(items) + len(errors) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(ItemResult(number, "?", "?", error=f"not valid JSON: {exc}"))
                continue
            if isinstance(record, dict) and "messages" not in record and "text" in record:
                continue
            task = record.get("task", "?") if isinstance(record, dict) else "?"
            if tasks is not None and task not in tasks:
                continue
            try:
                items.append(make_item(record, number, path.parent))
            except InputError as exc:
                errors.append(ItemResult(number, str(task), str(task), error=str(exc)))
    return items, errors


# --------------------------------------------------------------------------------------------------
# Answering and scoring
# --------------------------------------------------------------------------------------------------


def _batches(items: Sequence[EvalItem], size: int) -> Iterable[Sequence[EvalItem]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def score_item(item: EvalItem, prediction: str) -> ItemResult:
    result = ItemResult(item.line, item.task, item.metric, prediction=prediction)
    try:
        result.scores = score_sample(item.metric, prediction, item.record)
    except InputError as exc:
        result.error = f"cannot score: {exc}"
    return result


def answer_and_score(engine: Any, items: Sequence[EvalItem], batch_size: int = 8,
                     max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, progress: bool = True) -> list[ItemResult]:
    """Greedy answers of the engine to every item, in batches, each scored by its metric."""
    from dsvl2.engine.generate import Request
    from dsvl2.engine.sampling import SamplingParams

    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="eval", unit="sample", dynamic_ncols=True)
    results: list[ItemResult] = []
    try:
        for batch in _batches(items, batch_size):
            requests = [Request(item.conversation, item.images, sampling) for item in batch]
            for item, completion in zip(batch, engine.generate_batch(requests), strict=True):
                if completion.finish_reason == "error":
                    results.append(ItemResult(item.line, item.task, item.metric, error=completion.error,
                                              finish_reason="error"))
                    continue
                result = score_item(item, completion.text)
                result.finish_reason = completion.finish_reason
                results.append(result)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return results


def summarize(results: Sequence[ItemResult]) -> dict[str, dict]:
    """Per task: n scored, errors, mean main score and the mean of every numeric sub-score."""
    summary: dict[str, dict] = {}
    for result in results:
        entry = summary.setdefault(result.task, {"metric": result.metric, "n": 0, "errors": 0, "sums": {}})
        if result.error is not None:
            entry["errors"] += 1
            continue
        entry["n"] += 1
        for key, value in result.scores.items():
            if isinstance(value, (bool, int, float)):
                entry["sums"][key] = entry["sums"].get(key, 0.0) + float(value)
    for entry in summary.values():
        sums = entry.pop("sums")
        n = entry["n"]
        entry["score"] = sums.get("score", 0.0) / n if n else None
        entry["metrics"] = {key: total / n for key, total in sums.items() if key != "score"} if n else {}
        entry["score_name"] = METRIC_LABELS.get(entry["metric"], ("score", ()))[0]
    return dict(sorted(summary.items()))


def format_table(summary: dict[str, dict]) -> str:
    """A plain-text table: task, n, errors, main score (named) and the other metrics."""
    rows = [("task", "n", "errors", "score", "metrics")]
    for task, entry in summary.items():
        label, extras = METRIC_LABELS.get(entry["metric"], ("score", ()))
        score = "-" if entry["score"] is None else f"{entry['score']:.3f}"
        details = [f"{label}"]
        details += [f"{name}={entry['metrics'][key]:.3f}" for key, name in extras if key in entry["metrics"]]
        rows.append((task, str(entry["n"]), str(entry["errors"]), score, "  ".join(details)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for row in rows:
        numbers = (cell.rjust(width) for cell, width in zip(row[1:4], widths[1:], strict=True))
        cells = [row[0].ljust(widths[0]), *numbers]
        lines.append("  ".join(cells) + "  " + row[4])
    return "\n".join(lines)


def build_report(results: Sequence[ItemResult], *, model: str, data: str, task_filter: str, seconds: float
                 ) -> dict[str, Any]:
    summary = summarize(results)
    return {
        "model": model,
        "data": data,
        "task": task_filter,
        "num_records": len(results),
        "num_errors": sum(r.error is not None for r in results),
        "seconds": round(seconds, 3),
        "tasks": summary,
        "samples": [
            {"line": r.line, "task": r.task, "metric": r.metric, "prediction": r.prediction, "scores": r.scores,
             "finish_reason": r.finish_reason, **({"error": r.error} if r.error is not None else {})}
            for r in sorted(results, key=lambda r: r.line)
        ],
    }


def evaluate(engine: Any, data: Path, tasks: str | None = "all", *, batch_size: int = 8, limit: int | None = None,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, progress: bool = False, model_name: str = ""
             ) -> dict[str, Any]:
    """Evaluate `engine` on the records of `data`; returns the report (see `build_report`)."""
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}")
    started = time.perf_counter()
    items, errors = load_items(Path(data), parse_task_filter(tasks), limit)
    results = errors + answer_and_score(engine, items, batch_size, max_new_tokens, progress)
    return build_report(results, model=model_name, data=str(data), task_filter=tasks or "all",
                        seconds=time.perf_counter() - started)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dsvl2 eval`."""
    add_model_arguments(parser)
    parser.add_argument("--data", type=Path, required=True, help="eval JSON Lines file (e.g. dsvl2 data synth)")
    parser.add_argument("--task", default="all",
                        help="task(s) to evaluate, comma-separated (default: all); e.g. grounding,ocr")
    parser.add_argument("--batch-size", type=int, default=8, help="requests generated together (default 8)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N matching records")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"answer length limit in tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report (scores and every answer)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Evaluate as the parsed arguments say; 0 on success, 2 for bad input, 1 for a bad checkpoint."""
    return guarded_run(_evaluate, args)


def _evaluate(args: argparse.Namespace) -> int:
    from dsvl2.loading import resolve_model_dir

    # The cheap checks come first: a mistyped flag should not wait for the weights to load.
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    parse_task_filter(args.task)
    if not Path(args.data).is_file():
        raise InputError(f"eval data file {args.data} does not exist")
    args.model = resolve_model_dir(args.model)
    engine = load_engine(args, max_batch=args.batch_size)
    report = evaluate(engine, args.data, args.task, batch_size=args.batch_size, limit=args.limit,
                      max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                      model_name=str(args.model))
    print(format_table(report["tasks"]))
    print(f"{report['num_records']} records in {report['seconds']:.1f}s"
          + (f", {report['num_errors']} errors (see the report)" if report["num_errors"] else ""))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"report written to {args.out}")
    if report["num_records"] == 0:
        print("error: no record matched", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsvl2 eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
