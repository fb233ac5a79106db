"""The gate every HTTP request passes: its API key is checked (all but the page and /health), its key's limits
are applied (on generation requests), its key's counts are kept, and one access-log line is written."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dsvl2.serve.auth import ANONYMOUS, KeyRing, bearer_token
from dsvl2.serve.limits import KeyLimiter, LimitExceeded
from dsvl2.serve.metrics import ServerMetrics
from dsvl2.serve.schemas import error_body

access_logger = logging.getLogger("dsvl2.serve.access")

LIMITED_PATH = "/v1/chat/completions"
# Open to all: the page (it asks for the key itself), its icon (browsers fetch it without the page's key) and
# /health (for probes). Everything else, /v1/ and /metrics, needs a key, so that no path spelling can reach an
# API route around the check.
PUBLIC_PATHS = ("/", "/health", "/favicon.ico")
_REFUSED_KEY = "-"  # the access log's name for a request whose key was missing or wrong


def needs_key(path: str) -> bool:
    return path not in PUBLIC_PATHS


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key == name), None)


def _refusal(status: int, message: str, error_type: str, code: str, headers: dict[str, str]) -> JSONResponse:
    return JSONResponse(error_body(message, error_type, code), status_code=status, headers=headers)


def prompt_summary(messages: list[Any]) -> str:
    """The conversation's text for the access log (--log-prompts): images as '[image]', never their bytes."""
    parts = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            content = " ".join(part.text if part.type == "text" else "[image]" for part in content)
        parts.append(f"{message.role}: {content or ''}")
    return " | ".join(parts)


class AccessGate:
    """ASGI middleware; the key's hash, and the answer's token counts and prompt, travel in scope['state']."""

    def __init__(self, app: ASGIApp, keys: KeyRing | None, limiter: KeyLimiter | None,
                 metrics: ServerMetrics) -> None:
        self.app = app
        self.keys = keys
        self.limiter = limiter
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        status = 500  # what the log says when the app raised before answering

        async def noting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        key = ANONYMOUS
        path = scope["path"]
        if self.keys is not None and needs_key(path):
            key = self.keys.match(bearer_token(_header(scope, b"authorization"))) or _REFUSED_KEY
        try:
            if key == _REFUSED_KEY:
                response = _refusal(401, "invalid or missing API key (send it as 'Authorization: Bearer KEY')",
                                    "invalid_request_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
                await response(scope, receive, noting_send)
                return
            state["key"] = key
            if self.limiter is not None and path == LIMITED_PATH and scope["method"] == "POST":
                await self._limited(key, scope, receive, noting_send)
            else:
                await self.app(scope, receive, noting_send)
        finally:
            if needs_key(path) and key != _REFUSED_KEY:
                self.metrics.count_key_response(key, status)
            self._log(scope, key, status, time.perf_counter() - started)

    async def _limited(self, key: str, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request inside its key's limits; it counts as running until its answer is fully sent."""
        assert self.limiter is not None
        try:
            self.limiter.acquire(key)
        except LimitExceeded as exc:
            self.metrics.count_key_limited(key, exc.limit)
            response = _refusal(429, f"{exc}; retry after {exc.retry_after} s", "rate_limit_error",
                                "rate_limit_exceeded", {"Retry-After": str(exc.retry_after)})
            await response(scope, receive, send)
            return
        self.metrics.key_running(key, 1)
        try:
            await self.app(scope, receive, send)
        finally:
            self.limiter.release(key)
            self.metrics.key_running(key, -1)

    def _log(self, scope: Scope, key: str, status: int, seconds: float) -> None:
        state = scope["state"]
        usage = state.get("usage")
        if usage is not None and key != _REFUSED_KEY:
            self.metrics.count_key_tokens(key, *usage)
        if not access_logger.isEnabledFor(logging.INFO):
            return
        when = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        tokens = f" prompt_tokens={usage[0]} completion_tokens={usage[1]}" if usage is not None else ""
        prompt = f" prompt={json.dumps(state['prompt'], ensure_ascii=False)}" if "prompt" in state else ""
        # The raw path, still percent-encoded: a decoded one could carry a line break into the log.
        path = scope.get("raw_path", b"").decode("latin-1") or scope["path"]
        access_logger.info("%s key=%s %s %s %d%s latency=%.3fs%s", when, key, scope["method"], path, status, tokens,
                           seconds, prompt)
