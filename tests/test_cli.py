"""The `dsvl2` command line, driven through `cli.main([...])` on the conformance checkpoints."""

from __future__ import annotations

import ast
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from dsvl2 import cli
from dsvl2.chat import ChatSession
from dsvl2.engine.generate import Engine, Request
from dsvl2.engine.sampling import SamplingParams
from tests.conformance_data import conformance_dir, conformance_variants
from tests.engine.test_generate import ScriptedModel, expected_tokens, image_path, model_and_processor

VARIANTS = conformance_variants()
pytestmark = [pytest.mark.skipif(not VARIANTS, reason=f"no conformance fixtures at {conformance_dir()}"),
              pytest.mark.usefixtures("one_thread")]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json(capsys) -> None:
    variant = "base_like" if "base_like" in VARIANTS else VARIANTS[0]
    expected = expected_tokens(variant, "one_square")[:4]
    eos = model_and_processor(variant)[1].tokenizer.eos_id
    assert eos not in expected  # so generation without ignore_eos runs all 4 tokens
    code, out, err = run_cli(["generate", "--model", str(conformance_dir() / variant), "--image",
                              str(image_path("square")), "Describe this image.", "--max-new-tokens", "4",
                              "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["token_ids"] == expected
    assert result["finish_reason"] == "length" and result["completion_tokens"] == 4
    assert result["prompt_tokens"] == 434  # seq_len of the one_square case
    assert result["grounding"] == []


def test_generate_streams_plain_text(capsys) -> None:
    variant = VARIANTS[0]
    code, out, err = run_cli(["generate", "--model", str(conformance_dir() / variant), "--max-new-tokens", "5",
                              "Tell me about the number 42."], capsys)
    assert code == 0, err
    tokenizer = model_and_processor(variant)[1].tokenizer
    assert out == tokenizer.decode(expected_tokens(variant, "text_only")[:5]) + "\n"
    assert "loading weights" in err  # the progress bar


def test_generate_grounding_json_and_boxes(tmp_path, capsys, monkeypatch) -> None:
    answer = "<|ref|>the square<|/ref|><|det|>[[0, 0, 499, 999]]<|/det|>"
    model, processor = model_and_processor("tiny_like")

    def scripted_engine(args, max_batch=1):
        sample = processor.encode([{"role": "user", "content": "<image>\nFind the square."}],
                                  [image_path("square")])
        script = processor.tokenizer.encode(answer) + [processor.tokenizer.eos_id]
        return Engine(ScriptedModel(model, script, len(sample)), processor, max_batch=1)

    monkeypatch.setattr(cli, "load_engine", scripted_engine)
    boxes = tmp_path / "boxes.png"
    code, out, err = run_cli(["generate", "--image", str(image_path("square")), "Find the square.", "--json",
                              "--boxes-out", str(boxes)], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["text"] == answer and result["finish_reason"] == "stop"
    width, height = Image.open(image_path("square")).size
    assert result["grounding"] == [{"label": "the square", "boxes": [[0, 0, 499, 999]],
                                    "boxes_px": [[0.0, 0.0, round(499 / 999 * width, 1), float(height)]]}]
    drawn, original = Image.open(boxes).convert("RGB"), Image.open(image_path("square")).convert("RGB")
    assert drawn.size == original.size
    assert drawn.getpixel((width // 2 - 1, height // 2)) != original.getpixel((width // 2 - 1, height // 2))


def test_generate_places_image_tags_where_the_processor_config_says(tmp_path, capsys, monkeypatch) -> None:
    model_dir = tmp_path / VARIANTS[0]
    shutil.copytree(conformance_dir() / VARIANTS[0], model_dir)
    settings = json.loads((model_dir / "processor_config.json").read_text())
    generate, asked = Engine.generate, []

    def recording_generate(engine, request):
        asked.append(request.conversation[-1]["content"])
        return generate(engine, request)

    monkeypatch.setattr(Engine, "generate", recording_generate)
    for position in ("after", "before"):
        (model_dir / "processor_config.json").write_text(json.dumps({**settings, "image_tag_position": position}))
        code, _, err = run_cli(["generate", "--model", str(model_dir), "--image", str(image_path("square")),
                                "Describe this image.", "--max-new-tokens", "1", "--json"], capsys)
        assert code == 0, err
    assert asked == ["Describe this image.\n<image>", "<image>\nDescribe this image."]


def test_chat_session_places_image_tags_by_position() -> None:
    for position, expected in (("before", "<image>\nWhat is it?"), ("after", "What is it?\n<image>")):
        session = ChatSession(image_tag_position=position)
        session.attached = ["a.png"]
        conversation, images = session.ask("What is it?")
        assert conversation == [{"role": "user", "content": expected}] and images == ["a.png"]


def test_generate_reports_bad_input(capsys, monkeypatch, tmp_path) -> None:
    model_dir = str(conformance_dir() / VARIANTS[0])
    code, _, err = run_cli(["generate", "--model", model_dir, "--image", str(image_path("square")),
                            "<image> <image> two tags"], capsys)
    assert code == 2 and "1 image" in err
    code, _, err = run_cli(["generate", "--model", str(tmp_path / "missing"), "hi"], capsys)
    assert code == 2 and "does not exist" in err
    def missing_default_model():
        raise FileNotFoundError("the default model at X lacks model.safetensors")

    monkeypatch.setattr("dsvl2.defaults.default_model_dir", missing_default_model)
    code, _, err = run_cli(["generate", "hi"], capsys)
    assert code == 2 and "no --model given" in err and "model.safetensors" in err
    code, _, err = run_cli(["generate", "--model", model_dir, "--top-p", "3", "hi"], capsys)
    assert code == 2 and "top_p" in err


def test_chat_session(capsys, monkeypatch) -> None:
    variant = VARIANTS[0]
    model, processor = model_and_processor(variant)
    tokenizer = processor.tokenizer
    script = "\n".join([f"/image {image_path('square')}", "Describe this image.", "And the colours?", "/reset",
                        "Tell me about the number 42.", "/quit", "never read"]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code, out, err = run_cli(["chat", "--model", str(conformance_dir() / variant), "--max-new-tokens", "6"],
                             capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"(attached {image_path('square')})"
    reference = Engine(model, processor, max_batch=1)
    sampling = SamplingParams(max_new_tokens=6)
    first_turn = [{"role": "user", "content": "<image>\nDescribe this image."}]
    first = reference.generate(Request(first_turn, [image_path("square")], sampling)).text
    second_turn = [*first_turn, {"role": "assistant", "content": first},
                   {"role": "user", "content": "And the colours?"}]
    second = reference.generate(Request(second_turn, [image_path("square")], sampling)).text
    assert lines[1:4] == [first, second, "(conversation cleared)"]
    assert lines[4] == tokenizer.decode(expected_tokens(variant, "text_only")[:6])
    assert len(lines) == 5


def test_chat_ends_cleanly_at_end_of_input(capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("/image /no/such/file.png\n/what\n"))
    code, out, err = run_cli(["chat", "--model", str(conformance_dir() / VARIANTS[0])], capsys)
    assert code == 0
    assert "no such image file" in err and "unknown command /what" in err


def test_data_synth_is_a_nested_verb(tmp_path, capsys) -> None:
    code, out, err = run_cli(["data", "synth", "--out", str(tmp_path), "--n", "3", "--seed", "1"], capsys)
    assert code == 0, err
    records = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(records) == 3


def test_verbs_register_from_their_own_module(capsys) -> None:
    def add_arguments(parser):
        parser.add_argument("--times", type=int, default=1)

    def run(args):
        print("hello " * args.times)
        return 7

    commands = [cli.Command("say hello", "greets", add_arguments=add_arguments, run=run),
                cli.Command("absent", "a verb whose module is not written yet", "dsvl2.no_such_module")]
    args = cli.build_parser(commands).parse_args(["say", "hello", "--times", "2"])
    assert args.run(args) == 7
    assert capsys.readouterr().out.strip() == "hello hello"
    with pytest.raises(SystemExit):
        cli.build_parser(commands).parse_args(["absent"])


def test_prompt_after_a_list_of_images_is_not_taken_for_an_image() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["generate", "--image", str(image_path("square")), str(image_path("wide")),
                              "Compare them."])
    assert cli._split_prompt(args) == ("Compare them.", [str(image_path("square")), str(image_path("wide"))])




def test_no_module_imports_the_command_line_back() -> None:
    """`dsvl2.cli` loads the verbs' modules, so they take shared pieces from `dsvl2.cli_common` instead."""
    importers = []
    for path in sorted(Path(cli.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            if "dsvl2.cli" in names:
                importers.append(f"{path.name}:{node.lineno}")
    assert importers == []
