"""The chat page in headless Chromium with canned server answers: attaching, sending, safety of answers, tools.

No server runs: the page's file is served to the browser by a Playwright route, and /v1/models and
/v1/chat/completions are answered by routes with fixed bodies (the answers' text is what a model
could write). Streaming from the real engine is covered by test_web_page.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsvl2.serve.app import STATIC_DIR
from tests.conformance_data import CHROMIUM

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent (install Debian's browser: apt-get install -y chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright package is needed (pip install playwright)")

ORIGIN = "http://dsvl2.test"
ROOT = Path(__file__).resolve().parents[2]
SHAPES = ROOT / "examples" / "images" / "shapes.png"  # 310 x 205
CARD = {"object": "list", "data": [{"id": "canned", "object": "model", "image_tag_position": "before"}]}
GROUNDING = "<|ref|>the square<|/ref|><|det|>[[100, 200, 599, 799]]<|/det|>"


def sse(text: str) -> str:
    """A streamed completion of `text`, a few characters per chunk."""
    chunks = [{"choices": [{"index": 0, "delta": {"content": text[i:i + 5]}}]} for i in range(0, len(text), 5)]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 9, "completion_tokens": 4}})
    return "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"


class CannedServer:
    """Routes of one browser context: the page, the model card, and answers taken from `answers` in turn."""

    def __init__(self, context) -> None:
        self.answers: list[str | tuple[int, dict] | None] = []  # None: the request hangs
        self.requests: list[dict] = []
        self.hanging: list = []
        page_html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
        context.route(ORIGIN + "/", lambda route: route.fulfill(body=page_html, content_type="text/html"))
        context.route(ORIGIN + "/v1/models", lambda route: route.fulfill(json=CARD))
        context.route(ORIGIN + "/static/*", self._static)
        context.route(ORIGIN + "/v1/chat/completions", self._answer)

    @staticmethod
    def _static(route) -> None:
        path = STATIC_DIR / route.request.url.rsplit("/", 1)[1]
        if path.is_file():
            route.fulfill(path=str(path))
        else:
            route.fulfill(status=404)

    def _answer(self, route) -> None:
        self.requests.append(route.request.post_data_json)
        answer = self.answers.pop(0) if self.answers else "ok"
        if answer is None:
            self.hanging.append(route)
        elif isinstance(answer, tuple):
            route.fulfill(status=answer[0], json=answer[1])
        else:
            route.fulfill(body=sse(answer), content_type="text/event-stream")


@pytest.fixture()
def context(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    yield context
    context.close()


@pytest.fixture()
def server(context) -> CannedServer:
    return CannedServer(context)


@pytest.fixture()
def page(context, server):
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    open_page(page)
    yield page
    assert errors == []


def open_page(page) -> None:
    page.goto(ORIGIN + "/")
    page.wait_for_function("document.getElementById('model-name').textContent === 'canned'")


def ask(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant.done, .msg.error').length > 0 "
                           "&& !document.querySelector('.msg.assistant.streaming')")


# ---------------------------------------------------------------- the bugs of issue 44


def test_an_empty_page_shows_no_broken_image(page) -> None:
    assert page.is_hidden("#stage-frame") and page.is_hidden("#stage-image")
    assert page.is_visible("#stage-empty")


def test_two_files_chosen_at_once_are_both_attached(page, tmp_path: Path) -> None:
    second = tmp_path / "second.png"
    second.write_bytes(SHAPES.read_bytes())
    page.set_input_files("#file-input", [str(SHAPES), str(second)])
    page.wait_for_function("document.querySelectorAll('.thumb').length === 2")
    page.wait_for_timeout(200)
    assert page.locator(".thumb .badge").all_inner_texts() == ["#1 new", "#2 new"]


def test_enter_while_an_answer_streams_sends_nothing_and_stop_still_stops(page, server) -> None:
    server.answers = [None]
    page.set_input_files("#file-input", str(SHAPES))
    page.wait_for_selector(".thumb")
    page.fill("#prompt", "first")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant.streaming")
    page.fill("#prompt", "second")
    page.press("#prompt", "Enter")
    page.evaluate("document.getElementById('composer').requestSubmit()")
    page.wait_for_timeout(300)
    assert len(server.requests) == 1
    assert page.input_value("#prompt") == "second"  # kept for when the answer is done
    page.click("#stop")
    page.wait_for_selector(".msg.assistant.done")
    assert "stopped" in page.inner_text(".msg.assistant .meta")
    assert page.locator(".thumb .badge").all_inner_texts() == ["#1"]


def test_a_non_image_file_is_refused_when_chosen(page, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    page.set_input_files("#file-input", str(notes))
    notice = page.wait_for_selector("#image-notice:not([hidden])")
    assert notice.inner_text() == "notes.txt is not an image file (not attached)."
    assert page.locator(".thumb").count() == 0


def test_a_refused_request_gives_the_question_back(page, server) -> None:
    server.answers = [(400, {"error": {"message": "image 1: too large", "type": "invalid_request_error"}})]
    page.set_input_files("#file-input", str(SHAPES))
    page.wait_for_selector(".thumb")
    ask(page, "What is this?")
    assert page.inner_text(".msg.error") == "image 1: too large"
    assert page.locator(".msg.assistant").count() == 0 and page.locator(".msg.user").count() == 0
    assert page.input_value("#prompt") == "What is this?"
    assert page.locator(".thumb .badge").all_inner_texts() == ["#1 new"]


def test_grounding_shows_labels_boxes_and_pixel_coordinates(page, server) -> None:
    server.answers = [f"Here: {GROUNDING}"]
    page.set_input_files("#file-input", str(SHAPES))
    page.wait_for_selector(".thumb")
    ask(page, "<|ref|>the square<|/ref|>.")
    user = page.inner_text(".msg.user .text")
    assert user == "the square." and page.locator(".msg.user .ref").count() == 1
    assert page.inner_text(".msg.assistant .text") == "Here: the square"
    # 100/999*310, 200/999*205, 599/999*310, 799/999*205, rounded
    assert page.inner_text(".msg.assistant .box-list") == "the square: (31, 41, 186, 164) px on image #1"
    assert page.inner_text(".box .box-label") == "the square"


def test_small_images_fill_the_panel_and_fit_a_phone(browser) -> None:
    for width, height in ((1280, 820), (375, 740)):
        context = browser.new_context(viewport={"width": width, "height": height})
        CannedServer(context)
        page = context.new_page()
        open_page(page)
        page.set_input_files("#file-input", str(SHAPES))
        page.wait_for_function("document.getElementById('stage-image').style.width !== ''")
        shown = page.locator("#stage-image").bounding_box()
        assert abs(shown["width"] / shown["height"] - 310 / 205) < 0.02
        assert shown["x"] >= 0 and shown["x"] + shown["width"] <= width
        if width > 800:
            assert shown["width"] > 450  # scaled up from 310 px
        else:
            assert shown["width"] > 250
        context.close()


def test_the_page_has_an_icon(page) -> None:
    assert page.get_attribute("link[rel=icon]", "href").startswith("data:image/svg+xml,")


# ---------------------------------------------------------------- answers are untrusted


HOSTILE = ("<script>window.pwned = 1</script>\n"
           "<img src=x onerror=\"window.pwned = 2\">\n"
           "[click me](javascript:window.pwned=3) and [docs](https://example.org/docs)\n"
           "<|ref|><img src=y onerror=\"window.pwned = 4\"><|/ref|><|det|>[[1, 2, 300, 400]]<|/det|>\n"
           "**bold** and `<b>code</b>`")


def test_html_and_script_in_an_answer_never_run_or_land_in_the_page(page, server) -> None:
    server.answers = [HOSTILE]
    page.set_input_files("#file-input", str(SHAPES))
    page.wait_for_selector(".thumb")
    ask(page, "Say something hostile.")
    page.wait_for_timeout(300)
    answer = page.locator(".msg.assistant .text")
    assert page.evaluate("window.pwned") is None
    assert answer.locator("script, img, b, iframe, [onerror]").count() == 0
    assert page.locator(".box-label img").count() == 0
    text = answer.inner_text()
    assert "<script>window.pwned = 1</script>" in text and '<img src=x onerror="window.pwned = 2">' in text
    links = answer.locator("a")
    assert links.count() == 1 and links.get_attribute("href") == "https://example.org/docs"
    assert links.get_attribute("rel") == "noopener noreferrer nofollow"
    assert "click me (javascript:window.pwned=3)" in text
    page.click("text=click me")
    assert page.evaluate("window.pwned") is None
    assert answer.locator("strong").inner_text() == "bold" and answer.locator("code").inner_text() == "<b>code</b>"


def test_markdown_lists_headings_and_code_blocks(page, server) -> None:
    server.answers = ["# Title\n- one\n- two\n\n1. first\n2. second\n\n```\nx = <y>\n```\ntail"]
    ask(page, "Format something.")
    answer = page.locator(".msg.assistant .text")
    assert answer.locator("h4").inner_text() == "Title"
    assert answer.locator("ul li").all_inner_texts() == ["one", "two"]
    assert answer.locator("ol li").all_inner_texts() == ["first", "second"]
    assert answer.locator("pre code").inner_text() == "x = <y>"
    assert answer.locator("p").last.inner_text() == "tail"


# ---------------------------------------------------------------- tools


def test_examples_find_helper_system_prompt_and_top_p(page, server) -> None:
    page.wait_for_selector("#examples .example-image")
    page.click("#examples .example-image >> nth=0")
    page.wait_for_selector(".thumb")
    page.click("text=How many shapes are there?")
    assert page.input_value("#prompt") == "How many shapes are there?"
    page.fill("#find-object", "the blue triangle")
    page.click("#find")
    assert page.input_value("#prompt") == "<|ref|>the blue triangle<|/ref|>."
    page.fill("#system", "Be brief.")
    page.fill("#top-p", "0.8")
    ask(page, page.input_value("#prompt"))
    request = server.requests[0]
    assert request["top_p"] == 0.8
    assert request["messages"][0] == {"role": "system", "content": "Be brief."}
    parts = request["messages"][1]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[1] == {"type": "text", "text": "<|ref|>the blue triangle<|/ref|>."}


def test_regenerate_edit_and_copy(page, server) -> None:
    page.evaluate("window.copied = []; Object.defineProperty(navigator, 'clipboard', "
                  "{value: {writeText: async (text) => { window.copied.push(text); }}})")
    server.answers = ["first answer", "second answer"]
    ask(page, "Hello?")
    page.click(".msg.assistant .regenerate")
    page.wait_for_function("document.querySelector('.msg.assistant.done .text')?.textContent === 'second answer'")
    assert page.locator(".msg.assistant").count() == 1 and page.locator(".msg.user").count() == 1
    assert server.requests[1]["messages"] == server.requests[0]["messages"]
    page.click(".msg.assistant .copy")
    assert page.evaluate("window.copied") == ["second answer"]
    page.click(".msg.assistant .edit")
    assert page.input_value("#prompt") == "Hello?" and page.locator(".msg").count() == 0
    ask(page, "Hello again?")
    assert server.requests[2]["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Hello again?"}]}]


def test_the_conversation_survives_a_reload_in_this_tab_only(page, server) -> None:
    server.answers = [GROUNDING, "a follow-up"]
    page.set_input_files("#file-input", str(SHAPES))
    page.wait_for_selector(".thumb")
    page.fill("#temperature", "0.5")
    page.dispatch_event("#temperature", "change")
    ask(page, "Where is the square?")
    page.reload()
    page.wait_for_function("document.getElementById('model-name').textContent === 'canned'")
    assert page.inner_text(".msg.user .text") == "Where is the square?"
    assert page.inner_text(".msg.assistant .text") == "the square"
    assert page.locator(".thumb .badge").all_inner_texts() == ["#1"]
    assert page.input_value("#temperature") == "0.5"
    page.wait_for_selector(".box")
    assert page.evaluate("localStorage.length") == 0
    page.fill("#prompt", "And then?")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant.done').length === 2")
    messages = server.requests[1]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"] and messages[1]["content"] == GROUNDING
