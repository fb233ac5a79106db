"""`dsvl2 data check RECIPE.yaml` (or `--data FILE --model DIR`): read every record and image before training.

Every record of every source is read in file order, every image opened and tiled, and the tokens
counted with the model's processor exactly as training would. The report gives the records and
images, each record training would skip (named by file and line, row or array element, with the
reason), the records longer than the context, the token-length distribution and the share of
tokens that carry loss. The exit code is 1 when any record would be skipped, 2 when the data or
recipe cannot be read at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsvl2.config import ConfigError, load_json, model_config_from_dict
from dsvl2.processor import Processor
from dsvl2.train.data import DataSource, RecordEncoder, TrainSample
from dsvl2.train.errors import TrainError
from dsvl2.train.formats import FORMATS, DataError, SkipRecord, detect_format, find_shards, shard_file
from dsvl2.train.recipe import RecipeError, TrainRecipe, load_recipe
from dsvl2.train.stages import stage_mask_prompt
from dsvl2.train.start import load_processor

_REASON_WORDS = {
    "bad_json": "not valid JSON", "invalid_record": "not a usable record", "missing_image": "image file missing",
    "image_count": "<image> tags and images differ in number", "image_decode": "image cannot be decoded",
    "image_too_large": "image over the pixel limit", "too_long": "longer than the context (training skips it)",
    "unreadable": "file cannot be read on",
}


@dataclass
class Problem:
    where: str  # file and line, row or element
    reason: str  # a data.SKIP_REASONS entry, or "unreadable"
    message: str


@dataclass
class CheckReport:
    limit: int | None  # tokens a record may have
    records: int = 0
    images: int = 0  # read and tiled
    cut: int = 0  # plain-text records cut to the limit (trained on, not skipped)
    lengths: list[int] = field(default_factory=list)  # tokens of every encoded record, uncut
    tokens: int = 0  # of the records training uses, as trained
    loss_tokens: int = 0  # of those, the ones that are a next-token target
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_sources(sources: Sequence[DataSource], processor: Processor, max_length: int | None = None) -> CheckReport:
    """Read and encode every record of `sources` as training would; `max_length` defaults to the context."""
    limit = max_length if max_length is not None else processor.context_length
    report = CheckReport(limit)
    encoder = RecordEncoder(processor, max_length=sys.maxsize)  # lengths measured whole, compared below
    ignore = processor.config.ignore_id
    for source in sources:
        shards = find_shards(source.paths, source.format)
        format = source.format if source.format != "auto" else detect_format(shards)
        for shard in shards:
            file = shard_file(shard)
            records = file.records(shard, 0, 0)
            while True:
                try:
                    found = next(records, None)
                except DataError as exc:
                    report.problems.append(Problem(str(shard), "unreadable", str(exc)))
                    break
                if found is None:
                    break
                index, _, payload = found
                report.records += 1
                where = file.where(shard, index)
                try:
                    sample = encoder(payload, shard, format, source.image_root)
                except SkipRecord as skip:
                    report.problems.append(Problem(where, skip.reason, str(skip)))
                    continue
                length = len(sample)
                report.lengths.append(length)
                report.images += len(sample.image_sizes)
                if limit is not None and length > limit:
                    if isinstance(sample, TrainSample):  # a conversation; plain text is cut instead
                        report.problems.append(Problem(where, "too_long", f"{length} tokens, over the limit of "
                                                       f"{limit}"))
                        continue
                    report.cut += 1
                    length = limit
                report.tokens += length
                report.loss_tokens += int((sample.labels[1:length] != ignore).sum())
    return report


def format_report(report: CheckReport) -> str:
    lines = [f"records: {report.records}, usable: {report.records - len(report.problems)}",
             f"images read: {report.images}"]
    counts = Counter(problem.reason for problem in report.problems)
    for reason, count in sorted(counts.items()):
        lines.append(f"  {reason} ({_REASON_WORDS.get(reason, reason)}): {count}")
    if report.limit is not None:
        too_long = counts.get("too_long", 0)
        lines.append(f"longer than the context of {report.limit} tokens: {too_long} conversation(s), skipped by "
                     f"training; {report.cut} plain text(s), cut to the context")
    if report.lengths:
        p50, p90, p99 = np.percentile(report.lengths, [50, 90, 99])
        lines.append(f"tokens per record: min {min(report.lengths)}, median {p50:.0f}, p90 {p90:.0f}, "
                     f"p99 {p99:.0f}, max {max(report.lengths)}")
    if report.tokens:
        lines.append(f"tokens with loss: {report.loss_tokens} of {report.tokens} "
                     f"({100 * report.loss_tokens / report.tokens:.1f}%)")
    for problem in report.problems:
        lines.append(f"error: {problem.where}: {problem.message} ({problem.reason})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dsvl2 data check`."""
    parser.add_argument("recipe", type=Path, nargs="?", default=None,
                        help="training recipe: its sources, model, stage and data.max_length")
    parser.add_argument("--data", type=Path, action="append", default=[], metavar="FILE",
                        help="check this data file or folder (repeatable; each its own source) instead of a "
                        "recipe's data (needs --model)")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="with --data: the records' format")
    parser.add_argument("--image-root", type=Path, default=None, metavar="DIR",
                        help="with --data: image paths are relative to this folder (default: each file's folder)")
    parser.add_argument("--model", type=Path, default=None, metavar="DIR",
                        help="with --data: checkpoint folder whose processor and context length count the tokens")
    parser.add_argument("--max-length", type=int, default=None, metavar="N",
                        help="with --data: token limit (default: the context length)")


def run(args: argparse.Namespace) -> int:
    try:
        sources, processor, max_length = _setup(args)
        report = check_sources(sources, processor, max_length)
    except (RecipeError, DataError, TrainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report.ok else 1


def _setup(args: argparse.Namespace) -> tuple[list[DataSource], Processor, int | None]:
    if (args.recipe is None) == (not args.data):
        raise RecipeError("give a recipe, or --data FILE with --model DIR")
    if args.recipe is not None:
        recipe = load_recipe(args.recipe)
        sources = [DataSource(s.name, s.paths, s.weight, s.format, s.image_root) for s in recipe.data.sources]
        return sources, _recipe_processor(recipe), recipe.data.max_length
    if args.model is None:
        raise RecipeError("--data needs --model DIR (the checkpoint whose processor counts the tokens)")
    processor = load_processor(args.model)
    processor.config = dataclasses.replace(processor.config, mask_prompt=stage_mask_prompt("sft"))
    sources = [DataSource(str(path), (path,), 1.0, args.format, args.image_root) for path in args.data]
    return sources, processor, args.max_length


def _recipe_processor(recipe: TrainRecipe) -> Processor:
    """The processor training would use: the stage's loss mask and the model's context length."""
    model = recipe.model
    processor = load_processor(model.processor or model.checkpoint)
    try:
        if model.checkpoint is not None:
            raw = load_json(Path(model.checkpoint) / "config.json")
        else:
            raw = dict(model.config) if isinstance(model.config, dict) else load_json(model.config)
        processor.context_length = model_config_from_dict(raw).language.max_position_embeddings
    except (ConfigError, OSError) as exc:
        raise TrainError(f"cannot read the model's config: {exc}") from exc
    mask_prompt = stage_mask_prompt(recipe.stage, recipe.data.mask_prompt)
    processor.config = dataclasses.replace(processor.config, mask_prompt=mask_prompt)
    return processor
