"""Training data in the shapes people keep it (LLaVA, ShareGPT, parquet, ours): same samples, streamed, resumable."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dsvl2.processor import Processor
from dsvl2.train import formats
from dsvl2.train.data import DataSource, ShardStream, TrainDataset, TrainLoader
from dsvl2.train.formats import DataError, detect_format, find_shards

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTION_1 = "<image>\nWhere is the red square?"
ANSWER_1 = "<|ref|>the red square<|/ref|><|det|>[[102, 205, 498, 797]]<|/det|>"
QUESTION_2 = "<image>\nAnd what is here?"
ANSWER_2 = "A blue circle."
TURNS = [("user", QUESTION_1), ("assistant", ANSWER_1), ("user", QUESTION_2), ("assistant", ANSWER_2)]


@pytest.fixture(scope="module")
def processor(conf_dir: Path) -> Processor:
    proc = Processor.from_pretrained(conf_dir / "tiny_like")
    proc.config = dataclasses.replace(proc.config, mask_prompt=True)
    return proc


def png(color: str, size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def write_images(folder: Path) -> list[str]:
    """Two images the test draws, as paths relative to `folder`."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "img" / "red.png").write_bytes(png("red", (96, 64)))
    (folder / "img" / "blue.png").write_bytes(png("blue", (40, 120)))
    return ["img/red.png", "img/blue.png"]


def dsvl2_record(images: list[str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in TURNS], "images": images}


def llava_record(images: list[str]) -> dict:
    names = {"user": "human", "assistant": "gpt"}
    return {"id": "0", "image": images, "conversations": [{"from": names[r], "value": c} for r, c in TURNS]}


def sharegpt_record(images: list[str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in TURNS], "images": [{"path": p} for p in images]}


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 2) -> Path:
    """Rows as a Hugging Face dataset writes them: images a list of {bytes, path} structs."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("images", pa.list_(image)), ("messages", pa.list_(message))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


def parquet_row(folder: Path, images: list[str]) -> dict:
    # A Hugging Face dataset keeps the original file name beside the bytes; that file is not at hand.
    return {"images": [{"bytes": (folder / p).read_bytes(), "path": Path(p).name} for p in images],
            "messages": [{"role": r, "content": c} for r, c in TURNS]}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    """The same two-image, two-turn grounding conversation in each of the four shapes."""
    root = tmp_path_factory.mktemp("shapes")
    images = write_images(root)
    (root / "ours.jsonl").write_text(json.dumps(dsvl2_record(images)) + "\n")
    (root / "llava.json").write_text(json.dumps([llava_record(images)], indent=2))
    (root / "sharegpt.jsonl").write_text(json.dumps(sharegpt_record(images)) + "\n")
    write_parquet(root / "train-00000.parquet", [parquet_row(root, images)])
    return {"dsvl2": root / "ours.jsonl", "llava": root / "llava.json", "sharegpt": root / "sharegpt.jsonl",
            "parquet": root / "train-00000.parquet"}


def first_batch(processor: Processor, path: Path, format: str = "auto"):
    dataset = TrainDataset([DataSource("s", (path,), format=format)], processor, batch_size=1, shuffle_buffer=1)
    loader = TrainLoader(dataset)
    try:
        return dataset.sources[0].format, next(loader)
    finally:
        loader.close()


def test_the_four_shapes_give_identical_samples(processor: Processor, shapes: dict[str, Path]) -> None:
    batches = {}
    for expected, path in shapes.items():
        detected, batches[expected] = first_batch(processor, path)
        assert detected == expected, path  # detected from the file alone
    reference = batches["dsvl2"]
    ref_id = processor.tokenizer.encode("<|ref|>")[0]
    assert (reference.labels == ref_id).any()  # the grounding answer is a target, in the model's own tokens
    assert reference.images_spatial_crop.shape[1] == 2 and (reference.labels != -100).sum() > 10
    for name, batch in batches.items():
        assert batch.input_ids.tolist() == reference.input_ids.tolist(), name
        assert batch.labels.tolist() == reference.labels.tolist(), name
        assert batch.images.equal(reference.images), name
        assert batch.images_spatial_crop.equal(reference.images_spatial_crop), name


def test_image_root_and_explicit_format(processor: Processor, tmp_path: Path) -> None:
    images = write_images(tmp_path / "pictures")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps(llava_record(images)) + "\n")  # LLaVA records as JSON Lines
    assert detect_format([data / "train.jsonl"]) == "llava"
    dataset = TrainDataset([DataSource("s", (data,), format="llava", image_root=tmp_path / "pictures")], processor,
                           batch_size=1, shuffle_buffer=1)
    loader = TrainLoader(dataset)
    batch = next(loader)
    assert loader.take_skipped_records() == [] and batch.images_spatial_crop.shape[1] == 2
    loader.close()
    without_root = TrainLoader(TrainDataset([DataSource("s", (data,), format="llava")], processor, batch_size=1,
                                            shuffle_buffer=1, max_consecutive_bad=2))
    with pytest.raises(DataError, match="bad records in a row"):
        next(without_root)  # the images are not beside the data file


def test_folders_find_the_files_of_their_format(tmp_path: Path) -> None:
    (tmp_path / "data" / "train").mkdir(parents=True)
    write_parquet(tmp_path / "data" / "train" / "b.parquet", [])
    write_parquet(tmp_path / "data" / "a.parquet", [])
    (tmp_path / "README.md").write_text("a dataset card")
    assert find_shards([tmp_path], "parquet") == [tmp_path / "data" / "a.parquet", tmp_path / "data" / "train" /
                                                  "b.parquet"]
    assert find_shards([tmp_path], "auto") == find_shards([tmp_path], "parquet")
    with pytest.raises(DataError, match="matches no data file"):
        find_shards([tmp_path], "llava")


# --------------------------------------------------------------------------------------------------
# Streaming and exact resume
# --------------------------------------------------------------------------------------------------


def _llava_texts(n: int) -> list[dict]:
    # Multi-byte characters, so chunk edges fall inside them.
    return [{"id": i, "conversations": [{"from": "human", "value": f"Qué é {i} 猫" * (i % 5 + 1)},
                                        {"from": "gpt", "value": "ok"}]} for i in range(n)]


def test_a_json_array_is_read_element_by_element(tmp_path: Path, monkeypatch) -> None:
    records = _llava_texts(40)
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    monkeypatch.setattr(formats, "_CHUNK", 7)  # the file arrives in small pieces
    read = list(formats.JsonArrayFile.records(path, 0, 0))
    assert [json.loads(payload) for _, _, payload in read] == records
    assert [index for index, _, _ in read] == list(range(40))
    index, offset, _ = read[16]  # a saved position continues with the next element
    assert [json.loads(p) for _, _, p in formats.JsonArrayFile.records(path, index + 1, offset)] == records[17:]
    path.write_text(json.dumps(records[:3])[:-30] + "}, {]")  # a broken element
    with pytest.raises(DataError, match="record 2 is not valid JSON"):
        list(formats.JsonArrayFile.records(path, 0, 0))


def _stream_ids(stream: ShardStream, n: int) -> list:
    out = []
    for _ in range(n):
        shard, line, payload = stream.next()
        out.append((shard, line, formats.parse_record(payload)["id"]))
    return out


@pytest.mark.parametrize("kind", ["llava", "parquet"])
def test_streams_of_each_file_kind_resume_exactly(tmp_path: Path, kind: str) -> None:
    records = _llava_texts(11)
    if kind == "llava":
        shards = [tmp_path / "a.json", tmp_path / "b.json"]
        shards[0].write_text(json.dumps(records[:6]))
        shards[1].write_text(json.dumps(records[6:]))
    else:
        shards = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
        pq.write_table(pa.Table.from_pylist(records[:6]), shards[0], row_group_size=4)
        pq.write_table(pa.Table.from_pylist(records[6:]), shards[1], row_group_size=2)
    whole = _stream_ids(ShardStream("s", shards, 3, 0, shuffle_buffer=4), 30)
    assert sorted(r[2] for r in whole[:11]) != [r[2] for r in whole[:11]]  # shuffled
    first = ShardStream("s", shards, 3, 0, shuffle_buffer=4)
    head = _stream_ids(first, 13)
    state = json.loads(json.dumps(first.state_dict(), default=lambda b: b.decode()))  # as saved
    if kind == "parquet":
        assert all(payload is None for _, _, payload in state["buffer"])  # rows are saved by position only
    else:
        state["buffer"] = [(s, line, payload.encode()) for s, line, payload in state["buffer"]]
    again = ShardStream("s", shards, 3, 0, shuffle_buffer=4)
    again.load_state_dict(state)
    assert head + _stream_ids(again, 17) == whole


# --------------------------------------------------------------------------------------------------
# Training on them
# --------------------------------------------------------------------------------------------------


def _recipe(conf_dir: Path, out: Path, source: dict, steps: int = 2, strict: bool = False):
    from dsvl2.train.recipe import recipe_from_dict

    return recipe_from_dict({
        "stage": "sft", "model": {"checkpoint": str(conf_dir / "tiny_like")},
        "data": {"sources": [{"name": "s", **source}], "shuffle_buffer": 1, "strict": strict},
        "optimizer": {"lr": 1e-3}, "schedule": {"kind": "constant"},
        "training": {"steps": steps, "micro_batch_size": 1, "freeze": ["vision"]},
        "output": {"dir": str(out), "save_every": 100, "progress": False, "log_every": 1},
    }, out.parent)


@pytest.mark.parametrize("shape", ["dsvl2", "llava", "sharegpt", "parquet"])
def test_train_a_few_steps_on_each_shape(conf_dir: Path, shapes: dict[str, Path], tmp_path: Path, shape) -> None:
    from dsvl2.train.trainer import Trainer

    history = Trainer(_recipe(conf_dir, tmp_path / "run", {"paths": [str(shapes[shape])]})).train()
    assert [record["step"] for record in history] == [1, 2]
    assert all(record["loss"] > 0 and record["skipped"] == {} for record in history)
    assert history[1]["loss"] < history[0]["loss"]  # the same record twice: learnt
    assert not (tmp_path / "run" / "skipped.jsonl").exists()


def _with_bad_records(folder: Path) -> Path:
    images = write_images(folder)
    good, missing = dsvl2_record(images), dsvl2_record([images[0], "img/gone.png"])
    path = folder / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, missing, good, good, "not a record")) + "\n")
    return path


def test_unusable_records_are_listed_beside_the_checkpoints(conf_dir: Path, tmp_path: Path, capsys) -> None:
    from dsvl2.train import trainer

    path = _with_bad_records(tmp_path)
    whole = tmp_path / "whole"
    trainer.Trainer(_recipe(conf_dir, whole, {"paths": [str(path)]}, steps=4)).train()
    skipped = [json.loads(line) for line in (whole / "skipped.jsonl").read_text().splitlines()]
    assert [(s["step"], s["where"], s["reason"]) for s in skipped] == [
        (2, f"{path}:2", "missing_image"), (4, f"{path}:5", "invalid_record")]
    assert "gone.png" in skipped[0]["message"]
    log = [json.loads(line) for line in (whole / "log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped"] == {"missing_image": 1, "invalid_record": 1}
    resumed = tmp_path / "resumed"
    trainer.Trainer(_recipe(conf_dir, resumed, {"paths": [str(path)]}, steps=4)).train(stop_at=3)
    (resumed / "skipped.jsonl").write_text((resumed / "skipped.jsonl").read_text() + '{"step": 4}\n')  # a crash
    trainer.Trainer(_recipe(conf_dir, resumed, {"paths": [str(path)]}, steps=4), resume=True).train()
    assert (resumed / "skipped.jsonl").read_text() == (whole / "skipped.jsonl").read_text()

    recipe = tmp_path / "strict.yaml"
    recipe.write_text(json.dumps({**_recipe(conf_dir, tmp_path / "strict", {"paths": [str(path)]}).raw}))
    assert trainer.main([str(recipe), "--strict"]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}:2: image file" in err and "--strict" in err


def test_llava_keys_and_image_structs_in_parquet_rows() -> None:
    row = {"image": {"bytes": b"\x89PNG...", "path": "cat.png"}, "id": 3,
           "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]}
    messages, images = formats.conversation(row, "parquet")
    assert messages == [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A cat."}]
    assert images == [b"\x89PNG..."]
    assert formats.conversation({**row, "image": {"bytes": None, "path": "cat.png"}}, "parquet")[1] == ["cat.png"]
    with pytest.raises(formats.SkipRecord, match="message 1 has role 'bot'"):
        formats.conversation({**row, "conversations": [{"from": "human", "value": "hi"},
                                                       {"from": "bot", "value": "x"}]}, "llava")


def test_skipped_records_travel_from_loader_workers(processor: Processor, tmp_path: Path) -> None:
    path = _with_bad_records(tmp_path)
    seen = {}
    for workers in (0, 2):
        loader = TrainLoader(TrainDataset([DataSource("s", (path,))], processor, batch_size=1, shuffle_buffer=1,
                                          num_workers=workers))
        batches = [next(loader) for _ in range(6)]
        seen[workers] = ([b.input_ids.tolist() for b in batches], loader.take_skipped_records())
        loader.close()
    assert seen[2] == seen[0]
    assert [(s["where"], s["reason"]) for s in seen[0][1]] == [(f"{path}:2", "missing_image"),
                                                               (f"{path}:5", "invalid_record"),
                                                               (f"{path}:2", "missing_image")]
