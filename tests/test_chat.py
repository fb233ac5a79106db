"""`dsvl2 chat` as a user meets it: in a pseudo-terminal (pexpect) and with piped input, on a fake engine."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pexpect
import pytest
from PIL import Image

from dsvl2 import chat, cli
from tests.fake_chat_engine import ESCAPES, FakeEngine

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "examples" / "images" / "shapes.png"
PROMPT = "you> "


@pytest.fixture()
def terminal(tmp_path: Path):
    """`dsvl2 chat` on the fake engine in a pseudo-terminal, with a fresh HOME for its history."""

    def start(*args: str) -> pexpect.spawn:
        env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "TERM": "xterm", "PYTHONPATH": str(ROOT)}
        child = pexpect.spawn(sys.executable, ["-m", "tests.fake_chat_engine", "chat", *args], cwd=str(ROOT),
                              env=env, encoding="utf-8", timeout=60, dimensions=(40, 200))
        child.logfile_read = io.StringIO()  # everything shown, for checks across several expects
        child.expect_exact(PROMPT)
        children.append(child)
        return child

    children: list[pexpect.spawn] = []
    yield start
    for child in children:
        child.close(force=True)


def test_ctrl_c_stops_the_answer_not_the_chat(terminal, tmp_path: Path) -> None:
    child = terminal()
    child.sendline("tell me a story")
    child.expect_exact("Once upon a time Once upon")
    child.sendintr()
    assert child.expect_exact(["(stopped)", PROMPT]) == 0, "Ctrl-C did not stop the answer"
    child.expect_exact(PROMPT)
    assert "[engine: request dropped]" in child.logfile_read.getvalue()
    child.sendintr()  # at an empty prompt: a fresh prompt, not an exit
    child.expect_exact(PROMPT)
    saved = tmp_path / "talk.json"
    child.sendline(f"/save {saved}")
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    assert "Traceback" not in child.logfile_read.getvalue()
    child.close()
    assert child.exitstatus == 0
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"].startswith("Once upon a time")  # kept as far as it went


def test_ctrl_d_leaves_on_a_new_line(terminal) -> None:
    child = terminal()
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and child.before.endswith("\n")


def test_line_editing_history_and_help(terminal) -> None:
    child = terminal()
    child.send("helo wrld\x1b[D\x1b[D\x1b[Do\x1b[D\x1b[D\x1b[D\x1b[D\x1b[Dl\r")  # Left arrows, then fixes
    child.expect_exact("echo: hello world")
    child.expect_exact(PROMPT)
    child.send("\x1b[A\r")  # Up: the last line again
    child.expect_exact("last message 'hello world'")
    child.expect_exact("echo: hello world")
    child.expect_exact(PROMPT)
    child.sendline("/help")
    child.expect_exact(PROMPT)
    for command in ("/image", "/boxes", "/save", "/reset", "/help", "/exit"):
        assert command in child.before
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_keys_typed_during_an_answer_are_not_echoed_or_kept(terminal) -> None:
    child = terminal()
    child.sendline("a slow one")
    child.expect_exact("a slow")
    child.send("typed-meanwhile")
    child.expect_exact(PROMPT)
    assert "typed-meanwhile" not in child.before
    child.sendline("next")
    child.expect_exact("echo: next")
    assert "typed-meanwhile" not in child.before


def test_escape_sequences_in_an_answer_are_shown_escaped(terminal) -> None:
    child = terminal()
    child.sendline("an escape please")
    child.expect_exact("done")
    child.expect_exact(PROMPT)
    shown = child.logfile_read.getvalue()
    assert "\x1b[2J" not in shown and "\x1b]0;" not in shown and "\x07" not in shown and "\x9b" not in shown
    assert "\\x1b[2J\\x1b]0;pwned\\x07\\x1b[31mred\\x9b1m" in shown


def test_terminal_safe_keeps_text_and_escapes_controls() -> None:
    assert chat.terminal_safe("plain\ttext\nnext 图 ✓") == "plain\ttext\nnext 图 ✓"
    assert chat.terminal_safe(ESCAPES) == "\\x1b[2J\\x1b]0;pwned\\x07\\x1b[31mred\\x9b1m"


def test_image_paths_are_found_in_a_message(tmp_path: Path) -> None:
    assert chat.split_image_paths(f"what's in {SHAPES}?") == ("what's in", [str(SHAPES)])
    assert chat.split_image_paths(f'compare "{SHAPES}" and {SHAPES},') == ("compare and", [str(SHAPES)] * 2)
    missing = tmp_path / "missing.png"
    assert chat.split_image_paths(f"is {missing} there? it's fine") == (f"is {missing} there? it's fine", [])


def run_piped(lines: list[str], argv: list[str], monkeypatch, capsys) -> tuple[int, str, str, FakeEngine]:
    engine = FakeEngine()
    monkeypatch.setattr(chat, "load_engine", lambda args: engine)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    code = cli.main(["chat", *argv])
    out, err = capsys.readouterr()
    return code, out, err, engine


def test_image_paths_in_a_message_boxes_in_pixels_and_boxes_out(monkeypatch, capsys, tmp_path: Path) -> None:
    boxes = tmp_path / "boxes.png"
    code, out, err, engine = run_piped([f"where is the square? {SHAPES}"],
                                       ["--boxes-out", str(boxes), "--verbose"], monkeypatch, capsys)
    assert code == 0, err
    assert engine.requests[0].images == [str(SHAPES)]
    assert engine.requests[0].conversation[-1]["content"] == "<image>\nwhere is the square?"
    width, height = Image.open(SHAPES).size
    pixels = ", ".join(str(round(v)) for v in (100 / 999 * width, 200 / 999 * height, 599 / 999 * width,
                                                 799 / 999 * height))
    assert f"box the square: [100, 200, 599, 799] on the 0-999 grid = ({pixels}) px of image 1" in out
    assert Image.open(boxes).size == (width, height)
    assert "tokens/s" in err


def test_boxes_command_and_image_command(monkeypatch, capsys, tmp_path: Path) -> None:
    boxes = tmp_path / "b.png"
    code, out, err, engine = run_piped([f"/image {SHAPES}", f"/boxes {boxes}", "where?"], [], monkeypatch, capsys)
    assert code == 0, err
    assert engine.requests[0].images == [str(SHAPES)] and boxes.is_file()
    assert "tokens/s" not in err


def test_save_then_load_goes_on_with_the_conversation(monkeypatch, capsys, tmp_path: Path) -> None:
    saved = tmp_path / "talk.json"
    code, _, err, _ = run_piped([f"/image {SHAPES}", "first", f"/save {saved}"], [], monkeypatch, capsys)
    assert code == 0, err
    code, _, err, engine = run_piped(["second"], ["--load", str(saved)], monkeypatch, capsys)
    assert code == 0, err
    assert [m["content"] for m in engine.requests[0].conversation] == ["<image>\nfirst", "echo: first", "second"]
    assert engine.requests[0].images == [str(SHAPES.resolve())]


def test_a_bad_saved_chat_is_refused_with_its_name(monkeypatch, capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": [{"role": "user"}]}')
    code, _, err, _ = run_piped(["hi"], ["--load", str(bad)], monkeypatch, capsys)
    assert code == 2 and str(bad) in err and "is not a saved chat" in err and "Traceback" not in err
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "<image>\nhi"}], "images": []}))
    code, _, err, _ = run_piped(["hi"], ["--load", str(bad)], monkeypatch, capsys)
    assert code == 2 and "1 <image> tags but 0 images" in err
