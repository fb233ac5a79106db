"""A stand-in engine for `dsvl2 chat` tests: canned answers streamed a few characters at a time.

Run as `python -m tests.fake_chat_engine chat ...` to drive the real command line with it in a
pseudo-terminal. The answer depends on the last user message (see `answer_for`); the requests it
got and whether one was dropped early are reported on stderr.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace

from dsvl2.engine.generate import Request, TokenEvent

ESCAPES = "\x1b[2J\x1b]0;pwned\x07\x1b[31mred\x9b1m"
GROUNDING = "<|ref|>the square<|/ref|><|det|>[[100, 200, 599, 799]]<|/det|>"


def answer_for(text: str) -> tuple[str, float]:
    """(the answer, seconds per piece) for a user message."""
    if "story" in text:
        return "Once upon a time " * 200, 0.05
    if "slow" in text:
        return "a slow answer " * 4, 0.1
    if "escape" in text:
        return f"look: {ESCAPES} done", 0.0
    if "where" in text:
        return GROUNDING, 0.0
    return f"echo: {text.splitlines()[-1]}", 0.0


class FakeEngine:
    PIECE = 4

    def __init__(self) -> None:
        self.processor = SimpleNamespace(config=SimpleNamespace(image_tag_position="before"))
        self.requests: list[Request] = []
        self.dropped = 0

    def stream(self, request: Request) -> Iterator[TokenEvent]:
        self.requests.append(request)
        print(f"[engine: {len(request.images)} images, last message {request.conversation[-1]['content']!r}]",
              file=sys.stderr, flush=True)
        answer, delay = answer_for(request.conversation[-1]["content"])
        finished = False
        try:
            for start in range(0, len(answer), self.PIECE):
                time.sleep(delay)
                yield TokenEvent("fake", answer[start:start + self.PIECE], 1, prompt_tokens=10,
                                 completion_tokens=start // self.PIECE + 1)
            finished = True
            yield TokenEvent("fake", "", None, finished=True, finish_reason="stop", prompt_tokens=10,
                             completion_tokens=len(answer) // self.PIECE + 1)
        finally:
            if not finished:
                self.dropped += 1
                print("[engine: request dropped]", file=sys.stderr, flush=True)


def main() -> int:
    from dsvl2 import chat, cli

    # Ctrl-C as at a terminal a user opened, whatever the test process inherited (a CI job may start with
    # SIGINT ignored or blocked, and a child keeps both across exec).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    chat.load_engine = lambda args: FakeEngine()
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
