"""Streaming training data: sources in several file formats, a weighted mixture of sources, exact resume.

A source's records are conversations in one of the shapes of `dsvl2.train.formats` (ours, ShareGPT,
LLaVA, Hugging Face parquet). Ours is a JSON Lines file with one record per line, either a conversation

    {"messages": [{"role": "user", "content": "<image>\\nWhat is this?"},
                  {"role": "assistant", "content": "A cat."}],
     "images": ["images/cat.png"]}                # paths relative to the shard's folder (or image_root)

or plain text `{"text": "..."}`, trained on as begin-of-sentence + tokens + end-of-sentence
with every token in the loss (cut to `max_length`). Captions, OCR, VQA, grounding, grounded
conversations and interleaved image-text (several `<image>` tags and images) are all
conversations. Other keys of a conversation are ignored unless the dataset is given a reader for
them (`fields`, what a recipe's extensions read): their checked values travel in the sample's and the
batch's `extras`. A bad record (invalid JSON, missing image file, wrong `<image>` count, undecodable
image, too long, a field its reader refuses, ...) is skipped, counted by reason and logged with its
file and line (row, element); where and why travel with the batch (`TrainLoader.take_skipped_records`),
for the trainer's skipped.jsonl. It never stops a run unless the trainer is strict.

How the stream is made and split. Each source reads its shards in a seeded order per epoch
(the epochs never end) through a bounded shuffle buffer; a seeded RNG draws the source of each
record by weight. Every data-loader worker of every rank walks this same global stream (the
buffers hold raw lines, so walking costs little next to decoding images) and decodes only its
own records: the stream is cut into chunks of `batch_size` records and chunk c belongs to the
worker numbered c mod (world_size * num_workers). So no record goes to two workers, and a global
step of `world_size * grad_accum` micro-batches holds the same records for every split of the
same global batch size (without bad records), e.g. 2 ranks x 2 samples or 1 rank x 4 samples.

Resume: each worker's position, shard cursors, shuffle buffers (parquet rows in them by
position only, read again on restore) and RNG states travel with every
batch it yields; `TrainLoader.state_dict()` keeps the last ones consumed, and a loader restored
from it yields exactly the batches the interrupted one would have yielded next.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dsvl2.errors import (
    ImageCountError,
    ImageDecodeError,
    ImageTooLargeError,
    InputError,
    PromptTooLongError,
)
from dsvl2.processor import Batch, Processor, Sample
from dsvl2.train.formats import (
    DataError,
    Payload,
    SkipRecord,
    conversation,
    detect_format,
    find_shards,
    parse_record,
    shard_file,
)

logger = logging.getLogger(__name__)


FieldReader = Callable[[Any, dict], Any]  # (the key's value, the whole record) -> checked value; ValueError if bad


@dataclass
class TrainSample(Sample):
    """A `Sample` with the values of its record's extra fields (those the dataset has readers for)."""

    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainBatch(Batch):
    extras: list[dict[str, Any]] = field(default_factory=list)  # per row

SKIP_REASONS = (
    "bad_json", "invalid_record", "missing_image", "image_count", "image_decode", "image_too_large", "too_long",
)
STATE_VERSION = 1
# Distinct seed streams: shard order, shuffle buffer, mixture draws.
_SHARD_ORDER_STREAM, _BUFFER_STREAM, _MIXTURE_STREAM = 1, 2, 3


@dataclass(frozen=True)
class DataSource:
    name: str
    paths: tuple[str | Path, ...]  # data files, glob patterns or folders (see formats.find_shards)
    weight: float = 1.0
    format: str = "auto"  # one of formats.FORMATS
    image_root: Path | None = None  # image paths are relative to it (default: each file's folder)


@dataclass(frozen=True)
class RawRecord:
    source: int
    shard: int  # index into the source's shard list
    line: int  # 0-based record number in the shard (a JSON Lines line, array element or parquet row)
    text: Payload


# --------------------------------------------------------------------------------------------------
# Raw record streams
# --------------------------------------------------------------------------------------------------


class ShardStream:
    """One source's raw records, forever: a seeded shard order per epoch, then a shuffle buffer."""

    def __init__(self, name: str, shards: Sequence[Path], seed: int, source_index: int, shuffle_buffer: int,
                 shuffle_shards: bool = True) -> None:
        if not shards:
            raise DataError(f"source {name!r} has no shards")
        self.name = name
        self.shards = list(shards)
        self.seed = seed
        self.source_index = source_index
        self.buffer_size = shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self._rng = np.random.default_rng([seed, source_index, _BUFFER_STREAM])
        self.epoch = 0
        self.cursor = 0  # index into this epoch's shard order
        self.line = 0  # next record of the current shard
        self.offset = 0  # its position in the file (see formats)
        self.lines_this_epoch = 0
        self.buffer: list[tuple[int, int, Payload]] = []
        self._order = self._epoch_order(0)
        self.files = [shard_file(path) for path in self.shards]
        self._records: Iterator[tuple[int, int, Payload]] | None = None

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle_shards:
            return list(range(len(self.shards)))
        rng = np.random.default_rng([self.seed, self.source_index, _SHARD_ORDER_STREAM, epoch])
        return [int(i) for i in rng.permutation(len(self.shards))]

    def _next_shard(self) -> None:
        self.close()
        self.cursor += 1
        self.line = self.offset = 0
        if self.cursor == len(self.shards):
            if self.lines_this_epoch == 0:
                raise DataError(f"source {self.name!r}: its {len(self.shards)} shard(s) hold no records")
            self.epoch += 1
            self.cursor = self.lines_this_epoch = 0
            self._order = self._epoch_order(self.epoch)

    def _read_line(self) -> tuple[int, int, Payload]:
        while True:
            shard = self._order[self.cursor]
            if self._records is None:
                self._records = self.files[shard].records(self.shards[shard], self.line, self.offset)
            found = next(self._records, None)
            if found is None:
                self._next_shard()
                continue
            line, self.offset, payload = found
            self.line = line + 1
            self.lines_this_epoch += 1
            return shard, line, payload

    def next(self) -> tuple[int, int, Payload]:
        if self.buffer_size <= 1:
            return self._read_line()
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self._read_line())
        index = int(self._rng.integers(len(self.buffer)))
        record = self.buffer[index]
        self.buffer[index] = self._read_line()
        return record

    def close(self) -> None:
        if self._records is not None:
            self._records.close()  # closes the file the generator holds
            self._records = None

    def state_dict(self) -> dict[str, Any]:
        # Records of files that do not keep their payload (parquet rows, with image bytes) are saved by position.
        buffer = [(shard, line, payload if self.files[shard].keeps_payload else None)
                  for shard, line, payload in self.buffer]
        return {
            "shards": [str(s) for s in self.shards], "epoch": self.epoch, "cursor": self.cursor,
            "line": self.line, "offset": self.offset, "lines_this_epoch": self.lines_this_epoch,
            "buffer": buffer, "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["shards"] != [str(s) for s in self.shards]:
            raise DataError(f"source {self.name!r}: its shard files differ from those of the saved data position")
        self.close()
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.line, self.offset = state["line"], state["offset"]
        self.lines_this_epoch = state["lines_this_epoch"]
        self.buffer = [(shard, line, self.files[shard].fetch(self.shards[shard], line) if payload is None else payload)
                       for shard, line, payload in state["buffer"]]
        self._rng.bit_generator.state = state["rng"]
        self._order = self._epoch_order(self.epoch)


class MixtureStream:
    """Records of several sources, each record's source drawn by weight with a seeded RNG."""

    def __init__(self, streams: Sequence[ShardStream], weights: Sequence[float], seed: int) -> None:
        if len(streams) != len(weights) or not streams:
            raise DataError("a mixture needs one weight per source and at least one source")
        total = float(sum(weights))
        self.streams = list(streams)
        self.cumulative = np.cumsum(np.asarray(weights, dtype=np.float64) / total)
        self._rng = np.random.default_rng([seed, _MIXTURE_STREAM])

    def next(self) -> RawRecord:
        draw = self._rng.random()
        source = min(int(np.searchsorted(self.cumulative, draw, side="right")), len(self.streams) - 1)
        shard, line, text = self.streams[source].next()
        return RawRecord(source, shard, line, text)

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state, "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["streams"]) != len(self.streams):
            raise DataError(f"the saved data position has {len(state['streams'])} sources, the recipe "
                            f"{len(self.streams)}")
        self._rng.bit_generator.state = state["rng"]
        for stream, saved in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(saved)


# --------------------------------------------------------------------------------------------------
# Records to samples
# --------------------------------------------------------------------------------------------------


class RecordEncoder:
    """A raw record (JSON text or parquet row) to a training `Sample`, or SkipRecord naming why it cannot be one."""

    def __init__(self, processor: Processor, max_length: int | None = None,
                 fields: Mapping[str, FieldReader] | None = None) -> None:
        self.processor = processor
        self.max_length = max_length if max_length is not None else processor.context_length
        self.fields = dict(fields or {})

    def __call__(self, payload: Payload, shard_path: Path, format: str = "dsvl2",
                 image_root: Path | None = None) -> Sample:
        record = parse_record(payload)
        folder = image_root if image_root is not None else shard_path.parent
        if format != "dsvl2":
            messages, images = conversation(record, format)
            return self.conversation(record, messages, images, folder)
        if "messages" in record:
            images = record.get("images") or []
            if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
                raise SkipRecord("invalid_record", "'images' must be a list of path strings")
            return self.conversation(record, record["messages"], images, folder)
        if "text" in record:
            return self.plain_text(record["text"])
        raise SkipRecord("invalid_record", "a record needs 'messages' (a conversation) or 'text'")

    def plain_text(self, text: Any) -> Sample:
        if not isinstance(text, str) or not text.strip():
            raise SkipRecord("invalid_record", "'text' must be a non-empty string")
        tokenizer = self.processor.tokenizer
        ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
        if self.max_length is not None:
            ids = ids[: self.max_length]  # a long document is cut, not dropped
        input_ids = torch.tensor(ids, dtype=torch.long)
        size = self.processor.tile_size
        return Sample(
            input_ids=input_ids,
            labels=input_ids.clone(),
            images_seq_mask=torch.zeros(len(ids), dtype=torch.bool),
            images_spatial_crop=torch.zeros((1, 2), dtype=torch.long),
            pixel_values=torch.zeros((0, 3, size, size), dtype=torch.float32),
        )

    def conversation(self, record: dict, messages: Any, images: Sequence[str | bytes], folder: Path) -> Sample:
        """`images`: paths relative to `folder`, or encoded image bytes."""
        sources = [image if isinstance(image, bytes) else folder / image for image in images]
        for source in sources:
            if isinstance(source, Path) and not source.is_file():
                raise SkipRecord("missing_image", f"image file {source} does not exist")
        extras = self.extras(record)
        try:
            sample = self.processor.encode(messages, sources, inference=False, max_length=self.max_length)
        except ImageCountError as exc:
            raise SkipRecord("image_count", str(exc)) from None
        except ImageDecodeError as exc:
            raise SkipRecord("image_decode", str(exc)) from None
        except ImageTooLargeError as exc:
            raise SkipRecord("image_too_large", str(exc)) from None
        except PromptTooLongError as exc:
            raise SkipRecord("too_long", str(exc)) from None
        except InputError as exc:
            raise SkipRecord("invalid_record", str(exc)) from None
        return TrainSample(**vars(sample), extras=extras)

    def extras(self, record: dict) -> dict[str, Any]:
        """The checked values of the record's keys that have a reader."""
        extras = {}
        for key, read in self.fields.items():
            if key in record:
                try:
                    extras[key] = read(record[key], record)
                except ValueError as exc:
                    raise SkipRecord("invalid_record", str(exc)) from None
        return extras


def collate(processor: Processor, samples: Sequence[Sample]) -> TrainBatch:
    """Training batch: samples padded on the right (labels ignore_id there) by `processor.batch`."""
    batch = processor.batch(samples, padding="right")
    return TrainBatch(**vars(batch), extras=[getattr(sample, "extras", {}) for sample in samples])


# --------------------------------------------------------------------------------------------------
# Per-worker batches
# --------------------------------------------------------------------------------------------------


class WorkerStream:
    """The micro-batches of one data-loader worker of one rank: its chunks of the global stream."""

    def __init__(self, mixture: MixtureStream, encoder: RecordEncoder, shard_paths: Sequence[Sequence[Path]],
                 sources: Sequence[DataSource], batch_size: int, owner: int, num_owners: int,
                 max_consecutive_bad: int = 1000) -> None:
        self.mixture = mixture
        self.encoder = encoder
        self.shard_paths = shard_paths
        self.sources = sources  # with their formats resolved
        self.batch_size = batch_size
        self.owner = owner
        self.num_owners = num_owners
        self.max_consecutive_bad = max_consecutive_bad
        self.position = 0  # global stream position of the next record
        self.skipped: Counter[str] = Counter()
        self.consecutive_bad = 0
        self.recent: list[dict[str, Any]] = []  # records skipped since `take_recent`

    def owns(self, position: int) -> bool:
        return (position // self.batch_size) % self.num_owners == self.owner

    def next_samples(self) -> list[Sample]:
        samples: list[Sample] = []
        while len(samples) < self.batch_size:
            record = self.mixture.next()
            position = self.position
            self.position += 1
            if not self.owns(position):
                continue
            shard_path = self.shard_paths[record.source][record.shard]
            source = self.sources[record.source]
            try:
                samples.append(self.encoder(record.text, shard_path, source.format, source.image_root))
                self.consecutive_bad = 0
            except SkipRecord as skip:
                self._skip(skip, source.name, shard_path, record.line)
        return samples

    def _skip(self, skip: SkipRecord, source: str, shard_path: Path, line: int) -> None:
        self.skipped[skip.reason] += 1
        self.consecutive_bad += 1
        where = shard_file(shard_path).where(shard_path, line)
        logger.warning("skipped record %s (%s): %s", where, skip.reason, skip)
        self.recent.append({"source": source, "file": str(shard_path), "record": line, "where": where,
                            "reason": skip.reason, "message": str(skip)})
        if self.consecutive_bad >= self.max_consecutive_bad:
            raise DataError(f"{self.consecutive_bad} bad records in a row (last: {where}, "
                            f"{skip.reason}); counts so far {dict(self.skipped)}: check the data")

    def take_recent(self) -> list[dict[str, Any]]:
        """The records skipped since the last call (what went into the batch just made)."""
        recent, self.recent = self.recent, []
        return recent

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "skipped": dict(self.skipped), "consecutive_bad": self.consecutive_bad,
                "mixture": self.mixture.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]
        self.skipped = Counter(state["skipped"])
        self.consecutive_bad = state["consecutive_bad"]
        self.mixture.load_state_dict(state["mixture"])


@dataclass
class LoaderItem:
    batch: Batch
    worker: int  # logical worker that made it
    state: dict[str, Any]  # that worker's position after it
    skipped: list[dict[str, Any]] = field(default_factory=list)  # records skipped while making it


class TrainDataset(IterableDataset):
    """Endless micro-batches for one rank (see the module docstring for the split)."""

    def __init__(
        self,
        sources: Sequence[DataSource],
        processor: Processor,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        max_length: int | None = None,
        max_consecutive_bad: int = 1000,
        fields: Mapping[str, FieldReader] | None = None,
    ) -> None:
        super().__init__()
        if not sources:
            raise DataError("no data sources")
        if batch_size < 1 or not 0 <= rank < world_size or num_workers < 0:
            raise DataError(f"bad split: batch_size {batch_size}, rank {rank} of {world_size}, "
                            f"{num_workers} workers")
        self.shards = [find_shards(s.paths, s.format) for s in sources]
        # Each source's format, detected from its first file where the recipe leaves it to `auto`.
        self.sources = [s if s.format != "auto" else dataclasses.replace(s, format=detect_format(shards))
                        for s, shards in zip(sources, self.shards, strict=True)]
        self.processor = processor
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.max_length = max_length
        self.max_consecutive_bad = max_consecutive_bad
        self.fields = dict(fields or {})
        self.resume_states: dict[int, dict[str, Any]] = {}
        self.rotation = 0  # logical worker of physical worker 0

    @property
    def workers_per_rank(self) -> int:
        return max(1, self.num_workers)

    def worker_stream(self, worker: int) -> WorkerStream:
        """A fresh stream of logical worker `worker` of this rank."""
        streams = [
            ShardStream(s.name, shards, self.seed, i, self.shuffle_buffer, self.shuffle_shards)
            for i, (s, shards) in enumerate(zip(self.sources, self.shards, strict=True))
        ]
        mixture = MixtureStream(streams, [s.weight for s in self.sources], self.seed)
        encoder = RecordEncoder(self.processor, self.max_length, self.fields)
        owner = worker * self.world_size + self.rank
        return WorkerStream(mixture, encoder, self.shards, self.sources, self.batch_size, owner,
                            self.world_size * self.workers_per_rank, self.max_consecutive_bad)

    def __iter__(self) -> Iterator[LoaderItem]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        # DataLoader asks its workers in turn starting from physical worker 0; rotating the
        # logical numbering makes a resumed loader continue with the worker that was next.
        worker = (physical + self.rotation) % self.workers_per_rank
        stream = self.worker_stream(worker)
        if worker in self.resume_states:
            stream.load_state_dict(self.resume_states[worker])
        try:
            while True:
                batch = collate(self.processor, stream.next_samples())
                yield LoaderItem(batch, worker, stream.state_dict(), stream.take_recent())
        finally:
            stream.mixture.close()


def _pass_through(item: LoaderItem) -> LoaderItem:
    return item


class TrainLoader:
    """Iterates a TrainDataset's micro-batches (through DataLoader workers) and can resume exactly."""

    def __init__(self, dataset: TrainDataset, prefetch_factor: int = 2) -> None:
        self.dataset = dataset
        self.prefetch_factor = prefetch_factor
        self.consumed = 0
        self.worker_states: dict[int, dict[str, Any]] = {}
        self.skipped_records: list[dict[str, Any]] = []  # of the batches consumed, until `take_skipped_records`
        self._iterator: Iterator[LoaderItem] | None = None

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            self._iterator = self._start()
        item = next(self._iterator)
        self.worker_states[item.worker] = item.state
        self.skipped_records += item.skipped
        self.consumed += 1
        return item.batch

    def take_skipped_records(self) -> list[dict[str, Any]]:
        """Where and why each record was skipped, for the batches consumed since the last call."""
        records, self.skipped_records = self.skipped_records, []
        return records

    def _start(self) -> Iterator[LoaderItem]:
        dataset = self.dataset
        dataset.resume_states = dict(self.worker_states)
        dataset.rotation = self.consumed % dataset.workers_per_rank
        if dataset.num_workers == 0:
            return iter(dataset)
        loader = DataLoader(dataset, batch_size=None, num_workers=dataset.num_workers, collate_fn=_pass_through,
                            prefetch_factor=self.prefetch_factor)
        return iter(loader)

    def skipped(self) -> dict[str, int]:
        """Records skipped so far by this rank's workers, by reason."""
        total: Counter[str] = Counter()
        for state in self.worker_states.values():
            total.update(state["skipped"])
        return dict(total)

    def state_dict(self) -> dict[str, Any]:
        dataset = self.dataset
        return {
            "version": STATE_VERSION, "rank": dataset.rank, "world_size": dataset.world_size,
            "num_workers": dataset.num_workers, "batch_size": dataset.batch_size, "seed": dataset.seed,
            "consumed": self.consumed, "workers": dict(self.worker_states),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dataset = self.dataset
        if state.get("version") != STATE_VERSION:
            raise DataError(f"unknown data-position version {state.get('version')!r}")
        expected = {"rank": dataset.rank, "world_size": dataset.world_size, "num_workers": dataset.num_workers,
                    "batch_size": dataset.batch_size, "seed": dataset.seed}
        differ = {k: (state[k], v) for k, v in expected.items() if state[k] != v}
        if differ:
            details = ", ".join(f"{k} saved {old} now {new}" for k, (old, new) in differ.items())
            raise DataError(f"cannot continue the saved data position exactly: {details}")
        self.close()
        self.consumed = state["consumed"]
        self.worker_states = dict(state["workers"])

    def close(self) -> None:
        """Stop the worker processes; the next batch restarts them from the current position."""
        self._iterator = None
