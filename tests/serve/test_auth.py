"""API keys on the server: refusals (401), the openai client with the right key, the key file re-read on
SIGHUP, HTTPS with a certificate made here, and the refusal to serve another host without keys.

Servers bind only to 127.0.0.1. The keyed in-process server runs the real engine on the tiny_like
checkpoint; one server process (`python -m dsvl2.serve`) covers the command line: keys from an option,
the environment and a file, TLS, and the access log.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the openai client is needed (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="the serve extra is needed (pip install -e '.[serve]')")
trustme = pytest.importorskip("trustme", reason="trustme makes the test certificate (pip install trustme)")

from dsvl2.engine.generate import Engine  # noqa: E402
from dsvl2.serve.app import ServeSettings, create_app  # noqa: E402
from dsvl2.serve.auth import ENV_VAR, KeyRing, key_hash  # noqa: E402
from dsvl2.serve.launch import ServerProcess, ThreadedServer, get_json  # noqa: E402
from dsvl2.serve.runner import EngineRunner  # noqa: E402
from tests.serve.waiting import wait_for  # noqa: E402

SERVED_NAME = "tiny-keyed"
KEY = "sk-dsvl2-test-7f3a9c21e8b4d6"
OTHER_KEY = "sk-dsvl2-test-second-key-01"
WRONG_KEYS = {"no key": None, "wrong key": "sk-not-a-key-of-this-server", "last character differs": KEY[:-1] + "7"}
PROTECTED = [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/metrics"),
             ("GET", "/v1/models/" + SERVED_NAME), ("GET", "/./metrics"), ("GET", "//v1/models")]


@pytest.fixture(scope="module")
def keyed(engine: Engine):
    settings = ServeSettings(served_model_name=SERVED_NAME, api_keys=KeyRing([KEY, OTHER_KEY]))
    with ThreadedServer(create_app(EngineRunner(engine), settings)) as server:
        yield server


def call(url: str, method: str = "GET", body: dict | None = None, key: str | None = None,
         context: ssl.SSLContext | None = None) -> tuple[int, Message, bytes]:
    """Status, headers and body of one request (error statuses included)."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else (b"{}" if method == "POST" else None)
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def chat_body(text: str = "Hello.", max_tokens: int = 3) -> dict:
    return {"model": SERVED_NAME, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0}


@pytest.mark.parametrize("case", list(WRONG_KEYS))
@pytest.mark.parametrize(("method", "path"), PROTECTED, ids=[path for _, path in PROTECTED])
def test_a_missing_or_wrong_key_gets_401(keyed: ThreadedServer, method: str, path: str, case: str) -> None:
    body = chat_body() if method == "POST" else None
    status, headers, raw = call(keyed.base_url + path, method, body, key=WRONG_KEYS[case])
    assert status == 401, raw
    error = json.loads(raw)["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    assert headers["WWW-Authenticate"] == "Bearer"
    for key in (KEY, OTHER_KEY, key_hash(KEY), KEY[:8]):  # no hint about the valid keys
        assert key not in raw.decode()


def test_health_and_the_page_need_no_key(keyed: ThreadedServer) -> None:
    assert get_json(keyed.base_url + "/health") == (200, {"status": "ok"})
    status, _, page = call(keyed.base_url + "/")
    assert status == 200 and b"key-form" in page
    assert call(keyed.base_url + "/favicon.ico")[0] == 200  # browsers ask for it without the page's key


def test_the_right_key_is_served_through_the_openai_client(keyed: ThreadedServer, conf_dir: Path) -> None:
    client = openai.OpenAI(base_url=keyed.base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [model.id for model in client.models.list().data] == [SERVED_NAME]
    plain = client.chat.completions.create(**chat_body("Tell me about 42.", 6))
    assert plain.usage.completion_tokens >= 1 and plain.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(**chat_body("Tell me about 42.", 6), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    url = "data:image/png;base64," + base64.b64encode((conf_dir / "images" / "square.png").read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]
    image = client.chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": content}],
                                           max_tokens=4, temperature=0)
    assert image.usage.prompt_tokens > plain.usage.prompt_tokens  # the image's tokens were counted
    assert call(keyed.base_url + "/metrics", key=OTHER_KEY)[0] == 200
    wrong = openai.OpenAI(base_url=keyed.base_url + "/v1", api_key=WRONG_KEYS["last character differs"],
                          max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(**chat_body())


# ----------------------------------------------------------------------------- the command line

def _args(model_dir: Path, *extra: str):
    import argparse

    from dsvl2.serve import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--model", str(model_dir), *extra])


def test_another_host_without_keys_is_refused_unless_no_auth(model_dir: Path, monkeypatch, tmp_path: Path) -> None:
    from dsvl2.serve.cli import check_arguments, main

    monkeypatch.delenv(ENV_VAR, raising=False)

    def no_serving(*args, **kwargs):
        raise AssertionError("the server was started")

    monkeypatch.setattr("uvicorn.run", no_serving)
    monkeypatch.setattr("dsvl2.serve.cli.load_engine", lambda *args, **kwargs: None)
    with pytest.raises(SystemExit, match=r"--host 0\.0\.0\.0 is reachable from other machines and no API key.*"
                                         r"--no-auth"):
        main(["--model", str(model_dir), "--host", "0.0.0.0"])
    check_arguments(args := _args(model_dir, "--host", "0.0.0.0", "--no-auth"))
    assert args.key_ring is None
    check_arguments(args := _args(model_dir))  # loopback without keys: as before
    assert args.key_ring is None
    monkeypatch.setenv(ENV_VAR, KEY)
    check_arguments(args := _args(model_dir, "--host", "0.0.0.0"))
    assert args.key_ring.match(KEY) == key_hash(KEY)
    with pytest.raises(SystemExit, match="--no-auth and API keys"):
        check_arguments(_args(model_dir, "--no-auth"))
    empty = tmp_path / "keys.txt"
    empty.write_text("# no key yet\n\n")
    with pytest.raises(SystemExit, match=f"the API key file {empty} holds no key"):
        check_arguments(_args(model_dir, "--api-key-file", str(empty)))
    empty.write_text("sk-good\nsk-two words\n")
    with pytest.raises(SystemExit, match=f"key 2 of the API key file {empty} has a space"):
        check_arguments(_args(model_dir, "--api-key-file", str(empty)))
    with pytest.raises(SystemExit, match="--ssl-keyfile needs --ssl-certfile"):
        check_arguments(_args(model_dir, "--ssl-keyfile", str(empty)))


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> tuple[list[str], ssl.SSLContext]:
    """Server options for a certificate of 127.0.0.1 from a CA made here, and a client context trusting it."""
    folder = tmp_path_factory.mktemp("tls")
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    certificate.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    certificate.private_key_pem.write_to_path(str(folder / "key.pem"))
    context = ssl.create_default_context()
    authority.configure_trust(context)
    return ["--ssl-certfile", str(folder / "cert.pem"), "--ssl-keyfile", str(folder / "key.pem")], context


def test_https_keys_from_option_environment_and_file_reloaded_on_sighup(model_dir: Path, tls, tmp_path: Path) -> None:
    import httpx

    tls_args, context = tls
    key_file = tmp_path / "keys.txt"
    file_key, new_key, option_key, env_key = "sk-file-1111", "sk-file-2222", "sk-option-3333", "sk-env-4444"
    key_file.write_text(f"# keys of the test\n{file_key}\n")
    args = ["--served-model-name", SERVED_NAME, "--device", "cpu", "--dtype", "float32", "--api-key", option_key,
            "--api-key-file", str(key_file), *tls_args, "--log-level", "info"]
    with ServerProcess(model_dir, args, env={ENV_VAR: env_key}, ssl_context=context) as server:
        assert server.base_url.startswith("https://127.0.0.1:")
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=file_key, max_retries=0, timeout=60,
                               http_client=httpx.Client(verify=context))
        answer = client.chat.completions.create(**chat_body("Over TLS?", 4))
        assert answer.usage.completion_tokens >= 1
        assert len(list(client.chat.completions.create(**chat_body("Streamed over TLS?", 4), stream=True))) >= 2
        for key in (option_key, env_key):
            assert get_json(server.base_url + "/v1/models", context=context, key=key)[0] == 200
        assert get_json(server.base_url + "/v1/models", context=context, key=new_key)[0] == 401

        key_file.write_text(f"{new_key}\n")
        os.kill(server.pid, signal.SIGHUP)
        assert wait_for(lambda: get_json(server.base_url + "/v1/models", context=context, key=new_key)[0] == 200)
        assert get_json(server.base_url + "/v1/models", context=context, key=file_key)[0] == 401
        assert get_json(server.base_url + "/v1/models", context=context, key=option_key)[0] == 200
        key_file.write_text("")  # an empty file is refused: the keys read before stay valid
        os.kill(server.pid, signal.SIGHUP)
        assert wait_for(lambda: "API keys not reloaded" in server.log_tail(100_000))
        assert get_json(server.base_url + "/v1/models", context=context, key=new_key)[0] == 200
        log = server.log_tail(100_000)
    assert f"key={key_hash(file_key)} POST /v1/chat/completions 200 prompt_tokens=" in log
    assert "key=- GET /v1/models 401" in log
    for key in (file_key, new_key, option_key, env_key):
        assert key not in log
    assert "Over TLS" not in log  # prompts only with --log-prompts
