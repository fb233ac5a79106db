"""`dsvl2 chat`: a conversation with the model on the terminal.

Lines are read with readline (editing, history kept in ~/.local/state/dsvl2/chat_history); Ctrl-C
stops the answer being written (or clears the line at the prompt), Ctrl-D ends the chat. Answers
are untrusted text: control characters in them are printed escaped, never sent to the terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from dsvl2.cli_common import add_model_arguments, add_sampling_arguments, guarded_run, load_engine, sampling_from_args
from dsvl2.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
HISTORY_FILE = Path("~/.local/state/dsvl2/chat_history")

HELP = """commands:
  /image PATH   attach an image to the next message (an image path typed in a message works too)
  /boxes FILE   save each answer's grounding boxes drawn on its image to FILE (/boxes off to stop)
  /save FILE    save the conversation as JSON (dsvl2 chat --load FILE goes on with it)
  /reset        start a new conversation
  /help         this list
  /exit         leave (also /quit or Ctrl-D); Ctrl-C stops an answer"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="system prompt")
    add_sampling_arguments(parser)
    parser.add_argument("--boxes-out", type=Path, default=None, metavar="FILE",
                        help="save each answer's grounding boxes drawn on its image to this file (like generate)")
    parser.add_argument("--load", type=Path, default=None, metavar="FILE",
                        help="go on with a conversation saved by /save")


def run(args: argparse.Namespace) -> int:
    try:
        return guarded_run(chat, args)
    except KeyboardInterrupt:  # while the model loads: leave quietly, as a shell command does
        print(file=sys.stderr)
        return 130


def terminal_safe(text: str) -> str:
    """`text` with control characters (ESC, BEL, C1 codes ...) written as escapes; newlines and tabs kept."""
    if text.isprintable():
        return text
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else c.encode("unicode_escape").decode()
                   for c in text)


def split_image_paths(text: str) -> tuple[str, list[str]]:
    """Take the words of a message that name existing image files out of it: (the rest, the paths).

    A word may be quoted and may end in punctuation ("what is in photo.png?").
    """
    paths, kept = [], []
    for word in text.split():
        path = _image_path(word)
        if path is None:
            kept.append(word)
        else:
            paths.append(path)
    return (" ".join(kept), paths) if paths else (text, [])


def _image_path(word: str) -> str | None:
    for candidate in (word.strip("'\""), word.rstrip(",.?!;:").strip("'\"")):
        path = Path(candidate).expanduser()
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            return str(path)
    return None


class ChatSession:
    """The conversation so far, and the images attached to the message being written."""

    def __init__(self, system: str | None = None, image_tag_position: str = "before") -> None:
        self.system = system
        self.image_tag_position = image_tag_position
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list[str] = []  # every image of the conversation, in tag order
        self.attached: list[str] = []  # images for the next user message
        self._asked_images = 0

    def attach(self, path: str) -> None:
        if not Path(path).is_file():
            raise InputError(f"no such image file: {path}")
        self.attached.append(path)

    def ask(self, text: str) -> tuple[list[dict], list[str]]:
        """Add a user message (with the attached images) and return the conversation to answer."""
        from dsvl2.processor import with_image_tags

        content = with_image_tags(text, len(self.attached), self.image_tag_position)
        self.messages.append({"role": "user", "content": content})
        self._asked_images = len(self.attached)
        self.images += self.attached
        self.attached = []
        return list(self.messages), list(self.images)

    def drop_last_question(self) -> None:
        """Undo `ask` after a failure: the message goes, its images become attached again."""
        self.messages.pop()
        if self._asked_images:
            self.attached = self.images[-self._asked_images:]
            del self.images[-self._asked_images:]
        self._asked_images = 0

    def answer(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})
        self._asked_images = 0

    def save(self, path: Path) -> None:
        record = {"messages": self.messages, "images": [str(Path(p).resolve()) for p in self.images]}
        path.write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    def load(self, path: Path) -> None:
        """Replace the conversation by one saved with `save`; a malformed file is an error naming it."""
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"--load: no such file {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"--load: {path} is not a saved chat (JSON): {exc}") from None
        if not isinstance(record, dict):
            record = {}
        messages, images = record.get("messages"), record.get("images", [])
        if not isinstance(messages, list) or not isinstance(images, list) or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in messages):
            raise InputError(f"--load: {path} is not a saved chat: it needs \"messages\" (role and content "
                             "text each) and \"images\" (file paths)")
        missing = [p for p in images if not isinstance(p, str) or not Path(p).is_file()]
        if missing:
            raise InputError(f"--load: {path} names an image that is not there: {missing[0]}")
        tags = sum(m["content"].count("<image>") for m in messages)
        if tags != len(images):
            raise InputError(f"--load: {path} has {tags} <image> tags but {len(images)} images")
        self.reset()
        self.messages, self.images = messages, images


# ------------------------------------------------------------------------------------- the terminal


class Terminal:
    """Reads lines (readline on a terminal, plain lines from a pipe) and writes answers safely."""

    def __init__(self, stdin: TextIO, stdout: TextIO) -> None:
        self.stdin, self.stdout = stdin, stdout
        self.interactive = stdin.isatty() and stdout.isatty()
        self._history: Path | None = None
        if self.interactive:
            self._start_readline()

    def _start_readline(self) -> None:
        import readline

        self._history = HISTORY_FILE.expanduser()
        with contextlib.suppress(OSError):
            readline.read_history_file(self._history)
        readline.set_history_length(1000)

    def save_history(self) -> None:
        if self._history is None:
            return
        import readline

        with contextlib.suppress(OSError):
            self._history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(self._history)

    def read_line(self) -> str | None:
        """The next line without its newline; None at end of input. Ctrl-C at the prompt gives ""."""
        if not self.interactive:
            line = self.stdin.readline()
            return line.rstrip("\n") if line else None
        try:
            return input("you> ")
        except KeyboardInterrupt:
            self.stdout.write("^C\n")  # an abandoned line, as in a shell
            return ""
        except EOFError:
            self.stdout.write("\n")  # so the shell's prompt starts on its own line
            return None

    def write(self, text: str) -> None:
        self.stdout.write(terminal_safe(text))
        self.stdout.flush()

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        """While an answer is written, keys typed are neither echoed into it nor kept for the next prompt."""
        if not self.interactive:
            yield
            return
        import termios

        fd = self.stdin.fileno()
        saved = termios.tcgetattr(fd)
        quiet = termios.tcgetattr(fd)
        quiet[3] &= ~(termios.ECHO | termios.ICANON)
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
        try:
            yield
        finally:
            termios.tcflush(fd, termios.TCIFLUSH)
            termios.tcsetattr(fd, termios.TCSANOW, saved)


# ----------------------------------------------------------------------------------------- the chat


def chat(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    sampling = sampling_from_args(args)
    engine = load_engine(args)
    session = ChatSession(args.system, engine.processor.config.image_tag_position)
    if args.load is not None:
        session.load(args.load)
        print(f"(went on with {len(session.messages)} messages from {args.load})", file=sys.stderr)
    terminal = Terminal(stdin or sys.stdin, stdout or sys.stdout)
    state = {"boxes_out": args.boxes_out}
    print("type /help for commands", file=sys.stderr)
    try:
        while (line := terminal.read_line()) is not None:
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if _command(line, session, state, terminal) == "quit":
                    return 0
                continue
            text, paths = split_image_paths(line)
            for path in paths:
                session.attach(path)
                print(f"(attached {path})", file=terminal.stdout)
            try:
                _turn(engine, session, text, sampling, terminal, state["boxes_out"], args.verbose)
            except KeyboardInterrupt:  # after the answer (drawing its boxes): back to the prompt
                terminal.write("\n")
    finally:
        terminal.save_history()
    return 0


def _command(line: str, session: ChatSession, state: dict, terminal: Terminal) -> str | None:
    verb, _, rest = line.partition(" ")
    rest = rest.strip()
    out = terminal.stdout
    if verb in ("/quit", "/exit"):
        return "quit"
    if verb == "/help":
        print(HELP, file=out)
    elif verb == "/reset":
        session.reset()
        print("(conversation cleared)", file=out)
    elif verb == "/image":
        if not rest:
            print("error: /image needs a file path", file=sys.stderr)
            return None
        path = str(Path(rest.strip("'\"")).expanduser())
        try:
            session.attach(path)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return None
        print(f"(attached {path})", file=out)
    elif verb == "/boxes":
        if not rest:
            print("error: /boxes needs a file path (or off)", file=sys.stderr)
            return None
        state["boxes_out"] = None if rest == "off" else Path(rest).expanduser()
        print("(boxes not saved)" if rest == "off" else f"(boxes of each answer saved to {rest})", file=out)
    elif verb == "/save":
        if not rest:
            print("error: /save needs a file path", file=sys.stderr)
            return None
        try:
            session.save(Path(rest).expanduser())
        except OSError as exc:
            print(f"error: cannot write {rest}: {exc.strerror}", file=sys.stderr)
            return None
        print(f"(conversation saved to {rest})", file=out)
    else:
        print(f"error: unknown command {terminal_safe(verb)}; /help lists them", file=sys.stderr)
    return None


def _turn(engine: Any, session: ChatSession, text: str, sampling: Any, terminal: Terminal,
          boxes_out: Path | None, verbose: bool) -> None:
    """Ask, stream the answer, and keep it in the conversation (a stopped answer is kept as far as it went)."""
    from dsvl2.engine.generate import Completion, Request

    conversation, images = session.ask(text)
    request = Request(conversation, images, sampling)
    completion = Completion("", [], "", 0, 0)
    start = time.perf_counter()
    try:
        with terminal.answering():
            events = engine.stream(request)
            try:
                for event in events:
                    terminal.write(event.text)
                    completion.add(event)
            finally:
                events.close()  # after Ctrl-C: the engine drops the request
    except KeyboardInterrupt:
        terminal.write("\n(stopped)")
        completion.finish_reason = "cancelled"
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        session.drop_last_question()
        return
    terminal.write("\n")
    if completion.finish_reason == "error":
        print(f"error: {completion.error}", file=sys.stderr)
        session.drop_last_question()
        return
    session.answer(completion.text)
    seconds = time.perf_counter() - start
    if verbose:
        rate = completion.completion_tokens / seconds if seconds > 0 else 0.0
        print(f"({completion.prompt_tokens} prompt tokens, {completion.completion_tokens} tokens in {seconds:.2f} s,"
              f" {rate:.1f} tokens/s)", file=sys.stderr)
    _show_boxes(completion.text, images, terminal, boxes_out)


def _show_boxes(text: str, images: list[str], terminal: Terminal, boxes_out: Path | None) -> None:
    """Each grounding box on the 0-999 grid and in pixels of the conversation's last image (which it refers to)."""
    from dsvl2.grounding import box_to_pixels, draw_boxes, parse_grounding
    from dsvl2.images import load_image

    refs = [ref for ref in parse_grounding(text).refs if ref.boxes]
    if not refs:
        return
    image = load_image(images[-1]) if images else None
    for ref in refs:
        for box in ref.boxes:
            where = ""
            if image is not None:
                pixels = ", ".join(str(round(v)) for v in box_to_pixels(box, image.width, image.height))
                where = f" = ({pixels}) px of image {len(images)}"
            terminal.write(f"  box {ref.label or '(no label)'}: [{', '.join(map(str, box))}] on the 0-999 grid"
                           f"{where}\n")
    if boxes_out is None:
        return
    if image is None:
        print("warning: no image in the conversation; no boxes drawn", file=sys.stderr)
        return
    try:
        draw_boxes(image, refs).save(boxes_out)
    except (OSError, ValueError) as exc:
        print(f"error: cannot save the boxes to {boxes_out}: {exc}", file=sys.stderr)
        return
    print(f"(boxes drawn on {images[-1]} saved to {boxes_out})", file=sys.stderr)
