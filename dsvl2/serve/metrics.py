"""Server metrics, exposed by `prometheus_client` (each server has its own registry, so that several
servers in one process never share counts)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Time to first token spans a tiny CPU model (milliseconds) to a large one under load (tens of seconds).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

__all__ = ["CONTENT_TYPE", "ServerMetrics", "TTFT_BUCKETS"]


class ServerMetrics:
    """Counters updated from the event loop and the engine thread (prometheus_client locks each one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self._responses = Counter("dsvl2_requests", "HTTP responses by path and status code.", ["path", "status"],
                                  registry=registry)
        self._finishes = Counter("dsvl2_request_finish", "Generations by finish reason.", ["reason"],
                                 registry=registry)
        self._prompt_tokens = Counter("dsvl2_prompt_tokens", "Prompt tokens of finished requests, image tokens "
                                      "included.", registry=registry)
        self._completion_tokens = Counter("dsvl2_completion_tokens", "Generated tokens of finished requests.",
                                          registry=registry)
        self._engine_errors = Counter("dsvl2_engine_step_errors", "Engine steps that raised (their requests "
                                      "failed).", registry=registry)
        self._ttft = Histogram("dsvl2_time_to_first_token_seconds", "Seconds from accepting a request to its first "
                               "generated token.", buckets=TTFT_BUCKETS, registry=registry)
        # Per API key, named by its short hash (dsvl2.serve.auth.key_hash), never in clear.
        self._key_responses = Counter("dsvl2_key_requests", "HTTP responses to requests that need a key (all "
                                      "but / and /health) by API key and status code.", ["key", "status"],
                                      registry=registry)
        self._key_limited = Counter("dsvl2_key_rate_limited", "Requests refused with 429 by API key and the limit "
                                    "they exceeded.", ["key", "limit"], registry=registry)
        self._key_tokens = Counter("dsvl2_key_tokens", "Tokens of answered requests by API key and kind (prompt "
                                   "or completion).", ["key", "kind"], registry=registry)
        self._key_running = Gauge("dsvl2_key_running_requests", "Generation requests in progress by API key.",
                                  ["key"], registry=registry)
        self._key_limit = Gauge("dsvl2_key_limit", "The per-key limits: concurrent requests and requests per "
                                "minute (0: no limit).", ["limit"], registry=registry)

    def count_response(self, path: str, status: int) -> None:
        self._responses.labels(path=path, status=str(status)).inc()

    def count_finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self._finishes.labels(reason=reason).inc()
        self._prompt_tokens.inc(prompt_tokens)
        self._completion_tokens.inc(completion_tokens)

    def count_engine_error(self) -> None:
        self._engine_errors.inc()

    def observe_ttft(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def watch(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A gauge whose value `read` gives each time the metrics are collected."""
        Gauge(name, help_text, registry=self.registry).set_function(read)

    def set_key_limits(self, max_concurrent: int | None, per_minute: int | None) -> None:
        self._key_limit.labels(limit="concurrent").set(max_concurrent or 0)
        self._key_limit.labels(limit="per_minute").set(per_minute or 0)

    def count_key_response(self, key: str, status: int) -> None:
        self._key_responses.labels(key=key, status=str(status)).inc()

    def count_key_limited(self, key: str, limit: str) -> None:
        self._key_limited.labels(key=key, limit=limit).inc()

    def count_key_tokens(self, key: str, prompt_tokens: int, completion_tokens: int) -> None:
        self._key_tokens.labels(key=key, kind="prompt").inc(prompt_tokens)
        self._key_tokens.labels(key=key, kind="completion").inc(completion_tokens)

    def key_running(self, key: str, change: int) -> None:
        self._key_running.labels(key=key).inc(change)

    def render(self) -> bytes:
        return generate_latest(self.registry)
