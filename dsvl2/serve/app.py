"""The HTTP server: an OpenAI-compatible chat-completions API over the engine, metrics, and the web page."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dsvl2.engine.generate import Request as EngineRequest
from dsvl2.engine.generate import TokenEvent
from dsvl2.engine.sampling import SamplingParams
from dsvl2.errors import ImageCountError, ImageDecodeError, ImageTooLargeError, InputError, PromptTooLongError
from dsvl2.images import DEFAULT_MAX_PIXELS
from dsvl2.serve.auth import KeyRing
from dsvl2.serve.gate import AccessGate, prompt_summary
from dsvl2.serve.limits import KeyLimiter, KeyLimits
from dsvl2.serve.messages import grounding_entries, load_images, to_conversation
from dsvl2.serve.metrics import CONTENT_TYPE
from dsvl2.serve.runner import EngineRunner, QueueFullError, RunnerStoppedError
from dsvl2.serve.schemas import (
    APIError,
    ChatCompletionRequest,
    chunk_body,
    completion_body,
    error_body,
    parse_request,
    usage_chunk_body,
)

logger = logging.getLogger("dsvl2.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
CHAT_PATH = "/v1/chat/completions"
_COUNTED_PATHS = (CHAT_PATH, "/v1/models", "/health", "/metrics", "/")
_DRAIN_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class ServeSettings:
    served_model_name: str
    allow_local_files: bool = False
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_images: int = 8
    default_max_tokens: int = 512
    default_temperature: float = 1.0  # OpenAI's default
    preprocess_workers: int = 2  # threads decoding images and tokenizing prompts
    api_keys: KeyRing | None = None  # None: no key needed (loopback, or --no-auth)
    key_limits: KeyLimits = KeyLimits()
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the API (none: same origin only)
    log_prompts: bool = False  # the access log shows the conversation's text


class _CountResponses:
    """Counts every response by path and status, 500s from unhandled exceptions included."""

    def __init__(self, app: ASGIApp, count: Callable[[str, int], None]) -> None:
        self.app = app
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in _COUNTED_PATHS else "other"
        started = False

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.count(path, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:
                self.count(path, 500)
            raise


class _EngineStreamResponse(StreamingResponse):
    """A streamed answer that always releases its engine request, even when the client left before
    the body iterator ever started (then its own cleanup would never run)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def _read_body(request: HTTPRequest, limit: int) -> bytes:
    """The body, or 413 beyond `limit` bytes. A moderately oversized body is read to its end first:
    answering while the client still sends makes the closing socket reset and lose the answer."""
    too_large = APIError(413, f"the request body exceeds the limit of {limit} bytes", "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + _DRAIN_BYTES:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit + _DRAIN_BYTES:
                raise too_large
            if size <= limit:
                chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(499, "the client closed the connection while sending the request", "client_closed") from None
    if size > limit:
        raise too_large
    return b"".join(chunks)


def _decode_json(body: bytes) -> Any:
    if not body:
        raise APIError(400, "the request body is empty; send a JSON object", "invalid_json")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})", "invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", "invalid_json") from None


def _sampling(chat: ChatCompletionRequest, settings: ServeSettings) -> SamplingParams:
    max_new_tokens = chat.max_completion_tokens or chat.max_tokens or settings.default_max_tokens
    temperature = settings.default_temperature if chat.temperature is None else chat.temperature
    try:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=chat.top_k or 0,
            top_p=1.0 if chat.top_p is None else chat.top_p,
            repetition_penalty=1.0 if chat.repetition_penalty is None else chat.repetition_penalty,
            seed=chat.seed,
            stop=tuple(chat.stop_strings),
            ignore_eos=chat.ignore_eos,
        )
    except (TypeError, ValueError) as exc:
        raise APIError(400, f"invalid sampling parameters: {exc}", "invalid_request") from None


def _input_error(exc: InputError) -> APIError:
    codes = [(PromptTooLongError, "context_length_exceeded"), (ImageTooLargeError, "image_too_large"),
             (ImageDecodeError, "invalid_image"), (ImageCountError, "image_count_mismatch")]
    code = next((name for kind, name in codes if isinstance(exc, kind)), "invalid_request")
    return APIError(400, str(exc), code, param="messages")


def _finish_error(event: TokenEvent) -> APIError | None:
    if event.finish_reason == "error":
        return APIError(500, f"generation failed: {event.error or 'unknown engine error'}", "engine_error",
                        error_type="server_error")
    if event.finish_reason == "cancelled":
        return APIError(503, "the request was cancelled by the server", "cancelled", error_type="server_error")
    return None


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _Completion:
    """One accepted request: its engine queue, and what the answer needs (ids, image sizes)."""

    def __init__(self, runner: EngineRunner, settings: ServeSettings, chat: ChatCompletionRequest,
                 request_id: str, queue: asyncio.Queue[TokenEvent], image_sizes: list[tuple[int, int]],
                 state: dict[str, Any]) -> None:
        self.state = state  # the request's scope state: the access gate reads "usage" from it
        self.runner = runner
        self.settings = settings
        self.chat = chat
        self.request_id = request_id
        self.completion_id = f"chatcmpl-{request_id}"
        self.created = int(time.time())
        self.queue = queue
        self.image_sizes = image_sizes
        self.model = chat.model or settings.served_model_name  # the base model's name, or an adapter's

    def release(self) -> None:
        self.runner.cancel(self.request_id)  # a no-op once the request finished

    async def _next_events(self) -> list[TokenEvent]:
        """The next event and whatever else is already queued (one SSE write instead of many)."""
        events = [await self.queue.get()]
        while not events[-1].finished and not self.queue.empty():
            events.append(self.queue.get_nowait())
        return events

    async def answer(self, receive: Receive) -> Response:
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            pieces: list[str] = []
            while True:
                getter = asyncio.ensure_future(self._next_events())
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:  # the client left: free the slot now
                    getter.cancel()
                    self.release()
                    return Response(status_code=499)
                events = getter.result()
                pieces += [event.text for event in events]
                if events[-1].finished:
                    break
        finally:
            watcher.cancel()
            self.release()
        final = events[-1]
        error = _finish_error(final)
        if error is not None:
            return JSONResponse(error.body(), status_code=error.status)
        self.state["usage"] = (final.prompt_tokens, final.completion_tokens)
        text = "".join(pieces)
        body = completion_body(self.completion_id, self.model, text, final.finish_reason or "stop",
                               grounding_entries(text, self.image_sizes), final.prompt_tokens,
                               final.completion_tokens, created=self.created)
        return JSONResponse(body)

    async def stream(self) -> AsyncIterator[str]:
        model = self.model
        try:
            yield _sse(chunk_body(self.completion_id, model, self.created, {"role": "assistant", "content": ""}))
            pieces: list[str] = []
            while True:
                events = await self._next_events()
                text = "".join(event.text for event in events)
                if text:
                    pieces.append(text)
                    yield _sse(chunk_body(self.completion_id, model, self.created, {"content": text}))
                if events[-1].finished:
                    break
            final = events[-1]
            error = _finish_error(final)
            if error is not None:
                yield _sse(error.body())
            else:
                self.state["usage"] = (final.prompt_tokens, final.completion_tokens)
                delta = {"grounding": grounding_entries("".join(pieces), self.image_sizes)}
                yield _sse(chunk_body(self.completion_id, model, self.created, delta, final.finish_reason or "stop"))
                if self.chat.stream_options is not None and self.chat.stream_options.include_usage:
                    yield _sse(usage_chunk_body(self.completion_id, model, self.created, final.prompt_tokens,
                                                final.completion_tokens))
            yield _sse("[DONE]")
        finally:
            self.release()


def create_app(runner: EngineRunner, settings: ServeSettings, manage_runner: bool = True) -> FastAPI:
    """The ASGI app; with `manage_runner`, the engine thread starts and stops with the app."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Bounded, so that many concurrent uploads cannot each hold a decoded image in memory at once.
        app.state.preprocess_limiter = anyio.CapacityLimiter(settings.preprocess_workers)
        if manage_runner:
            runner.start()
        try:
            yield
        finally:
            if manage_runner:
                runner.stop()

    app = FastAPI(title="dsvl2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _add_middleware(app, runner, settings)
    started_at = int(time.time())
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    _add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico")
    async def favicon() -> FileResponse:
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    # The page's own files (example images, icon); the listing is fixed at start, so no path can leave the folder.
    static_files = {path.name: path for path in STATIC_DIR.iterdir() if path.suffix in (".png", ".svg")}

    @app.get("/static/{name}")
    async def static_file(name: str) -> FileResponse:
        if name not in static_files:
            raise APIError(404, f"no such file: {name[:80]}", "not_found")
        return FileResponse(static_files[name], headers={"Cache-Control": "max-age=3600"})

    @app.get("/health")
    async def health() -> JSONResponse:
        if not runner.is_alive():
            return JSONResponse({"status": "error", "message": "the engine thread is not running"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(runner.metrics.render(), media_type=CONTENT_TYPE)

    def model_card(model_id: str) -> dict[str, Any]:
        # image_tag_position tells a client whether this model reads a question's images before the text
        # ("before") or after it ("after"); the web page orders a message's parts by it.
        card = {"id": model_id, "object": "model", "created": started_at, "owned_by": "dsvl2",
                "image_tag_position": runner.engine.processor.config.image_tag_position}
        if model_id != settings.served_model_name:  # an adapter over the base model
            card["parent"] = settings.served_model_name
        return card

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card(name) for name in _served_names(runner, settings)]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        if model_id not in _served_names(runner, settings):
            raise _unknown_model(model_id, runner, settings)
        return JSONResponse(model_card(model_id))

    @app.post(CHAT_PATH)
    async def chat_completions(request: HTTPRequest) -> Response:
        chat = parse_request(_decode_json(await _read_body(request, settings.max_body_bytes)))
        if chat.model is not None and chat.model not in _served_names(runner, settings):
            raise _unknown_model(chat.model, runner, settings)
        state = request.scope.setdefault("state", {})
        if settings.log_prompts:
            state["prompt"] = prompt_summary(chat.messages)
        completion = await _accept(runner, settings, chat, app.state.preprocess_limiter, state)
        if chat.stream:
            return _EngineStreamResponse(completion.stream(), completion.release)
        return await completion.answer(request.receive)

    return app


def _add_middleware(app: FastAPI, runner: EngineRunner, settings: ServeSettings) -> None:
    """Outermost first: CORS (so that preflights and refusals carry its headers), counting, the access gate."""
    limiter = KeyLimiter(settings.key_limits) if settings.key_limits.active else None
    runner.metrics.set_key_limits(settings.key_limits.max_concurrent, settings.key_limits.per_minute)
    app.add_middleware(AccessGate, keys=settings.api_keys, limiter=limiter, metrics=runner.metrics)
    app.add_middleware(_CountResponses, count=runner.metrics.count_response)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])


def _served_names(runner: EngineRunner, settings: ServeSettings) -> list[str]:
    """The model ids a request may name: the base model's, then each loaded adapter's."""
    return [settings.served_model_name, *getattr(runner.engine, "adapter_names", ())]


def _adapter(chat: ChatCompletionRequest, settings: ServeSettings) -> str | None:
    """The adapter a request's model field names (None: the base model, named or not)."""
    return None if chat.model in (None, settings.served_model_name) else chat.model


def _unknown_model(model: str, runner: EngineRunner, settings: ServeSettings) -> APIError:
    served = ", ".join(repr(name) for name in _served_names(runner, settings))
    return APIError(404, f"the model {model[:200]!r} does not exist; this server serves {served}",
                    "model_not_found", param="model")


def _prepare_and_submit(runner: EngineRunner, settings: ServeSettings, conversation: list[dict[str, str]],
                        sources: list, sampling: SamplingParams, loop: asyncio.AbstractEventLoop,
                        adapter: str | None = None) -> tuple[str, asyncio.Queue[TokenEvent], list[tuple[int, int]]]:
    """Decode the images and queue the request (in a worker thread: both take CPU time)."""
    pictures = load_images(sources, settings.max_image_pixels)
    request_id = uuid.uuid4().hex
    engine_request = EngineRequest(conversation=conversation, images=pictures, sampling=sampling,
                                   request_id=request_id, adapter=adapter)
    queue = runner.submit(engine_request, loop)
    return request_id, queue, [(picture.width, picture.height) for picture in pictures]


async def _accept(runner: EngineRunner, settings: ServeSettings, chat: ChatCompletionRequest,
                  limiter: anyio.CapacityLimiter, state: dict[str, Any]) -> _Completion:
    """Convert, decode and submit a request; every refusal is an APIError with its status."""
    conversation, sources = to_conversation(chat.messages, settings.allow_local_files, settings.max_images)
    sampling = _sampling(chat, settings)
    work = functools.partial(_prepare_and_submit, runner, settings, conversation, sources, sampling,
                             asyncio.get_running_loop(), _adapter(chat, settings))
    try:
        request_id, queue, image_sizes = await anyio.to_thread.run_sync(work, limiter=limiter)
    except QueueFullError as exc:
        # A slot frees as soon as any answer ends: a second is a fair first wait for a client's back-off.
        raise APIError(429, f"{exc}; retry later", "queue_full", error_type="rate_limit_error",
                       headers={"Retry-After": "1"}) from None
    except RunnerStoppedError as exc:
        raise APIError(503, str(exc), "unavailable", error_type="server_error") from None
    except InputError as exc:
        raise _input_error(exc) from None
    return _Completion(runner, settings, chat, request_id, queue, image_sizes, state)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(_: HTTPRequest, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error", "internal_error"),
                            status_code=500)
