"""The OpenAI-compatible server, driven over loopback HTTP by the official `openai` client.

A real server process (`python -m dsvl2.serve`) serves the tiny_like conformance checkpoint;
its greedy answers are compared with `Engine.generate` on the same checkpoint in this process.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

openai = pytest.importorskip("openai", reason="the openai client is needed (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="the serve extra is needed (pip install -e '.[serve]')")

from dsvl2.engine.generate import Engine, Request  # noqa: E402
from dsvl2.engine.sampling import SamplingParams  # noqa: E402
from dsvl2.serve.launch import ServerProcess, ThreadedServer, get_json  # noqa: E402
from tests.serve.waiting import wait_for  # noqa: E402

SERVED_NAME = "tiny-test"
MAX_BODY_MB = 1
MAX_IMAGE_PIXELS = 1_000_000
MAX_IMAGES = 2
MAX_PENDING = 3


@pytest.fixture(scope="module")
def server(model_dir: Path):
    args = ["--served-model-name", SERVED_NAME, "--max-body-mb", str(MAX_BODY_MB), "--max-image-pixels",
            str(MAX_IMAGE_PIXELS), "--max-images", str(MAX_IMAGES), "--max-pending", str(MAX_PENDING),
            "--max-batch", "4", "--device", "cpu", "--dtype", "float32"]
    with ServerProcess(model_dir, args) as process:
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def square_path(conf_dir: Path) -> Path:
    return conf_dir / "images" / "square.png"


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def png_data_url(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(url: str, text: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return {"role": "user", "content": parts}


def post(base_url: str, body: bytes | dict, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(base_url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def metric(base_url: str, name: str) -> float:
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    if "{" in name:
        return 0.0  # a labelled counter appears with its first count
    raise AssertionError(f"metric {name} missing")


def generate(engine: Engine, content: str, images: list | None = None, max_new_tokens: int = 12, **sampling):
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, **sampling)
    return engine.generate(Request(conversation=[{"role": "user", "content": content}], images=images or [],
                                   sampling=params))


# ----------------------------------------------------------------------------- basic endpoints

def test_models_health_and_page(server: ServerProcess, client) -> None:
    assert [model.id for model in client.models.list().data] == [SERVED_NAME]
    # The conformance checkpoints keep the released format: images before the text.
    assert get_json(server.base_url + "/v1/models")[1]["data"][0]["image_tag_position"] == "before"
    assert get_json(server.base_url + "/health") == (200, {"status": "ok"})
    with urllib.request.urlopen(server.base_url + "/", timeout=10) as response:
        page = response.read().decode()
    assert response.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page and "getReader" in page
    status, body = get_json(server.base_url + "/v1/models/other")
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_plain_answer_equals_engine_generate(client, engine: Engine) -> None:
    prompt = "Tell me about the number 42."
    response = client.chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=12, temperature=0)
    expected = generate(engine, prompt)
    choice = response.choices[0]
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == expected.prompt_tokens
    assert response.usage.completion_tokens == len(expected.token_ids) == expected.completion_tokens
    assert response.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens
    assert response.object == "chat.completion" and response.model == SERVED_NAME
    assert choice.message.grounding == []


def test_image_answer_equals_engine_generate(client, engine: Engine, conf_dir: Path, square_path: Path) -> None:
    prompt = "Describe this image."
    response = client.chat.completions.create(model=SERVED_NAME, max_tokens=12, temperature=0,
                                              messages=[image_message(data_url(square_path), prompt)])
    expected = generate(engine, "<image>\n" + prompt, [Image.open(square_path)])
    assert response.choices[0].message.content == expected.text
    # The official processor's length of this very prompt (conformance case one_square), image tokens included.
    cases = json.loads((conf_dir / "tiny_like" / "cases.json").read_text())
    assert response.usage.prompt_tokens == cases["one_square"]["seq_len"] == expected.prompt_tokens


def test_streamed_answer_equals_plain_answer(client, square_path: Path) -> None:
    messages = [image_message(data_url(square_path), "What is in the picture?")]
    plain = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == plain.choices[0].message.content
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_sse_wire_format_ends_with_done(server: ServerProcess) -> None:
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    request = urllib.request.Request(server.base_url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        records = [r for r in response.read().decode().split("\n\n") if r]
    assert all(record.startswith("data: ") for record in records)
    assert records[-1] == "data: [DONE]"
    assert json.loads(records[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def _stop_string(text: str) -> tuple[str, int]:
    """A two-character stop string first found after the start of `text`, and where."""
    for start in range(1, len(text) - 1):
        candidate = text[start:start + 2]
        if "\ufffd" not in candidate and candidate.strip() and text.find(candidate) == start:
            return candidate, start
    pytest.skip(f"no usable stop string in the greedy answer {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_answer(client, engine: Engine, stream: bool) -> None:
    prompt = "Count from one to twenty."
    full = generate(engine, prompt, max_new_tokens=24, ignore_eos=True).text
    stop, position = _stop_string(full)
    messages = [{"role": "user", "content": prompt}]
    options = {"model": SERVED_NAME, "messages": messages, "max_tokens": 24, "temperature": 0,
               "stop": [stop, "never-generated-stop"], "extra_body": {"ignore_eos": True}}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **options))
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = client.chat.completions.create(**options).choices[0]
        text, finish = choice.message.content, choice.finish_reason
    assert text == full[:position]
    assert finish == "stop"


def test_sampling_with_seed_is_reproducible(client) -> None:
    options = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8,
               "temperature": 1.0, "top_p": 0.9, "seed": 1234}
    first = client.chat.completions.create(**options).choices[0].message.content
    assert client.chat.completions.create(**options).choices[0].message.content == first


def test_temperature_is_honoured(client, engine: Engine) -> None:
    # Seeded sampling is deterministic: at temperature 2 each seed's answer must be the engine's own sampled
    # answer for that seed, and the seeds cannot all fall on the greedy answer (a server that ignored the
    # temperature would answer greedily, or at its default temperature, every time).
    question = "Say something."
    greedy = generate(engine, question, max_new_tokens=8).text
    answers = []
    for seed in (1, 2, 3):
        answer = client.chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": question}],
                                                max_tokens=8, temperature=2.0, seed=seed).choices[0].message.content
        sampled = engine.generate(Request(conversation=[{"role": "user", "content": question}], images=[],
                                          sampling=SamplingParams(max_new_tokens=8, temperature=2.0, seed=seed)))
        assert answer == sampled.text, seed
        answers.append(answer)
    assert any(answer != greedy for answer in answers), (greedy, answers)


# ----------------------------------------------------------------------------- refusals

def _user(content) -> dict:
    return {"model": SERVED_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 2}


MALFORMED = {
    "invalid JSON": (b'{"messages": [', 400, "invalid_json"),
    "empty body": (b"", 400, "invalid_json"),
    "not an object": (b"[1, 2]", 400, "invalid_request"),
    "no messages": ({"model": SERVED_NAME}, 400, "invalid_request"),
    "bad role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_request"),
    "n is 2": ({**_user("hi"), "n": 2}, 400, "unsupported_n"),
    "negative temperature": ({**_user("hi"), "temperature": -1}, 400, "invalid_request"),
    "zero max_tokens": ({**_user("hi"), "max_tokens": 0}, 400, "invalid_request"),
    "unknown model": ({**_user("hi"), "model": "gpt-4o"}, 404, "model_not_found"),
    "http image URL": (_user([{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]), 400,
                       "remote_url_refused"),
    "bad base64": (_user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not base64@@"}}]),
                   400, "invalid_base64"),
    "not an image": (_user([{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"hello, not a picture").decode()}}]), 400,
        "invalid_image"),
    "local path refused": (_user([{"type": "image_url", "image_url": {"url": "/etc/hostname"}}]), 400,
                           "local_files_disabled"),
    "image tag in text": (_user("look: <image>"), 400, "invalid_request"),
    "too many images": (_user([{"type": "image_url", "image_url": {"url": png_data_url(8, 8)}}] * (MAX_IMAGES + 1)),
                        400, "too_many_images"),
    "too many pixels": (_user([{"type": "image_url", "image_url": {"url": png_data_url(1001, 1000)}}]), 400,
                        "image_too_large"),
    "prompt over context": (_user("hello " * 5000), 400, "context_length_exceeded"),
    "body too large": (_user("x" * (MAX_BODY_MB * 1024 * 1024 + 10)), 413, "request_too_large"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_request_gets_a_json_error(server: ServerProcess, case: str) -> None:
    body, status, code = MALFORMED[case]
    got_status, payload = post(server.base_url, body)
    assert got_status == status, payload
    error = payload["error"]
    assert error["code"] == code
    assert error["message"] and error["type"]
    assert get_json(server.base_url + "/health") == (200, {"status": "ok"})


def test_openai_client_raises_on_refusal(client) -> None:
    with pytest.raises(openai.BadRequestError, match="remote image URLs are not fetched"):
        client.chat.completions.create(model=SERVED_NAME, messages=[image_message("https://example.com/x.png", "hi")])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def _open_stream(base_url: str, max_tokens: int = 3000):
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "temperature": 0}
    request = urllib.request.Request(base_url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    response = urllib.request.urlopen(request, timeout=60)
    response.readline()  # the first SSE record arrived: the request is accepted
    return response


def test_queue_full_then_disconnects_free_the_slots(server: ServerProcess) -> None:
    cancelled = 'dsvl2_request_finish_total{reason="cancelled"}'
    before = metric(server.base_url, cancelled)
    streams = [_open_stream(server.base_url) for _ in range(MAX_PENDING)]
    try:
        request = urllib.request.Request(server.base_url + "/v1/chat/completions", data=json.dumps(
            _user("one more")).encode(), headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 429 and json.loads(refused.value.read())["error"]["code"] == "queue_full"
        assert refused.value.headers["Retry-After"] == "1"  # clients back off, like the per-key limits' 429
        assert metric(server.base_url, "dsvl2_pending_requests") == MAX_PENDING
    finally:
        for stream in streams:
            stream.close()
    # 3000 tokens each would take far longer than this: the disconnects cancelled them.
    assert wait_for(lambda: metric(server.base_url, "dsvl2_running_requests") == 0
                     and metric(server.base_url, "dsvl2_pending_requests") == 0)
    assert metric(server.base_url, cancelled) == before + MAX_PENDING
    status, payload = post(server.base_url, _user("after the storm"))
    assert status == 200 and payload["choices"][0]["message"]["role"] == "assistant"


def test_a_client_leaving_before_its_answer_cancels_it(server: ServerProcess) -> None:
    cancelled = 'dsvl2_request_finish_total{reason="cancelled"}'
    before = metric(server.base_url, cancelled)
    body = json.dumps({**_user("Write a long story."), "max_tokens": 3000, "ignore_eos": True}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((server.host, server.port)) as connection:
        connection.sendall(head + body)
        assert wait_for(lambda: metric(server.base_url, "dsvl2_running_requests") == 1)
    # Not streamed, so nothing was being written to it: the server noticed the closed connection itself.
    assert wait_for(lambda: metric(server.base_url, "dsvl2_pending_requests") == 0)
    assert wait_for(lambda: metric(server.base_url, cancelled) == before + 1)


def test_metrics_count_requests_tokens_and_first_token_time(server: ServerProcess) -> None:
    before = metric(server.base_url, "dsvl2_completion_tokens_total")
    request = {**_user("Count tokens."), "max_completion_tokens": 5, "ignore_eos": True}
    status, payload = post(server.base_url, request)
    assert status == 200 and payload["usage"]["completion_tokens"] == 5
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    assert metric(server.base_url, "dsvl2_completion_tokens_total") - before == 5
    assert 'dsvl2_requests_total{path="/v1/chat/completions",status="200"}' in text
    assert metric(server.base_url, "dsvl2_time_to_first_token_seconds_count") >= 1
    for name in ("dsvl2_queue_length", "dsvl2_running_requests", "dsvl2_prompt_tokens_total"):
        metric(server.base_url, name)


# ----------------------------------------------------------------------------- grounding, end to end

class _GroundingEngine:
    """The real engine with a fixed grounding span put in front of every answer (random weights never
    produce one on their own)."""

    SPAN = "<|ref|>the square<|/ref|><|det|>[[100, 200, 599, 799]]<|/det|>"

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._started: set[str] = set()

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def step(self):
        events = self._engine.step()
        for index, event in enumerate(events):
            if event.request_id not in self._started:
                self._started.add(event.request_id)
                events[index] = dataclasses.replace(event, text=self.SPAN + event.text)
        return events


def test_grounding_field_in_pixels(engine: Engine, square_path: Path) -> None:
    from dsvl2.serve.app import ServeSettings, create_app
    from dsvl2.serve.runner import EngineRunner

    runner = EngineRunner(_GroundingEngine(engine))
    app = create_app(runner, ServeSettings(served_model_name=SERVED_NAME))
    width, height = Image.open(square_path).size
    with ThreadedServer(app) as threaded:
        client = openai.OpenAI(base_url=threaded.base_url + "/v1", api_key="unused", max_retries=0)
        messages = [image_message(png_data_url(40, 40), "first"), {"role": "assistant", "content": "ok"},
                    image_message(data_url(square_path), "<|ref|>the square<|/ref|>.")]
        message = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=3,
                                                 temperature=0).choices[0].message
        chunks = list(client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=3,
                                                     temperature=0, stream=True))
    assert message.content.startswith(_GroundingEngine.SPAN)
    expected_box = [round(100 / 999 * width, 2), round(200 / 999 * height, 2), round(599 / 999 * width, 2),
                    round(799 / 999 * height, 2)]
    assert message.grounding == [{"label": "the square", "boxes": [expected_box],
                                  "grid_boxes": [[100, 200, 599, 799]], "image_index": 1}]
    assert chunks[-1].choices[0].delta.grounding == message.grounding


class _FailingEngine:
    """The real engine, whose `step` raises while `failing` is set."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.failing = False

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def step(self):
        if self.failing:
            raise RuntimeError("simulated device failure")
        return self._engine.step()


def test_engine_failure_fails_the_request_not_the_server(engine: Engine) -> None:
    from dsvl2.serve.app import ServeSettings, create_app
    from dsvl2.serve.runner import EngineRunner

    failing = _FailingEngine(engine)
    app = create_app(EngineRunner(failing), ServeSettings(served_model_name=SERVED_NAME))
    request = {**_user("Hello there."), "max_tokens": 4}
    with ThreadedServer(app) as threaded:
        failing.failing = True
        status, payload = post(threaded.base_url, request)
        assert status == 500 and payload["error"]["code"] == "engine_error"
        assert "simulated device failure" in payload["error"]["message"]
        streamed = urllib.request.Request(threaded.base_url + "/v1/chat/completions",
                                          data=json.dumps({**request, "stream": True}).encode(),
                                          headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(streamed, timeout=30) as response:
            records = [r for r in response.read().decode().split("\n\n") if r]
        assert records[-1] == "data: [DONE]"
        assert json.loads(records[-2][6:])["error"]["code"] == "engine_error"
        failing.failing = False
        assert get_json(threaded.base_url + "/health") == (200, {"status": "ok"})
        status, payload = post(threaded.base_url, request)
        assert status == 200 and payload["usage"]["completion_tokens"] >= 1
        assert metric(threaded.base_url, "dsvl2_engine_step_errors_total") >= 2


class _CancellingEngine:
    """The real engine, which cancels each request as soon as it is queued (as a shutdown would): the
    client is still listening when the "cancelled" final event comes."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def submit(self, request: Request) -> str:
        request_id = self._engine.submit(request)
        self._engine.cancel(request_id)
        return request_id


def test_a_request_cancelled_by_the_server_gets_503(engine: Engine) -> None:
    from dsvl2.serve.app import ServeSettings, create_app
    from dsvl2.serve.runner import EngineRunner

    app = create_app(EngineRunner(_CancellingEngine(engine)), ServeSettings(served_model_name=SERVED_NAME))
    request = {**_user("Hello there."), "max_tokens": 4}
    with ThreadedServer(app) as threaded:
        status, payload = post(threaded.base_url, request)
        assert status == 503 and payload["error"]["code"] == "cancelled", payload
        streamed = urllib.request.Request(threaded.base_url + "/v1/chat/completions",
                                          data=json.dumps({**request, "stream": True}).encode(),
                                          headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(streamed, timeout=30) as response:
            records = [r for r in response.read().decode().split("\n\n") if r]
        assert records[-1] == "data: [DONE]"
        assert json.loads(records[-2][6:])["error"]["code"] == "cancelled"


def test_local_image_paths_only_when_allowed(engine: Engine, square_path: Path) -> None:
    from dsvl2.serve.app import ServeSettings, create_app
    from dsvl2.serve.runner import EngineRunner

    app = create_app(EngineRunner(engine), ServeSettings(served_model_name=SERVED_NAME, allow_local_files=True))
    question = "Describe this image."
    with ThreadedServer(app) as threaded:
        answers = []
        for url in (str(square_path), square_path.as_uri(), data_url(square_path)):
            status, payload = post(threaded.base_url, {**_user([{"type": "image_url", "image_url": {"url": url}},
                                                                {"type": "text", "text": question}]),
                                                       "max_tokens": 6, "temperature": 0})
            assert status == 200, payload
            answers.append(payload["choices"][0]["message"]["content"])
        status, payload = post(threaded.base_url, _user([{"type": "image_url", "image_url": {"url": "images/x.png"}}]))
        assert status == 400 and "absolute" in payload["error"]["message"]
        status, payload = post(threaded.base_url, _user([{"type": "image_url", "image_url": {"url": "/no/such.png"}}]))
        assert status == 400 and "no such image file" in payload["error"]["message"]
    assert answers[0] == answers[1] == answers[2]


def test_cli_refuses_a_directory_without_a_checkpoint(tmp_path: Path) -> None:
    import argparse

    from dsvl2.serve import add_arguments
    from dsvl2.serve.cli import check_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path)])
    assert (args.host, args.port, args.allow_local_files) == ("127.0.0.1", 8000, False)
    with pytest.raises(SystemExit, match="not a checkpoint directory"):
        check_arguments(args)


def test_cli_serves_the_default_model_without_model_argument(monkeypatch, tmp_path: Path) -> None:
    import argparse

    from dsvl2.serve import add_arguments
    from dsvl2.serve.cli import check_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr("dsvl2.defaults.default_model_dir", lambda: tmp_path)
    args = parser.parse_args([])
    check_arguments(args)
    assert args.model == tmp_path

    def missing():
        raise FileNotFoundError("the default model at X lacks model.safetensors")

    monkeypatch.setattr("dsvl2.defaults.default_model_dir", missing)
    with pytest.raises(SystemExit, match="no --model given"):
        check_arguments(parser.parse_args([]))
