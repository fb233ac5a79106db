"""Training data: record kinds, loss masks, deterministic streaming, splitting, mixture, resume, bad records."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsvl2.processor import Processor
from dsvl2.train.data import (
    DataError,
    DataSource,
    MixtureStream,
    RecordEncoder,
    ShardStream,
    SkipRecord,
    TrainDataset,
    TrainLoader,
    collate,
    find_shards,
)
from dsvl2.train.synthetic import TASKS, generate_dataset

IGNORE = -100


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def processor(conf_dir: Path) -> Processor:
    proc = Processor.from_pretrained(conf_dir / "tiny_like")
    proc.config = dataclasses.replace(proc.config, mask_prompt=True)
    return proc


def _write_text_shards(folder: Path, counts: list[int]) -> list[Path]:
    """Shards of text records 'record S-I' (unique, so a sample names its record)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, count in enumerate(counts):
        path = folder / f"part-{shard}.jsonl"
        path.write_text("".join(json.dumps({"text": f"record {shard}-{i}"}) + "\n" for i in range(count)))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text")
    _write_text_shards(folder, [7, 5, 9])
    return folder


def _names(processor: Processor, batch) -> list[str]:
    """The record text of each row of a batch of text records."""
    out = []
    for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True):
        out.append(processor.tokenizer.decode(ids[mask.bool()][1:-1].tolist()))
    return out


def _all_names(folder: Path) -> list[str]:
    paths = sorted(folder.glob("*.jsonl"))
    return [json.loads(line)["text"] for path in paths for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------------
# Records to samples
# --------------------------------------------------------------------------------------------------


def test_text_record_is_bos_tokens_eos_all_in_the_loss(processor: Processor) -> None:
    encoder = RecordEncoder(processor)
    sample = encoder(json.dumps({"text": "The capital of Peru is Lima."}).encode(), Path("x.jsonl"))
    tokenizer = processor.tokenizer
    expected = [tokenizer.bos_id, *tokenizer.encode("The capital of Peru is Lima."), tokenizer.eos_id]
    assert sample.input_ids.tolist() == expected
    assert sample.labels.tolist() == expected
    assert not sample.images_seq_mask.any() and sample.pixel_values.shape[0] == 0


def test_text_record_is_cut_to_max_length(processor: Processor) -> None:
    sample = RecordEncoder(processor, max_length=5)(json.dumps({"text": "one two three four five six"}).encode(),
                                                   Path("x.jsonl"))
    assert len(sample) == 5 and sample.input_ids[0] == processor.tokenizer.bos_id


def test_conversation_learns_only_the_answer(processor: Processor) -> None:
    record = {"messages": [{"role": "user", "content": "What is two plus two?"},
                           {"role": "assistant", "content": "Four."}]}
    sample = RecordEncoder(processor)(json.dumps(record).encode(), Path("x.jsonl"))
    tokenizer = processor.tokenizer
    answer = [*tokenizer.encode("Four."), tokenizer.eos_id]
    learnt = sample.labels[sample.labels != IGNORE].tolist()
    assert learnt == [tokenizer.bos_id, *answer]  # bos is never predicted (the loss shifts by one)
    assert sample.input_ids[-len(answer):].tolist() == answer


def test_every_record_kind_loads(processor: Processor, tmp_path: Path, conf_dir: Path) -> None:
    counts = generate_dataset(tmp_path, 2 * len(TASKS) + 4, seed=5, split="train")
    assert set(counts) == set(TASKS) and all(counts.values())
    images = conf_dir / "images"
    interleaved = {
        "messages": [
            {"role": "system", "content": "You compare pictures."},
            {"role": "user", "content": "<image>\n<image>\nWhich of these is wider?"},
            {"role": "assistant", "content": "The first."},
            {"role": "user", "content": "And this one? <image>"},
            {"role": "assistant", "content": "It is tall."},
        ],
        "images": [str(images / "wide.png"), str(images / "square.png"), str(images / "tall.png")],
    }
    with open(tmp_path / "train.jsonl", "a") as handle:
        handle.write(json.dumps(interleaved) + "\n")
    encoder = RecordEncoder(processor)
    lines = (tmp_path / "train.jsonl").read_bytes().splitlines()
    for line in lines:
        record = json.loads(line)
        sample = encoder(line, tmp_path / "train.jsonl")
        n_images = len(record.get("images") or [])
        assert sample.images_spatial_crop.shape[0] == max(1, n_images)
        assert int(sample.images_seq_mask.sum()) == sum(sample.num_image_tokens)
        assert len(sample.num_image_tokens) == n_images
        assert (sample.labels != IGNORE).sum() > 1  # something to learn
        assert not (sample.labels[sample.images_seq_mask] != IGNORE).any()  # image tokens never in the loss
    assert sample.images_spatial_crop.tolist() == [[1, 1]] * 3  # > 2 images: global views only, as official


def _read_size(value, record: dict) -> int:
    """A field reader: an integer size, refused (ValueError) when negative."""
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"'size' must be an integer >= 0, got {value!r}")
    return value * len(record["messages"])


def test_extra_fields_are_read_checked_and_carried_into_the_batch(processor: Processor, conf_dir: Path) -> None:
    record = {"messages": [{"role": "user", "content": "<image>\nHow big?"}, {"role": "assistant", "content": "1"}],
              "images": [str(conf_dir / "images" / "square.png")], "size": 3, "colour": "red"}
    encoder = RecordEncoder(processor, fields={"size": _read_size})
    sample = encoder(json.dumps(record).encode(), Path("x.jsonl"))
    without = encoder(json.dumps({k: v for k, v in record.items() if k != "size"}).encode(), Path("x.jsonl"))
    text = encoder(json.dumps({"text": "no picture", "size": 5}).encode(), Path("x.jsonl"))
    batch = collate(processor, [sample, without, text])
    assert batch.extras == [{"size": 6}, {}, {}]  # read with the record; keys without a reader stay out
    assert batch.to("cpu").extras == batch.extras
    assert RecordEncoder(processor)(json.dumps(record).encode(), Path("x.jsonl")).extras == {}
    with pytest.raises(SkipRecord, match="'size' must be an integer >= 0, got -1") as caught:
        encoder(json.dumps({**record, "size": -1}).encode(), Path("x.jsonl"))
    assert caught.value.reason == "invalid_record"


def test_collated_batch_is_padded_on_the_right(processor: Processor, text_dir: Path) -> None:
    dataset = TrainDataset([DataSource("t", (text_dir,))], processor, batch_size=3, shuffle_buffer=1,
                           shuffle_shards=False)
    batch = next(TrainLoader(dataset))
    lengths = batch.attention_mask.sum(1)
    for row, length in enumerate(lengths.tolist()):
        assert batch.attention_mask[row, :length].all() and not batch.attention_mask[row, length:].any()
        assert (batch.labels[row, length:] == IGNORE).all()
    assert _names(processor, batch) == ["record 0-0", "record 0-1", "record 0-2"]


# --------------------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------------------


def test_find_shards_accepts_files_folders_and_globs(text_dir: Path) -> None:
    all_shards = sorted(text_dir.glob("*.jsonl"))
    assert find_shards([text_dir]) == all_shards
    assert find_shards([text_dir / "part-[12].jsonl"]) == all_shards[1:]
    assert find_shards([all_shards[2], text_dir]) == [all_shards[2], *all_shards[:2]]
    with pytest.raises(DataError, match="does not exist"):
        find_shards([text_dir / "nope.jsonl"])
    with pytest.raises(DataError, match="matches no"):
        find_shards([text_dir / "*.json"])


def _texts(stream: ShardStream, n: int) -> list[str]:
    return [json.loads(stream.next()[2])["text"] for _ in range(n)]


def test_each_epoch_without_buffer_is_a_seeded_shard_permutation(text_dir: Path) -> None:
    shards = find_shards([text_dir])
    names = _all_names(text_dir)
    first = _texts(ShardStream("t", shards, seed=1, source_index=0, shuffle_buffer=1), 3 * len(names))
    epochs = [first[i * len(names):(i + 1) * len(names)] for i in range(3)]
    assert all(sorted(e) == sorted(names) for e in epochs)  # every record once per epoch
    assert _texts(ShardStream("t", shards, 1, 0, 1), len(names)) == epochs[0]  # same seed, same order
    orders = {tuple(_texts(ShardStream("t", shards, seed, 0, 1), len(names))) for seed in range(6)}
    assert len(orders) > 1  # the shard order depends on the seed


def test_shuffle_buffer_mixes_records_deterministically(text_dir: Path) -> None:
    shards = find_shards([text_dir])
    names = _all_names(text_dir)
    a = _texts(ShardStream("t", shards, 3, 0, shuffle_buffer=8, shuffle_shards=False), 4 * len(names))
    b = _texts(ShardStream("t", shards, 3, 0, shuffle_buffer=8, shuffle_shards=False), 4 * len(names))
    c = _texts(ShardStream("t", shards, 4, 0, shuffle_buffer=8, shuffle_shards=False), 4 * len(names))
    assert a == b and a != c
    assert a[: len(names)] != names  # not the file order
    counts = Counter(a)
    assert set(counts) == set(names) and max(counts.values()) - min(counts.values()) <= 3


def test_mixture_draws_sources_by_weight(text_dir: Path, tmp_path: Path) -> None:
    other = _write_text_shards(tmp_path / "other", [4])
    streams = [ShardStream("a", find_shards([text_dir]), 0, 0, 4), ShardStream("b", other, 0, 1, 4)]
    mixture = MixtureStream(streams, [0.7, 0.3], seed=11)
    sources = [mixture.next().source for _ in range(2000)]
    assert abs(sources.count(0) / len(sources) - 0.7) < 0.04
    again = MixtureStream([ShardStream("a", find_shards([text_dir]), 0, 0, 4), ShardStream("b", other, 0, 1, 4)],
                          [0.7, 0.3], seed=11)
    assert [again.next().source for _ in range(200)] == sources[:200]


# --------------------------------------------------------------------------------------------------
# Splitting across ranks and data-loader workers
# --------------------------------------------------------------------------------------------------


def _owner_batches(processor: Processor, text_dir: Path, world: int, workers: int, batch_size: int, n: int
                   ) -> dict[tuple[int, int], list[list[str]]]:
    out = {}
    for rank in range(world):
        dataset = TrainDataset([DataSource("t", (text_dir,))], processor, batch_size, seed=2, rank=rank,
                               world_size=world, num_workers=workers, shuffle_buffer=6)
        for worker in range(max(1, workers)):
            stream = dataset.worker_stream(worker)
            out[rank, worker] = [
                _names(processor, processor.batch(stream.next_samples(), padding="right")) for _ in range(n)
            ]
    return out


def test_ranks_and_workers_split_the_stream_without_overlap(processor: Processor, text_dir: Path) -> None:
    # 2 ranks x 2 data-loader workers, 2 samples per micro-batch: a global step is one micro-batch
    # per rank (4 records), and must hold what 1 rank x 1 worker x 4 samples holds.
    split = _owner_batches(processor, text_dir, world=2, workers=2, batch_size=2, n=3)
    whole = _owner_batches(processor, text_dir, world=1, workers=0, batch_size=4, n=6)[0, 0]
    for step in range(6):
        # A rank's step-th micro-batch comes from worker step % 2: the DataLoader asks them in turn.
        taken = [name for rank in range(2) for name in split[rank, step % 2][step // 2]]
        assert sorted(taken) == sorted(whole[step])
    seen = Counter(name for batches in split.values() for batch in batches for name in batch)
    assert seen == Counter(name for batch in whole for name in batch)  # each stream position used once


def test_dataloader_workers_take_turns_and_cover_the_stream(processor: Processor, text_dir: Path) -> None:
    single = TrainLoader(TrainDataset([DataSource("t", (text_dir,))], processor, 2, seed=9, shuffle_buffer=5))
    expected = [_names(processor, next(single)) for _ in range(6)]
    parallel = TrainLoader(TrainDataset([DataSource("t", (text_dir,))], processor, 2, seed=9, shuffle_buffer=5,
                                        num_workers=2))
    got = [_names(processor, next(parallel)) for _ in range(6)]
    parallel.close()
    assert got == expected  # the same records in the same order, whatever the worker count


# --------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_same_samples(processor: Processor, text_dir: Path, tmp_path: Path,
                                                 workers: int) -> None:
    other = _write_text_shards(tmp_path / "other", [3, 4])
    sources = [DataSource("a", (text_dir,), 0.6), DataSource("b", tuple(other), 0.4)]

    def loader() -> TrainLoader:
        return TrainLoader(TrainDataset(sources, processor, 2, seed=4, num_workers=workers, shuffle_buffer=5))

    first = loader()
    before = [_names(processor, next(first)) for _ in range(5)]
    state = pickle.loads(pickle.dumps(first.state_dict()))
    expected = [_names(processor, next(first)) for _ in range(7)]
    first.close()
    resumed = loader()
    resumed.load_state_dict(state)
    assert [_names(processor, next(resumed)) for _ in range(7)] == expected
    resumed.close()
    assert before != expected[:5]


def test_resume_refuses_a_different_split(processor: Processor, text_dir: Path) -> None:
    loader = TrainLoader(TrainDataset([DataSource("t", (text_dir,))], processor, 2))
    next(loader)
    state = loader.state_dict()
    other = TrainLoader(TrainDataset([DataSource("t", (text_dir,))], processor, 2, rank=1, world_size=2))
    with pytest.raises(DataError, match="world_size saved 1 now 2"):
        other.load_state_dict(state)


# --------------------------------------------------------------------------------------------------
# Bad records
# --------------------------------------------------------------------------------------------------


def test_bad_records_are_skipped_counted_and_logged(processor: Processor, tmp_path: Path, conf_dir: Path,
                                                    caplog) -> None:
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    (tmp_path / "garbage.png").write_bytes(np.random.default_rng(0).integers(0, 256, 500, np.uint8).tobytes())
    good = {"messages": [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "Red."}],
            "images": ["red.png"]}
    lines = [
        json.dumps(good),
        json.dumps({**good, "images": ["missing.png"]}),
        json.dumps({**good, "images": ["red.png", "red.png"]}),  # one tag, two images
        json.dumps({**good, "images": ["garbage.png"]}),
        '{"messages": [{"role": "user", "content": "cut off',
        json.dumps(["not", "an", "object"]),
        json.dumps({"neither": "messages nor text"}),
        json.dumps({"text": "A good text record."}),
    ]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    dataset = TrainDataset([DataSource("m", (tmp_path / "mixed.jsonl",))], processor, batch_size=2,
                           shuffle_buffer=1, shuffle_shards=False)
    loader = TrainLoader(dataset)
    with caplog.at_level(logging.WARNING, logger="dsvl2.train.data"):
        batch = next(loader)
    assert loader.skipped() == {"missing_image": 1, "image_count": 1, "image_decode": 1, "bad_json": 1,
                                "invalid_record": 2}
    assert batch.input_ids.shape[0] == 2 and int(batch.images_spatial_crop[0].sum()) > 0
    assert _names(processor, batch)[1] == "A good text record."
    messages = "\n".join(r.getMessage() for r in caplog.records)
    for line_no, reason in [(2, "missing_image"), (3, "image_count"), (4, "image_decode"), (5, "bad_json"),
                            (6, "invalid_record"), (7, "invalid_record")]:
        assert f"mixed.jsonl:{line_no} ({reason})" in messages
    assert loader.state_dict()["workers"][0]["skipped"]["bad_json"] == 1  # counts survive a resume


def test_data_with_no_good_record_fails_clearly(processor: Processor, tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text("not json\n{also not\n")
    loader = TrainLoader(TrainDataset([DataSource("b", (tmp_path / "bad.jsonl",))], processor, 1,
                                      max_consecutive_bad=20))
    with pytest.raises(DataError, match="20 bad records in a row"):
        next(loader)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="hold no records"):
        next(TrainLoader(TrainDataset([DataSource("e", (tmp_path / "empty.jsonl",))], processor, 1)))
