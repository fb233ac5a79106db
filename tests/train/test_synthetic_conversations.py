"""Synthetic conversations (`turns` above 1): follow-ups about the same scene, answered from its metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsvl2.errors import InputError
from dsvl2.eval.metrics import parse_det_boxes
from dsvl2.grounding import IMAGE_TAG
from dsvl2.train.synthetic import (
    FOLLOW_UP_TASKS,
    SCENE_TASKS,
    asked_first,
    generate_dataset,
    generate_records,
    main,
)

N = 36  # three cycles of the task mixture
SEED = 5


@pytest.fixture(scope="module")
def one_turn() -> list[tuple[dict, object]]:
    return list(generate_records(N, SEED, "train"))


@pytest.fixture(scope="module")
def conversations() -> list[tuple[dict, object]]:
    return list(generate_records(N, SEED, "train", turns=(2, 3)))


def _matches(obj: dict, query: dict) -> bool:
    return obj["color"] == query.get("color", obj["color"]) and obj["shape"] == query.get("shape", obj["shape"])


def _check_turn(task: str, question: str, answer: str, record: dict) -> None:
    """The answer of one turn, re-derived from the scene's objects."""
    objects = record["objects"]
    if task == "grounding":
        expression = question.removeprefix("<|ref|>").removesuffix("<|/ref|>.")
        named = [o for o in objects if expression in (f"the {o['color']} {o['shape']}", f"the {o['shape']}",
                                                      f"the {o['color']} shape")]
        matching = [o for o in objects if all(word in (o["color"], o["shape"], "the", "shape")
                                              for word in expression.split())]
        assert len(named) == 1 and len(matching) == 1, f"{expression!r} must name exactly one shape"
        assert parse_det_boxes(answer) == [named[0]["box"]]
    elif task == "counting":
        if question == "How many shapes are there?":
            query = {}
        elif question.endswith(" shapes are there?"):
            query = {"color": question.split()[2]}
        else:
            query = {"shape": question.split()[2].removesuffix("s")}
        assert answer == str(sum(_matches(o, query) for o in objects))
    elif task == "grounded_caption":
        assert len(parse_det_boxes(answer)) == len(objects)
    else:
        assert task == "caption" and record["background"] in answer


def test_first_turn_and_image_are_the_one_turn_records(one_turn, conversations) -> None:
    changed = 0
    for (single, image), (conversation, image_too) in zip(one_turn, conversations, strict=True):
        assert (image is None) == (image_too is None) and (image is None or image.tobytes() == image_too.tobytes())
        if single["task"] in SCENE_TASKS:
            changed += 1
            assert conversation["messages"][:2] == single["messages"]
            assert 2 <= len(conversation["messages"]) // 2 <= 3
            assert conversation["turn_tasks"][0] == single["task"]
        else:
            assert conversation == single  # OCR, charts and text stay one-turn
    assert changed == 3 * 7  # grounding 3, grounded_caption 1, counting 2, caption 1 per cycle


def test_every_turn_answers_from_the_scene(conversations) -> None:
    mixed = set()
    for record, _ in conversations:
        if "turn_tasks" not in record:
            continue
        messages = record["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * len(record["turn_tasks"])
        assert IMAGE_TAG in messages[0]["content"] and all(IMAGE_TAG not in m["content"] for m in messages[1:])
        questions = [m["content"].removesuffix(f"\n{IMAGE_TAG}") for m in messages[::2]]
        assert len(set(questions)) == len(questions), "a conversation never asks the same question twice"
        for task, question, answer in zip(record["turn_tasks"], questions, [m["content"] for m in messages[1::2]],
                                          strict=True):
            _check_turn(task, question, answer, record)
        assert record["task"] == record["turn_tasks"][-1] and record["answers"] == [messages[-1]["content"]]
        mixed.add(tuple(record["turn_tasks"]))
    assert len({task for tasks in mixed for task in tasks[1:]}) >= 3, "follow-ups mix grounding, counting, captions"


def test_metric_fields_are_the_last_turns_and_regions_the_first_questions(conversations) -> None:
    for record, _ in conversations:
        if "turn_tasks" not in record:
            continue
        first = record["turn_tasks"][0]
        if record["task"] == "grounding":
            assert parse_det_boxes(record["answers"][0]) == [record["box"]]
            assert record["objects"][record["target"]]["box"] == record["box"]
        if record["task"] == "counting":
            assert record["answers"] == [str(sum(_matches(o, record["query"]) for o in record["objects"]))]
        if first == "grounding":
            assert record["regions"] == [parse_det_boxes(record["messages"][1]["content"])[0]]
        elif first == "counting":
            assert len(record["regions"]) == int(record["messages"][1]["content"])
        else:
            assert record["regions"] == [o["box"] for o in record["objects"]]


def test_a_shape_is_asked_for_once() -> None:
    for record, _ in generate_records(N, SEED, "test", tasks=["grounding"], turns=4, follow_ups=["grounding"]):
        boxes = [tuple(parse_det_boxes(m["content"])[0]) for m in record["messages"][1::2]]
        assert len(set(boxes)) == len(boxes)


def test_two_turn_held_out_set_and_its_questions_asked_first(tmp_path: Path) -> None:
    counts = generate_dataset(tmp_path, 24, SEED, "test", tasks=list(SCENE_TASKS), turns=2,
                              follow_ups=["grounding", "counting"])
    assert set(counts) <= set(SCENE_TASKS) and sum(counts.values()) == 24
    records = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    firsts = [json.loads(line) for line in (tmp_path / "test_asked_first.jsonl").read_text().splitlines()]
    assert len(records) == len(firsts) == 24
    for record, first in zip(records, firsts, strict=True):
        assert len(record["turn_tasks"]) == 2 and record["task"] in ("grounding", "counting")
        assert first["messages"] == [{"role": "user", "content": f"{record['messages'][2]['content']}\n{IMAGE_TAG}"},
                                     record["messages"][3]]
        assert first["images"] == record["images"] and (tmp_path / first["images"][0]).is_file()
        assert first["task"] == record["task"] and first["answers"] == record["answers"]
        assert "turn_tasks" not in first
        if first["task"] == "counting":
            assert len(first["regions"]) == int(first["answers"][0])


def test_one_turn_datasets_write_no_asked_first_file(tmp_path: Path) -> None:
    generate_dataset(tmp_path, 4, SEED, "test")
    assert not (tmp_path / "test_asked_first.jsonl").exists()


def test_asked_first_refuses_a_one_turn_record(one_turn) -> None:
    with pytest.raises(InputError, match="conversation"):
        asked_first(one_turn[0][0])


@pytest.mark.parametrize("turns", [0, 9, (3, 2), (0, 2), True])
def test_bad_turns_raise_clear_errors(turns) -> None:
    with pytest.raises(InputError, match="turns must be"):
        list(generate_records(1, 0, turns=turns))


def test_bad_follow_ups_raise_clear_errors() -> None:
    with pytest.raises(InputError, match=f"follow-ups can ask: {', '.join(FOLLOW_UP_TASKS)}"):
        list(generate_records(1, 0, turns=2, follow_ups=["ocr"]))


def test_cli_turns_and_follow_ups(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--out", str(tmp_path), "--n", "4", "--seed", "3", "--tasks", "counting", "--turns", "2-3",
            "--follow-ups", "counting"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert all(set(r["turn_tasks"]) == {"counting"} and len(r["turn_tasks"]) in (2, 3) for r in records)
    assert main(["--out", str(tmp_path), "--n", "1", "--turns", "two"]) == 2
    assert "--turns takes a number of turns or a range MIN-MAX, got 'two'" in capsys.readouterr().err
