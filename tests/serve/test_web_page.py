"""The web page in headless Chromium: upload an image, stream an answer, see its box, stop a generation.

Needs Debian's Chromium (`apt-get install -y chromium`, giving /usr/bin/chromium) and the Playwright
Python package (`pip install playwright`; its own browser download is never used). The server runs
in this process on loopback with the real engine on the tiny_like checkpoint, wrapped so that every
answer starts with a fixed grounding span (random weights never produce one), never stops early at
end-of-sentence, and takes a short pause per step so streaming is visible.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest

from tests.conformance_data import CHROMIUM

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent (install Debian's browser: apt-get install -y chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright package is needed (pip install playwright)")
pytest.importorskip("fastapi", reason="the serve extra is needed (pip install -e '.[serve]')")

from dsvl2.engine.generate import Engine  # noqa: E402
from dsvl2.serve.app import ServeSettings, create_app  # noqa: E402
from dsvl2.serve.auth import KeyRing  # noqa: E402
from dsvl2.serve.launch import ThreadedServer  # noqa: E402
from dsvl2.serve.runner import EngineRunner  # noqa: E402

SERVED_NAME = "tiny-page"
GRID_BOX = (100, 200, 599, 799)
SPAN = f"<|ref|>the square<|/ref|><|det|>[[{', '.join(map(str, GRID_BOX))}]]<|/det|>"


class GroundingEngine:
    """The real engine, with SPAN streamed in front of each answer a few characters per step.

    Answers run to max_tokens, one step per `delay_s`; the model's own text is dropped while the
    span is being sent.
    """

    PIECE = 8  # characters of SPAN per event

    def __init__(self, engine: Engine, delay_s: float) -> None:
        self._engine = engine
        self._delay_s = delay_s
        self._forced: dict[str, str] = {}  # request id -> the part of SPAN not sent yet

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def submit(self, request) -> str:
        request.sampling = dataclasses.replace(request.sampling, ignore_eos=True)
        request_id = self._engine.submit(request)
        self._forced[request_id] = SPAN
        return request_id

    def step(self):
        time.sleep(self._delay_s)
        events = self._engine.step()
        for index, event in enumerate(events):
            forced = self._forced.get(event.request_id, "")
            piece = forced if event.finished else forced[:self.PIECE]
            if event.finished:
                self._forced.pop(event.request_id, None)
            else:
                self._forced[event.request_id] = forced[len(piece):]
            # The model's own text waits until the span is out, so it cannot split the span's tags.
            text = piece + (event.text if not forced or event.finished else "")
            events[index] = dataclasses.replace(event, text=text)
        return events


@pytest.fixture(scope="module")
def served(conf_dir: Path):
    import torch

    model_dir = conf_dir / "tiny_like"
    if not (model_dir / "config.json").exists():
        pytest.skip(f"no tiny_like checkpoint in {conf_dir}")
    runner = EngineRunner(GroundingEngine(Engine.from_pretrained(model_dir, dtype=torch.float32, device="cpu"),
                                          delay_s=0.03))
    with ThreadedServer(create_app(runner, ServeSettings(served_model_name=SERVED_NAME))) as server:
        yield server, runner


@pytest.fixture()
def page(browser, served):
    server, _ = served
    page = browser.new_page(viewport={"width": 1280, "height": 820})
    page.goto(server.base_url + "/")
    page.wait_for_function(f"document.getElementById('model-name').textContent === '{SERVED_NAME}'")
    yield page
    page.close()


def screenshot_dir(tmp_path: Path) -> Path:
    directory = Path(os.environ.get("DSVL2_SCREENSHOT_DIR") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


COUNT_ANSWER_UPDATES = """() => {
  window.answerUpdates = 0;
  new MutationObserver((records) => {
    for (const record of records) {
      const message = record.target.closest && record.target.closest('.msg.assistant.streaming');
      if (message) window.answerUpdates += 1;
      if (message && message.querySelector('.text').textContent.includes('<|')) window.rawTagSeen = true;
      if (message && document.querySelector('.box')) window.boxWhileStreaming = true;
    }
  }).observe(document.getElementById('chat'), {childList: true, subtree: true, characterData: true});
}"""


def test_upload_ask_stream_and_draw_box(page, served, conf_dir: Path, tmp_path: Path) -> None:
    square = conf_dir / "images" / "square.png"
    page.set_input_files("#file-input", str(square))
    page.wait_for_selector("#stage-image[src^='data:image/png']")
    page.evaluate(COUNT_ANSWER_UPDATES)
    page.fill("#max-tokens", "24")
    page.fill("#prompt", "<|ref|>the square<|/ref|>.")
    page.click("#send")
    page.wait_for_selector(".msg.assistant.done", timeout=60_000)
    page.wait_for_selector(".box")

    assert page.evaluate("window.answerUpdates") >= 3, "the answer did not arrive in several streamed pieces"
    assert page.evaluate("window.rawTagSeen") is None, "grounding tags were shown raw while streaming"
    assert page.evaluate("window.boxWhileStreaming"), "the box was drawn only after the answer ended"
    width, height = page.evaluate("[document.getElementById('stage-image').naturalWidth, "
                                  "document.getElementById('stage-image').naturalHeight]")
    sides = (width, height, width, height)
    pixels = ", ".join(str(round(value / 999 * side)) for value, side in zip(GRID_BOX, sides, strict=True))
    assert page.inner_text(".msg.assistant .box-list") == f"the square: ({pixels}) px on image #1"
    answer = page.inner_text(".msg.assistant .text")
    assert answer.startswith("the square") and "<|det|>" not in answer  # tags rendered, not shown raw
    assert "24 completion tokens" in page.inner_text(".msg.assistant .meta")
    assert page.inner_text(".box .box-label") == "the square"
    image = page.locator("#stage-image").bounding_box()
    box = page.locator(".box").bounding_box()
    # The drawn box covers grid / 999 of the displayed image, whatever its on-screen scale.
    for got, expected in [((box["x"] - image["x"]) / image["width"], GRID_BOX[0] / 999),
                          ((box["y"] - image["y"]) / image["height"], GRID_BOX[1] / 999),
                          (box["width"] / image["width"], (GRID_BOX[2] - GRID_BOX[0]) / 999),
                          (box["height"] / image["height"], (GRID_BOX[3] - GRID_BOX[1]) / 999)]:
        assert abs(got - expected) < 0.01
    assert page.locator(".thumb .badge").all_inner_texts() == ["#1"]  # the image joined the conversation
    path = screenshot_dir(tmp_path) / "web_page.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000


def test_stop_button_aborts_and_frees_the_engine(page, served) -> None:
    _, runner = served
    page.evaluate(COUNT_ANSWER_UPDATES)
    page.fill("#max-tokens", "3000")
    page.fill("#prompt", "Tell me a very long story.")
    page.click("#send")
    page.wait_for_function("window.answerUpdates >= 2", timeout=60_000)
    assert runner.num_pending == 1
    page.click("#stop")
    page.wait_for_selector(".msg.assistant.done", timeout=10_000)
    assert "stopped" in page.inner_text(".msg.assistant .meta")
    deadline = time.monotonic() + 10
    while (runner.num_pending or runner.engine.num_running) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runner.num_pending == 0 and runner.engine.num_running == 0
    assert page.is_enabled("#send") and not page.is_enabled("#stop")


def test_icon_and_example_images_are_served(served) -> None:
    import urllib.request

    server, _ = served
    with urllib.request.urlopen(server.base_url + "/favicon.ico") as response:
        assert response.status == 200 and response.headers["Content-Type"] == "image/svg+xml"
    with urllib.request.urlopen(server.base_url + "/static/example-shapes.png") as response:
        assert response.read()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("index.html", "..%2Fapp.py", "nothing.png"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(server.base_url + "/static/" + name)
        assert refused.value.code == 404


PASTE_FILE = """async ([name, bytes]) => {
  const file = new File([new Uint8Array(bytes)], name, {type: 'image/png'});
  const data = new DataTransfer();
  data.items.add(file);
  document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true}));
}"""


def test_pasted_image_is_attached_and_an_undecodable_one_refused_at_once(page, conf_dir: Path) -> None:
    tiny = (conf_dir / "images" / "tiny.png").read_bytes()
    page.evaluate(PASTE_FILE, ["tiny.png", list(tiny)])
    page.wait_for_selector(".thumb .badge")
    assert page.locator(".thumb .badge").all_inner_texts() == ["#1 new"]
    page.evaluate(PASTE_FILE, ["broken.png", list(b"these bytes are not a picture")])
    notice = page.wait_for_selector("#image-notice:not([hidden])")
    assert "broken.png could not be read as an image" in notice.inner_text()
    assert page.locator(".thumb .badge").all_inner_texts() == ["#1 new"]  # never attached, no broken thumbnail


@pytest.mark.parametrize(("position", "order"), [("after", ["text", "image_url"]), ("before", ["image_url", "text"])])
def test_message_parts_follow_the_model_cards_image_tag_position(browser, served, conf_dir: Path, position: str,
                                                                  order: list[str]) -> None:
    server, _ = served
    page = browser.new_page()
    card = {"object": "list", "data": [{"id": SERVED_NAME, "object": "model", "image_tag_position": position}]}
    page.route("**/v1/models", lambda route: route.fulfill(json=card))
    sent: list[dict] = []

    def capture(route) -> None:
        sent.append(route.request.post_data_json)
        route.abort()

    page.route("**/v1/chat/completions", capture)
    page.goto(server.base_url + "/")
    page.wait_for_function(f"document.getElementById('model-name').textContent === '{SERVED_NAME}'")
    page.set_input_files("#file-input", str(conf_dir / "images" / "square.png"))
    page.wait_for_selector("#stage-image[src^='data:image/png']")
    page.fill("#prompt", "Where is the square?")
    page.click("#send")
    page.wait_for_selector(".msg.error", timeout=10_000)  # the aborted request
    assert [part["type"] for part in sent[0]["messages"][-1]["content"]] == order
    page.close()


PAGE_KEY = "sk-page-test-91c4e7"
MODEL_SHOWN = f"document.getElementById('model-name').textContent === '{SERVED_NAME}'"


def test_the_page_asks_for_its_key_and_says_when_it_is_refused(browser, conf_dir: Path) -> None:
    import torch

    # An engine of its own: two runners must never step one engine.
    engine = Engine.from_pretrained(conf_dir / "tiny_like", dtype=torch.float32, device="cpu")
    settings = ServeSettings(served_model_name=SERVED_NAME, api_keys=KeyRing([PAGE_KEY]))
    with ThreadedServer(create_app(EngineRunner(engine), settings)) as server:
        page = browser.new_page()
        page.goto(server.base_url + "/")
        page.wait_for_selector("#key-form", state="visible")
        assert page.inner_text("#key-message") == "This server needs an API key."
        page.fill("#api-key", PAGE_KEY[:-1] + "8")
        page.click("#use-key")
        page.wait_for_function("document.getElementById('key-message').classList.contains('refused')")
        assert page.inner_text("#key-message") == "The server refused this key."
        assert page.evaluate("sessionStorage.getItem('dsvl2-api-key')") is None
        page.fill("#api-key", PAGE_KEY)
        page.click("#use-key")
        page.wait_for_function(MODEL_SHOWN)
        assert page.is_hidden("#key-form")
        page.fill("#max-tokens", "3")
        page.fill("#prompt", "Hello there.")
        page.click("#send")
        page.wait_for_selector(".msg.assistant.done", timeout=30_000)
        assert page.locator(".msg.error").count() == 0
        # Kept for this tab only: a reload needs no new key, and nothing is left in lasting storage.
        assert page.evaluate("sessionStorage.getItem('dsvl2-api-key')") == PAGE_KEY
        assert page.evaluate("localStorage.length") == 0 and page.evaluate("document.cookie") == ""
        page.reload()
        page.wait_for_function(MODEL_SHOWN)
        page.close()
