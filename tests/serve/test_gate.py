"""The access gate: per-key limits (429 with Retry-After while other keys are served), per-key counts in
/metrics under short hashes, the access log, and CORS. In-process servers on 127.0.0.1, real engine."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi", reason="the serve extra is needed (pip install -e '.[serve]')")

from dsvl2.engine.generate import Engine  # noqa: E402
from dsvl2.serve.app import ServeSettings, create_app  # noqa: E402
from dsvl2.serve.auth import KeyRing, key_hash  # noqa: E402
from dsvl2.serve.launch import ThreadedServer  # noqa: E402
from dsvl2.serve.limits import KeyLimiter, KeyLimits, LimitExceeded  # noqa: E402
from dsvl2.serve.runner import EngineRunner  # noqa: E402
from tests.serve.test_auth import call, chat_body  # noqa: E402

SERVED_NAME = "tiny-keyed"
GREEDY, POLITE = "sk-greedy-client-0001", "sk-polite-client-0002"


def serve(engine: Engine, **settings) -> ThreadedServer:
    settings = {"api_keys": KeyRing([GREEDY, POLITE]), **settings}
    return ThreadedServer(create_app(EngineRunner(engine), ServeSettings(served_model_name=SERVED_NAME, **settings)))


def open_stream(base_url: str, key: str):
    """A long streamed answer, open once its first record arrived (it runs until closed)."""
    body = {**chat_body("Write a long story.", 3000), "stream": True, "ignore_eos": True}
    request = urllib.request.Request(base_url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    response = urllib.request.urlopen(request, timeout=60)
    response.readline()
    return response


def metrics_text(base_url: str) -> str:
    return call(base_url + "/metrics", key=POLITE)[2].decode()


def test_limiter_counts_running_requests_and_a_sliding_minute() -> None:
    now = [1000.0]
    limiter = KeyLimiter(KeyLimits(max_concurrent=2, per_minute=3), clock=lambda: now[0])
    limiter.acquire("a")
    limiter.acquire("a")
    with pytest.raises(LimitExceeded) as refused:
        limiter.acquire("a")
    assert (refused.value.limit, refused.value.retry_after) == ("concurrent", 1)
    limiter.acquire("b")  # another key is not held back
    limiter.release("a")
    now[0] += 20
    limiter.acquire("a")  # the third start of "a" in this minute
    limiter.release("a")
    limiter.release("a")
    now[0] += 30
    with pytest.raises(LimitExceeded) as refused:
        limiter.acquire("a")
    assert (refused.value.limit, refused.value.retry_after) == ("per_minute", 10)  # the first start leaves at 1060
    now[0] += 10
    limiter.acquire("a")
    with pytest.raises(ValueError, match="per_minute must be at least 1"):
        KeyLimits(per_minute=0)


def test_a_key_over_its_concurrent_limit_gets_429_while_another_key_is_served(engine: Engine) -> None:
    with serve(engine, key_limits=KeyLimits(max_concurrent=1)) as server:
        stream = open_stream(server.base_url, GREEDY)
        try:
            status, headers, raw = call(server.base_url + "/v1/chat/completions", "POST", chat_body(), key=GREEDY)
            assert status == 429, raw
            assert headers["Retry-After"] == "1"
            assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
            status, _, raw = call(server.base_url + "/v1/chat/completions", "POST", chat_body(), key=POLITE)
            assert status == 200, raw
            text = metrics_text(server.base_url)
            assert f'dsvl2_key_running_requests{{key="{key_hash(GREEDY)}"}} 1.0' in text
        finally:
            stream.close()
    assert f'dsvl2_key_rate_limited_total{{key="{key_hash(GREEDY)}",limit="concurrent"}} 1.0' in text
    assert f'dsvl2_key_requests_total{{key="{key_hash(POLITE)}",status="200"}}' in text
    assert 'dsvl2_key_limit{limit="concurrent"} 1.0' in text and 'dsvl2_key_limit{limit="per_minute"} 0.0' in text
    assert GREEDY not in text and POLITE not in text


def test_a_key_over_its_requests_per_minute_gets_429_with_retry_after(engine: Engine) -> None:
    with serve(engine, key_limits=KeyLimits(per_minute=2)) as server:
        url = server.base_url + "/v1/chat/completions"
        assert [call(url, "POST", chat_body(), key=GREEDY)[0] for _ in range(2)] == [200, 200]
        status, headers, raw = call(url, "POST", chat_body(), key=GREEDY)
        assert status == 429 and "2 requests in the last minute" in json.loads(raw)["error"]["message"]
        assert 50 <= int(headers["Retry-After"]) <= 60
        assert call(url, "POST", chat_body(), key=POLITE)[0] == 200
        assert call(server.base_url + "/v1/models", key=GREEDY)[0] == 200  # only generation requests are limited
        text = metrics_text(server.base_url)
    assert f'dsvl2_key_rate_limited_total{{key="{key_hash(GREEDY)}",limit="per_minute"}} 1.0' in text
    assert f'dsvl2_key_tokens_total{{key="{key_hash(GREEDY)}",kind="completion"}} 6.0' in text  # 2 answers of 3


@pytest.mark.parametrize("log_prompts", [False, True])
def test_one_access_log_line_per_request(engine: Engine, caplog, log_prompts: bool) -> None:
    caplog.set_level(logging.INFO, logger="dsvl2.serve.access")
    with serve(engine, log_prompts=log_prompts) as server:
        url = server.base_url + "/v1/chat/completions"
        assert call(url, "POST", chat_body("a secret question", 3), key=GREEDY)[0] == 200
        assert call(url, "POST", chat_body("a secret question", 3), key=GREEDY + "x")[0] == 401
        assert call(server.base_url + "/health")[0] == 200
    lines = [record.getMessage() for record in caplog.records if record.name == "dsvl2.serve.access"]
    assert len(lines) == 3
    assert f"key={key_hash(GREEDY)} POST /v1/chat/completions 200 prompt_tokens=" in lines[0]
    assert "completion_tokens=3 latency=" in lines[0]
    assert "key=- POST /v1/chat/completions 401" in lines[1] and "GET /health 200" in lines[2]
    assert lines[0].startswith("20") and "Z key=" in lines[0]  # an ISO time in UTC
    assert ("a secret question" in lines[0]) == log_prompts
    assert all(GREEDY not in line for line in lines)


def test_cors_is_off_by_default_and_allows_the_given_origins(engine: Engine) -> None:
    origin = "https://client.example"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}

    def options(base_url: str):
        request = urllib.request.Request(base_url + "/v1/chat/completions", headers=preflight, method="OPTIONS")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers

    with serve(engine) as server:
        status, headers = options(server.base_url)
        assert status == 401 and headers["Access-Control-Allow-Origin"] is None
    with serve(engine, cors_origins=(origin,)) as server:
        status, headers = options(server.base_url)
        assert status == 200 and headers["Access-Control-Allow-Origin"] == origin
        assert "authorization" in headers["Access-Control-Allow-Headers"].lower()
        status, headers, _ = call_from(server.base_url + "/v1/models", origin)
        assert status == 401 and headers["Access-Control-Allow-Origin"] == origin  # a refusal its page can read
        status, headers, _ = call_from(server.base_url + "/v1/models", "https://elsewhere.example")
        assert status == 401 and headers["Access-Control-Allow-Origin"] is None


def call_from(url: str, origin: str):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Origin": origin}), timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()
