"""The public benchmarks' own files: tiny files written here in each published format (images drawn by the
test) go through reader, prompt and scorer, with a lookup engine for the published values and with the
bundled model end to end; bad files and records are errors naming the file and the record."""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from dsvl2.errors import InputError
from dsvl2.eval import runner
from dsvl2.eval.answers import AnswerLog
from dsvl2.eval.benchmarks import read_benchmark
from dsvl2.eval.items import EvalItem, ItemResult
from dsvl2.eval.prompts import SHORT_ANSWER


def _png(path: Path | None = None, size: tuple[int, int] = (64, 48), text: str = "42") -> bytes:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((4, 4), text, fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def _tsv(path: Path, rows: list[dict]) -> Path:
    columns = list(rows[0])
    lines = ["\t".join(columns)] + ["\t".join(str(row.get(c, "")) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict[str, Path]:
    """task -> a tiny file in that benchmark's published layout."""
    root = tmp_path_factory.mktemp("benchmarks")
    for name in ("a.png", "b.png"):
        _png(root / "chartqa" / "png" / name)
    _png(root / "docvqa" / "documents" / "doc1.png")
    _png(root / "infovqa" / "infographicsvqa_images" / "info1.jpeg")
    _png(root / "textvqa" / "train_images" / "img1.jpg")
    _png(root / "ocrbench" / "OCRBench_Images" / "IIIT5K" / "w1.png")
    _png(root / "ocrbench" / "OCRBench_Images" / "HME100k" / "f1.png")
    image = _png(size=(200, 100))
    ten = ["2", "two"] + ["3"] * 8
    return {
        "chartqa": _json(root / "chartqa" / "test_human.json", [
            {"imgname": "a.png", "query": "What is the value for Brazil?", "label": "45"},
            {"imgname": "b.png", "query": "Which country is highest?", "label": "Brazil"},
        ]),
        "docvqa": _json(root / "docvqa" / "val_v1.0.json", {"dataset_name": "docvqa", "data": [
            {"questionId": 337, "question": "What is the date?", "question_types": ["form"],
             "image": "documents/doc1.png", "docId": 1, "answers": ["abc"]},
        ]}),
        "docvqa_test": _json(root / "docvqa" / "test_v1.0.json", {"data": [
            {"questionId": 901, "question": "What is the title?", "image": "documents/doc1.png"},
            {"questionId": 902, "question": "Who signed?", "image": "documents/doc1.png"},
        ]}),
        "infovqa": _json(root / "infovqa" / "infographicsVQA_val_v1.0_withQT.json", {"data": [
            {"questionId": 65, "question": "How many?", "image_local_name": "info1.jpeg", "answers": ["12"],
             "answer_type": ["single span"]},
        ]}),
        "textvqa": _json(root / "textvqa" / "TextVQA_0.5.1_val.json", {"dataset_version": "0.5.1", "data": [
            {"question_id": 34602, "question": "What number is shown?", "image_id": "img1", "answers": ten},
        ]}),
        "ocrbench": _json(root / "ocrbench" / "OCRBench.json", [
            {"dataset_name": "IIIT5K", "id": 0, "image_path": "IIIT5K/w1.png",
             "question": "what is written in the image?", "answers": ["STOP"], "type": "Regular Text Recognition"},
            {"dataset_name": "HME100k", "id": 1, "image_path": "HME100k/f1.png",
             "question": "Please write out the expression of the formula in the image using LaTeX format.",
             "answers": "x^{2}+1", "type": "Handwritten Mathematical Expression Recognition"},
        ]),
        "refcoco": _parquet(root / "refcoco-val.parquet", [
            {"question_id": "r1", "image": {"bytes": image, "path": "coco.png"}, "question": "caption",
             "answer": ["left square", "the dark one"], "bbox": [20.0, 10.0, 40.0, 30.0], "iscrowd": 0,
             "file_name": "coco.png"},
        ]),
        "vlmevalkit": _tsv(root / "MMStar.tsv", [
            {"index": 0, "question": "What animal is shown?", "hint": "", "A": "cat", "B": "dog", "C": "bird",
             "answer": "B", "category": "coarse perception", "image": "1"},
            {"index": 1, "question": "Which colour?", "hint": "Look closely", "A": "red", "B": "blue", "C": "green",
             "answer": "A", "category": "fine-grained perception", "image": base64.b64encode(image).decode()},
        ]),
    }


def _entries(task: str, path: Path, **kwargs) -> list:
    return list(read_benchmark(task, path, task, **kwargs))


def test_each_published_format_is_read_with_its_prompt_images_and_categories(bench):
    chart = _entries("chartqa", bench["chartqa"])
    assert [item.record["answers"] for item in chart] == [["45"], ["Brazil"]]
    assert chart[0].conversation == [{"role": "user", "content":
                                      f"<image>\nWhat is the value for Brazil?\n{SHORT_ANSWER}"}]
    assert chart[0].images == [str(bench["chartqa"].parent / "png" / "a.png")] and chart[0].category == "human"
    doc, = _entries("docvqa", bench["docvqa"])
    assert (doc.key, doc.metric, doc.category, doc.record) == ("337", "anls", "form", {"answers": ["abc"]})
    info, = _entries("infovqa", bench["infovqa"])
    assert Path(info.images[0]).name == "info1.jpeg" and info.category == "single span"
    text, = _entries("textvqa", bench["textvqa"])
    assert (text.key, text.metric, len(text.record["answers"])) == ("34602", "vqa", 10)
    ocr = _entries("ocrbench", bench["ocrbench"])
    assert [item.record["answers"] for item in ocr] == [["STOP"], ["x^{2}+1"]]
    assert ocr[1].category == "Handwritten Mathematical Expression Recognition"
    assert ocr[0].conversation[0]["content"] == "<image>\nwhat is written in the image?"
    ref = _entries("refcoco", bench["refcoco"])
    assert [item.key for item in ref] == ["r1#0", "r1#1"]  # one question per referring expression
    assert ref[0].conversation[0]["content"] == "<image>\n<|ref|>left square<|/ref|>."
    # [20, 10, 40, 30] px on a 200 x 100 image: x 0.1..0.3, y 0.1..0.4 of the 0..999 grid
    assert ref[0].record["box"] == pytest.approx([99.9, 99.9, 299.7, 399.6])
    choice = _entries("vlmevalkit", bench["vlmevalkit"])
    assert choice[0].images == choice[1].images  # MMBench-style: "1" is the index of the row with the image
    assert choice[1].conversation[0]["content"] == ("<image>\nHint: Look closely\nQuestion: Which colour?\n"
                                                    "Options:\nA. red\nB. blue\nC. green\n"
                                                    "Answer with the option's letter from the given choices "
                                                    "directly.")
    assert Image.open(io.BytesIO(choice[0].images[0])).size == (200, 100)


class _LookupEngine:
    """Answers by the first registered phrase found in the question; records what it was asked."""

    def __init__(self, answers: dict[str, str], fail_after: int | None = None) -> None:
        self.answers = answers
        self.asked: list[str] = []
        self.fail_after = fail_after

    def generate_batch(self, requests):
        from dsvl2.engine.generate import Completion

        if self.fail_after is not None and len(self.asked) >= self.fail_after:
            raise KeyboardInterrupt  # the run is killed
        out = []
        for request in requests:
            question = request.conversation[-1]["content"]
            self.asked.append(question)
            text = next((a for phrase, a in self.answers.items() if phrase in question), "no idea")
            out.append(Completion(text, [], "stop", 0, 0))
        return out


ANSWERS = {
    "value for Brazil": "45%",  # 0.45 against 45: wrong as published
    "highest": "brazil",  # case-insensitive equality
    "the date": "abd",  # ANLS 1 - 1/3
    "How many": "12",
    "number is shown": "two",  # 2 of 10 annotators: leave-one-out 0.6
    "written in": "It says stop.",  # OCRBench: contained, ignoring case
    "LaTeX": "X^{2}+1",  # HME100k keeps case: wrong
    "left square": "<|ref|>left square<|/ref|><|det|>[[100, 100, 300, 400]]<|/det|>",
    "the dark one": "<|det|>[[600, 600, 900, 900]]<|/det|>",
    "animal": "The answer is B.",
    "colour": "something else",  # names no option
}
PUBLISHED = {"chartqa": 0.5, "docvqa": 2 / 3, "infovqa": 1.0, "textvqa": 0.6, "ocrbench": 0.5, "refcoco": 0.5,
             "vlmevalkit": 0.5}
REPORTED = {**{task: task for task in PUBLISHED}, "vlmevalkit": "vlmevalkit/MMStar"}  # named by the TSV file


def _sources(bench, tasks=tuple(PUBLISHED)) -> list[runner.Source]:
    return runner.sources_from_args([bench[t] for t in tasks], list(tasks))


def test_every_benchmark_is_scored_as_published_end_to_end(bench):
    report, _ = runner.evaluate_sources(_LookupEngine(ANSWERS), _sources(bench), batch_size=3)
    assert report["num_errors"] == 0
    assert report["tasks"]["vlmevalkit/MMStar"]["metrics"]["no_option"] == 0.5
    assert {task: entry["score"] for task, entry in report["tasks"].items()} == pytest.approx(
        {REPORTED[task]: score for task, score in PUBLISHED.items()})
    assert report["tasks"]["ocrbench"]["categories"]["Regular Text Recognition"] == {"n": 1, "score": 1.0}
    assert report["tasks"]["chartqa"]["categories"] == {"human": {"n": 2, "score": 0.5}}
    worst = report["worst"]["chartqa"][0]
    assert (worst["prediction"], worst["reference"], worst["scores"]["score"]) == ("45%", ["45"], 0.0)
    assert any("NL < 0.5" in note for note in report["notes"])
    table = runner.format_table(report["tasks"])
    assert "relaxed accuracy" in table and "  Regular Text Recognition" in table


def test_a_file_read_twice_is_reported_per_file(bench, tmp_path):
    copy = _json(bench["chartqa"].parent / "test_augmented.json", json.loads(bench["chartqa"].read_text()))
    sources = runner.sources_from_args([bench["chartqa"], copy], ["chartqa"])
    report, _ = runner.evaluate_sources(_LookupEngine(ANSWERS), sources)
    assert set(report["tasks"]) == {"chartqa/test_human", "chartqa/test_augmented"}
    assert report["tasks"]["chartqa/test_augmented"]["categories"] == {"augmented": {"n": 2, "score": 0.5}}
    with pytest.raises(InputError, match="2 --task options for 3 --data"):
        runner.sources_from_args([copy] * 3, ["chartqa", "docvqa"])


def test_bad_records_are_counted_errors_naming_file_and_record(tmp_path):
    _png(tmp_path / "png" / "a.png")
    chart = _json(tmp_path / "test_human.json", [
        {"imgname": "a.png", "query": "q", "label": "1"},
        {"imgname": "missing.png", "query": "q", "label": "1"},
        {"imgname": "a.png", "query": "q"},
    ])
    doc = _json(tmp_path / "val_v1.0.json", {"data": [{"questionId": 7, "question": "q", "image": "png/a.png"}]})
    tsv = _tsv(tmp_path / "AI2D_TEST.tsv", [{"index": 5, "question": "q", "A": "x", "B": "y", "answer": "E",
                                            "image": base64.b64encode(_png()).decode()},
                                           {"index": 6, "question": "q", "A": "x", "B": "y", "answer": "A",
                                            "image": "99"}])
    sources = runner.sources_from_args([chart, doc, tsv], ["chartqa", "docvqa", "vlmevalkit"])
    report, results = runner.evaluate_sources(_LookupEngine({}), sources)
    errors = [r.error for r in results if r.error]
    assert report["num_records"] == 6 and report["num_errors"] == 5
    assert f"{chart} record 2" in errors[0] and "missing.png not found" in errors[0]
    assert f"{chart} record 3" in errors[1] and "no 'label'" in errors[1]
    assert f"{doc} record 1 (id 7)" in errors[2] and "--submission" in errors[2]
    assert f"{tsv} record 1 (id 5)" in errors[3] and "answer E is not one of the options A, B" in errors[3]
    assert f"{tsv} record 2 (id 6)" in errors[4] and "'image' names no row holding an image" in errors[4]


@pytest.mark.parametrize(
    ("task", "content", "problem"),
    [
        ("chartqa", '[{"imgname": "a.png", "query": "q", "lab', "not valid JSON"),
        ("docvqa", '[{"questionId": 1}]', "expected a JSON object with a 'data' list"),
        ("textvqa", "", "not valid JSON"),
        ("vlmevalkit", "index\tquestion\tanswer\n1\tq\tA\n", "no column A, B, image"),
        ("refcoco", "PAR1 not really", "not a readable parquet file"),
    ],
)
def test_wrong_or_truncated_files_are_refused_by_name(tmp_path, task, content, problem):
    path = tmp_path / "file"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=problem) as error:
        _entries(task, path)
    assert str(path) in str(error.value)


def test_a_killed_run_resumes_where_it_stopped(bench, tmp_path):
    answers = tmp_path / "answers.jsonl"
    settings = {"model": "lookup"}
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate_sources(_LookupEngine(ANSWERS, fail_after=4), _sources(bench), batch_size=2,
                                log=AnswerLog(answers, settings))
    assert len(answers.read_text().splitlines()) == 1 + 4  # settings, then the two batches answered
    with answers.open("a") as handle:
        handle.write('{"task": "textvqa", "key": "346')  # the line being written when the run was killed
    engine = _LookupEngine(ANSWERS)
    report, _ = runner.evaluate_sources(engine, _sources(bench), batch_size=2, log=AnswerLog(answers, settings))
    assert len(engine.asked) == 11 - 4  # 11 questions, 4 answered before the kill
    assert {task: entry["score"] for task, entry in report["tasks"].items()} == pytest.approx(
        {REPORTED[task]: score for task, score in PUBLISHED.items()})
    assert len(answers.read_text().splitlines()) == 1 + 11
    with pytest.raises(InputError, match="belongs to another run"):
        AnswerLog(answers, {"model": "another"})


def test_docvqa_test_split_gives_the_submission_file(bench, tmp_path):
    sources = runner.sources_from_args([bench["docvqa_test"]], ["docvqa"])
    engine = _LookupEngine({"title": " Annual report ", "signed": "J. Smith"})
    report, results = runner.evaluate_sources(engine, sources, require_answers=False)
    assert report["num_errors"] == 0 and report["tasks"]["docvqa"]["unscored"] == 2
    assert report["tasks"]["docvqa"]["score"] is None
    out = tmp_path / "submission.json"
    assert runner.write_submission(out, results) == 2
    assert json.loads(out.read_text()) == [{"questionId": 901, "answer": "Annual report"},
                                           {"questionId": 902, "answer": "J. Smith"}]


def test_submission_is_refused_before_loading_a_model_for_other_benchmarks(bench, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    args = parser.parse_args(["--task", "chartqa", "--data", str(bench["chartqa"]), "--submission",
                              str(tmp_path / "s.json"), "--model", str(tmp_path / "no-model")])
    assert runner.run(args) == 2
    assert "--submission takes exactly one --data file read as docvqa or infovqa" in capsys.readouterr().err


@pytest.mark.usefixtures("one_thread")
def test_bundled_model_answers_every_format_from_the_command_line(bench, tmp_path, capsys):
    tasks = list(PUBLISHED)
    argv = [item for task in tasks for item in ("--task", task, "--data", str(bench[task]))]
    out = tmp_path / "report.json"
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    args = parser.parse_args([*argv, "--limit", "2", "--batch-size", "4", "--max-new-tokens", "6", "--out",
                              str(out), "--no-progress"])
    assert runner.run(args) == 0
    report = json.loads(out.read_text())
    assert report["num_errors"] == 0
    assert {task: entry["n"] for task, entry in report["tasks"].items()} == {
        "chartqa": 2, "docvqa": 1, "infovqa": 1, "textvqa": 1, "ocrbench": 2, "refcoco": 2, "vlmevalkit/MMStar": 2}
    for entry in report["tasks"].values():
        assert 0.0 <= entry["score"] <= 1.0
    assert all(s["finish_reason"] in ("stop", "length") for s in report["samples"])
    answers = out.with_suffix(".answers.jsonl").read_text().splitlines()
    assert len(answers) == 1 + 11
    assert "ocrbench" in capsys.readouterr().out
    # run again: every answer comes from the answers file, the same report
    assert runner.run(parser.parse_args([*argv, "--limit", "2", "--max-new-tokens", "6", "--out", str(out),
                                         "--no-progress"])) == 0
    assert out.with_suffix(".answers.jsonl").read_text().splitlines() == answers
    assert json.loads(out.read_text())["tasks"] == report["tasks"]
    assert "resuming: 11 answers already in" in capsys.readouterr().out


def test_a_model_rewritten_in_place_is_another_run(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x" * 10)
    before = runner._weights_fingerprint(tmp_path)
    weights.write_bytes(b"y" * 11)  # retrained into the same folder
    assert runner._weights_fingerprint(tmp_path) != before
    AnswerLog(tmp_path / "answers.jsonl", {"model": str(tmp_path), "weights": before})
    after = runner._weights_fingerprint(tmp_path)
    with pytest.raises(InputError, match="belongs to another run"):
        AnswerLog(tmp_path / "answers.jsonl", {"model": str(tmp_path), "weights": after})


def test_items_and_results_keep_the_benchmark_key():
    item = EvalItem(3, "docvqa", "anls", {}, key="337", category="form")
    failed = ItemResult.failed(item, "boom")
    assert (failed.key, failed.category, failed.error) == ("337", "form", "boom")
