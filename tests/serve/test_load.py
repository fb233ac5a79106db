"""The server under concurrent load, over loopback: isolation of streams, survival and memory.

A real server process serves the tiny_like conformance checkpoint with an API key, which every
request sends (the key check and the access gate are part of what is under load). Answers are greedy with few
tokens so the whole file stays within about a minute on two cores.
"""

from __future__ import annotations

import base64
import json
import random
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is needed (pip install -e '.[serve]')")

from dsvl2.serve.launch import ServerProcess, get_json  # noqa: E402
from tests.serve.waiting import wait_for  # noqa: E402

SERVED_NAME = "tiny-load"
KEY = "sk-load-test-5e1d"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONCURRENT = 64
MAX_TOKENS = 6
IMAGES = ("square", "tiny", "wide", "tall")


@pytest.fixture(scope="module")
def image_urls(conf_dir: Path) -> dict[str, str]:
    return {name: "data:image/png;base64," + base64.b64encode((conf_dir / "images" / f"{name}.png").read_bytes())
            .decode() for name in IMAGES}


@pytest.fixture(scope="module")
def server(model_dir: Path):
    args = ["--served-model-name", SERVED_NAME, "--max-pending", str(CONCURRENT + 16), "--max-batch", "8",
            "--device", "cpu", "--dtype", "float32"]
    with ServerProcess(model_dir, args, env={"DSVL2_API_KEY": KEY}) as process:
        yield process


def request_body(number: int, image_urls: dict[str, str], stream: bool, max_tokens: int = MAX_TOKENS) -> dict:
    """Request `number`: a distinct prompt, and every other one an image (four different ones)."""
    text = f"Request {number}: what do you see? Answer briefly."
    if number % 2:
        url = image_urls[IMAGES[(number // 2) % len(IMAGES)]]
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    else:
        content = text
    return {"model": SERVED_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, "ignore_eos": True}


def _post(base_url: str, body: dict | bytes, timeout: float = 120):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(base_url + "/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json", **AUTH})
    return urllib.request.urlopen(request, timeout=timeout)


def complete(base_url: str, body: dict) -> str:
    with _post(base_url, body) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def stream(base_url: str, body: dict) -> tuple[str, set[str], str | None]:
    """Text, completion ids seen, and finish reason of one streamed answer."""
    text, ids, finish = [], set(), None
    with _post(base_url, body) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            ids.add(chunk["id"])
            choice = chunk["choices"][0]
            text.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    return "".join(text), ids, finish


def test_concurrent_streams_equal_their_answers_alone(server: ServerProcess, image_urls: dict[str, str]) -> None:
    base = server.base_url
    alone = [complete(base, request_body(n, image_urls, stream=False)) for n in range(CONCURRENT)]
    with ThreadPoolExecutor(CONCURRENT) as pool:
        together = list(pool.map(lambda n: stream(base, request_body(n, image_urls, stream=True)), range(CONCURRENT)))
    for number, (text, ids, finish) in enumerate(together):
        assert len(ids) == 1, f"request {number} saw chunks of several completions: {ids}"
        assert finish == "length"
        assert text == alone[number], f"request {number}: streamed under load {text!r} != alone {alone[number]!r}"
    all_ids = [next(iter(ids)) for _, ids, _ in together]
    assert len(set(all_ids)) == CONCURRENT
    # Equal-to-alone only shows that no stream took another's tokens if the answers differ.
    assert len(set(alone)) >= CONCURRENT // 4, f"too few distinct answers to tell streams apart: {len(set(alone))}"


def _malformed(number: int) -> bytes:
    bodies = [b'{"messages": [', b"[]", json.dumps({"model": "other", "messages": [{"role": "user", "content": "x"}]})
              .encode(), json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
                  "url": "data:image/png;base64,####"}}]}]}).encode(),
              json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 3}).encode()]
    return bodies[number % len(bodies)]


def _disconnect_mid_stream(base_url: str, body: dict) -> None:
    """Read up to the first generated text, then drop the connection."""
    response = _post(base_url, body)
    try:
        for line in response:
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
    finally:
        response.close()


def _one_of_many(base_url: str, number: int, kind: str, image_urls: dict[str, str]) -> str:
    if kind == "ok":
        if number % 3:
            complete(base_url, request_body(number, image_urls, stream=False))
        else:
            stream(base_url, request_body(number, image_urls, stream=True))
    elif kind == "malformed":
        try:
            _post(base_url, _malformed(number))
        except urllib.error.HTTPError as exc:
            assert 400 <= exc.code < 500 and "error" in json.loads(exc.read())
            return "refused"
        raise AssertionError("a malformed request was accepted")
    else:
        # Sampled, so that text flows at once (greedy random-weight answers are held-back invalid UTF-8).
        body = {**request_body(number, image_urls, stream=True, max_tokens=3000), "temperature": 1.0, "seed": number}
        _disconnect_mid_stream(base_url, body)
    return kind


def metric(base_url: str, name: str) -> float:
    with urllib.request.urlopen(urllib.request.Request(base_url + "/metrics", headers=AUTH), timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


def test_survives_malformed_and_disconnected_requests_without_growing(server: ServerProcess,
                                                                       image_urls: dict[str, str]) -> None:
    base = server.base_url
    rest = ["ok"] * 150 + ["malformed"] * 20 + ["disconnect"] * 20
    random.Random(0).shuffle(rest)
    kinds = ["ok"] * 10 + rest  # the first 10 set the memory baseline
    cancelled_before = metric(base, 'dsvl2_request_finish_total{reason="cancelled"}')
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: _one_of_many(base, n, kinds[n], image_urls), range(10)))
        baseline = server.rss_bytes()
        outcomes = list(pool.map(lambda n: _one_of_many(base, n, kinds[n], image_urls), range(10, len(kinds))))
    assert outcomes.count("refused") == 20 and outcomes.count("disconnect") == 20
    # Each disconnect cancelled its generation (3000 tokens would otherwise finish by length).
    assert wait_for(lambda: metric(base, 'dsvl2_request_finish_total{reason="cancelled"}') - cancelled_before == 20)
    assert metric(base, "dsvl2_pending_requests") == 0
    assert get_json(base + "/health") == (200, {"status": "ok"})
    status, body = get_json(base + "/v1/models", key=KEY)
    assert status == 200 and body["data"][0]["id"] == SERVED_NAME
    final = server.rss_bytes()
    assert final <= baseline * 1.10, f"RSS grew from {baseline / 2**20:.0f} MiB to {final / 2**20:.0f} MiB"
