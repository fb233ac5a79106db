"""`dsvl2 eval`: answer the questions of eval files with a model and score the answers.

    dsvl2 eval [--model DIR] [--task TASK --data PATH]... [--batch-size N] [--limit N] [--max-new-tokens N]
               [--out report.json] [--answers answers.jsonl] [--submission FILE]

Each `--data` is read by the `--task` at the same position (one `--task` applies to every `--data`). A
benchmark name (chartqa, docvqa, infovqa, textvqa, ocrbench, refcoco, vlmevalkit) reads that benchmark's
published files (`dsvl2.eval.benchmarks`) and scores them as published. Anything else reads our own JSON
Lines records (`dsvl2 data synth` writes them) and keeps those of the named tasks (default all): a
conversation in the training format, `messages` ending with the reference answer, `images` relative to the
file's folder, `task`, and the fields its metric needs; `score_sample` scores by the record's `metric`
field, else by its `task`. Answering is greedy and batched; answers are appended to the answers file as they
come so that running the same command again resumes. Records that cannot be answered or scored are counted
as errors, never dropped. Without `--model` the bundled default model answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from dsvl2.cli_common import add_model_arguments, guarded_run, load_engine
from dsvl2.errors import InputError
from dsvl2.eval.answers import AnswerLog
from dsvl2.eval.benchmarks import READERS, SUBMISSION_TASKS, read_benchmark
from dsvl2.eval.items import UNSCORED, EvalItem, ItemResult
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
    "ocrbench": ("accuracy", ()),
    "choice": ("accuracy", (("no_option", "no option"),)),
}
WORST_ANSWERS = 5  # lowest-scored answers shown per task in the report
ANLS_RULE = "ANLS as in the DocVQA paper: 1 - NL when NL < 0.5, else 0 (the server's script scores NL = 0.5 as 0.5)"


@dataclass
class Source:
    """One `--data` file and how it is read: a benchmark's reader, or our JSON Lines with a task filter."""

    path: Path
    task: str  # the benchmark name or the task filter
    label: str = ""  # the report's task name of a benchmark file (the benchmark, or benchmark/file stem)

    @property
    def benchmark(self) -> str | None:
        return self.task if self.task in READERS else None


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
    return EvalItem(line, task, metric, record, prompt_turns(record), resolved, key=str(line))


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
                errors.append(ItemResult(number, "?", "?", error=f"not valid JSON: {exc}", key=str(number)))
                continue
            if isinstance(record, dict) and "messages" not in record and "text" in record:
                continue
            task = record.get("task", "?") if isinstance(record, dict) else "?"
            if tasks is not None and task not in tasks:
                continue
            try:
                items.append(make_item(record, number, path.parent))
            except InputError as exc:
                errors.append(ItemResult(number, str(task), str(task), error=str(exc), key=str(number)))
    return items, errors


# --------------------------------------------------------------------------------------------------
# Answering and scoring
# --------------------------------------------------------------------------------------------------


def read_source(source: Source, limit: int | None = None, require_answers: bool = True
                ) -> tuple[list[EvalItem], list[ItemResult]]:
    """The questions of one `--data` file (its first `limit` records) and its unusable records as errors."""
    if source.benchmark is None:
        return load_items(source.path, parse_task_filter(source.task), limit)
    items: list[EvalItem] = []
    errors: list[ItemResult] = []
    for entry in islice(read_benchmark(source.benchmark, source.path, source.label or source.task,
                                       require_answers), limit):
        (items if isinstance(entry, EvalItem) else errors).append(entry)
    return items, errors


# --------------------------------------------------------------------------------------------------
# Answering and scoring
# --------------------------------------------------------------------------------------------------


def _batches(items: Sequence[EvalItem], size: int) -> Iterable[Sequence[EvalItem]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _reference(record: dict) -> object:
    for key in ("answers", "answer", "box", "boxes"):
        if key in record:
            return record[key]
    return None


def score_item(item: EvalItem, prediction: str) -> ItemResult:
    result = ItemResult(item.line, item.task, item.metric, prediction=prediction, key=item.key,
                        category=item.category, reference=_reference(item.record))
    if item.metric == UNSCORED:
        return result
    try:
        result.scores = score_sample(item.metric, prediction, item.record)
    except InputError as exc:
        result.error = f"cannot score: {exc}"
    return result


def answer_and_score(engine: Any, items: Sequence[EvalItem], batch_size: int = 8,
                     max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, progress: bool = True,
                     log: AnswerLog | None = None) -> list[ItemResult]:
    """Greedy answers of the engine to every item, in batches, each scored by its metric.

    Items the answer log already holds are scored from it; new answers are appended to it as they come.
    """
    from dsvl2.engine.generate import Request
    from dsvl2.engine.sampling import SamplingParams

    done = log.done if log is not None else {}
    results = [_from_log(item, done[(item.task, item.key)]) for item in items if (item.task, item.key) in done]
    todo = [item for item in items if (item.task, item.key) not in done]
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), initial=len(results), desc="eval", unit="question", dynamic_ncols=True)
    try:
        for batch in _batches(todo, batch_size):
            requests = [Request(item.conversation, item.images, sampling) for item in batch]
            for item, completion in zip(batch, engine.generate_batch(requests), strict=True):
                if completion.finish_reason == "error":
                    result = ItemResult.failed(item, completion.error)
                    result.finish_reason = "error"
                else:
                    result = score_item(item, completion.text)
                    result.finish_reason = completion.finish_reason
                if log is not None:
                    log.append(result)
                results.append(result)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return results


def _from_log(item: EvalItem, answer: tuple[str, str]) -> ItemResult:
    result = score_item(item, answer[0])
    result.finish_reason = answer[1]
    return result


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def _mean_scores(results: Sequence[ItemResult]) -> tuple[int, dict[str, float]]:
    sums: dict[str, float] = {}
    scored = [r for r in results if r.error is None and r.scores]
    for result in scored:
        for key, value in result.scores.items():
            if isinstance(value, (bool, int, float)):
                sums[key] = sums.get(key, 0.0) + float(value)
    return len(scored), {key: total / len(scored) for key, total in sums.items()}


def summarize(results: Sequence[ItemResult]) -> dict[str, dict]:
    """Per task: n scored, errors, unscored answers (test splits), mean main score, the mean of every
    numeric sub-score, and per category (where the benchmark has them) n and mean score."""
    by_task: dict[str, list[ItemResult]] = {}
    for result in results:
        by_task.setdefault(result.task, []).append(result)
    summary: dict[str, dict] = {}
    for task, group in sorted(by_task.items()):
        n, means = _mean_scores(group)
        metric = next((r.metric for r in group if r.metric != UNSCORED), group[0].metric)
        entry = {"metric": metric, "n": n, "errors": sum(r.error is not None for r in group),
                 "score": means.pop("score", None) if n else None, "metrics": means,
                 "score_name": METRIC_LABELS.get(metric, ("score", ()))[0]}
        unscored = sum(r.error is None and r.metric == UNSCORED for r in group)
        if unscored:
            entry["unscored"] = unscored
        categories = sorted({r.category for r in group if r.category})
        if categories:
            entry["categories"] = {}
            for category in categories:
                count, category_means = _mean_scores([r for r in group if r.category == category])
                entry["categories"][category] = {"n": count, "score": category_means.get("score")}
        summary[task] = entry
    return summary


def format_table(summary: dict[str, dict]) -> str:
    """A plain-text table: task, n, errors, main score (named) and the other metrics, then categories."""
    rows = [("task", "n", "errors", "score", "metrics")]
    for task, entry in summary.items():
        label, extras = METRIC_LABELS.get(entry["metric"], ("score", ()))
        score = "-" if entry["score"] is None else f"{entry['score']:.3f}"
        details = [f"{label}"]
        details += [f"{name}={entry['metrics'][key]:.3f}" for key, name in extras if key in entry["metrics"]]
        if entry.get("unscored"):
            details.append(f"{entry['unscored']} answered for submission")
        rows.append((task, str(entry["n"]), str(entry["errors"]), score, "  ".join(details)))
        for category, numbers in entry.get("categories", {}).items():
            value = "-" if numbers["score"] is None else f"{numbers['score']:.3f}"
            rows.append((f"  {category}", str(numbers["n"]), "", value, ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for row in rows:
        numbers = (cell.rjust(width) for cell, width in zip(row[1:4], widths[1:], strict=True))
        cells = [row[0].ljust(widths[0]), *numbers]
        lines.append(("  ".join(cells) + "  " + row[4]).rstrip())
    return "\n".join(lines)


def _sample(result: ItemResult) -> dict[str, Any]:
    sample = {"line": result.line, "task": result.task, "metric": result.metric, "key": result.key,
              "prediction": result.prediction, "scores": result.scores, "finish_reason": result.finish_reason}
    if result.category:
        sample["category"] = result.category
    if result.error is not None:
        sample["error"] = result.error
    return sample


def worst_answers(results: Sequence[ItemResult], count: int = WORST_ANSWERS) -> dict[str, list[dict]]:
    """Per task, the `count` lowest-scored answers with what they were scored against."""
    worst: dict[str, list[dict]] = {}
    for result in sorted(results, key=lambda r: (r.task, r.scores.get("score", 1.0), r.line)):
        if result.error is None and result.scores and len(worst.setdefault(result.task, [])) < count:
            worst[result.task].append({**_sample(result), "reference": result.reference})
    return {task: samples for task, samples in worst.items() if samples}


def build_report(results: Sequence[ItemResult], *, model: str, data: str, task_filter: str, seconds: float
                 ) -> dict[str, Any]:
    summary = summarize(results)
    report = {
        "model": model,
        "data": data,
        "task": task_filter,
        "num_records": len(results),
        "num_errors": sum(r.error is not None for r in results),
        "seconds": round(seconds, 3),
        "tasks": summary,
        "worst": worst_answers(results),
        "samples": [_sample(r) for r in results],
    }
    if any(entry["metric"] == "anls" for entry in summary.values()):
        report["notes"] = [ANLS_RULE]
    return report


def write_submission(path: Path, results: Sequence[ItemResult]) -> int:
    """DocVQA / InfoVQA's submission file: a JSON list of {"questionId", "answer"}, every question listed;
    returns its length."""
    entries = []
    for result in sorted(results, key=lambda r: r.line):
        question_id = int(result.key) if result.key.isdigit() else result.key
        entries.append({"questionId": question_id, "answer": result.prediction.strip()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, ensure_ascii=False) + "\n", encoding="utf-8")
    return len(entries)


def evaluate_sources(engine: Any, sources: Sequence[Source], *, batch_size: int = 8, limit: int | None = None,
                     max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, progress: bool = False, model_name: str = "",
                     log: AnswerLog | None = None, require_answers: bool = True
                     ) -> tuple[dict[str, Any], list[ItemResult]]:
    """Evaluate `engine` on every source; the report (see `build_report`) and the results behind it."""
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}")
    started = time.perf_counter()
    items: list[EvalItem] = []
    results: list[ItemResult] = []
    position: dict[tuple[str, str], tuple[int, int]] = {}  # the report lists records file by file, in order
    for index, source in enumerate(sources):
        source_items, errors = read_source(source, limit, require_answers)
        for entry in [*source_items, *errors]:
            position[(entry.task, entry.key)] = (index, entry.line)
        items += source_items
        results += errors
    results += answer_and_score(engine, items, batch_size, max_new_tokens, progress, log)
    results.sort(key=lambda r: position[(r.task, r.key)])
    report = build_report(results, model=model_name, data=", ".join(str(s.path) for s in sources),
                          task_filter=", ".join(s.task for s in sources), seconds=time.perf_counter() - started)
    return report, results


def evaluate(engine: Any, data: Path, tasks: str | None = "all", *, batch_size: int = 8, limit: int | None = None,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, progress: bool = False, model_name: str = ""
             ) -> dict[str, Any]:
    """Evaluate `engine` on one file (our JSON Lines with a task filter, or a benchmark's); the report."""
    source = Source(Path(data), tasks or "all")
    report, _ = evaluate_sources(engine, [source], batch_size=batch_size, limit=limit,
                                 max_new_tokens=max_new_tokens, progress=progress, model_name=model_name)
    return report


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dsvl2 eval`."""
    add_model_arguments(parser)
    parser.add_argument("--data", type=Path, action="append", required=True,
                        help="a file to evaluate (repeatable): a benchmark's published file, or eval JSON Lines "
                             "(e.g. dsvl2 data synth)")
    parser.add_argument("--task", action="append", default=None,
                        help="how the --data at the same position is read (repeatable): "
                             f"{', '.join(READERS)}, or for JSON Lines the task(s) kept, comma-separated "
                             "(default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="requests generated together (default 8)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N records of each file")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"answer length limit in tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report (scores and every answer)")
    parser.add_argument("--answers", type=Path, default=None,
                        help="JSON Lines file the answers are appended to as they come; running again resumes "
                             "(default: next to --out, as OUT.answers.jsonl)")
    parser.add_argument("--submission", type=Path, default=None,
                        help="write the official submission file of a DocVQA or InfoVQA test split")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def sources_from_args(data: Sequence[Path], tasks: Sequence[str] | None) -> list[Source]:
    """Pair each --data with its --task (one --task applies to all); benchmark files get a report name."""
    if not tasks:
        tasks = ["all"] * len(data)
    elif len(tasks) == 1:
        tasks = list(tasks) * len(data)
    elif len(tasks) != len(data):
        raise InputError(f"{len(tasks)} --task options for {len(data)} --data files: give one --task, or one "
                         "per --data in the same order")
    sources = [Source(Path(path), task.strip()) for path, task in zip(data, tasks, strict=True)]
    for source in sources:
        if source.benchmark is None:
            parse_task_filter(source.task)
        if not source.path.is_file():
            raise InputError(f"eval data file {source.path} does not exist")
    counts: dict[str, int] = {}
    for source in sources:
        counts[source.task] = counts.get(source.task, 0) + 1
    for source in sources:
        # VLMEvalKit's files are different benchmarks (AI2D, MMStar, MMBench): each is named by its file.
        by_file = counts[source.task] > 1 or source.task == "vlmevalkit"
        if source.benchmark is not None:
            source.label = f"{source.task}/{source.path.stem}" if by_file else source.task
    return sources


def _weights_fingerprint(model_dir: Path) -> list[list]:
    # Name, size and modification time of the weight files: a model retrained into the same folder is
    # another run, whose answers must not be taken from the old answers file.
    files = sorted(model_dir.glob("*.safetensors"))
    return [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in files]


def run(args: argparse.Namespace) -> int:
    """Evaluate as the parsed arguments say; 0 on success, 2 for bad input, 1 for a bad checkpoint."""
    return guarded_run(_evaluate, args)


def _evaluate(args: argparse.Namespace) -> int:
    from dsvl2.loading import resolve_model_dir

    # The cheap checks come first: a mistyped flag should not wait for the weights to load.
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    sources = sources_from_args(args.data, args.task)
    if args.submission is not None and (len(sources) != 1 or sources[0].task not in SUBMISSION_TASKS):
        raise InputError(f"--submission takes exactly one --data file read as {' or '.join(SUBMISSION_TASKS)}")
    args.model = resolve_model_dir(args.model)
    answers = args.answers or (args.out.with_suffix(".answers.jsonl") if args.out is not None else None)
    settings = {"model": str(args.model), "weights": _weights_fingerprint(Path(args.model)),
                "max_new_tokens": args.max_new_tokens, "dtype": args.dtype}
    log = AnswerLog(answers, settings) if answers is not None else None
    if log is not None and log.done:
        print(f"resuming: {len(log.done)} answers already in {answers}")
    engine = load_engine(args, max_batch=args.batch_size)
    report, results = evaluate_sources(engine, sources, batch_size=args.batch_size, limit=args.limit,
                                       max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                                       model_name=str(args.model), log=log,
                                       require_answers=args.submission is None)
    print(format_table(report["tasks"]))
    print(f"{report['num_records']} records in {report['seconds']:.1f}s"
          + (f", {report['num_errors']} errors (see the report)" if report["num_errors"] else ""))
    for note in report.get("notes", []):
        print(note)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"report written to {args.out}")
    if args.submission is not None:
        print(f"submission of {write_submission(args.submission, results)} answers written to {args.submission}"
              + (" (records with errors answered empty)" if report["num_errors"] else ""))
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
