"""The engine thread: one thread runs `engine.step()` while there is work and hands each TokenEvent to
the asyncio queue of the request it belongs to.

The engine is single-threaded. Requests are submitted from worker threads (validation decodes and
tiles images, too slow for the event loop); cancellations are queued here and applied by the engine
thread between steps, so the event loop never waits for a step to end.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from dsvl2.engine.generate import Request, TokenEvent
from dsvl2.serve.metrics import ServerMetrics

logger = logging.getLogger("dsvl2.serve")


class QueueFullError(Exception):
    """More requests are pending than the server accepts; the client should retry later (429)."""


class RunnerStoppedError(Exception):
    """The server is shutting down."""


@dataclass
class _Listener:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenEvent]
    accepted_at: float = field(default_factory=time.perf_counter)
    saw_token: bool = False


class EngineRunner:
    """Owns the engine, its thread, and the per-request event queues."""

    def __init__(self, engine, *, max_pending: int = 64, metrics: ServerMetrics | None = None,
                 error_backoff_s: float = 0.05) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.engine = engine
        self.max_pending = max_pending
        self.metrics = metrics or ServerMetrics()
        self.metrics.watch("dsvl2_queue_length", "Requests waiting for a batch slot.", lambda: engine.num_waiting)
        self.metrics.watch("dsvl2_running_requests", "Requests being generated.", lambda: engine.num_running)
        self.metrics.watch("dsvl2_pending_requests", "Requests accepted by the server and not finished.",
                           lambda: self.num_pending)
        self.error_backoff_s = error_backoff_s
        self._cond = threading.Condition()
        self._listeners: dict[str, _Listener] = {}
        self._cancels: list[str] = []
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dsvl2-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread after its current step; pending requests end with an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._fail_all("the server is shutting down")

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_pending(self) -> int:
        """Requests accepted and not yet finished (waiting or running)."""
        with self._cond:
            return len(self._listeners)

    # ------------------------------------------------------------------ requests

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> asyncio.Queue[TokenEvent]:
        """Validate and queue `request` (blocking: call it from a worker thread, not the event loop).

        Raises QueueFullError, RunnerStoppedError, or the engine's InputError for a bad request.
        """
        if not request.request_id:
            raise ValueError("the server assigns request ids before submitting")
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        with self._cond:
            if self._stopping or self._thread is None:
                raise RunnerStoppedError("the engine is not running")
            if len(self._listeners) >= self.max_pending:
                raise QueueFullError(f"the server already has {len(self._listeners)} pending requests "
                                     f"(limit {self.max_pending})")
            # Listening before submitting: the engine thread may emit the first event at once.
            self._listeners[request.request_id] = _Listener(loop, queue)
        try:
            self.engine.submit(request)
        except BaseException:
            with self._cond:
                self._listeners.pop(request.request_id, None)
            raise
        with self._cond:
            self._cond.notify_all()
        return queue

    def cancel(self, request_id: str) -> None:
        """Stop listening at once; the engine frees the slot before its next step. Never blocks."""
        with self._cond:
            if self._listeners.pop(request_id, None) is None:
                return  # already finished
            self._cancels.append(request_id)
            self._cond.notify_all()

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._cancels or self.engine.has_work()):
                    self._cond.wait()
                if self._stopping:
                    return
                cancels, self._cancels = self._cancels, []
            for request_id in cancels:
                self._cancel_in_engine(request_id)
            if not self.engine.has_work():
                continue
            try:
                events = self.engine.step()
            except Exception as exc:  # a failing step must not kill the thread: fail its requests
                logger.exception("engine step failed")
                self.metrics.count_engine_error()
                self._fail_all(f"engine step failed: {type(exc).__name__}: {exc}", cancel_in_engine=True)
                time.sleep(self.error_backoff_s)
                continue
            self._dispatch(events)

    def _cancel_in_engine(self, request_id: str) -> None:
        try:
            self.engine.cancel(request_id)
        except Exception:
            logger.exception("cancelling request %s failed", request_id)

    def _dispatch(self, events: list[TokenEvent]) -> None:
        now = time.perf_counter()
        for event in events:
            with self._cond:
                listener = (self._listeners.pop(event.request_id, None) if event.finished
                            else self._listeners.get(event.request_id))
            if event.finished:
                self.metrics.count_finish(event.finish_reason or "unknown", event.prompt_tokens,
                                          event.completion_tokens)
            if listener is None:
                continue  # cancelled by the client: nobody is listening
            if not listener.saw_token and event.token_id is not None:
                listener.saw_token = True
                self.metrics.observe_ttft(now - listener.accepted_at)
            self._deliver(listener, event)

    @staticmethod
    def _deliver(listener: _Listener, event: TokenEvent) -> None:
        try:
            listener.loop.call_soon_threadsafe(listener.queue.put_nowait, event)
        except RuntimeError:
            pass  # the event loop is closed: the server is gone

    def _fail_all(self, message: str, cancel_in_engine: bool = False) -> None:
        with self._cond:
            failed, self._listeners = self._listeners, {}
        for request_id, listener in failed.items():
            if cancel_in_engine:
                self._cancel_in_engine(request_id)
            self.metrics.count_finish("error", 0, 0)
            self._deliver(listener, TokenEvent(request_id=request_id, text="", token_id=None, finished=True,
                                               finish_reason="error", error=message))
