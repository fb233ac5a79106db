"""`dsvl2 data check` finds each kind of fault and names its record; `dsvl2 data convert` keeps the samples."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dsvl2 import cli
from dsvl2.processor import Processor
from dsvl2.train.data import DataSource, TrainDataset, TrainLoader
from tests.train.test_formats import (
    dsvl2_record,
    llava_record,
    parquet_row,
    png,
    write_images,
    write_parquet,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_image(question: str, answer: str, image: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "images": [image]}


@pytest.fixture
def faulty(tmp_path: Path) -> dict[str, Path]:
    """Files in three shapes, each with faults planted on known lines, rows and elements."""
    images = write_images(tmp_path)
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = [
        json.dumps(one_image("<image>\nWhat colour?", "Red.", images[0])),  # 1: good
        "{not json",  # 2
        json.dumps(one_image("<image>\nWhat colour?", "Red.", "img/nowhere.png")),  # 3: missing image
        json.dumps(one_image("<image>\nWhat colour?", "Red.", "img/broken.png")),  # 4: undecodable
        json.dumps(one_image("<image>\n<image>\nBoth?", "Red.", images[0])),  # 5: two tags, one image
        json.dumps(one_image("<image>\nDescribe it.", "red " * 1000, images[0])),  # 6: too long
        json.dumps(dsvl2_record(images)),  # 7: good, two images
    ]
    (tmp_path / "ours.jsonl").write_text("\n".join(lines) + "\n")
    broken = llava_record(images)
    broken.pop("conversations")
    (tmp_path / "llava.json").write_text(json.dumps([llava_record(images), broken, llava_record(images[:1])]))
    rows = [parquet_row(tmp_path, images), parquet_row(tmp_path, images)]
    rows[1]["images"][1]["bytes"] = b"not an image"
    write_parquet(tmp_path / "train.parquet", rows)
    return {"dsvl2": tmp_path / "ours.jsonl", "llava": tmp_path / "llava.json", "parquet": tmp_path / "train.parquet"}


def test_data_check_names_each_planted_fault(faulty: dict[str, Path], conf_dir: Path, capsys) -> None:
    args = ["data", "check", "--model", str(conf_dir / "tiny_like"), "--max-length", "1000"]
    for path in faulty.values():
        args += ["--data", str(path)]
    code, out, err = run_cli(args, capsys)
    assert code == 1, err
    errors = sorted(line for line in out.splitlines() if line.startswith("error: "))
    ours, llava, parquet = (str(p) for p in faulty.values())
    expected = [f"error: {ours}:2: not valid JSON", f"error: {ours}:3: image file", f"error: {ours}:4: ",
                f"error: {ours}:5: the conversation has 2 <image> tag(s) but 1 image(s)",
                f"error: {ours}:6: ", f"error: {llava} record 1: a LLaVA record needs 'conversations'",
                f"error: {llava} record 2: the conversation has 2 <image> tag(s) but 1 image(s)",
                f"error: {parquet} row 1: "]
    assert len(errors) == len(expected), out
    for line, start in zip(errors, sorted(expected), strict=True):
        assert line.startswith(start), (line, start)
    reasons = {"bad_json": 1, "missing_image": 1, "image_decode": 2, "image_count": 2, "invalid_record": 1,
               "too_long": 1}
    for reason, count in reasons.items():
        assert f"  {reason} (" in out and f"): {count}" in out.split(f"  {reason} (")[1].splitlines()[0], reason
    assert "records: 12, usable: 4" in out
    assert "longer than the context of 1000 tokens: 1 conversation(s), skipped by training" in out
    assert "tokens per record: min" in out and "tokens with loss: " in out


def test_data_check_of_a_clean_recipe_passes(tmp_path: Path, conf_dir: Path, capsys) -> None:
    images = write_images(tmp_path / "pictures")
    (tmp_path / "llava.json").write_text(json.dumps([llava_record(images)] * 3))
    write_parquet(tmp_path / "train.parquet", [parquet_row(tmp_path / "pictures", images)])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "stage": "sft", "model": {"checkpoint": str(conf_dir / "tiny_like")},
        "data": {"sources": [{"name": "l", "paths": ["llava.json"], "image_root": "pictures"},
                             {"name": "p", "paths": ["train.parquet"], "format": "parquet"}]},
        "output": {"dir": "out"},
    }))
    code, out, err = run_cli(["data", "check", str(recipe)], capsys)
    assert code == 0, out + err
    assert "records: 4, usable: 4" in out and "images read: 8" in out and "error" not in out
    assert "longer than the context of 4096 tokens: 0" in out
    share = float(out.split("tokens with loss: ")[1].split("(")[1].split("%")[0])
    assert 0 < share < 50  # prompts and images are masked


def test_data_check_reports_an_unusable_recipe(tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(["data", "check", "--data", str(tmp_path / "none.jsonl")], capsys)
    assert code == 2 and "--model" in err


def test_convert_keeps_the_samples(tmp_path: Path, conf_dir: Path, capsys) -> None:
    images = write_images(tmp_path / "pictures")
    (tmp_path / "llava.json").write_text(json.dumps([llava_record(images), {"image": "x.png"}]))
    write_parquet(tmp_path / "train.parquet", [parquet_row(tmp_path / "pictures", images)])
    out = tmp_path / "out" / "train.jsonl"
    out.parent.mkdir()
    code, _, err = run_cli(["data", "convert", "--from", "llava", str(tmp_path / "llava.json"), "--out", str(out),
                            "--image-root", str(tmp_path / "pictures")], capsys)
    assert code == 1 and f"{tmp_path / 'llava.json'} record 1: a LLaVA record needs 'conversations'" in err
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {**dsvl2_record(["../pictures/img/red.png", "../pictures/img/blue.png"]), "id": "0"}]
    from_parquet = tmp_path / "out" / "rows.jsonl"
    code, _, err = run_cli(["data", "convert", "--from", "parquet", str(tmp_path / "train.parquet"), "--out",
                            str(from_parquet)], capsys)
    assert code == 0, err
    written = json.loads(from_parquet.read_text())
    assert written["images"] == ["rows_images/00000000_0.png", "rows_images/00000000_1.png"]
    processor = Processor.from_pretrained(conf_dir / "tiny_like")
    processor.config = dataclasses.replace(processor.config, mask_prompt=True)
    batches = []
    for path in (out, from_parquet, tmp_path / "llava.json"):
        loader = TrainLoader(TrainDataset([DataSource("s", (path,))], processor, 1, shuffle_buffer=1))
        source = loader.dataset.sources[0]
        if source.format == "llava":
            loader = TrainLoader(TrainDataset([dataclasses.replace(source, image_root=tmp_path / "pictures")],
                                              processor, 1, shuffle_buffer=1))
        batches.append(next(loader))
        loader.close()
    for batch in batches[1:]:
        assert batch.input_ids.equal(batches[0].input_ids) and batch.images.equal(batches[0].images)
    assert png("red", (96, 64)) == (tmp_path / "out" / "rows_images" / "00000000_0.png").read_bytes()
